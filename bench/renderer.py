"""Classical renderer speed: mode "physical", mode "bokehme" and the brute-force scatter, side by side.

Usage::

    python bench/renderer.py [--quick] [--threads 2] [--max-scatter-seconds 120] [--repeat 3]

Scene: BokehMe's example 21 from ``../shared/data/bokehme-examples`` (a synthetic scene when that
folder is absent), resized to about 1 MP and 4 MP (image: area average when shrinking, bilinear
when enlarging; disparity: bilinear) with ``K`` unchanged, as in ``docs/renderer.md`` §7, so the
radii in pixels are the same at every size. ``d_f = 90/255``, ``gamma = 4``, no highlight boost.
For each size and ``K`` in {5, 20, 60} the table gives the best of ``--repeat`` runs of each method,
the speed-ups over the brute-force scatter and the PSNR of "bokehme" against the scatter (equal
output check). A scatter run predicted to take longer than ``--max-scatter-seconds`` is not run;
its time is estimated from the measured ns per tap of the same ``K`` at the smallest size
(taps = sum over pixels of ``(2 floor(r) + 3)**2``) and marked ``~est``. Last, one 3840x2160 render
of "physical" with a largest CoC radius of about 100 px (best of two or more: the first includes
one-off setup). ``--quick``: 1 MP only, one run each. From 2 MP on every method runs inside
``genrefocus_core._malloc.render_memory`` (``render_bokeh`` does that itself; the scatter is
wrapped here), so no method pays for page faults the others do not.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from genrefocus_core._malloc import render_memory  # noqa: E402
from genrefocus_core._render_bokehme import bokehme_disparity  # noqa: E402
from genrefocus_core.renderer import render_bokeh  # noqa: E402
from genrefocus_core.renderer_reference import scatter_reference  # noqa: E402

SCENE = REPO.parent / "shared" / "data" / "bokehme-examples"
D_F = 90.0 / 255.0
GAMMA = 4.0


def out(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def load_scene() -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(1,3,H,W)`` image in [0,1] and ``(1,1,H,W)`` disparity in [0,1] (BokehMe's 8-bit read)."""
    if SCENE.is_dir():
        import numpy as np
        from PIL import Image

        rgb = np.asarray(Image.open(SCENE / "21.jpg").convert("RGB"))
        raw = np.asarray(Image.open(SCENE / "21.png")).astype(np.float32)
        img = torch.from_numpy(rgb.astype(np.float32) / 255.0).permute(2, 0, 1)[None].contiguous()
        disp = bokehme_disparity(torch.from_numpy(raw)[None, None])
        return img, disp, "BokehMe scene 21"
    g = torch.Generator().manual_seed(0)
    h, w = 1350, 1080
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    disp = (0.15 + 0.7 * yy + 0.15 * torch.sin(9 * xx)).clamp(0, 1)
    disp = torch.where((xx - 0.5) ** 2 + (yy - 0.45) ** 2 < 0.04, torch.full_like(disp, 0.36), disp)
    img = torch.rand(1, 3, h // 8, w // 8, generator=g)
    img = F.interpolate(img, size=(h, w), mode="bilinear", align_corners=False)
    img = torch.where(torch.rand(1, 1, h, w, generator=g) > 0.998, torch.ones_like(img), img)  # highlights
    return img.clamp(0, 1), ((disp - disp.min()) / (disp.max() - disp.min()))[None, None], "synthetic scene"


def resize(img: torch.Tensor, disp: torch.Tensor, mp: float) -> tuple[torch.Tensor, torch.Tensor]:
    h, w = img.shape[-2:]
    s = math.sqrt(mp * 1e6 / (h * w))
    size = (round(h * s), round(w * s))
    mode = "area" if s < 1 else "bilinear"
    kw = {} if mode == "area" else {"align_corners": False}
    im = F.interpolate(img, size=size, mode=mode, **kw).clamp(0, 1)
    dp = F.interpolate(disp, size=size, mode="bilinear", align_corners=False).clamp(0, 1)
    return im.contiguous(), dp.contiguous()


def best_time(fn: Callable[[], torch.Tensor], repeat: int) -> tuple[float, torch.Tensor]:
    best, res = math.inf, None
    for _ in range(repeat):
        t0 = time.perf_counter()
        res = fn()
        best = min(best, time.perf_counter() - t0)
    return best, res


def taps(disp: torch.Tensor, k: float) -> float:
    """Brute-force taps: sum over pixels of (2 floor(r) + 3)^2."""
    r = (k * (disp.double() - D_F)).abs()
    return float(((2 * torch.floor(r) + 3) ** 2).sum())


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float((a.double() - b.double()).square().mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def fmt_s(x: float | None, est: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"~{x:.1f} est" if est else f"{x:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 MP only, one run per method")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    ap.add_argument("--max-scatter-seconds", type=float, default=120.0,
                    help="estimate instead of running a brute-force scatter predicted to take longer")
    ap.add_argument("--repeat", type=int, default=3, help="runs per method (best is reported)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    repeat = 1 if args.quick else args.repeat
    sizes = [1.0] if args.quick else [1.0, 4.0]
    ks = [5.0, 20.0, 60.0]

    img0, disp0, name = load_scene()
    out(f"# Classical renderer benchmark: {name}, d_f = 90/255, gamma = {GAMMA:g}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, best of {repeat}")
    out()
    head = ("| size | H x W | K | r_max px | physical s | bokehme s | scatter s | scatter/bokehme | "
            "scatter/physical | PSNR bokehme vs scatter dB |")
    out(head)
    out("|" + "---|" * (head.count("|") - 1))
    ns_per_tap: dict[float, float] = {}
    last_ns: float | None = None
    physical_ok = True
    for mp in sizes:
        img, disp = resize(img0, disp0, mp)
        h, w = img.shape[-2:]
        for k in ks:
            rmax = k * float((disp - D_F).abs().max())
            t_phys = None
            if physical_ok:
                try:
                    t_phys, _ = best_time(partial(render_bokeh, img, disp, k=k, disp_focus=D_F, gamma=GAMMA,
                                                  mode="physical"), repeat)
                except Exception as e:  # not written yet (NotImplementedError, ImportError) or broken
                    out(f"(physical mode unavailable: {type(e).__name__}: {e})")
                    physical_ok = False
            t_bm, res_bm = best_time(partial(render_bokeh, img, disp, k=k, disp_focus=D_F, gamma=GAMMA,
                                             mode="bokehme"), repeat)
            n_taps = taps(disp, k)
            rate = ns_per_tap.get(k, last_ns)
            predicted = None if rate is None else rate * n_taps * 1e-9
            est = predicted is not None and predicted > args.max_scatter_seconds
            if est:
                t_sc, quality = predicted, "n/a"
            else:
                # one run when it is long anyway (minutes at 4 MP): the noise is small against it
                reps = 1 if (predicted or 0.0) > 10.0 or mp > sizes[0] else repeat
                with render_memory(img):  # the allocator setting render_bokeh gives the other two
                    t_sc, res_sc = best_time(partial(scatter_reference, img, disp, k=k, disp_focus=D_F,
                                                     gamma=GAMMA), reps)
                last_ns = t_sc / n_taps * 1e9
                ns_per_tap.setdefault(k, last_ns)
                quality = f"{psnr(res_bm, res_sc):.1f}"
            r_bm = f"{t_sc / t_bm:.1f}x" + (" ~est" if est else "")
            r_ph = "n/a" if t_phys is None else f"{t_sc / t_phys:.1f}x" + (" ~est" if est else "")
            out(f"| ~{mp:g} MP | {h} x {w} | {k:g} | {rmax:.1f} | {fmt_s(t_phys)} | {fmt_s(t_bm)} | "
                f"{fmt_s(t_sc, est)} | {r_bm} | {r_ph} | {quality} |")

    out()
    img, disp = img0, disp0
    img4k = F.interpolate(img, size=(2160, 3840), mode="bilinear", align_corners=False).clamp(0, 1)
    disp4k = F.interpolate(disp, size=(2160, 3840), mode="bilinear", align_corners=False).clamp(0, 1)
    k4k = 100.0 / float((disp4k - D_F).abs().max())
    if physical_ok:
        try:
            t4k, _ = best_time(partial(render_bokeh, img4k, disp4k, k=k4k, disp_focus=D_F, gamma=GAMMA,
                                       mode="physical"), max(2, repeat))
            out(f"physical, 3840 x 2160, K = {k4k:.1f} (max CoC radius 100 px): {t4k:.2f} s "
                f"(best of {max(2, repeat)}; the first run includes one-off kernel and FFT-plan setup)")
        except Exception as e:  # see above
            out(f"physical, 3840 x 2160: n/a ({type(e).__name__}: {e})")
    else:
        out("physical, 3840 x 2160: n/a")


if __name__ == "__main__":
    main()
