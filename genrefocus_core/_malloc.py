"""Keep freed memory inside the process while a CPU render runs (glibc only).

A classical render allocates and frees hundreds of large temporaries (a 4K RGBA float plane is
133 MB). glibc serves every block above its mmap threshold (at most 32 MiB by default) with a
fresh ``mmap`` and gives it back on ``free``, so each one is faulted in again page by page; on
virtual machines, where a minor fault costs microseconds, that kernel time can exceed the
arithmetic. Measured on the 2-core CI-class VM (``bench/renderer.py``, 3840x2160, max CoC
100 px): 1.3-1.8 M page faults and 4-6 s of system time per render without this, ~0 and
~0.1 s with it (wall 6.9-8.2 s -> 4.6 s).

:func:`reuse_freed_memory` raises glibc's mmap and trim thresholds for the duration of a render,
so freed blocks are reused instead of unmapped, and on leaving the outermost one sets the
thresholds to the values glibc's own dynamic rule settles on in a long-running PyTorch process
(mmap 32 MiB, trim 64 MiB) and returns the free memory to the system with ``malloc_trim(0)``:
the process does not keep the render's peak. :func:`render_memory` applies it to CPU renders from
2 MP on, for :func:`~genrefocus_core.renderer.render_bokeh` and the benchmark's scatter (below, a
4-channel float plane stays under 32 MiB and glibc reuses it anyway; trimming after every small
render would only add faults). Elsewhere (other C libraries, other systems, GPU tensors) it does
nothing. ``GENREFOCUS_MALLOC_TUNING=0`` turns it off.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor

__all__ = ["LARGE_RENDER_PIXELS", "render_memory", "reuse_freed_memory"]

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3
_DURING = 2**31 - 1  # largest value mallopt takes: blocks up to 2 GiB come from the heap
_MMAP_AFTER = 32 * 2**20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit systems
_TRIM_AFTER = 2 * _MMAP_AFTER  # the dynamic rule keeps trim at twice the mmap threshold

#: Pixels (batch included) from which a render's 4-channel float planes pass glibc's 32 MiB mmap limit
LARGE_RENDER_PIXELS = 2_000_000

_lock = threading.Lock()
_depth = 0
_libc: Any = None
_probed = False


def _glibc() -> Any:
    """The process's glibc (``mallopt`` and ``malloc_trim``), or ``None`` elsewhere."""
    global _libc, _probed
    if not _probed:
        _probed = True
        if sys.platform.startswith("linux") and os.environ.get("GENREFOCUS_MALLOC_TUNING", "1") != "0":
            try:
                libc = ctypes.CDLL(None)  # the symbols already loaded into this process
                if all(hasattr(libc, name) for name in ("gnu_get_libc_version", "mallopt", "malloc_trim")):
                    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
                    libc.malloc_trim.argtypes = [ctypes.c_size_t]
                    _libc = libc
            except OSError:  # no C library symbols reachable: leave the allocator alone
                _libc = None
    return _libc


@contextmanager
def reuse_freed_memory(enabled: bool = True) -> Iterator[None]:
    """Within the block, freed large blocks stay in the process for reuse (glibc, re-entrant).

    Args:
        enabled: ``False`` makes it a no-op (e.g. for tensors on a GPU).

    Example:
        >>> import torch
        >>> with reuse_freed_memory():
        ...     x = torch.zeros(1000, 1000).sum()
        >>> float(x)
        0.0
    """
    global _depth
    libc = _glibc() if enabled else None
    if libc is None:
        yield
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            libc.mallopt(_M_MMAP_THRESHOLD, _DURING)
            libc.mallopt(_M_TRIM_THRESHOLD, _DURING)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_AFTER)
                libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_AFTER)
                libc.malloc_trim(0)


def render_memory(image: Tensor) -> contextlib.AbstractContextManager[None]:
    """:func:`reuse_freed_memory` for a render of ``image`` ``(B, C, H, W)``: on for CPU tensors of at
    least :data:`LARGE_RENDER_PIXELS` pixels, a no-op otherwise.

    Example:
        >>> import torch
        >>> with render_memory(torch.zeros(1, 3, 8, 8)):  # small: the allocator is left alone
        ...     pass
    """
    b, _, h, w = image.shape
    return reuse_freed_memory(image.device.type == "cpu" and b * h * w >= LARGE_RENDER_PIXELS)
