"""Focus Point's ui output carries the point it marks, for the click-to-focus extension (web/)."""

from __future__ import annotations

import torch


def test_preview_carries_the_marked_point(nodes):
    node = nodes["GenRefocus_FocusPoint"]
    out = node.execute(x=0.25, y=0.75, image=torch.full((2, 8, 12, 3), 0.5))
    ui = out.ui.as_dict()
    assert ui["genrefocus_point"] == [0.25, 0.75]  # what web/focus_point.js compares with the widgets
    assert ui["images"]  # the marked photo itself is shown as before
    moved = node.execute(x=0.8, y=0.1, image=torch.full((1, 8, 12, 3), 0.5)).ui.as_dict()
    assert moved["genrefocus_point"] == [0.8, 0.1]


def test_no_image_no_ui(nodes):
    assert nodes["GenRefocus_FocusPoint"].execute(x=0.25, y=0.75).ui is None
