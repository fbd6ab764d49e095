"""Monocular depth estimators (Depth Pro, Depth Anything V2) read from local ``transformers`` folders.

A depth model is a folder in ``transformers`` format (what ``save_pretrained`` writes and what the
Hugging Face repos ``apple/DepthPro-hf`` or ``depth-anything/Depth-Anything-V2-*-hf`` hold):
``config.json``, ``model.safetensors`` (or a sharded ``model.safetensors.index.json``) and,
optionally, ``preprocessor_config.json``. Nothing is ever downloaded: :func:`load_depth_model`
only reads an existing folder (``local_files_only=True``) and refuses anything else.

``transformers`` is imported lazily, inside :func:`load_depth_model`, so importing this module is
cheap. Preprocessing is done here in plain torch (the ``transformers`` image processors need
torchvision, which ComfyUI installs but we do not depend on); its parameters come from
``preprocessor_config.json`` when present, else from each model family's published defaults.

Conventions of the returned :class:`~genrefocus_core.depth.DepthMap`:

* Depth Pro: metric depth in metres and the focal length in px of the *input* image
  (from the predicted field of view, or the caller's ``focal_px``); ``source="depth_pro"``.
* Depth Anything V2 (relative): its output is relative disparity (near = larger), min-max
  normalised per image to [0, 1]; ``source="depth_anything_v2"``.
* Depth Anything V2 metric variants (``depth_estimation_type == "metric"``): metres;
  ``source="depth_anything_v2_metric"``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_bchw, check_finite, check_number
from .defocus import disparity_from_depth, resize_like
from .depth import DepthMap
from .errors import GenRefocusInputError, GenRefocusModelError

__all__ = ["DEPTH_MODEL_FOLDER_HINT", "DEPTH_MODEL_KINDS", "DepthModel", "load_depth_model"]

logger = logging.getLogger(__name__)

#: Model families :func:`load_depth_model` reads.
DEPTH_MODEL_KINDS = ("depth_pro", "depth_anything_v2")

#: ``config.json`` ``model_type`` -> our kind.
_MODEL_TYPES = {"depth_pro": "depth_pro", "depth_anything": "depth_anything_v2"}

_FOLDER_HINTS = {
    "depth_pro": "put the Depth Pro folder (config.json, model.safetensors, preprocessor_config.json; "
    "from the Hugging Face repo apple/DepthPro-hf) in models/depth/DepthPro/",
    "depth_anything_v2": "put a Depth Anything V2 folder (config.json, model.safetensors, "
    "preprocessor_config.json; e.g. from depth-anything/Depth-Anything-V2-Large-hf) in "
    "models/depth/Depth-Anything-V2-Large-hf/",
}

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")

# Values of ``image`` outside [0, 1] by more than this are refused (a 0-255 image, say); small
# overshoots from bicubic resizing upstream are passed on unchanged.
_RANGE_SLACK = 0.1

# PIL resampling ids used by ``preprocessor_config.json`` -> torch interpolate modes.
_PIL_RESAMPLE = {2: "bilinear", 3: "bicubic"}

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


#: What to put where, for messages about missing depth models (ComfyUI folder names).
DEPTH_MODEL_FOLDER_HINT = f"{_FOLDER_HINTS['depth_pro']}, or {_FOLDER_HINTS['depth_anything_v2']}"


def _where_to_put(kind: str | None) -> str:
    return _FOLDER_HINTS.get(kind or "", DEPTH_MODEL_FOLDER_HINT)


@dataclass(frozen=True)
class _Preprocess:
    """How a model wants its input: resize rule, interpolation, normalisation."""

    size: tuple[int, int]  # (height, width) target of the resize rule
    keep_aspect_ratio: bool
    multiple: int
    mode: str  # "bilinear" or "bicubic"
    antialias: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def input_size(self, h: int, w: int) -> tuple[int, int]:
        """Network input size for an ``h x w`` image.

        With ``keep_aspect_ratio`` this is the rule of transformers' DPT image processor (used by
        Depth Anything): scale both sides by whichever of the two target ratios is closer to 1,
        then round each side to the nearest multiple (at least one multiple).
        """
        th, tw = self.size
        sh, sw = th / h, tw / w
        if self.keep_aspect_ratio:
            if abs(1 - sw) < abs(1 - sh):
                sh = sw
            else:
                sw = sh
        return self._to_multiple(sh * h), self._to_multiple(sw * w)

    def _to_multiple(self, v: float) -> int:
        m = self.multiple
        x = round(v / m) * m
        if x <= 0:
            x = math.ceil(v / m) * m
        return max(int(x), m)

    def apply(self, image: Tensor) -> Tensor:
        """``(1, 3, H, W)`` in [0, 1] -> normalised network input."""
        h, w = image.shape[-2:]
        size = self.input_size(int(h), int(w))
        if size != (h, w):
            image = F.interpolate(image, size=size, mode=self.mode, align_corners=False,
                                  antialias=self.antialias)
        mean = torch.tensor(self.mean, device=image.device, dtype=image.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=image.device, dtype=image.dtype).view(1, 3, 1, 1)
        return (image - mean) / std


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GenRefocusModelError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise GenRefocusModelError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _preprocess_for(
    kind: str, config: dict[str, Any], proc: dict[str, Any] | None, folder: Path
) -> _Preprocess:
    """Preprocessing of a model family, overridden by its ``preprocessor_config.json``."""
    if kind == "depth_pro":
        # Depth Pro's patch encoder needs the input side to be patch_size / min(scaled_images_ratios)
        # (1536 = 384 / 0.25 for the released model); its processor normalises with mean = std = 0.5.
        patch = int(config.get("patch_size", 384))
        ratios = config.get("scaled_images_ratios") or [0.25, 0.5, 1.0]
        side = round(patch / min(float(r) for r in ratios))
        prep = dict(size=(side, side), keep_aspect_ratio=False, multiple=1, mode="bilinear", antialias=False,
                    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    else:
        # Depth Anything V2's DPT processor: 518 px, keep aspect, multiples of the ViT patch, bicubic.
        prep = dict(size=(518, 518), keep_aspect_ratio=True, multiple=int(config.get("patch_size", 14)),
                    mode="bicubic", antialias=True, mean=_IMAGENET_MEAN, std=_IMAGENET_STD)
    if proc:
        size = proc.get("size")
        if isinstance(size, dict) and "height" in size and "width" in size:
            prep["size"] = (int(size["height"]), int(size["width"]))
        elif size is not None:
            raise GenRefocusModelError(
                f"{folder / 'preprocessor_config.json'}: size must be {{'height': h, 'width': w}}, "
                f"got {size!r}"
            )
        if "keep_aspect_ratio" in proc:
            prep["keep_aspect_ratio"] = bool(proc["keep_aspect_ratio"])
        if proc.get("ensure_multiple_of"):
            prep["multiple"] = int(proc["ensure_multiple_of"])
        if "resample" in proc:
            if proc["resample"] in _PIL_RESAMPLE:
                prep["mode"] = _PIL_RESAMPLE[proc["resample"]]
            else:
                logger.warning("%s: resample %r not supported, using %s", folder, proc["resample"],
                               prep["mode"])
        if proc.get("do_normalize", True):
            if "image_mean" in proc:
                prep["mean"] = tuple(float(v) for v in proc["image_mean"])
            if "image_std" in proc:
                prep["std"] = tuple(float(v) for v in proc["image_std"])
        else:
            prep["mean"], prep["std"] = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    result = _Preprocess(**prep)
    if kind == "depth_pro":
        patch = int(config.get("patch_size", 384))
        ratios = config.get("scaled_images_ratios") or [0.25, 0.5, 1.0]
        if min(result.size) * min(float(r) for r in ratios) < patch:
            raise GenRefocusModelError(
                f"{folder}: preprocessor size {result.size} is too small for Depth Pro's patch_size {patch} "
                f"with scaled_images_ratios {ratios}; fix preprocessor_config.json or remove it"
            )
    return result


def _resolve_folder(path: str | Path) -> Path:
    """The model folder, or a :class:`GenRefocusModelError` that says what to put where."""
    if not isinstance(path, str | Path) or str(path) == "":
        raise GenRefocusInputError(f"path must be a folder path (str or Path), got {path!r}")
    folder = Path(path).expanduser()
    if not folder.exists():
        raise GenRefocusModelError(
            f"depth model folder {str(path)!r} does not exist (nothing is downloaded, Hugging Face repo ids "
            f"are not looked up); {_where_to_put(None)}"
        )
    if not folder.is_dir():
        raise GenRefocusModelError(
            f"depth model path {str(folder)!r} is a file; pass the folder that holds config.json and "
            f"model.safetensors ({_where_to_put(None)})"
        )
    if not (folder / "config.json").is_file():
        raise GenRefocusModelError(f"config.json is missing in {folder}; {_where_to_put(None)}")
    return folder


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise GenRefocusModelError(
            "depth models need the `transformers` package (>= 4.49 for Depth Pro); install it with "
            "`pip install transformers`"
        ) from e
    return transformers


def _check_dtype(dtype: object) -> torch.dtype:
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise GenRefocusInputError(
            f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}"
        )
    return dtype  # type: ignore[return-value]


def _compute_dtype(requested: torch.dtype, device: torch.device) -> torch.dtype:
    """Half precision only off the CPU: CPU kernels for fp16/bf16 are slow or missing."""
    return torch.float32 if device.type == "cpu" else requested


class DepthModel:
    """A loaded depth estimator: the ``transformers`` module plus how to feed it and read its output.

    Build with :func:`load_depth_model`. The model runs on :attr:`device`; :meth:`to` moves it
    (ComfyUI nodes move it to the GPU for a run and back afterwards). Half precision requested at
    load time is used on accelerators only; on the CPU the weights are kept in float32.

    Attributes:
        kind: ``"depth_pro"`` or ``"depth_anything_v2"``.
        path: the model folder.
        metric: True when the model predicts metric depth (Depth Pro, metric DA-V2 variants).
        module: the ``transformers`` model (eval mode, no gradients).
    """

    def __init__(self, module: nn.Module, kind: str, path: Path, *, metric: bool, preprocess: _Preprocess,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.module = module.eval().requires_grad_(False)
        self.kind = kind
        self.path = path
        self.metric = metric
        self._preprocess = preprocess
        self._requested_dtype = dtype
        self.to(device)

    def __repr__(self) -> str:
        return (f"DepthModel(kind={self.kind!r}, path={str(self.path)!r}, metric={self.metric}, "
                f"device={self.device}, dtype={self.dtype})")

    @property
    def device(self) -> torch.device:
        """Device of the weights."""
        return next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the weights (float32 on the CPU whatever was requested)."""
        return next(self.module.parameters()).dtype

    @property
    def source(self) -> str:
        """The ``source`` tag of the maps this model makes."""
        if self.kind == "depth_anything_v2" and self.metric:
            return "depth_anything_v2_metric"
        return self.kind

    def memory_bytes(self, device: torch.device | str | None = None) -> int:
        """Bytes the weights take on ``device`` (default: the current one), in the dtype used there."""
        dev = torch.device(device) if device is not None else self.device
        itemsize = torch.empty((), dtype=_compute_dtype(self._requested_dtype, dev)).element_size()
        n = sum(p.numel() for p in self.module.parameters()) + sum(b.numel() for b in self.module.buffers())
        return int(n * itemsize)

    def to(self, device: torch.device | str) -> DepthModel:
        """Move the weights to ``device`` (in place) and return ``self``.

        The dtype follows the device: the one requested at load time on accelerators, float32 on
        the CPU.
        """
        dev = torch.device(device)
        self.module.to(device=dev, dtype=_compute_dtype(self._requested_dtype, dev))
        return self

    @torch.no_grad()  # not inference_mode: callers may update the maps in place later
    def estimate(self, image: Tensor, *, focal_px: float | None = None,
                 on_step: Callable[[int, int], None] | None = None) -> DepthMap:
        """Estimate depth for a batch of images, frame by frame.

        Each frame is preprocessed as the model expects (resize, normalise), run on the model's
        device and dtype, and its output resized back to ``(H, W)`` bilinearly. Depth Pro's
        inverse depth is resized before inverting, as upstream does.

        Args:
            image: ``(B, 3, H, W)`` RGB in [0, 1] (small overshoots tolerated, never clamped).
            focal_px: the focal length in px of ``image`` when known (e.g. from EXIF); Depth Pro
                then uses it instead of its predicted field of view. Stored in the map for every
                model. ``> 0``.
            on_step: called as ``on_step(frames_done, B)`` after each frame (progress, interrupt).

        Returns:
            A :class:`~genrefocus_core.depth.DepthMap` on ``image``'s device and dtype:
            metric (``depth_m`` in metres, ``disparity = 1 / depth_m`` in 1/m, ``focal_px`` of the
            input width) for Depth Pro and metric DA-V2 variants; relative disparity in [0, 1],
            near = 1, per-image min-max normalised, for relative DA-V2.

        Raises:
            GenRefocusInputError: bad shape, non-finite values, values far outside [0, 1], bad
                ``focal_px``.
            GenRefocusModelError: the model predicted an unusable field of view.

        Example:
            >>> model = load_depth_model("models/depth/DepthPro")  # doctest: +SKIP
            >>> depth = model.estimate(torch.rand(1, 3, 480, 640))  # doctest: +SKIP
            >>> depth.metric, depth.depth_m.shape, depth.focal_px > 0  # doctest: +SKIP
            (True, torch.Size([1, 1, 480, 640]), True)
        """
        check_bchw("image", image, 3)
        check_finite("image", image)
        lo, hi = float(image.min()), float(image.max())
        if lo < -_RANGE_SLACK or hi > 1 + _RANGE_SLACK:
            raise GenRefocusInputError(
                f"image must hold RGB values in [0, 1], got values in [{lo:.4g}, {hi:.4g}] "
                f"(shape {tuple(image.shape)}); a 0-255 image must be divided by 255"
            )
        if focal_px is not None:
            focal_px = check_number("focal_px", focal_px, lo=0.0, lo_open=True)
        b, _, h, w = image.shape
        frames: list[Tensor] = []
        focals: list[float | None] = []
        for i in range(b):
            x = image[i : i + 1].to(device=self.device, dtype=torch.float32)
            x = self._preprocess.apply(x).to(self.dtype)
            out = self.module(pixel_values=x)
            pred = out.predicted_depth.float()[:, None]  # (1, 1, h', w')
            if self.kind == "depth_pro":
                frame, f = self._depth_pro_frame(pred, out.field_of_view, (h, w), focal_px)
            else:
                frame, f = resize_like(pred, (h, w)), focal_px
            frames.append(frame)
            focals.append(f)
            if on_step is not None:
                on_step(i + 1, b)
        raw = torch.cat(frames).to(device=image.device, dtype=image.dtype)
        focal = _one_focal(focals)
        if self.kind == "depth_pro" or self.metric:
            depth_m = raw  # Depth Pro frames are already metres; metric DA-V2 predicts metres
            return DepthMap(disparity_from_depth(depth_m), metric=True, depth_m=depth_m, focal_px=focal,
                            source=self.source)
        return DepthMap(_minmax(raw), metric=False, focal_px=focal, source=self.source)

    def _depth_pro_frame(self, pred: Tensor, fov: Tensor | None, size: tuple[int, int],
                         focal_px: float | None) -> tuple[Tensor, float | None]:
        """Depth Pro's canonical inverse depth -> metres at ``size``, and the focal length in px.

        As in apple/ml-depth-pro ``DepthPro.infer`` (and transformers' post-processing):
        ``inverse_depth = canonical * W / f_px`` with ``f_px = W / (2 tan(fov / 2))``, resized
        bilinearly, then ``depth = 1 / clamp(inverse_depth, 1e-4, 1e4)``. ``W / f_px`` does not
        depend on the resolution, so it is taken at the input width.
        """
        width = size[1]
        if focal_px is None and fov is not None:
            fov_deg = float(fov.float().flatten()[0])
            if not (math.isfinite(fov_deg) and 0.0 < fov_deg < 180.0):
                raise GenRefocusModelError(
                    f"Depth Pro predicted a field of view of {fov_deg:.4g} degrees (must be in (0, 180)); "
                    f"the weights in {self.path} look broken, or pass focal_px"
                )
            focal_px = 0.5 * width / math.tan(math.radians(0.5 * fov_deg))
        if focal_px is None:
            logger.warning(
                "Depth Pro in %s has no field-of-view head (use_fov_model is false) and no focal_px was "
                "given: the metric scale assumes a focal length equal to the image width", self.path,
            )
            inverse = pred
        else:
            inverse = pred * (width / focal_px)
        inverse = resize_like(inverse, size)
        return 1.0 / inverse.clamp(1e-4, 1e4), focal_px


def _one_focal(focals: list[float | None]) -> float | None:
    """A single focal length for the batch (DepthMap holds one): the mean of the frames' values."""
    known = [f for f in focals if f is not None]
    if not known:
        return None
    if max(known) - min(known) > 1e-3 * max(known):
        logger.info("focal length differs across frames (%.1f..%.1f px); using the mean",
                    min(known), max(known))
    return float(sum(known) / len(known))


def _minmax(x: Tensor) -> Tensor:
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    rng = x.amax(dim=(1, 2, 3), keepdim=True) - lo
    if bool((rng <= 0).any()):
        logger.warning("the depth model predicted a flat map (one value everywhere): "
                       "everything at one distance")
    return (x - lo) / rng.clamp_min(1e-12)


def load_depth_model(path: str | Path, *, kind: str | None = None, dtype: torch.dtype = torch.float32,
                     device: torch.device | str = "cpu") -> DepthModel:
    """Load Depth Pro or Depth Anything V2 from a local ``transformers``-format folder.

    The folder holds ``config.json``, ``model.safetensors`` (or ``model.safetensors.index.json``
    and its shards) and optionally ``preprocessor_config.json``, as in the Hugging Face repos
    ``apple/DepthPro-hf`` and ``depth-anything/Depth-Anything-V2-*-hf``. Only that folder is read
    (``local_files_only=True``, safetensors only); a string that is not an existing folder, such as
    a Hub repo id, is an error, never a download. Weights missing from the file are an error
    (no silently random layers).

    Args:
        path: the model folder.
        kind: ``"depth_pro"`` or ``"depth_anything_v2"``; default: from ``config.json``'s
            ``model_type``. When given it must agree with the config.
        dtype: ``torch.float32``, ``torch.float16`` or ``torch.bfloat16``; half precision is used
            on accelerators only, the CPU always computes in float32.
        device: where to put the weights.

    Returns:
        A :class:`DepthModel` in eval mode on ``device``.

    Raises:
        GenRefocusInputError: bad ``kind`` or ``dtype``.
        GenRefocusModelError: missing folder or files (the message says what to put where), an
            unsupported ``model_type``, a ``kind`` that contradicts the config, weights that do
            not fit the config, or ``transformers`` not installed.

    Example:
        >>> load_depth_model("apple/DepthPro-hf")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        GenRefocusModelError: depth model folder 'apple/DepthPro-hf' does not exist ...
    """
    if kind is not None and kind not in DEPTH_MODEL_KINDS:
        raise GenRefocusInputError(
            f"kind must be one of {', '.join(DEPTH_MODEL_KINDS)} or None, got {kind!r}"
        )
    dtype = _check_dtype(dtype)
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise GenRefocusInputError(f"device must be a torch device, got {device!r}") from e
    folder = _resolve_folder(path)
    config = _read_json(folder / "config.json")
    model_type = config.get("model_type")
    detected = _MODEL_TYPES.get(str(model_type))
    if detected is None:
        raise GenRefocusModelError(
            f"{folder / 'config.json'} has model_type {model_type!r}; supported depth models are "
            f"{', '.join(sorted(_MODEL_TYPES))} (Depth Pro, Depth Anything V2)"
        )
    if kind is not None and kind != detected:
        raise GenRefocusModelError(
            f"{folder} holds a {detected} model (config.json model_type {model_type!r}), not {kind}"
        )
    kind = detected
    if not any((folder / name).is_file() for name in _WEIGHT_FILES):
        present = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
        raise GenRefocusModelError(
            f"no weights in {folder}: expected {' or '.join(_WEIGHT_FILES)} (found: {present}); "
            f"{_where_to_put(kind)}"
        )
    proc_path = folder / "preprocessor_config.json"
    proc = _read_json(proc_path) if proc_path.is_file() else None
    if proc is None:
        logger.info("%s has no preprocessor_config.json; using the %s defaults", folder, kind)
    preprocess = _preprocess_for(kind, config, proc, folder)

    transformers = _import_transformers()
    cls_name = "DepthProForDepthEstimation" if kind == "depth_pro" else "DepthAnythingForDepthEstimation"
    cls = getattr(transformers, cls_name, None)
    if cls is None:
        raise GenRefocusModelError(
            f"transformers {transformers.__version__} has no {cls_name}; upgrade it "
            "(`pip install -U transformers`)"
        )
    load_dtype = _compute_dtype(dtype, dev)
    if load_dtype != dtype:
        logger.info("%s requested on %s: computing in float32 on the CPU", dtype, dev)
    try:
        # Mismatched shapes are reported back (not raised) so that they get the same message as
        # missing keys below; nothing is left randomly initialised either way.
        module, info = cls.from_pretrained(str(folder), local_files_only=True, use_safetensors=True,
                                           dtype=load_dtype, output_loading_info=True,
                                           ignore_mismatched_sizes=True)
    except (OSError, ValueError) as e:
        raise GenRefocusModelError(
            f"cannot load the {kind} model from {folder}: {e}. {_where_to_put(kind)}"
        ) from e
    missing = sorted(str(k) for k in info.get("missing_keys") or [])
    mismatched = sorted(
        str(k[0] if isinstance(k, tuple | list) else k) for k in info.get("mismatched_keys") or []
    )
    if missing or mismatched:
        raise GenRefocusModelError(
            f"the weights in {folder} do not fit its config.json: {len(missing)} parameter(s) missing "
            f"({', '.join(missing[:3]) or '-'}), {len(mismatched)} of another shape "
            f"({', '.join(mismatched[:3]) or '-'}); re-download the complete folder"
        )
    unexpected = list(info.get("unexpected_keys") or [])
    if unexpected:
        logger.warning("%s: %d unused tensor(s) in the weights, e.g. %s", folder, len(unexpected),
                       ", ".join(sorted(unexpected)[:5]))
    metric = kind == "depth_pro" or config.get("depth_estimation_type") == "metric"
    return DepthModel(module, kind, folder, metric=metric, preprocess=preprocess, dtype=dtype, device=dev)
