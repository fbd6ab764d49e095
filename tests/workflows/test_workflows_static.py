"""Tier 3 (static, always): shipped workflows parse, use only our nodes and core nodes, and their
widget values match our node schemas; the API twins agree with the UI files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
SCHEMAS = json.loads((REPO / "tests" / "data" / "schemas.json").read_text())
CORE_NODES = {
    "LoadImage",
    "SaveImage",
    "PreviewImage",
    "Note",
    "MarkdownNote",
    "Reroute",
    "ImageScale",
    "LoadImageMask",
    "ImageToMask",
    "MaskToImage",
    "UNETLoader",
    "VAELoader",
}
WIDGET_TYPES = {"INT", "FLOAT", "BOOLEAN", "STRING", "COMBO"}


def test_there_are_workflows():
    assert [p.name for p in WORKFLOWS if p.name == "classical_refocus.json"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_static(path):
    wf = json.loads(path.read_text())
    node_ids = {n["id"] for n in wf["nodes"]}
    assert len(node_ids) == len(wf["nodes"])
    for n in wf["nodes"]:
        t = n["type"]
        assert t.startswith("GenRefocus_") or t in CORE_NODES, (
            f"{path.name}: node type {t} is not ours or core"
        )
        if t.startswith("GenRefocus_"):
            assert t in SCHEMAS, f"{path.name}: unknown GenRefocus node {t}"
            widgets = [i for i in SCHEMAS[t]["inputs"] if i["type"] in WIDGET_TYPES]
            values = n["widgets_values"]
            assert len(values) == len(widgets), f"{path.name} node {n['id']} {t}: widget count"
            for spec, v in zip(widgets, values, strict=True):
                if spec["type"] == "COMBO" and spec.get("file_list"):
                    assert isinstance(v, str) and v, (t, spec["id"], v)
                elif spec["type"] == "COMBO":
                    assert v in spec["options"], (t, spec["id"], v)
                elif spec["type"] in ("INT", "FLOAT"):
                    assert isinstance(v, int | float) and not isinstance(v, bool), (t, spec["id"], v)
                    assert spec.get("min", v) <= v <= spec.get("max", v), (t, spec["id"], v)
                elif spec["type"] == "BOOLEAN":
                    assert isinstance(v, bool), (t, spec["id"], v)
    for link in wf["links"]:
        lid, src, _src_slot, dst, dst_slot, ltype = link
        assert src in node_ids and dst in node_ids, link
        dst_node = next(n for n in wf["nodes"] if n["id"] == dst)
        assert dst_node["inputs"][dst_slot]["link"] == lid, link
        assert dst_node["inputs"][dst_slot]["type"] == ltype, link
    notes = [n for n in wf["nodes"] if n["type"] in ("Note", "MarkdownNote")]
    assert (
        notes and "Inputs" in notes[0]["widgets_values"][0] and "Model files" in notes[0]["widgets_values"][0]
    )


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_api_twin_matches_ui(path):
    twin = REPO / "tests" / "data" / f"{path.stem}.api.json"
    assert twin.is_file(), f"missing API twin {twin.name}: run python tests/data/build_workflows.py"
    api = json.loads(twin.read_text())
    wf = json.loads(path.read_text())
    ui_nodes = {str(n["id"]): n for n in wf["nodes"] if n["type"] not in ("Note", "MarkdownNote")}
    assert set(api) == set(ui_nodes)
    for nid, entry in api.items():
        n = ui_nodes[nid]
        assert entry["class_type"] == n["type"]
        if n["type"] in SCHEMAS:
            widgets = [i["id"] for i in SCHEMAS[n["type"]]["inputs"] if i["type"] in WIDGET_TYPES]
            assert [entry["inputs"][w] for w in widgets] == n["widgets_values"]


def test_thumbnails_exist():
    for p in WORKFLOWS:
        assert p.with_suffix(".jpg").is_file(), f"{p.name} needs a thumbnail {p.stem}.jpg"
