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
    assert {"classical_refocus.json", "camera_refocus.json"} <= {p.name for p in WORKFLOWS}


def test_camera_workflow_feeds_k_from_the_camera():
    """camera_refocus: the Defocus Map's k is a link from K from Camera (widget as input), at f/1.4."""
    wf = json.loads((REPO / "workflows" / "camera_refocus.json").read_text())
    nodes = {n["id"]: n for n in wf["nodes"]}
    dmap = next(n for n in wf["nodes"] if n["type"] == "GenRefocus_DefocusMap")
    k_in = next(i for i in dmap["inputs"] if i["name"] == "k")
    assert k_in["widget"] == {"name": "k"} and k_in["type"] == "FLOAT"
    link = next(lk for lk in wf["links"] if lk[0] == k_in["link"])
    assert nodes[link[1]]["type"] == "GenRefocus_KFromCamera" and link[5] == "FLOAT"
    settings = next(n for n in wf["nodes"] if n["type"] == "GenRefocus_CameraSettings")
    assert settings["widgets_values"][0] == 1.4
    api = json.loads((REPO / "tests" / "data" / "camera_refocus.api.json").read_text())
    assert api[str(dmap["id"])]["inputs"]["k"] == [str(link[1]), 0]


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
            # a widget driven by a link (e.g. K from Camera into the Defocus Map's k) is a link in the
            # twin, and the UI keeps its widget value as the fallback
            linked = {i["widget"]["name"]: i["link"] for i in n.get("inputs", []) if "widget" in i}
            values = [[str(lk[1]), lk[2]] for w in widgets for lk in wf["links"] if lk[0] == linked.get(w)]
            assert len(values) == len([w for w in widgets if linked.get(w) is not None])
            assert [entry["inputs"][w] for w in widgets if linked.get(w) is None] == [
                v for w, v in zip(widgets, n["widgets_values"], strict=True) if linked.get(w) is None
            ]
            assert [entry["inputs"][w] for w in widgets if linked.get(w) is not None] == values


def test_thumbnails_exist():
    for p in WORKFLOWS:
        assert p.with_suffix(".jpg").is_file(), f"{p.name} needs a thumbnail {p.stem}.jpg"
