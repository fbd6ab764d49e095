"""Drive the ComfyUI frontend of a :class:`_live_comfy.LiveComfy` server in headless Chromium.

Uses the system Chromium (Debian package ``chromium``) through the Python ``playwright`` package,
never a browser that playwright would download: ``executable_path`` points at the system binary
and nothing runs ``playwright install``. Every launch gets a fresh profile directory.

Environment:
    GENREFOCUS_CHROMIUM  the Chromium binary; default: /usr/bin/chromium, else chromium on PATH
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# First-visit dialogs that would cover the canvas (tutorial/templates, minimap).
FRONTEND_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False}


def chromium_path() -> str | None:
    """The system Chromium binary, or None when there is none."""
    env = os.environ.get("GENREFOCUS_CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    if Path("/usr/bin/chromium").is_file():
        return "/usr/bin/chromium"
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Frontend:
    """A page with the ComfyUI frontend open; ``page`` is a playwright sync ``Page``.

    Console messages and page errors are collected in ``log`` (strings), for failure messages.
    """

    def __init__(self, playwright, url: str, executable: str, *, width: int = 1600, height: int = 1000):
        self._profile = tempfile.mkdtemp(prefix="genrefocus_chromium_")
        self.context = playwright.chromium.launch_persistent_context(
            self._profile,
            executable_path=executable,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": width, "height": height},
            device_scale_factor=1,
        )
        self.page = self.context.pages[0] if self.context.pages else self.context.new_page()
        self.log: list[str] = []
        self.page_errors: list[str] = []
        self.page.on("console", lambda m: self.log.append(f"{m.type}: {m.text}"))
        self.page.on("pageerror", self._on_page_error)
        self.page.goto(url, wait_until="domcontentloaded")
        self.page.wait_for_function(
            "() => window.app && window.app.graph && window.app.canvas && window.app.canvas.ds",
            timeout=90_000,
        )

    def _on_page_error(self, err) -> None:
        self.page_errors.append(str(err))
        self.log.append(f"pageerror: {err}")

    def close(self) -> None:
        try:
            self.context.close()
        finally:
            shutil.rmtree(self._profile, ignore_errors=True)

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log[-n:])

    def evaluate(self, script: str, arg=None):
        return self.page.evaluate(script, arg)

    def wait_for(self, script: str, arg=None, timeout: float = 60.0):
        """Poll a JS predicate (an arrow function taking ``arg``) until it returns a truthy value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.page.evaluate(script, arg)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {script}\n{self.log_tail()}")
            time.sleep(0.1)

    def redraw(self) -> None:
        """Draw the canvas now (foreground and background)."""
        self.page.evaluate("() => { app.canvas.setDirty(true, true); app.canvas.draw(true, true); }")

    def graph_to_screen(self, gx: float, gy: float) -> tuple[float, float]:
        """Page (CSS px) coordinates of a graph-space point, from the canvas transform.

        The canvas maps graph point g to ``(g + ds.offset) * ds.scale`` in its own CSS pixels (the
        page runs at device scale factor 1); the canvas element's box gives the page offset.
        """
        return tuple(
            self.page.evaluate(
                """([gx, gy]) => {
                    const ds = app.canvas.ds;
                    const box = app.canvas.canvas.getBoundingClientRect();
                    return [box.left + (gx + ds.offset[0]) * ds.scale,
                            box.top + (gy + ds.offset[1]) * ds.scale];
                }""",
                [gx, gy],
            )
        )
