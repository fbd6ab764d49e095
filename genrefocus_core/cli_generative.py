"""Command line for the generative pipeline: ``python -m genrefocus_core deblur|bokeh|refocus``.

Every option of the official scripts is accepted, under its official spelling too
(``--input``, ``--output``, ``--k_value``, ``--point x,y``, ``--mask``, ``--depth`` (.npy),
``--steps``, ``--long_side``, ``--disable_tiling``, ``--pre_deblur_input``), so an official command
line runs unchanged once the model paths are given:

    python -m genrefocus_core deblur --input photo.jpg --steps 28 \\
        --transformer models/diffusion_models/flux1-dev.safetensors --vae models/vae/FLUX.1-dev-vae \\
        --prompts models/genrefocus/genfocus_prompts.safetensors \\
        --lora-deblur models/loras/genfocus/deblurNet.safetensors

Differences from the official scripts, all documented switches: K defaults to 20 (the demo's,
§14 #9); depth, masks and points follow the ``--long_side`` crop unless ``--geometry official``;
``--restore-size`` maps the result back to the input size. Nothing is downloaded: the depth model
is a local folder (``--depth-model``), never fetched.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from .errors import GenRefocusInputError

__all__ = ["GENERATIVE_COMMANDS", "add_generative_commands", "run_generative"]

logger = logging.getLogger("genrefocus_core.cli")

#: Subcommands this module adds.
GENERATIVE_COMMANDS = ("deblur", "bokeh", "refocus")

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _add_model_options(p: argparse.ArgumentParser, *, deblur: bool, bokeh: bool) -> None:
    g = p.add_argument_group("models (local files only)")
    g.add_argument("--transformer", type=Path, required=True,
                   help="FLUX.1-dev: a diffusers folder (or pipeline folder) or a single .safetensors file "
                        "(BFL/ComfyUI layout, fp8 allowed)")
    g.add_argument("--transformer-config", type=Path, default=None,
                   help="config.json for a single-file transformer that is not FLUX.1-dev sized")
    g.add_argument("--vae", type=Path, required=True, help="FLUX VAE as a diffusers folder (vae/)")
    g.add_argument("--prompts", type=Path, required=True,
                   help="cached prompt embeddings (.safetensors) of the two fixed Genfocus prompts")
    if deblur:
        g.add_argument("--lora-deblur", type=Path, default=None, help="deblurNet.safetensors")
        g.add_argument("--lora-pre-deblur", type=Path, default=None,
                       help="deblurNet_with_pre_deblur.safetensors (for --pre-deblur, --pre-deblur-variant)")
    if bokeh:
        g.add_argument("--lora-bokeh", type=Path, required=True, help="bokehNet.safetensors")
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    g.add_argument("--dtype", choices=("auto", *_DTYPES), default="auto",
                   help="compute dtype; auto = bf16 on CUDA, fp32 on the CPU (as the official scripts)")


def _add_sampler_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampler")
    g.add_argument("--steps", type=int, default=28, help="denoising steps, 1-100 (default 28)")
    g.add_argument("--long-side", "--long_side", dest="long_side", type=int, default=0,
                   help="resize the longer side to this many px, then centre-crop to multiples of 16 "
                        "(0 = keep the size)")
    g.add_argument("--disable-tiling", "--disable_tiling", dest="disable_tiling", action="store_true",
                   help="never denoise in tiles (official: tiles on from 512 px on both sides)")
    g.add_argument("--tiling", choices=("auto", "on", "off"), default="auto",
                   help="tiled denoising: auto (official rule), on or off")
    g.add_argument("--tile-size", type=int, default=512, help="tile side in px, multiple of 16 (default 512)")
    g.add_argument("--tile-overlap", type=float, default=0.125,
                   help="tile overlap as a fraction of the tile side (default 1/8)")
    g.add_argument("--tile-batch", type=int, default=4, help="tiles per transformer forward (default 4)")
    g.add_argument("--noise", choices=("reference", "seeded"), default="reference",
                   help="reference: the official RNG recipe (seeds 42/1234); seeded: from --seed")
    g.add_argument("--seed", type=int, default=0, help="seed of --noise seeded")
    g.add_argument("--restore-size", action="store_true", help="map the result back to the input size")
    g.add_argument("--geometry", choices=("aligned", "official"), default="aligned",
                   help="aligned: depth/mask/point/pre-deblur follow the --long_side crop; official: "
                        "stretched as the official CLI")


def _add_focus_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("depth and focus")
    g.add_argument("--k", "--k_value", "-k", dest="k", type=float, default=20.0,
                   help="blur strength K (px*m with metric depth); 0 = all in focus. Default 20 (the demo's; "
                        "the official CLI uses 15)")
    depth = g.add_mutually_exclusive_group()
    depth.add_argument("--depth", "-d", type=Path, default=None,
                       help="depth map of the input: .npy in metres (as the official CLI) or a grey PNG; "
                            "--depth or --depth-model is needed unless --k 0")
    depth.add_argument("--depth-model", type=Path, default=None,
                       help="a Depth Pro / Depth Anything V2 folder (transformers format) run on the "
                            "all-in-focus image")
    g.add_argument("--depth-kind", default="metric_depth",
                   choices=("metric_depth", "relative_disparity", "relative_depth"),
                   help="how to read --depth (default metres)")
    g.add_argument("--metric-scale", type=float, default=1.0, help="metres per unit of a metric --depth file")
    focus = g.add_mutually_exclusive_group()
    focus.add_argument("--point", "-p", default=None,
                       help="focus point 'x,y' in px of the ORIGINAL input image (default: the centre)")
    focus.add_argument("--mask", "-m", type=Path, default=None,
                       help="focus on the median disparity inside this mask (white = in focus)")
    g.add_argument("--mask-threshold", type=float, default=0.0,
                   help="mask pixels above this value count (official: 0, any non-black pixel)")


def add_generative_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``deblur``, ``bokeh`` and ``refocus`` to the subcommands of ``python -m genrefocus_core``."""
    d = sub.add_parser("deblur", help="DeblurNet: an all-in-focus image from a blurry photo (FLUX + LoRA)")
    d.add_argument("--input", "-i", type=Path, required=True, help="the blurry photo")
    d.add_argument("--output", "-o", type=Path, default=Path("output_deblur.png"), help="output PNG")
    d.add_argument("--pre-deblur", "--pre_deblur_input", dest="pre_deblur", type=Path, default=None,
                   help="a pre-deblurred version of the input (pre-deblur DeblurNet)")
    d.add_argument("--pre-deblur-variant", action="store_true",
                   help="use the pre-deblur DeblurNet with a black pre-deblur image (official script without "
                        "--pre_deblur_input)")
    _add_model_options(d, deblur=True, bokeh=False)
    _add_sampler_options(d)

    b = sub.add_parser("bokeh", help="BokehNet: refocus an all-in-focus image with a depth map (FLUX + LoRA)")
    b.add_argument("--input", "-i", type=Path, required=True, help="the all-in-focus image")
    b.add_argument("--output", "-o", type=Path, default=Path("output_bokeh.png"), help="output PNG")
    _add_focus_options(b)
    _add_model_options(b, deblur=False, bokeh=True)
    _add_sampler_options(b)

    r = sub.add_parser("refocus", help="the whole Genfocus pipeline: DeblurNet, depth, BokehNet")
    r.add_argument("--input", "-i", type=Path, required=True, help="the photo")
    r.add_argument("--output", "-o", type=Path, default=Path("output_refocus.png"), help="output PNG")
    r.add_argument("--aif-output", type=Path, default=None, help="also save the all-in-focus image here")
    r.add_argument("--pre-deblur", "--pre_deblur_input", dest="pre_deblur", type=Path, default=None,
                   help="a pre-deblurred version of the input (pre-deblur DeblurNet)")
    r.add_argument("--pre-deblur-variant", action="store_true",
                   help="use the pre-deblur DeblurNet with a black pre-deblur image")
    _add_focus_options(r)
    _add_model_options(r, deblur=True, bokeh=True)
    _add_sampler_options(r)


def _options(args: argparse.Namespace):
    from .genpipe import GenerationOptions

    return GenerationOptions(
        steps=args.steps,
        tiling="off" if args.disable_tiling else args.tiling,
        tile_size=args.tile_size,
        tile_batch=args.tile_batch,
        tile_overlap=args.tile_overlap,
        noise=args.noise,
        seed=args.seed,
    )


def _models(args: argparse.Namespace, command: str):
    from .models import load_genfocus_models

    device = torch.device(args.device)
    dtype = _DTYPES.get(args.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    variant = command != "bokeh" and (args.pre_deblur is not None or args.pre_deblur_variant)
    deblur = pre = None
    if command != "bokeh":
        if variant and args.lora_pre_deblur is None:
            raise GenRefocusInputError(
                "--lora-pre-deblur must be given with --pre-deblur / --pre-deblur-variant "
                "(deblurNet_with_pre_deblur.safetensors)"
            )
        if not variant and args.lora_deblur is None:
            raise GenRefocusInputError("--lora-deblur must be given (deblurNet.safetensors)")
        deblur, pre = (None, args.lora_pre_deblur) if variant else (args.lora_deblur, None)
    t0 = time.perf_counter()
    models = load_genfocus_models(
        args.transformer,
        args.vae,
        args.prompts,
        deblur_lora=deblur,
        pre_deblur_lora=pre,
        bokeh_lora=getattr(args, "lora_bokeh", None),
        dtype=dtype,
        device=device,
        transformer_config=args.transformer_config,
    )
    logger.info("loaded the models on %s (%s) in %.1f s", device, dtype, time.perf_counter() - t0)
    return models


def _depth(args: argparse.Namespace, device: torch.device):
    """(depth_model, depth) from --depth-model or --depth."""
    if args.depth is None and args.depth_model is None:
        raise GenRefocusInputError("--depth or --depth-model must be given when --k is above 0")
    if args.depth_model is not None:
        from .depth_models import load_depth_model

        return load_depth_model(args.depth_model, device=device), None
    from .depth import depth_map_from_image
    from .imageio import load_depth_file

    raw = load_depth_file(args.depth)
    if args.depth_kind != "metric_depth" and raw.max() > 1.0:
        raw = raw / (65535.0 if raw.max() > 255.0 else 255.0)
    return None, depth_map_from_image(raw, args.depth_kind, metric_scale=args.metric_scale)


def _focus(args: argparse.Namespace, width: int, height: int):
    from .defocus import FocusTarget
    from .imageio import load_mask

    if args.point is not None:
        try:
            px, py = (float(v) for v in str(args.point).split(","))
        except ValueError as e:
            raise GenRefocusInputError(f"--point must be 'x,y' in pixels, got {args.point!r}") from e
        if not (0 <= px <= width and 0 <= py <= height):
            raise GenRefocusInputError(
                f"--point must lie inside the {width}x{height} input image, got ({px:g}, {py:g})"
            )
        return FocusTarget("point", x=px / width, y=py / height)
    if args.mask is not None:
        return FocusTarget("mask", mask=load_mask(args.mask), threshold=args.mask_threshold)
    return FocusTarget("center")


def _progress(name: str):
    last = [-1]

    def on_step(done: int, total: int) -> None:
        pct = 100 * done // max(total, 1)
        if pct // 10 != last[0] // 10 or done == total:
            last[0] = pct
            logger.info("%s: %d/%d (%d%%)", name, done, total, pct)

    return on_step


def run_generative(args: argparse.Namespace) -> int:
    """Run ``deblur``, ``bokeh`` or ``refocus`` from parsed arguments; returns the exit code."""
    from .imageio import load_image, save_image
    from .pipeline import bokeh_image, deblur_image, refocus

    command = args.command
    image = load_image(args.input)
    h0, w0 = image.shape[-2:]
    options = _options(args)
    device = torch.device(args.device)
    common = dict(options=options, long_side=args.long_side, geometry=args.geometry,
                  restore_size=args.restore_size, on_step=_progress(command))
    focus = depth_model = depth = None
    if command != "deblur":
        focus = _focus(args, int(w0), int(h0))
        if args.k > 0:
            depth_model, depth = _depth(args, device)
    pre = None
    if command != "bokeh" and args.pre_deblur is not None:
        pre = load_image(args.pre_deblur).to(device)
    models = _models(args, command)
    t0 = time.perf_counter()
    if command == "deblur":
        out = deblur_image(image.to(device), models=models, pre_deblurred=pre,
                           pre_deblur_variant=args.pre_deblur_variant, **common)
    elif command == "bokeh":
        out = bokeh_image(image.to(device), models=models, depth_model=depth_model, depth=depth, focus=focus,
                          k=args.k, **common)
    else:
        out = refocus(image.to(device), models=models, depth_model=depth_model, depth=depth, focus=focus,
                      k=args.k, pre_deblurred=pre, pre_deblur_variant=args.pre_deblur_variant, **common)
    w, h = out.image.shape[-1], out.image.shape[-2]
    logger.info("%s: %dx%d px (processed %dx%d) in %.1f s", command, w, h, *out.info.size,
                time.perf_counter() - t0)
    path = save_image(args.output, out.image.cpu())
    logger.info("wrote %s", path)
    if command == "refocus" and args.aif_output is not None:
        logger.info("wrote %s", save_image(args.aif_output, out.aif.cpu()))
    return 0
