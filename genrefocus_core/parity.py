"""Parity runner against the official Genfocus fixtures (``../shared/fixtures/genfocus-parity``).

``python -m genrefocus_core.parity CASE_DIR --fixture FIXTURE_DIR --out OUT_DIR [--level A|B]``
runs one case's ``meta.json`` arguments through our code, writes the same files as the fixture
(``*.npy`` with the fixture's names, ``cond*_input.png``, ``output.png``) and prints the max-abs
difference of every tensor the two share, plus a PASS/FAIL line per tolerance of the fixture
README:

* Level A: transformer + sampler only, injecting the fixture's initial noise and condition tokens
  (ours: ids, sigmas, prompt embeddings, LoRA loading, the multi-stream forward, tiling, decode);
* Level B: end to end from ``inputs/``: resize, D_def map, VAE encode with the official RNG
  recipe, sampling, decode.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .conditions import ConditionTokens, load_vae
from .errors import GenRefocusError, GenRefocusInputError
from .genpipe import (
    BOKEH_GUIDANCE,
    DEBLUR_GUIDANCE,
    GenerationOptions,
    GenfocusModels,
    bokeh,
    deblur,
    generate_from_tokens,
    resize_for_generation,
)
from .lora_loading import load_lora, load_transformer
from .prompts import load_prompt_embeddings
from .sampler import FlowShift

__all__ = ["TOLERANCES", "ParityReport", "main", "run_case"]

logger = logging.getLogger(__name__)

_SCRIPTS = {
    "Inference_deblurNet": ("deblurNet.safetensors", "deblurring", "deblur"),
    "Inference_deblurNet_with_pre_deblur": ("deblurNet_with_pre_deblur.safetensors", "deblurring", "deblur"),
    "Inference_bokehNet": ("bokehNet.safetensors", "bokeh", "bokeh"),
}

#: README tolerances: level → list of (tensor name, max abs); ``png`` entries are checked separately.
TOLERANCES: dict[str, list[tuple[str, float]]] = {
    "A": [
        ("scheduler_sigmas", 1e-6),
        ("step_timesteps", 1e-6),
        ("step0_model_output", 1e-4),
        ("step_latents", 2e-4),
        ("vae_decode_input", 2e-4),
    ],
    "B": [
        ("scheduler_sigmas", 1e-6),
        ("step_timesteps", 1e-6),
        ("cond0_tokens", 2e-3),
        ("cond1_tokens", 2e-3),
        ("vae_decode_input", 1e-3),
        ("decoded_image", 1e-3),
        ("cond1_input_ch0", 1e-6),
        ("cond0_input", 1.0),
        ("cond1_input", 1.0),
    ],
}
#: Level B output PNG: max level difference and fraction of differing pixels.
PNG_MAX_LEVELS = 2
PNG_MAX_FRACTION = 1e-3


@dataclass
class ParityReport:
    """Result of :func:`run_case`.

    Attributes:
        case: case name.
        level: ``"A"`` or ``"B"``.
        diffs: tensor name → max abs difference (PNG-derived entries in 8-bit levels).
        png_max_levels: max |difference| of ``output.png`` in levels.
        png_fraction: fraction of ``output.png`` pixel values that differ.
        failures: human-readable tolerance violations (empty = pass).
    """

    case: str
    level: str
    diffs: dict[str, float] = field(default_factory=dict)
    png_max_levels: int = 0
    png_fraction: float = 0.0
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Whether every README tolerance of this level holds."""
        return not self.failures


def _argv(meta: dict, fixture: Path) -> dict[str, str | bool]:
    args: dict[str, str | bool] = {}
    argv = [a.replace("{in}", str(fixture / "inputs")) for a in meta["argv"]]
    i = 0
    while i < len(argv):
        key = argv[i].lstrip("-")
        if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            args[key] = argv[i + 1]
            i += 2
        else:
            args[key] = True
            i += 1
    return args


def _load_rgb(path: str | Path) -> Tensor:
    from PIL import Image

    arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)[None].contiguous()


def _png(path: Path, image: Tensor) -> None:
    from PIL import Image

    arr = np.round(image[0].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0).astype(
        np.uint8
    )
    Image.fromarray(arr, "RGB").save(path)


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def _models(fixture: Path, lora_file: str, adapter: str) -> GenfocusModels:
    transformer = load_transformer(fixture / "model" / "transformer")
    load_lora(transformer, fixture / "lora" / lora_file, adapter)
    vae = load_vae(fixture / "model" / "vae")
    cfg = transformer.config
    prompts = load_prompt_embeddings(
        fixture / "inputs" / "prompt_embeds.safetensors",
        joint_attention_dim=cfg.joint_attention_dim,
        pooled_projection_dim=cfg.pooled_projection_dim,
    )
    sched = json.loads((fixture / "model" / "scheduler" / "scheduler_config.json").read_text())
    return GenfocusModels(transformer, vae, prompts, FlowShift.from_scheduler_config(sched))


def _defocus_map(args: dict, aif: Tensor, original_size: tuple[int, int]) -> Tensor:
    from .defocus import (
        defocus_condition_map,
        disparity_from_depth,
        focus_disparity_center,
        focus_disparity_from_mask,
        focus_disparity_from_point,
        resize_like,
        signed_coc,
    )
    from .imageio import load_depth_file, load_mask

    h, w = aif.shape[-2:]
    if "depth" not in args:
        raise GenRefocusInputError("the parity runner needs --depth (a .npy file); Depth Pro is not run here")
    depth = load_depth_file(str(args["depth"]))
    # parity: Inference_bokehNet.py resizes the .npy depth (cv2 INTER_LINEAR) to (W, H), then 1/depth
    disp = disparity_from_depth(resize_like(depth, (int(h), int(w)), mode="bilinear"))
    if "mask" in args:
        mask = load_mask(str(args["mask"]))
        fd = focus_disparity_from_mask(disp, mask, threshold=0.0, empty="all")
    elif "point" in args:
        px, py = (float(v) for v in str(args["point"]).split(","))
        # parity: the point is scaled from the original image size, ignoring the --long_side crop
        fd = focus_disparity_from_point(disp, px, py, image_size=original_size)
    else:
        fd = focus_disparity_center(disp)
    k = float(args.get("k_value", 15.0))
    return defocus_condition_map(signed_coc(disp, fd, k))


def _write_and_compare(
    report: ParityReport,
    case_dir: Path,
    out: Path | None,
    trace: dict[str, Any],
    image: Tensor,
    preprocess: list[bool],
) -> None:
    arrays: dict[str, np.ndarray] = {}
    for key, val in trace.items():
        if key.startswith("cond") and key.endswith("_input"):
            continue
        arrays[key] = val.detach().float().cpu().numpy() if isinstance(val, Tensor) else np.asarray(val)
    if "step_model_output" in arrays:
        arrays["step0_model_output"] = arrays["step_model_output"][0]
        arrays["stepN_model_output"] = arrays["step_model_output"][-1]
    arrays["step_timesteps"] = arrays["step_timesteps"].astype(np.float64)
    pngs: dict[str, Tensor] = {"output.png": image}
    for i, pre in enumerate(preprocess):
        px = trace.get(f"cond{i}_input")
        if px is None:
            continue
        if pre:
            pngs[f"cond{i}_input.png"] = px
        else:
            arrays[f"cond{i}_input_ch0"] = px[0, 0].detach().float().cpu().numpy()
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for name, arr in arrays.items():
            np.save(out / f"{name}.npy", arr)
        for name, img in pngs.items():
            _png(out / name, img)
    for name, arr in arrays.items():
        ref_path = case_dir / f"{name}.npy"
        if not ref_path.is_file():
            continue
        ref = np.load(ref_path)
        if name == "step0_model_output" and ref.ndim == arr.ndim + 1:
            ref = ref[0]
        if ref.shape != arr.shape:
            report.failures.append(f"{name}: shape {arr.shape} != fixture {ref.shape}")
            continue
        report.diffs[name] = float(np.abs(arr.astype(np.float64) - ref.astype(np.float64)).max())
    if (case_dir / "step_model_output.npy").is_file() and "step_model_output" in arrays:
        ref0 = np.load(case_dir / "step_model_output.npy")[0]
        report.diffs["step0_model_output"] = float(np.abs(arrays["step_model_output"][0] - ref0).max())
    if "vae_decode_output" in report.diffs:
        report.diffs["decoded_image"] = report.diffs["vae_decode_output"] / 2.0
    for name, img in pngs.items():
        ref_path = case_dir / name
        if not ref_path.is_file():
            continue
        ours = np.round(img[0].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0).astype(
            np.int16
        )
        ref = _read_png(ref_path)
        if ours.shape != ref.shape:
            report.failures.append(f"{name}: shape {ours.shape} != fixture {ref.shape}")
            continue
        d = np.abs(ours - ref)
        if name == "output.png":
            report.png_max_levels = int(d.max())
            report.png_fraction = float((d > 0).mean())
        else:
            report.diffs[name.removesuffix(".png")] = float(d.max())


def _check(report: ParityReport) -> None:
    for name, tol in TOLERANCES[report.level]:
        if name in report.diffs and not report.diffs[name] <= tol:
            report.failures.append(f"{name}: max abs {report.diffs[name]:.3g} > {tol:g}")
    if report.level == "B":
        if report.png_max_levels > PNG_MAX_LEVELS:
            report.failures.append(
                f"output.png: max |diff| {report.png_max_levels} levels > {PNG_MAX_LEVELS}"
            )
        if report.png_fraction >= PNG_MAX_FRACTION:
            report.failures.append(
                f"output.png: {report.png_fraction:.3%} pixels differ (>= {PNG_MAX_FRACTION:.1%})"
            )


def run_case(
    case_dir: str | Path,
    fixture_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    level: str = "B",
    tile_batch: int = 4,
) -> ParityReport:
    """Run one fixture case through our code and compare with the official tensors.

    Args:
        case_dir: ``cases/<name>`` folder with ``meta.json``.
        fixture_dir: the fixture root (``model/``, ``lora/``, ``inputs/``).
        out_dir: where to write our tensors and PNGs (``None``: nothing written).
        level: ``"A"`` (inject noise and condition tokens) or ``"B"`` (end to end).
        tile_batch: tiles per forward in tiled cases.

    Returns:
        A :class:`ParityReport` (``passed`` tells whether the README tolerances hold).

    Raises:
        GenRefocusInputError: unknown level or script, missing files.
    """
    case_dir, fixture = Path(case_dir), Path(fixture_dir)
    if level not in ("A", "B"):
        raise GenRefocusInputError(f"level must be 'A' or 'B', got {level!r}")
    meta_path = case_dir / "meta.json"
    if not meta_path.is_file():
        raise GenRefocusInputError(f"case_dir must contain meta.json, got {str(case_dir)!r}")
    meta = json.loads(meta_path.read_text())
    script = meta["case"]["script"]
    if script not in _SCRIPTS:
        raise GenRefocusInputError(f"script must be one of {sorted(_SCRIPTS)}, got {script!r}")
    lora_file, adapter, prompt = _SCRIPTS[script]
    call = meta["generate_calls"][0]
    args = _argv(meta, fixture)
    models = _models(fixture, lora_file, adapter)
    options = GenerationOptions(
        steps=int(call["num_inference_steps"]),
        tiling="off" if call.get("NO_TILED_DENOISE") else "auto",
        tile_batch=tile_batch,
    )
    guidance = float(call.get("guidance_scale", DEBLUR_GUIDANCE if prompt == "deblur" else BOKEH_GUIDANCE))
    preprocess = [not c.get("No_preprocess", False) for c in call["conditions"]]
    report = ParityReport(case_dir.name, level)
    trace: dict[str, Any] = {}
    height, width = int(call["height"]), int(call["width"])
    if level == "A":
        noise = torch.from_numpy(np.load(case_dir / "init_latents.npy"))
        conds = []
        for i, c in enumerate(call["conditions"]):
            tok = torch.from_numpy(np.load(case_dir / f"cond{i}_tokens.npy"))
            conds.append(
                ConditionTokens.on_grid(tok, height // 16, width // 16, c["adapter"], c["position_delta"])
            )
        result = generate_from_tokens(
            models,
            noise,
            conds,
            height,
            width,
            prompt=prompt,
            guidance=guidance,
            options=options,
            trace=trace,
        )
    else:
        image, info = resize_for_generation(_load_rgb(str(args["input"])), int(args.get("long_side", 0)))
        if tuple(image.shape[-2:]) != (height, width):
            report.failures.append(f"processed size {tuple(image.shape[-2:])} != official {(height, width)}")
            return report
        if script == "Inference_bokehNet":
            dmap = _defocus_map(args, image, info.original_size)
            result = bokeh(models, image, dmap, adapter=adapter, options=options, trace=trace)
        else:
            pre = _load_rgb(str(args["pre_deblur_input"])) if "pre_deblur_input" in args else None
            result = deblur(
                models,
                image,
                adapter=adapter,
                pre_deblurred=pre,
                pre_deblur_variant=script.endswith("pre_deblur"),
                options=options,
                trace=trace,
            )
    _write_and_compare(
        report, case_dir, Path(out_dir) if out_dir is not None else None, trace, result.image, preprocess
    )
    _check(report)
    return report


def main(argv: list[str] | None = None) -> int:
    """Command-line entry; returns 0 when every tolerance holds, 1 otherwise."""
    p = argparse.ArgumentParser(prog="python -m genrefocus_core.parity", description=__doc__.split("\n\n")[0])
    p.add_argument("case_dir", type=Path, help="fixture case folder (with meta.json)")
    p.add_argument("--fixture", type=Path, required=True, help="fixture root (model/, lora/, inputs/)")
    p.add_argument("--out", type=Path, default=None, help="folder for our tensors and PNGs")
    p.add_argument("--level", choices=("A", "B"), default="B", help="A: inject noise/tokens; B: end to end")
    p.add_argument("--tile-batch", type=int, default=4, help="tiles per forward (tiled cases)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (fixtures: 2)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        rep = run_case(a.case_dir, a.fixture, a.out, level=a.level, tile_batch=a.tile_batch)
    except GenRefocusError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    tols = dict(TOLERANCES[rep.level])
    sys.stdout.write(f"case {rep.case}, level {rep.level}\n")
    for name, d in sorted(rep.diffs.items()):
        tol = tols.get(name)
        sys.stdout.write(
            f"  {name:24s} max abs {d:.3e}" + (f"  (tol {tol:g})" if tol is not None else "") + "\n"
        )
    if rep.level == "B":
        sys.stdout.write(
            f"  output.png               max {rep.png_max_levels} levels, "
            f"{rep.png_fraction:.4%} pixels differ (tol {PNG_MAX_LEVELS} levels, "
            f"< {PNG_MAX_FRACTION:.1%})\n"
        )
    for f in rep.failures:
        sys.stdout.write(f"  FAIL {f}\n")
    sys.stdout.write("PASS\n" if rep.passed else "FAIL\n")
    return 0 if rep.passed else 1


if __name__ == "__main__":
    sys.exit(main())
