"""Flow-matching Euler sampler with FLUX's dynamic shift, and tiled (MultiDiffusion) denoising.

Reproduces the official Genfocus sampler (official-pipeline.md §5, §7): sigmas
``linspace(1, 1/n, n)`` shifted by ``mu`` (linear in the full image token count, unclamped),
one velocity per step, Euler in float32. Tiled mode splits the token grid into overlapping tiles
(512 px = 32 tokens, overlap 1/8), runs every tile with its conditions cropped alongside and fixed
per-tile ids, and blends the velocities with a Gaussian window. Tiles are batched into one forward
(``tile_batch``); the result equals running them one by one.

Pure torch; the transformer is reached only through a ``velocity_fn`` callback.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ._checks import check_number
from .condition_cache import CONDITION_CACHE_MODES, ConditionCache
from .conditions import ConditionTokens, latent_image_ids
from .errors import GenRefocusInputError

__all__ = [
    "FLUX_DEV_SHIFT",
    "FlowShift",
    "TileLayout",
    "VelocityFn",
    "denoise",
    "euler_step",
    "flow_sigmas",
    "flux_mu",
    "should_tile",
]

logger = logging.getLogger(__name__)

#: ``velocity_fn(latents (b, n, C), latent_ids (n, 3), conditions, timestep (b,)) -> (b, n, C)``;
#: ``timestep`` is the model time in [0, 1] (``sigma``), conditions hold tokens of the same ``b``.
#: With :func:`denoise`'s ``condition_cache`` on, it is also called with the keyword
#: ``condition_cache=`` (a :class:`~genrefocus_core.condition_cache.ConditionCache`, one per tile chunk).
VelocityFn = Callable[[Tensor, Tensor, Sequence[ConditionTokens], Tensor], Tensor]


@dataclass(frozen=True)
class FlowShift:
    """Dynamic-shift constants of ``FlowMatchEulerDiscreteScheduler`` (FLUX.1-dev defaults).

    Attributes:
        base_seq_len: token count where ``mu = base_shift``.
        max_seq_len: token count where ``mu = max_shift`` (extrapolated beyond, not clamped).
        base_shift: ``mu`` at ``base_seq_len``.
        max_shift: ``mu`` at ``max_seq_len``.
        num_train_timesteps: model time scale (timestep = ``sigma * num_train_timesteps``).
    """

    base_seq_len: int = 256
    max_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15
    num_train_timesteps: int = 1000

    @classmethod
    def from_scheduler_config(cls, config: dict) -> FlowShift:
        """From a diffusers ``scheduler_config.json`` dict (dynamic, exponential shifting only).

        Raises:
            GenRefocusInputError: for configs this sampler does not reproduce.
        """
        if not config.get("use_dynamic_shifting", False) or config.get("time_shift_type", "exponential") != (
            "exponential"
        ):
            raise GenRefocusInputError(
                "scheduler config must use dynamic exponential shifting (FLUX.1-dev), got "
                f"use_dynamic_shifting={config.get('use_dynamic_shifting')!r}, "
                f"time_shift_type={config.get('time_shift_type')!r}"
            )
        for key in (
            "use_karras_sigmas",
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "invert_sigmas",
            "stochastic_sampling",
            "shift_terminal",
        ):
            if config.get(key):
                raise GenRefocusInputError(
                    f"scheduler config option {key} is not supported, got {config[key]!r}"
                )
        return cls(
            int(config.get("base_image_seq_len", 256)),
            int(config.get("max_image_seq_len", 4096)),
            float(config.get("base_shift", 0.5)),
            float(config.get("max_shift", 1.15)),
            int(config.get("num_train_timesteps", 1000)),
        )


FLUX_DEV_SHIFT = FlowShift()


def flux_mu(image_seq_len: int, shift: FlowShift = FLUX_DEV_SHIFT) -> float:
    """FLUX's resolution shift ``mu = N*m + b``, linear in the image token count ``N``, unclamped.

    Example:
        >>> round(flux_mu(1024), 4), round(flux_mu(4096), 4)
        (0.63, 1.15)
    """
    if image_seq_len < 1:
        raise GenRefocusInputError(f"image_seq_len must be >= 1, got {image_seq_len}")
    m = (shift.max_shift - shift.base_shift) / (shift.max_seq_len - shift.base_seq_len)
    b = shift.base_shift - m * shift.base_seq_len
    return image_seq_len * m + b


def flow_sigmas(
    num_steps: int,
    image_seq_len: int,
    *,
    shift: FlowShift = FLUX_DEV_SHIFT,
    mu: float | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Shifted flow-matching sigmas ``(num_steps + 1,)`` float32, descending from 1, ending at 0.

    ``sigma' = e^mu / (e^mu + (1/sigma - 1))`` on ``sigma = linspace(1, 1/n, n)`` (float32, as the
    diffusers scheduler computes it), then a final 0.

    Args:
        num_steps: number of Euler steps ``n >= 1``.
        image_seq_len: image tokens ``N`` of the **full** image (parity), for ``mu``.
        shift: scheduler constants.
        mu: explicit shift, overriding ``image_seq_len`` (e.g. a clamped or per-tile value).
        device: device of the result.

    Returns:
        ``(n + 1,)`` float32.

    Example:
        >>> s = flow_sigmas(28, 1024)
        >>> [round(float(v), 5) for v in s[:3]], float(s[-1])
        ([1.0, 0.98066, 0.96064], 0.0)
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise GenRefocusInputError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    mu = flux_mu(image_seq_len, shift) if mu is None else check_number("mu", mu)
    # parity: computed in numpy float32 exactly as diffusers' FlowMatchEulerDiscreteScheduler.set_timesteps
    base = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
    e = math.exp(mu)
    shifted = e / (e + (1.0 / base - 1.0))
    return torch.cat([torch.from_numpy(np.asarray(shifted, dtype=np.float32)), torch.zeros(1)]).to(device)


def euler_step(latents: Tensor, velocity: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """One flow-matching Euler step in float32, cast back to the velocity's dtype.

    Example:
        >>> x = torch.ones(1, 2, 4)
        >>> euler_step(x, x, torch.tensor(1.0), torch.tensor(0.5))[0, 0, 0]
        tensor(0.5000)
    """
    dt = sigma_next - sigma
    return (latents.to(torch.float32) + dt * velocity).to(velocity.dtype)


def should_tile(height: int, width: int, *, tiling: str = "auto", tile_size: int = 512) -> bool:
    """Whether to denoise in tiles (official rule for ``"auto"``).

    ``"auto"``: on iff ``h*w >= (tile/16)^2`` tokens and ``min(H, W) >= 512`` px (the scripts force
    it off below 512 px); ``"on"`` / ``"off"`` force it.

    Example:
        >>> should_tile(576, 640), should_tile(96, 144), should_tile(256, 4096)
        (True, False, False)
    """
    if tiling not in ("auto", "on", "off"):
        raise GenRefocusInputError(f"tiling must be 'auto', 'on' or 'off', got {tiling!r}")
    if tiling != "auto":
        return tiling == "on"
    t = tile_size // 16
    return (height // 16) * (width // 16) >= t * t and min(height, width) >= 512


class TileLayout:
    """Overlapping tiles over an ``h x w`` token grid (geometry only), in the official order.

    Starts per axis: ``range(0, n - t + 1, t - t//8)`` (at least ``[0]``), plus ``n - t`` when the
    last tile would end short of the edge. Tiles are iterated **column-start outer, row-start
    inner** (upstream ``meshgrid('xy')`` + ``ravel``). A side shorter than the tile gets one tile
    spanning that whole side (upstream would crash, quirk #3).

    Args:
        height: token rows ``h``.
        width: token columns ``w``.
        tile: tile side in tokens (32 = 512 px).
        overlap: overlap in tokens (default ``tile // 8``).

    Example:
        >>> lay = TileLayout(36, 40)
        >>> lay.tiles
        [(0, 0), (4, 0), (0, 8), (4, 8)]
        >>> lay.tile_shape
        (32, 32)
    """

    def __init__(self, height: int, width: int, tile: int = 32, overlap: int | None = None) -> None:
        for name, v in (("height", height), ("width", width), ("tile", tile)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise GenRefocusInputError(f"{name} must be an integer >= 1 (tokens), got {v!r}")
        overlap = tile // 8 if overlap is None else overlap
        if not 0 <= overlap < tile:
            raise GenRefocusInputError(f"overlap must be in [0, tile), got {overlap} for tile {tile}")
        self.height, self.width, self.tile, self.overlap = height, width, tile, overlap
        self.tile_shape = (min(tile, height), min(tile, width))
        self.row_starts = self._starts(height, self.tile_shape[0], tile - overlap)
        self.col_starts = self._starts(width, self.tile_shape[1], tile - overlap)
        # parity: rayray9999/Genfocus@54752a1 Genfocus/pipeline/flux.py meshgrid('xy').ravel(): columns outer
        self.tiles = [(r, c) for c in self.col_starts for r in self.row_starts]

    @staticmethod
    def _starts(n: int, t: int, stride: int) -> list[int]:
        starts = list(range(0, max(1, n - t + 1), stride))
        if starts[-1] + t < n:
            starts.append(n - t)
        return starts

    def __len__(self) -> int:
        return len(self.tiles)

    def __repr__(self) -> str:
        return f"TileLayout({self.height}x{self.width} tokens, tile {self.tile_shape}, {len(self)} tiles)"

    def indices(self, row: int, col: int, device: torch.device | str | None = None) -> Tensor:
        """Token indices ``(th*tw,)`` of the tile starting at ``(row, col)``, row-major inside the tile."""
        th, tw = self.tile_shape
        r = torch.arange(row, row + th, device=device)
        c = torch.arange(col, col + tw, device=device)
        return (r[:, None] * self.width + c[None, :]).flatten()

    def weights(self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """Gaussian blend window ``exp(-(d_a^2 + d_b^2))``, ``d = linspace(-2, 2, side)``, flattened.

        Example:
            >>> w = TileLayout(32, 32).weights()
            >>> w.shape, round(float(w[0]), 6)
            (torch.Size([1024]), 0.000335)
        """
        th, tw = self.tile_shape
        dr = torch.linspace(-2, 2, th, dtype=dtype, device=device)
        dc = torch.linspace(-2, 2, tw, dtype=dtype, device=device)
        return torch.exp(-(dr[:, None] ** 2 + dc[None] ** 2)).flatten()

    def ids(self, delta: tuple[int, int] = (0, 0), device: torch.device | str | None = None) -> Tensor:
        """Fixed per-tile ids: the grid of a standalone tile (0..th-1, 0..tw-1), plus ``delta``."""
        return latent_image_ids(*self.tile_shape, delta=delta, device=device)


def _check_conditions(latents: Tensor, conditions: Sequence[ConditionTokens]) -> None:
    for i, c in enumerate(conditions):
        if not isinstance(c, ConditionTokens):
            raise GenRefocusInputError(f"conditions[{i}] must be a ConditionTokens, got {type(c).__name__}")
        if c.tokens.shape[0] not in (1, latents.shape[0]) or c.tokens.shape[2] != latents.shape[2]:
            raise GenRefocusInputError(
                f"conditions[{i}].tokens must have shape (1 or {latents.shape[0]}, N, {latents.shape[2]}), "
                f"got {tuple(c.tokens.shape)}"
            )


def denoise(
    velocity_fn: VelocityFn,
    latents: Tensor,
    grid: tuple[int, int],
    sigmas: Tensor,
    *,
    conditions: Sequence[ConditionTokens] = (),
    latent_ids: Tensor | None = None,
    tiles: TileLayout | None = None,
    tile_batch: int = 4,
    keep_condition_deltas: bool = False,
    on_step: Callable[[int, int], None] | None = None,
    on_velocity: Callable[[int, Tensor, Tensor], None] | None = None,
    condition_cache: str = "off",
) -> Tensor:
    """Run the Euler loop over ``sigmas``, untiled or tiled (MultiDiffusion, Gaussian blend).

    Untiled: one ``velocity_fn`` call per step on the whole grid. Tiled: per step, every tile's
    tokens (and its conditions' tokens at the same positions) go through ``velocity_fn`` with the
    fixed tile ids, ``tile_batch`` tiles per call (stacked on the batch axis); the velocities are
    blended ``acc += v*g, wsum += g`` tile by tile in the official order, in float32, and one Euler
    step is taken on the whole latent with the full-image sigmas.

    Args:
        velocity_fn: see :data:`VelocityFn`.
        latents: ``(B, N, C)`` initial noise, ``N = h*w``.
        grid: ``(h, w)`` token grid of the latents.
        sigmas: ``(n + 1,)`` float32 from :func:`flow_sigmas`.
        conditions: condition streams on the same grid (their ids are used when untiled).
        latent_ids: ``(N, 3)`` image ids for the untiled forward (default: the plain grid).
        tiles: a :class:`TileLayout` of ``grid`` to tile, or ``None`` for one forward per step.
        tile_batch: tiles per forward (>= 1).
        keep_condition_deltas: tiled only: add each condition's ``position_delta`` to the tile ids
            (fix #2; the official code drops it).
        on_step: progress ``on_step(done, total)`` after every forward, counted in tiles
            (``total = steps * tiles``; untiled: one tile per step).
        on_velocity: ``on_velocity(i, velocity, latents_after_step)`` for tracing (parity runner).
        condition_cache: fast mode, ``"off"`` (exact), ``"on"`` or ``"cpu"``: the first step records
            each forward's condition K/V (one cache per tile chunk, kept on the latents' device or
            in host memory) and later steps replay them, an approximation
            (:mod:`~genrefocus_core.condition_cache`). Needs conditions; ``velocity_fn`` must take
            the ``condition_cache`` keyword.

    Returns:
        ``(B, N, C)`` final latents in the velocity dtype.

    Raises:
        GenRefocusInputError: inconsistent shapes or options.

    Example:
        >>> fn = lambda x, ids, conds, t: -x  # a toy velocity field
        >>> out = denoise(fn, torch.ones(1, 4, 2), (2, 2), flow_sigmas(2, 4))
        >>> out.shape
        torch.Size([1, 4, 2])
    """
    if latents.ndim != 3:
        raise GenRefocusInputError(f"latents must have shape (B, N, C), got {tuple(latents.shape)}")
    h, w = grid
    if h * w != latents.shape[1]:
        raise GenRefocusInputError(f"grid {h}x{w} must match the {latents.shape[1]} latent tokens")
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise GenRefocusInputError(f"sigmas must be 1-D with >= 2 values, got shape {tuple(sigmas.shape)}")
    if isinstance(tile_batch, bool) or not isinstance(tile_batch, int) or tile_batch < 1:
        raise GenRefocusInputError(f"tile_batch must be an integer >= 1, got {tile_batch!r}")
    _check_conditions(latents, conditions)
    if condition_cache not in CONDITION_CACHE_MODES:
        raise GenRefocusInputError(
            f"condition_cache must be one of {', '.join(CONDITION_CACHE_MODES)}, got {condition_cache!r}"
        )
    caching = condition_cache != "off" and bool(conditions)
    caches: dict[int, ConditionCache] = {}

    def call(x: Tensor, ids: Tensor, conds: Sequence[ConditionTokens], t: Tensor, key: int) -> Tensor:
        if not caching:
            return velocity_fn(x, ids, conds, t)
        if key not in caches:
            caches[key] = ConditionCache("cpu" if condition_cache == "cpu" else None)
        return velocity_fn(x, ids, conds, t, condition_cache=caches[key])

    if tiles is not None and (tiles.height, tiles.width) != (h, w):
        raise GenRefocusInputError(f"tiles must cover the {h}x{w} grid, got {tiles!r}")
    device = latents.device
    b = latents.shape[0]
    n_steps = sigmas.numel() - 1
    sigmas = sigmas.to(device=device, dtype=torch.float32)
    # parity: diffusers FlowMatchEulerDiscreteScheduler: timesteps = sigmas * 1000, model gets t / 1000
    timesteps = sigmas[:-1] * 1000.0
    n_tiles = 1 if tiles is None else len(tiles)
    total = n_steps * n_tiles
    done = 0
    if tiles is None:
        ids = latent_image_ids(h, w, device=device) if latent_ids is None else latent_ids
    else:
        plan = [tiles.indices(r, c, device=device) for r, c in tiles.tiles]
        g = tiles.weights(device=device)
        tile_ids = tiles.ids(device=device)
        cond_ids = [
            tiles.ids(c.position_delta if keep_condition_deltas else (0, 0), device=device)
            for c in conditions
        ]
    for i in range(n_steps):
        if tiles is None:
            t = timesteps[i].expand(b).to(latents.dtype) / 1000.0
            v = call(latents, ids, conditions, t, 0)
            done += 1
            if on_step is not None:
                on_step(done, total)
        else:
            acc = torch.zeros(latents.shape, device=device, dtype=torch.float32)
            wsum = torch.zeros(latents.shape[:2], device=device, dtype=torch.float32)
            for start in range(0, n_tiles, tile_batch):
                chunk = plan[start : start + tile_batch]
                k = len(chunk)
                x = torch.cat([latents[:, idx] for idx in chunk], dim=0)  # (k*B, n, C), tile-major
                conds = []
                for c, cid in zip(conditions, cond_ids, strict=True):
                    full = c.tokens.expand(b, -1, -1)
                    conds.append(c.with_tokens(torch.cat([full[:, idx] for idx in chunk], dim=0), cid))
                t = timesteps[i].expand(k * b).to(latents.dtype) / 1000.0
                v_chunk = call(x, tile_ids, conds, t, start).to(torch.float32)
                for j, idx in enumerate(chunk):
                    acc[:, idx] += v_chunk[j * b : (j + 1) * b] * g[None, :, None]
                    wsum[:, idx] += g
                done += k
                if on_step is not None:
                    on_step(done, total)
            v = (acc / wsum[..., None]).to(latents.dtype)
        latents = euler_step(latents, v, sigmas[i], sigmas[i + 1])
        if on_velocity is not None:
            on_velocity(i, v, latents)
    return latents
