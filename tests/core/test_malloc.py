"""Tests of genrefocus_core._malloc: freed large blocks are reused inside the block, not re-faulted."""

from __future__ import annotations

import resource
import sys

import pytest
import torch

from genrefocus_core import _malloc
from genrefocus_core._malloc import reuse_freed_memory

glibc = pytest.mark.skipif(_malloc._glibc() is None, reason="needs Linux glibc")


def _faults_over_cycles(cycles: int = 12) -> int:
    """Minor page faults while 64 MiB blocks are allocated, written and freed ``cycles`` times."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for i in range(cycles):
        x = torch.empty(16 * 2**20)  # 64 MiB: above glibc's largest dynamic mmap threshold
        x.fill_(float(i))
        del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


BLOCK_PAGES = 64 * 2**20 // resource.getpagesize()


@glibc
def test_freed_blocks_are_reused_inside_and_unmapped_outside():
    outside = _faults_over_cycles()
    with reuse_freed_memory():
        inside = _faults_over_cycles()
    assert outside > 10 * BLOCK_PAGES, outside  # a fresh mmap per block: every page faulted in again
    # the first block is faulted in once; later ones come back from the heap (a small allocation
    # landing in a freed block may cost one more)
    assert inside < 6 * BLOCK_PAGES, inside


def _resident_pages() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1])


@glibc
def test_nesting_keeps_blocks_until_the_outermost_exit_which_returns_them():
    with reuse_freed_memory():
        with reuse_freed_memory():
            pass
        assert _malloc._depth == 1
        assert _faults_over_cycles() < 6 * BLOCK_PAGES  # still reusing after the inner exit
        held = _resident_pages()  # the freed 64 MiB block is still resident
    assert _malloc._depth == 0
    assert _resident_pages() < held - BLOCK_PAGES // 2  # malloc_trim gave it back


def test_disabled_and_error_paths_leave_the_depth_alone():
    with reuse_freed_memory(False):
        assert _malloc._depth == 0
    with pytest.raises(ValueError), reuse_freed_memory():
        raise ValueError("inside")
    assert _malloc._depth == 0


def test_render_is_identical_with_and_without(monkeypatch):
    from genrefocus_core.renderer import render_bokeh

    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 3, 48, 64, generator=g)
    disp = torch.rand(1, 1, 48, 64, generator=g)
    with reuse_freed_memory():
        a = render_bokeh(img, disp, k=8.0, disp_focus=0.5)
    monkeypatch.setattr(_malloc, "_libc", None)
    b = render_bokeh(img, disp, k=8.0, disp_focus=0.5)
    assert torch.equal(a, b)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")
def test_environment_switch_turns_it_off(monkeypatch):
    monkeypatch.setenv("GENREFOCUS_MALLOC_TUNING", "0")
    monkeypatch.setattr(_malloc, "_probed", False)
    monkeypatch.setattr(_malloc, "_libc", None)
    assert _malloc._glibc() is None
    monkeypatch.setattr(_malloc, "_probed", False)  # probed again after the test, as at import


@glibc
def test_render_memory_switches_on_from_the_large_render_size_on_cpu():
    from genrefocus_core._malloc import LARGE_RENDER_PIXELS, render_memory

    side = int(LARGE_RENDER_PIXELS**0.5) + 1
    large = torch.zeros(1, 1, 1, 1).expand(1, 3, side, side)
    small = torch.zeros(1, 1, 1, 1).expand(1, 3, side - 2, side - 2)
    with render_memory(large):
        assert _malloc._depth == 1
    with render_memory(small):
        assert _malloc._depth == 0
    with render_memory(torch.zeros(1, 1, 1, 1).expand(2, 3, side // 2 + 1, side)):  # batch counts
        assert _malloc._depth == 1
    with render_memory(torch.zeros(1, 3, side, side, device="meta")):  # not a CPU tensor
        assert _malloc._depth == 0
