"""Condition K/V cache of the fast mode: the conditions' keys and values, computed once, replayed.

Conditions run at t = 0 with fixed tokens, but under Genfocus' attention mask each condition also
attends to the text and the (noisy) image, so its keys and values after the first block change a
little from step to step. The cache is therefore an **approximation** (the official, unused
``kv_cache``; official-pipeline.md §6.6): the first step runs every stream and stores each layer's
post-RoPE condition K/V; later steps run only text + image, which attend to
``[text, image, cached conditions]``. Exact parts: the first double block's K/V and everything
upstream of it. Measured deviation: tests/core/test_fast_modes.py and the README.

One cache belongs to one forward layout: one tile chunk of a tiled denoise (never shared across
tiles, unlike the official flag) or the whole image when untiled. Size per condition token: 57
layers x (K + V) x 3072 x 2 B = 0.70 MB in bf16 (1.4 GB per 512 px tile for BokehNet's two
conditions); ``device="cpu"`` keeps it in pinned host memory and streams it back per layer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import GenRefocusInputError

__all__ = ["CONDITION_CACHE_MODES", "ConditionCache"]

#: ``off`` (exact, parity), ``on`` (cache on the compute device), ``cpu`` (cache in host memory).
CONDITION_CACHE_MODES = ("off", "on", "cpu")


class ConditionCache:
    """Per-layer condition keys and values of one forward layout.

    Args:
        device: where to keep the tensors (``None``: where they were computed; ``"cpu"``: pinned
            host memory when computed on CUDA).

    Example:
        >>> c = ConditionCache()
        >>> c.filled
        False
        >>> c.store(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4), batch=1, tokens=3)
        >>> c.finish()
        >>> c.filled, c.layers, c.nbytes
        (True, 1, 192)
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = None if device is None else torch.device(device)
        self._kv: list[tuple[Tensor, Tensor]] = []
        self._done = False
        self.batch = 0
        self.tokens = 0

    @property
    def filled(self) -> bool:
        """Whether a full forward has been recorded (the next forwards replay it)."""
        return self._done

    @property
    def layers(self) -> int:
        """Layers stored."""
        return len(self._kv)

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self._kv)

    def _keep(self, t: Tensor) -> Tensor:
        if self.device is None or t.device == self.device:
            return t
        if self.device.type == "cpu" and t.device.type == "cuda":
            return t.to("cpu", non_blocking=False).pin_memory()
        return t.to(self.device)

    def store(self, k: Tensor, v: Tensor, *, batch: int, tokens: int) -> None:
        """Append one layer's condition K/V ``(B, heads, tokens, head_dim)`` (recording forward)."""
        if self._done:
            raise GenRefocusInputError("condition cache is already filled; clear() it first")
        self.batch, self.tokens = batch, tokens
        self._kv.append((self._keep(k), self._keep(v)))

    def finish(self) -> None:
        """Mark the recording forward complete."""
        self._done = True

    def get(self, layer: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Layer ``layer``'s K/V on ``device`` in ``dtype`` (replaying forward)."""
        if not 0 <= layer < len(self._kv):
            raise GenRefocusInputError(
                f"condition cache holds {len(self._kv)} layers, asked for layer {layer}"
            )
        k, v = self._kv[layer]
        return (k.to(device=device, dtype=dtype, non_blocking=True),
                v.to(device=device, dtype=dtype, non_blocking=True))

    def check(self, batch: int, tokens: int) -> None:
        """Raise unless a replay has the recorded batch and condition token count."""
        if (batch, tokens) != (self.batch, self.tokens):
            raise GenRefocusInputError(
                f"condition cache was recorded for batch {self.batch} with {self.tokens} condition tokens, "
                f"got batch {batch} with {tokens}; use one cache per tile chunk"
            )

    def clear(self) -> None:
        """Drop everything."""
        self._kv.clear()
        self._done = False
        self.batch = self.tokens = 0
