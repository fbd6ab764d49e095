"""Command line: ``python -m genrefocus_core render|demo|deblur|bokeh|refocus|build-prompts``.

``render`` refocuses an all-in-focus image with a depth/disparity file; ``demo`` renders the
built-in synthetic scene (no input files or weights needed) to show the classical renderer.
``deblur``, ``bokeh`` and ``refocus`` run the generative Genfocus pipeline (FLUX + LoRAs, local
files only; see :mod:`genrefocus_core.cli_generative`). ``build-prompts`` writes the cached prompt
embeddings once from local T5/CLIP folders (:mod:`genrefocus_core.text_encoders`).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

from .aperture import APERTURE_SHAPES, Aperture
from .cli_generative import GENERATIVE_COMMANDS, add_generative_commands, run_generative
from .errors import GenRefocusError

__all__ = ["main"]

logger = logging.getLogger("genrefocus_core.cli")


def _add_render_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--k", type=float, default=None,
                   help="blur strength K: CoC radius (px) = K * (disparity - focus disparity). "
                        "Default 20 for metric depth, 40 for relative maps")
    p.add_argument("--mode", choices=("physical", "bokehme"), default="physical",
                   help="physical: occlusion-aware layered renderer (default); bokehme: BokehMe parity")
    p.add_argument("--gamma", type=float, default=None,
                   help="linearisation power in [1, 5] (default 2.2; 4 in bokehme mode, as BokehMe's demo)")
    p.add_argument("--highlight", action="store_true", help="restore clipped highlights before blurring")
    p.add_argument("--aperture", choices=APERTURE_SHAPES, default="disc", help="aperture shape")
    p.add_argument("--blades", type=int, default=6, help="blades of a polygon aperture (3-16)")
    p.add_argument("--rotation", type=float, default=0.0, help="aperture rotation in degrees (CCW)")
    p.add_argument("--roundness", type=float, default=0.0, help="blade curvature 0 (straight) .. 1 (circle)")
    p.add_argument("--aperture-image", type=Path, default=None, help="image of the aperture (white = open)")
    p.add_argument("--bits", type=int, choices=(8, 16), default=8, help="PNG bit depth of the output")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")


def _aperture(args: argparse.Namespace) -> Aperture:
    image = None
    if args.aperture == "image":
        if args.aperture_image is None:
            raise GenRefocusError("--aperture image needs --aperture-image FILE")
        from .aperture import aperture_from_image
        from .imageio import load_image

        image = aperture_from_image(load_image(args.aperture_image)[0].permute(1, 2, 0))
    return Aperture(shape=args.aperture, blades=args.blades, rotation_deg=args.rotation,
                    roundness=args.roundness, image=image)


def _render(args: argparse.Namespace) -> int:
    from .defocus import (
        focus_disparity_center,
        focus_disparity_from_mask,
        focus_disparity_from_point,
        resize_like,
    )
    from .depth import depth_map_from_image
    from .imageio import load_depth_file, load_image, load_mask, save_image
    from .renderer import render_bokeh

    image = load_image(args.image)
    h, w = image.shape[-2:]
    raw = load_depth_file(args.depth)
    if args.depth_kind == "bokehme_16bit":
        from ._render_bokehme import bokehme_disparity

        disparity = bokehme_disparity(raw)
        metric = False
    else:
        scale = args.metric_scale
        if args.depth_kind != "metric_depth" and raw.max() > 1.0:
            raw = raw / (65535.0 if raw.max() > 255.0 else 255.0)
        dm = depth_map_from_image(raw, args.depth_kind, invert=args.invert, metric_scale=scale)
        disparity, metric = dm.disparity, dm.metric
    if disparity.shape[-2:] != (h, w):
        logger.info("resizing the depth map from %dx%d to the image's %dx%d (bilinear, as the official CLI)",
                    disparity.shape[-1], disparity.shape[-2], w, h)
        disparity = resize_like(disparity, (h, w))
    if args.focus_disparity is not None:
        fd = float(args.focus_disparity)
    elif args.focus_point is not None:
        fd = float(focus_disparity_from_point(disparity, *args.focus_point, image_size=(w, h))[0])
    elif args.focus_mask is not None:
        fd = float(focus_disparity_from_mask(disparity, load_mask(args.focus_mask))[0])
    else:
        fd = float(focus_disparity_center(disparity)[0])
    k = args.k if args.k is not None else (20.0 if metric else 40.0)
    gamma = args.gamma if args.gamma is not None else (4.0 if args.mode == "bokehme" else 2.2)
    dev = torch.device(args.device)
    t0 = time.perf_counter()
    out = render_bokeh(image.to(dev), disparity.to(dev), k=k, disp_focus=fd, gamma=gamma,
                       aperture=_aperture(args), mode=args.mode, highlight=args.highlight)
    logger.info("rendered %dx%d, mode %s, K=%g, focus disparity %.4g %s in %.2f s", w, h, args.mode, k, fd,
                "1/m" if metric else "(relative)", time.perf_counter() - t0)
    path = save_image(args.output, out.cpu(), bits=args.bits)
    logger.info("wrote %s", path)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .defocus import coc_preview, disparity_preview, focus_disparity_from_point, signed_coc
    from .imageio import save_image
    from .renderer import render_bokeh
    from .scenes import demo_scene

    out_dir = Path(args.output)
    image, disparity, (fx, fy) = demo_scene(args.height, args.width)
    fd = float(focus_disparity_from_point(disparity, fx, fy)[0])
    k = args.k if args.k is not None else 40.0
    save_image(out_dir / "demo_input.png", image)
    save_image(out_dir / "demo_disparity.png", disparity_preview(disparity))
    save_image(out_dir / "demo_coc.png", coc_preview(signed_coc(disparity, fd, k)))
    aperture = _aperture(args)
    modes = ("physical", "bokehme") if args.mode_all else (args.mode,)
    for mode in modes:
        gamma = args.gamma if args.gamma is not None else (4.0 if mode == "bokehme" else 2.2)
        ap = aperture if mode == "physical" or aperture.shape in ("disc", "polygon") else None
        t0 = time.perf_counter()
        out = render_bokeh(image, disparity, k=k, disp_focus=fd, gamma=gamma, aperture=ap, mode=mode,
                           highlight=args.highlight)
        dt = time.perf_counter() - t0
        path = save_image(out_dir / f"demo_bokeh_{mode}.png", out, bits=args.bits)
        logger.info("%s: %dx%d, K=%g, focus on the ball (disparity %.3f): %.2f s -> %s", mode,
                    args.width, args.height, k, fd, dt, path)
    return 0


def _build_prompts(args: argparse.Namespace) -> int:
    from .text_encoders import build_prompt_cache

    t5, clip = args.t5 or args.flux, args.clip or args.flux
    if t5 is None or clip is None:
        raise GenRefocusError("build-prompts needs --flux DIR, or both --t5 DIR and --clip DIR")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    build_prompt_cache(t5, clip, args.output, device=args.device, dtype=dtype)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m genrefocus_core``."""
    parser = argparse.ArgumentParser(prog="python -m genrefocus_core", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    r = sub.add_parser("render", help="refocus an all-in-focus image with a depth map (classical renderer)")
    r.add_argument("image", type=Path, help="all-in-focus image (PNG/JPEG)")
    r.add_argument("--depth", type=Path, required=True, help="depth/disparity file: .npy, 8- or 16-bit PNG")
    r.add_argument("--depth-kind", default="metric_depth",
                   choices=("metric_depth", "relative_disparity", "relative_depth", "bokehme_16bit"),
                   help="how to read --depth: metres (.npy), near=bright, near=dark, or BokehMe's 16-bit "
                        "disparity PNG read as its demo does (8-bit, min-max)")
    r.add_argument("--metric-scale", type=float, default=1.0, help="metres per unit for metric_depth files")
    r.add_argument("--invert", action="store_true", help="flip near/far of a relative map")
    focus = r.add_mutually_exclusive_group()
    focus.add_argument("--focus-point", type=float, nargs=2, metavar=("X", "Y"),
                       help="focus on the pixel (X, Y) of the input image")
    focus.add_argument("--focus-mask", type=Path, help="focus on the median disparity inside this mask")
    focus.add_argument("--focus-disparity", type=float, help="focus disparity directly")
    r.add_argument("-o", "--output", type=Path, required=True, help="output PNG")
    _add_render_options(r)

    d = sub.add_parser("demo", help="render the built-in synthetic scene (no files needed)")
    d.add_argument("-o", "--output", type=Path, default=Path("genrefocus_demo"), help="output folder")
    d.add_argument("--width", type=int, default=640)
    d.add_argument("--height", type=int, default=400)
    d.add_argument("--mode-all", action=argparse.BooleanOptionalAction, default=True,
                   help="render both modes (default) or only --mode")
    _add_render_options(d)
    add_generative_commands(sub)

    b = sub.add_parser("build-prompts", help="write the cached prompt embeddings from local T5/CLIP folders")
    b.add_argument("--flux", type=Path, default=None,
                   help="FLUX.1-dev diffusers folder (text_encoder/, tokenizer/, text_encoder_2/, "
                        "tokenizer_2/)")
    b.add_argument("--t5", type=Path, default=None,
                   help="T5-XXL folder (model + tokenizer); overrides --flux")
    b.add_argument("--clip", type=Path, default=None,
                   help="CLIP-L folder (model + tokenizer); overrides --flux")
    b.add_argument("-o", "--output", type=Path, required=True,
                   help="output .safetensors, e.g. models/genrefocus/genfocus_prompts.safetensors")
    b.add_argument("--device", default="cpu", help="torch device for the encoders (default cpu)")
    b.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="encoder and stored dtype (official: bf16 on CUDA, fp32 on the CPU)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code (2 for bad input, with a one-line message)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command in GENERATIVE_COMMANDS:
            return run_generative(args)
        if args.command == "build-prompts":
            return _build_prompts(args)
        return _render(args) if args.command == "render" else _demo(args)
    except GenRefocusError as e:
        logger.error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
