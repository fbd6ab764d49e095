"""Photos at any size, shared by both generative backends: the stage order of official-pipeline.md §1.

:func:`run_stages` is the one implementation behind :func:`~genrefocus_core.pipeline.deblur_image`,
:func:`~genrefocus_core.pipeline.bokeh_image`, :func:`~genrefocus_core.pipeline.refocus` and their
native twins in :mod:`~genrefocus_core.native_pipeline`: input check, resize (§3), DeblurNet per
frame (§8), disparity and D_def per frame from a depth model, a depth map or a CoC map (§10),
BokehNet per frame (§9), one progress count over frames and stages, restore size. What differs
between the backends is a :class:`Backend`: how the inputs and models are checked, the per-image
DeblurNet and BokehNet, and where an idle depth model waits.

The public names are re-exported by :mod:`~genrefocus_core.pipeline`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ._generation import GenerationResult
from .conditions import ResizeInfo, resize_for_generation
from .defocus import DefocusMap, FocusTarget, defocus_condition_map, defocus_map, resize_like, signed_coc
from .depth import DepthMap
from .errors import GenRefocusInputError
from .geometry import depth_to_processed, focus_to_processed, frame_focus, restore_input_size, to_processed
from .models import ADAPTER_BOKEH, ADAPTER_DEBLUR, ADAPTER_PRE_DEBLUR
from .sampler import TileLayout, should_tile

if TYPE_CHECKING:
    from .depth_models import DepthModel
    from .genpipe import GenerationOptions

OnStep = Callable[[int, int], None]


@dataclass(frozen=True)
class RefocusResult:
    """What a pipeline run produced.

    Attributes:
        image: ``(B, 3, H, W)`` in [0, 1]: the refocused image (the all-in-focus image when K = 0
            or for :func:`deblur_image`), at the processed size, or the input size with
            ``restore_size``.
        aif: ``(B, 3, H, W)`` the all-in-focus image (DeblurNet's output, or the given AIF after
            resizing), same size as ``image``.
        defocus: ``(B, 1, h, w)`` the Genfocus map D_def in [0, 1] at the processed size, or None
            when BokehNet did not run.
        coc: the signed CoC map at the processed size, or None when BokehNet did not run.
        depth: the disparity used, at the processed size, or None when none was needed.
        info: the resize applied (processed size, crop); undo it with
            :func:`~genrefocus_core.geometry.restore_input_size`.
    """

    image: Tensor
    aif: Tensor
    defocus: Tensor | None
    coc: DefocusMap | None
    depth: DepthMap | None
    info: ResizeInfo


def _checked_by_check(adapter: str, prompt: str) -> None:
    """A backend whose ``check`` already checked the models needs nothing more."""


def _stays_put(depth_model: DepthModel | None) -> None:
    """A backend without an offload device leaves the depth model where it is."""


@dataclass(frozen=True)
class Backend:
    """What a backend brings to :func:`run_stages` (all bound to its models).

    Attributes:
        check: ``check(image, **inputs) -> ResizeInfo``: the input check of
            :func:`~genrefocus_core.pipeline.check_inputs` (with or without the models).
        deblur: ``deblur(frame, *, adapter, pre_deblurred, pre_deblur_variant, options, on_step)``
            → :class:`~genrefocus_core.genpipe.GenerationResult` at the processed size.
        bokeh: ``bokeh(frame, d_def, *, adapter, options, on_step)`` → ``GenerationResult``.
        require: ``require(adapter, prompt)`` raises when the stage's LoRA or prompt is missing
            (called when the stage is known to run); default: nothing (``check`` did it).
        depth_in_use: context manager around one depth estimate (the depth model on the compute
            device meanwhile); default: nothing.
        park_depth: moves the idle depth model off the compute device before DeblurNet runs;
            default: nothing.
        report_depth: fill :attr:`RefocusResult.depth`.
    """

    check: Callable[..., ResizeInfo]
    deblur: Callable[..., GenerationResult]
    bokeh: Callable[..., GenerationResult]
    require: Callable[[str, str], None] = _checked_by_check
    depth_in_use: Callable[[DepthModel], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
    park_depth: Callable[[DepthModel | None], None] = _stays_put
    report_depth: bool = True


# ------------------------------------------------------------------------------------------------
# Progress
# ------------------------------------------------------------------------------------------------


def forwards(height: int, width: int, options: GenerationOptions) -> int:
    """Transformer forwards of one denoise (what :func:`~genrefocus_core.sampler.denoise` counts)."""
    if not should_tile(height, width, tiling=options.tiling, tile_size=options.tile_size):
        return options.steps
    t = options.tile_size // 16
    lay = TileLayout(height // 16, width // 16, tile=t, overlap=int(t * options.tile_overlap))
    return options.steps * len(lay)


class Progress:
    """One ``on_step(done, total)`` across frames and stages (per step and tile).

    Example:
        >>> seen = []
        >>> p = Progress(5, lambda i, n: seen.append((i, n)))
        >>> p.tick(); p.stage(4)(2, 4); seen
        [(1, 5), (3, 5)]
    """

    def __init__(self, total: int, on_step: OnStep | None) -> None:
        self.total, self.done, self.on_step = max(int(total), 1), 0, on_step

    def stage(self, units: int) -> OnStep | None:
        """The callback of the next ``units`` steps (None without ``on_step``)."""
        base = self.done
        self.done = base + units
        if self.on_step is None:
            return None
        cb = self.on_step

        def on_step(done: int, _n: int) -> None:
            cb(min(base + done, self.total), self.total)

        return on_step

    def tick(self) -> None:
        """One step done (a depth frame)."""
        self.done += 1
        if self.on_step is not None:
            self.on_step(min(self.done, self.total), self.total)


# ------------------------------------------------------------------------------------------------
# Stages
# ------------------------------------------------------------------------------------------------


def resize(image: Tensor, long_side: int) -> tuple[Tensor, ResizeInfo]:
    """The official resize and crop (§3) of a float32 copy."""
    return resize_for_generation(image.float(), long_side)


def deblur_frames(
    backend: Backend,
    image: Tensor,
    *,
    pre_deblurred: Tensor | None,
    variant: bool,
    long_side: int,
    geometry: str,
    options: GenerationOptions,
    progress: Progress,
) -> Tensor:
    """DeblurNet over the frames of a photo at its input size; returns the processed-size AIF."""
    adapter = ADAPTER_PRE_DEBLUR if variant else ADAPTER_DEBLUR
    if pre_deblurred is not None and geometry == "aligned" and pre_deblurred.shape[-2:] == image.shape[-2:]:
        pre_deblurred = resize(pre_deblurred, long_side)[0]  # same scale and crop as the photo
    processed = resize(image, long_side)[0]
    h, w = processed.shape[-2:]
    out = []
    for i in range(processed.shape[0]):
        pre = None if pre_deblurred is None else pre_deblurred[min(i, pre_deblurred.shape[0] - 1) :][:1]
        res = backend.deblur(
            processed[i : i + 1],
            adapter=adapter,
            pre_deblurred=pre,
            pre_deblur_variant=variant,
            options=options,
            on_step=progress.stage(forwards(h, w, options)),
        )
        out.append(res.image.to(image.device))
    return torch.cat(out)


def _frame(x: Tensor, i: int, like: Tensor) -> Tensor:
    return x[min(i, x.shape[0] - 1) :][:1].to(like)


def bokeh_frames(
    backend: Backend,
    aif: Tensor,
    info: ResizeInfo,
    *,
    input_size: tuple[int, int],
    depth_model: DepthModel | None,
    depth: DepthMap | None,
    defocus: DefocusMap | None,
    focus: FocusTarget | None,
    k: float,
    geometry: str,
    options: GenerationOptions,
    progress: Progress,
) -> tuple[Tensor, Tensor, DefocusMap, DepthMap]:
    """BokehNet over the frames of a processed-size AIF; returns (image, D_def, coc, depth)."""
    b, _, h, w = aif.shape
    given = None if depth is None else depth_to_processed(depth, info, geometry)
    target = focus_to_processed(focus or FocusTarget("center"), info, geometry)
    images, d_defs, cocs, disps, depths_m = [], [], [], [], []
    metric, focal, source = True, None, "defocus"
    for i in range(b):
        frame = aif[i : i + 1]
        if defocus is not None:
            disp = _frame(defocus.disparity, i, aif)
            if tuple(disp.shape[-2:]) != (h, w):
                if tuple(disp.shape[-2:]) != input_size:
                    raise GenRefocusInputError(
                        f"defocus.disparity must have the size of the coc map, got {tuple(disp.shape[-2:])}"
                    )
                disp = resize_like(disp, (h, w)) if geometry == "official" else to_processed(disp, info)
            fd = _frame(defocus.focus_disparity.flatten(), i, aif)
            dm = DefocusMap(signed_coc(disp, fd, defocus.k), disp, defocus.k, fd, defocus.metric)
            metric, dmap_m = defocus.metric, None
        else:
            if given is None:  # check_inputs guarantees a depth model then
                with backend.depth_in_use(depth_model):
                    dmap = depth_model.estimate(frame)
                progress.tick()
            else:
                j = min(i, given.batch_size - 1)
                disp = given.disparity[j:][:1].to(aif)
                depth_m = None if given.depth_m is None else given.depth_m[j:][:1].to(aif)
                dmap = DepthMap(disp, given.metric, depth_m, given.focal_px, given.source)
            metric, focal, source, dmap_m = dmap.metric, dmap.focal_px, dmap.source, dmap.depth_m
            dm = defocus_map(dmap.disparity, frame_focus(target, i), k, metric=dmap.metric)
        d_def = defocus_condition_map(dm.coc)
        res = backend.bokeh(frame, d_def, adapter=ADAPTER_BOKEH, options=options,
                            on_step=progress.stage(forwards(h, w, options)))
        images.append(res.image.to(aif.device))
        d_defs.append(d_def)
        cocs.append(dm)
        disps.append(dm.disparity)
        depths_m.append(dmap_m)
    coc = DefocusMap(
        torch.cat([c.coc for c in cocs]),
        torch.cat(disps),
        cocs[0].k,
        torch.cat([c.focus_disparity.flatten() for c in cocs]),
        metric,
    )
    depth_m = torch.cat(depths_m) if all(d is not None for d in depths_m) else None
    used = DepthMap(coc.disparity, metric, depth_m, focal, source)
    return torch.cat(images), torch.cat(d_defs), coc, used


def finish(
    image: Tensor,
    aif: Tensor,
    info: ResizeInfo,
    restore_size: bool,
    defocus: Tensor | None = None,
    coc: DefocusMap | None = None,
    depth: DepthMap | None = None,
) -> RefocusResult:
    """The result, mapped back to the input size with ``restore_size``."""
    if restore_size:
        image = restore_input_size(image, info)
        aif = image if aif is image else restore_input_size(aif, info)
    return RefocusResult(image, aif, defocus, coc, depth, info)


def run_stages(
    backend: Backend,
    stage: str,
    image: Tensor,
    *,
    options: GenerationOptions,
    long_side: int,
    geometry: str,
    restore_size: bool,
    on_step: OnStep | None,
    k: float = 20.0,
    depth_model: DepthModel | None = None,
    depth: DepthMap | None = None,
    defocus: DefocusMap | None = None,
    focus: FocusTarget | None = None,
    pre_deblurred: Tensor | None = None,
    pre_deblur_variant: bool = False,
) -> RefocusResult:
    """``stage`` ``"deblur"``, ``"bokeh"`` (``image`` is the AIF) or ``"refocus"`` on a photo of any size.

    Arguments as :func:`~genrefocus_core.pipeline.refocus` (``defocus`` for ``"bokeh"`` only); ``k``
    (or ``defocus.k``) 0 returns the all-in-focus image without depth or BokehNet.

    Raises:
        GenRefocusInputError: bad inputs (from ``backend.check``).
        GenRefocusModelError: a needed LoRA or prompt is missing.
    """
    info = backend.check(
        image,
        stage=stage,
        k=k,
        options=options,
        depth_model=depth_model,
        depth=depth,
        defocus=defocus,
        focus=focus,
        pre_deblurred=pre_deblurred,
        pre_deblur_variant=pre_deblur_variant,
        long_side=long_side,
        geometry=geometry,
    )
    no_bokeh = stage == "deblur" or (defocus.k if defocus is not None else k) == 0
    h, w = info.size[1], info.size[0]
    depth_units = 1 if depth_model is not None else 0  # one progress step per depth frame
    if stage == "bokeh":
        aif = resize(image, long_side)[0]
        if no_bokeh:
            return finish(aif, aif, info, restore_size)
        backend.require(ADAPTER_BOKEH, "bokeh")
        progress = Progress(image.shape[0] * (forwards(h, w, options) + depth_units), on_step)
    else:
        variant = pre_deblur_variant or pre_deblurred is not None
        backend.require(ADAPTER_PRE_DEBLUR if variant else ADAPTER_DEBLUR, "deblur")
        if not no_bokeh:
            backend.require(ADAPTER_BOKEH, "bokeh")
        fw = forwards(h, w, options)
        units = fw if no_bokeh else 2 * fw + depth_units
        progress = Progress(image.shape[0] * units, on_step)
        if stage == "refocus":
            backend.park_depth(depth_model if not no_bokeh else None)
        aif = deblur_frames(
            backend,
            image,
            pre_deblurred=pre_deblurred,
            variant=variant,
            long_side=long_side,
            geometry=geometry,
            options=options,
            progress=progress,
        )
        if no_bokeh:
            return finish(aif, aif, info, restore_size)
    out, d_def, coc, used = bokeh_frames(
        backend,
        aif,
        info,
        input_size=tuple(image.shape[-2:]),
        depth_model=depth_model,
        depth=depth,
        defocus=defocus,
        focus=focus,
        k=k,
        geometry=geometry,
        options=options,
        progress=progress,
    )
    return finish(out, aif, info, restore_size, d_def, coc, used if backend.report_depth else None)
