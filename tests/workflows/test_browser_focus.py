"""Tier 3 (live, opt-in): click-to-focus in a real browser against a real ComfyUI.

A real ComfyUI (``_live_comfy.LiveComfy``: CPU, loopback, only this pack) serves the frontend of
``comfyui-frontend-package`` with our ``web/focus_point.js``; headless Chromium (Debian package
``chromium``, driven by the Python ``playwright`` package, no downloaded browser) opens it, loads
``workflows/depth_to_bokeh.json``, queues it, clicks on the photo inside the Focus Point node and
checks the widgets, the crosshair, and that the next run focuses where the click was.

Opt-in: needs COMFYUI_PATH (+ COMFYUI_PYTHON), ``playwright`` importable here and a Chromium binary
(``/usr/bin/chromium``, or GENREFOCUS_CHROMIUM); otherwise it skips. Run with

    COMFYUI_PATH=/work/comfyui COMFYUI_PYTHON=/work/comfy-venv/bin/python \\
        python -m pytest tests/workflows/test_browser_focus.py -m browser -v

Screenshots go to ``$GENREFOCUS_SCREENSHOT_DIR`` (default: ``<tmp>/genrefocus_browser_focus``).
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.comfy, pytest.mark.browser]

if not os.environ.get("COMFYUI_PATH"):
    pytest.skip("live ComfyUI tests need COMFYUI_PATH", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs the playwright package")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _browser import FRONTEND_SETTINGS, Frontend, chromium_path  # noqa: E402
from _live_comfy import LiveComfy  # noqa: E402

CHROMIUM = chromium_path()
if CHROMIUM is None:
    pytest.skip("the browser test needs Chromium (apt-get install chromium)", allow_module_level=True)

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
WORKFLOW = REPO / "workflows" / "depth_to_bokeh.json"
SHOTS = Path(
    os.environ.get("GENREFOCUS_SCREENSHOT_DIR") or Path(tempfile.gettempdir()) / "genrefocus_browser_focus"
)
H, W = 200, 320  # the demo scene: ground plane below 0.55 H, its disparity growing linearly downwards
HAND = (0.68, 0.8)  # typed into the widgets: on the ground, right of the ball
CLICK = (0.32, 0.9)  # clicked: on the ground, left of the ball, nearer than it, clear of the bars
NARROW_CLICK = (0.62, 0.86)  # clicked on the narrowed node: ground, right of the ball
TOL = 0.01  # about 2 screen px on a 320 px picture shown at scale 0.8
TOP = int(0.58 * H)
GROUND = (slice(TOP, H), slice(int(0.27 * W), int(0.38 * W)))  # below the horizon, between bar and ball


def _wf() -> dict:
    return json.loads(WORKFLOW.read_text())


def _node_id(wf: dict, node_type: str) -> int:
    return next(n["id"] for n in wf["nodes"] if n["type"] == node_type)


@pytest.fixture(scope="module")
def live():
    from genrefocus_core.defocus import disparity_preview
    from genrefocus_core.imageio import save_image
    from genrefocus_core.scenes import demo_scene

    with LiveComfy() as server:
        image, disparity, _ = demo_scene(H, W)
        save_image(server.input_dir / "demo_input.png", image)
        save_image(server.input_dir / "demo_disparity.png", disparity_preview(disparity))
        server._post("/settings", FRONTEND_SETTINGS)
        yield server


@pytest.fixture(scope="module")
def frontend(live):
    with sync_api.sync_playwright() as pw:
        fe = Frontend(pw, live.url, CHROMIUM, width=1700, height=1000)
        try:
            yield fe
        finally:
            fe.close()


def _runs(live, n: int, timeout: float = 300) -> list[dict]:
    """Wait until the server has finished ``n`` prompts; their history entries, oldest first."""
    deadline = time.monotonic() + timeout
    while True:
        hist = live._get("/history") or {}
        done = [e for e in hist.values() if (e.get("status") or {}).get("completed")
                or (e.get("status") or {}).get("status_str") == "error"]
        if len(done) >= n:
            return sorted(done, key=lambda e: e["prompt"][0])
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(done)} of {n} prompts finished\n{live.log_tail()}")
        time.sleep(0.25)


def _image(live, ref: dict) -> np.ndarray:
    folder = {"temp": live.base_dir / "temp", "output": live.output_dir}[ref["type"]]
    return _rgb(folder / ref["subfolder"] / ref["filename"])


def _rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255


def _screenshot(fe: Frontend, name: str) -> np.ndarray:
    SHOTS.mkdir(parents=True, exist_ok=True)
    fe.redraw()
    png = fe.page.screenshot(path=str(SHOTS / name))
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32) / 255


def _widgets(fe: Frontend, node: int) -> dict:
    return fe.evaluate(
        "(id) => Object.fromEntries(app.graph.getNodeById(id).widgets.map(w => [w.name, w.value]))", node
    )


def _picture_rect(fe: Frontend, node: int) -> tuple[float, float, float, float]:
    """Where the frontend draws the preview in the node (node-local x, y, w, h), from its layout rule:
    the area under the widgets (less the size line), image centred, scaled down to fit, never up."""
    g = fe.evaluate(
        """(id) => {
            const n = app.graph.getNodeById(id);
            const w = n.widgets.find(w => w.name === '$$canvas-image-preview');
            const img = n.imgs[0];
            const sizeLine = app.ui.settings.getSettingValue('Comfy.Node.AllowImageSizeDraw') ? 15 : 0;
            return {size: [...n.size], top: w.last_y, nw: img.naturalWidth, nh: img.naturalHeight, sizeLine};
        }""",
        node,
    )
    dw, dh = g["size"][0], g["size"][1] - g["top"] - g["sizeLine"]
    s = min(dw / g["nw"], dh / g["nh"], 1.0)
    w, h = g["nw"] * s, g["nh"] * s
    return (dw - w) / 2, (dh - h) / 2 + g["top"], w, h


def _to_screen(fe: Frontend, node: int, rect, u: float, v: float) -> tuple[float, float]:
    pos = fe.evaluate("(id) => [...app.graph.getNodeById(id).pos]", node)
    return fe.graph_to_screen(pos[0] + rect[0] + u * rect[2], pos[1] + rect[1] + v * rect[3])


def _yellow_near(shot: np.ndarray, xy: tuple[float, float], radius: int = 14) -> int:
    """Pixels of the extension's crosshair colour (#ffcc33) around a screen point. The demo
    ground is never that saturated (red <= 0.7), so only the crosshair counts there."""
    x, y = round(xy[0]), round(xy[1])
    patch = shot[y - radius : y + radius + 1, x - radius : x + radius + 1]
    r, g, b = patch[..., 0], patch[..., 1], patch[..., 2]
    return int(((r > 0.92) & (g > 0.7) & (g < 0.9) & (b < 0.35)).sum())


def _dark_row(preview: np.ndarray) -> int:
    """Row of the defocus preview that is darkest (in focus) on the ground, away from the ball."""
    return TOP + int(np.median(preview.mean(axis=2)[GROUND], axis=1).argmin())


def _row_with_disparity(disparity: np.ndarray, value: float) -> int:
    """The ground row (left of the ball) whose disparity is nearest ``value``."""
    return TOP + int(np.abs(np.median(disparity[GROUND], axis=1) - value).argmin())


def _patch_error(render: np.ndarray, photo: np.ndarray, u: float, v: float, r: int = 10) -> float:
    x, y = int(u * W), int(v * H)
    sl = (slice(max(0, y - r), y + r), slice(max(0, x - r), x + r))
    return float(np.abs(render[sl] - photo[sl]).mean())


def test_extension_is_served(live):
    assert "/extensions/genrefocus/focus_point.js" in live._get("/extensions")


def test_click_on_the_preview_sets_the_focus_and_the_next_run_uses_it(live, frontend):
    fe = frontend
    wf = _wf()
    node = _node_id(wf, "GenRefocus_FocusPoint")
    defocus = str(_node_id(wf, "GenRefocus_DefocusMap"))
    save = str(_node_id(wf, "SaveImage"))
    fe.evaluate(
        """async (wf) => {
            await app.loadGraphData(wf, true, false, 'depth_to_bokeh.json',
                                    {showMissingNodesDialog: true, showMissingModelsDialog: false});
            app.canvas.ds.scale = 0.8;
            app.canvas.ds.offset = [60, 20];
            app.canvas.setDirty(true, true);
        }""",
        wf,
    )
    assert fe.evaluate("() => app.extensions.some(e => e.name === 'GenRefocus.ClickToFocus')"), fe.log_tail()
    errors_at_load = len(fe.page_errors)
    start = _widgets(fe, node)
    assert (start["x"], start["y"]) == (0.5, 0.62)

    # Before the first run: a hint, and a click on the node does not touch x, y.
    texts = fe.evaluate(
        """() => {
            const texts = [];
            const fillText = CanvasRenderingContext2D.prototype.fillText;
            CanvasRenderingContext2D.prototype.fillText = function (t, ...a) {
                texts.push(String(t));
                return fillText.call(this, t, ...a);
            };
            try { app.canvas.setDirty(true, true); app.canvas.draw(true, true); }
            finally { CanvasRenderingContext2D.prototype.fillText = fillText; }
            return texts;
        }"""
    )
    assert any("run once to see the image" in t for t in texts), texts
    size = fe.evaluate("(id) => [...app.graph.getNodeById(id).size]", node)
    pos = fe.evaluate("(id) => [...app.graph.getNodeById(id).pos]", node)
    fe.page.mouse.click(*fe.graph_to_screen(pos[0] + size[0] * 0.4, pos[1] + size[1] * 0.6))
    fe.redraw()
    assert _widgets(fe, node) == start
    _screenshot(fe, "before_first_run.png")

    # First run: the photo appears in the node.
    fe.evaluate("async () => { await app.queuePrompt(0, 1); }")
    first = _runs(live, 1)[0]
    assert first["status"]["status_str"] == "success", first["status"]
    fe.wait_for(
        """(id) => { const n = app.graph.getNodeById(id);
                     return n.imgs?.length === 1 && n.imgs[0].complete && n.imgs[0].naturalWidth > 0; }""",
        node,
    )
    fe.redraw()
    # the frontend's (1.27) image-preview widget, laid out once drawn
    fe.wait_for("(id) => app.graph.getNodeById(id).widgets.find(w => w.name === '$$canvas-image-preview')"
                "?.last_y != null", node)
    rect = _picture_rect(fe, node)
    ours = fe.evaluate("(id) => app.graph.getNodeById(id).genrefocusImageRect", node)
    assert ours is not None, fe.log_tail()
    assert np.allclose([ours["x"], ours["y"], ours["w"], ours["h"]], rect, atol=0.5), (ours, rect)
    assert rect[2] == W and rect[3] == H  # shown 1:1 in the node (room enough), letterboxed around

    # The computed rectangle is where the photo really is on screen: compare the pixels.
    shot = _screenshot(fe, "after_first_run.png")
    x0, y0 = _to_screen(fe, node, rect, 0, 0)
    x1, y1 = _to_screen(fe, node, rect, 1, 1)
    photo = _image(live, first["outputs"][str(node)]["images"][0])  # the node's preview: photo + mark
    shown = Image.fromarray((photo * 255).astype(np.uint8)).resize((round(x1 - x0), round(y1 - y0)))
    small = np.asarray(shown, dtype=np.float32) / 255

    def crop_error(dx: int) -> float:
        top, left = round(y0), round(x0) + dx
        crop = shot[top : top + small.shape[0], left : left + small.shape[1]]
        return float(np.abs(crop - small).mean())

    assert crop_error(0) < 0.05 and crop_error(0) < 0.5 * crop_error(6), (crop_error(0), crop_error(6))

    # Typed values move the crosshair (no click involved).
    fe.evaluate(
        """([id, x, y]) => {
            const n = app.graph.getNodeById(id);
            for (const [name, v] of [['x', x], ['y', y]]) {
                const w = n.widgets.find(w => w.name === name);
                w.value = v;
                w.callback?.(v);
            }
            app.canvas.setDirty(true, true);
        }""",
        [node, *HAND],
    )
    shot = _screenshot(fe, "typed.png")
    assert _yellow_near(shot, _to_screen(fe, node, rect, *HAND)) > 20
    assert _yellow_near(shot, _to_screen(fe, node, rect, *CLICK)) == 0

    # A narrower node: the picture is scaled down and letterboxed above and below. A click on the
    # bar above it changes nothing; a click on it maps onto the picture as drawn.
    full = fe.evaluate("(id) => [...app.graph.getNodeById(id).size]", node)
    fe.evaluate("([id, w, h]) => app.graph.getNodeById(id).setSize([w, h])", [node, 240, full[1]])
    fe.redraw()
    narrow = _picture_rect(fe, node)
    assert narrow[2] == 240 and narrow[3] == 150 and narrow[1] > 60, narrow  # 0.75x, bars of ~80 units
    fe.page.mouse.click(*_to_screen(fe, node, narrow, 0.5, -0.1))
    fe.redraw()
    assert (_widgets(fe, node)["x"], _widgets(fe, node)["y"]) == HAND
    fe.page.mouse.click(*_to_screen(fe, node, narrow, *NARROW_CLICK))
    fe.wait_for("([id, x]) => app.graph.getNodeById(id).widgets.find(w => w.name === 'x').value !== x",
                [node, HAND[0]], timeout=10)
    values = _widgets(fe, node)
    assert abs(values["x"] - NARROW_CLICK[0]) <= TOL and abs(values["y"] - NARROW_CLICK[1]) <= TOL, values
    shot = _screenshot(fe, "narrow_node.png")
    assert _yellow_near(shot, _to_screen(fe, node, narrow, *NARROW_CLICK)) > 20
    fe.evaluate("([id, w, h]) => app.graph.getNodeById(id).setSize([w, h])", [node, *full])
    fe.redraw()
    assert _picture_rect(fe, node) == rect

    # The click.
    version = fe.evaluate("() => app.graph._version")
    fe.page.mouse.click(*_to_screen(fe, node, rect, *CLICK))
    fe.wait_for("([id, x]) => app.graph.getNodeById(id).widgets.find(w => w.name === 'x').value !== x",
                [node, HAND[0]], timeout=10)
    values = _widgets(fe, node)
    assert abs(values["x"] - CLICK[0]) <= TOL and abs(values["y"] - CLICK[1]) <= TOL, values
    assert values["x"] == round(values["x"], 3) and values["y"] == round(values["y"], 3)  # widget precision
    assert fe.evaluate("() => app.graph._version") > version  # the graph knows it changed
    shot = _screenshot(fe, "after_click.png")
    assert _yellow_near(shot, _to_screen(fe, node, rect, *CLICK)) > 20
    assert _yellow_near(shot, _to_screen(fe, node, rect, *HAND)) == 0
    # Dragging the picture still moves the node and leaves the focus alone.
    pos = fe.evaluate("(id) => [...app.graph.getNodeById(id).pos]", node)
    for dx, dy in ((60, 40), (-60, -40)):
        sx, sy = _to_screen(fe, node, rect, 0.6, 0.3)
        fe.page.mouse.move(sx, sy)
        fe.page.mouse.down()
        for i in range(1, 7):
            fe.page.mouse.move(sx + dx * i / 6, sy + dy * i / 6)
        fe.page.mouse.up()
        moved = fe.evaluate("(id) => [...app.graph.getNodeById(id).pos]", node)
        expected = (dx / 0.8, dy / 0.8) if dx > 0 else (0, 0)  # screen px / canvas scale; then back
        assert np.allclose(np.subtract(moved, pos), expected, atol=1.5), (moved, pos)
        assert _widgets(fe, node) == values
    api = fe.evaluate("async () => (await app.graphToPrompt()).output")
    assert (api[str(node)]["inputs"]["x"], api[str(node)]["inputs"]["y"]) == (values["x"], values["y"])

    # Second run: the server gets the clicked point and the in-focus band moves there.
    fe.evaluate("async () => { await app.queuePrompt(0, 1); }")
    second = _runs(live, 2)[1]
    assert second["status"]["status_str"] == "success", second["status"]
    sent = second["prompt"][2][str(node)]["inputs"]
    assert (sent["x"], sent["y"]) == (values["x"], values["y"])
    assert second["outputs"][str(node)]["genrefocus_point"][:2] == [values["x"], values["y"]]
    fe.wait_for("(id) => (app.graph.getNodeById(id).genrefocusLastPoint ?? [0, 0])[1] > 0.8", node)

    # In focus (black in the defocus preview) is the ground row whose disparity is the focus point's:
    # the ball's for the first run, the clicked ground row itself for the second.
    disparity = np.asarray(Image.open(live.input_dir / "demo_disparity.png").convert("L"), dtype=np.float32)
    px, py = int(values["x"] * W), int(values["y"] * H)
    expect_before = _row_with_disparity(disparity, disparity[int(0.62 * H), int(0.5 * W)])
    expect_after = _row_with_disparity(disparity, disparity[py, px])
    assert abs(expect_after - py) <= 1
    before = _image(live, first["outputs"][defocus]["images"][0])
    after = _image(live, second["outputs"][defocus]["images"][0])
    row_before, row_after = _dark_row(before), _dark_row(after)
    log.info("darkest ground row: %d before (expected %d), %d after the click (expected %d)", row_before,
             expect_before, row_after, expect_after)
    assert abs(row_before - expect_before) <= 3, (row_before, expect_before)
    assert abs(row_after - expect_after) <= 3, (row_after, expect_after)
    assert row_after - row_before > 15  # it moved
    assert after[py, px].mean() < 0.05 < before[py, px].mean()  # black = in focus, now at the click

    source = _rgb(live.input_dir / "demo_input.png")
    render_before = _image(live, first["outputs"][save]["images"][0])
    render_after = _image(live, second["outputs"][save]["images"][0])
    sharp_before = _patch_error(render_before, source, values["x"], values["y"])
    sharp_after = _patch_error(render_after, source, values["x"], values["y"])
    log.info("render vs photo around the click: %.4f before, %.4f after", sharp_before, sharp_after)
    assert sharp_after < 0.5 * sharp_before, (sharp_before, sharp_after)

    _screenshot(fe, "click_to_focus.png")
    assert fe.page_errors[errors_at_load:] == [], fe.log_tail()
    log.info("screenshots in %s", SHOTS)
