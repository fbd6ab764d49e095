"""Run a real ComfyUI server with only this pack installed (opt-in live tests).

Standard library only, so it can be imported by any interpreter that runs pytest.

Environment:
    COMFYUI_PATH    a ComfyUI checkout (the folder holding main.py); required
    COMFYUI_PYTHON  the interpreter of ComfyUI's environment; default: sys.executable

Usage (in a pytest fixture):

    with LiveComfy() as live:
        info = live.object_info()
        prompt_id = live.submit(api_graph)
        entry = live.wait(prompt_id)
        assert entry["status"]["status_str"] == "success"

The server runs on CPU, listens on a free 127.0.0.1 port, and uses a fresh temporary
base directory (custom_nodes, models, input, output, temp, user) whose custom_nodes/
holds one symlink, ``genrefocus``, to this repository. Only loopback is ever contacted:
the HTTP client ignores proxy settings.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import deque
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PACK_NAME = "genrefocus"
HOST = "127.0.0.1"


class LiveComfyError(RuntimeError):
    """The server could not be started, died, or answered unexpectedly."""


class PackImportError(LiveComfyError):
    """ComfyUI started but reported that our pack failed to import."""


class PromptRejected(LiveComfyError):
    """POST /prompt answered HTTP 400; ``body`` is the parsed JSON answer.

    ``body["error"]["type"]`` is e.g. "invalid_prompt", "prompt_outputs_failed_validation",
    "prompt_no_outputs"; ``body["node_errors"]`` maps node id to ``{"errors": [...], ...}``.
    """

    def __init__(self, body: dict, status: int = 400):
        self.body = body
        self.status = status
        error = body.get("error") if isinstance(body, dict) else None
        summary = error.get("message") if isinstance(error, dict) else None
        super().__init__(f"HTTP {status}: {summary or body!r}\n{json.dumps(body, indent=1)[:4000]}")

    @property
    def error_type(self) -> str | None:
        error = self.body.get("error")
        return error.get("type") if isinstance(error, dict) else None

    @property
    def node_errors(self) -> dict:
        return self.body.get("node_errors") or {}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# A client that never uses a proxy, so requests stay on loopback whatever the environment says.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class LiveComfy:
    """Context manager owning one ComfyUI server process and its temporary base directory."""

    def __init__(
        self,
        comfyui_path: str | os.PathLike | None = None,
        python: str | os.PathLike | None = None,
        *,
        pack_dir: str | os.PathLike | None = None,
        pack_name: str = PACK_NAME,
        start_timeout: float = 120.0,
        extra_args: tuple[str, ...] | list[str] = (),
    ):
        path = comfyui_path if comfyui_path is not None else os.environ.get("COMFYUI_PATH")
        if not path:
            raise LiveComfyError("COMFYUI_PATH is not set (a ComfyUI checkout holding main.py)")
        self.comfyui_path = Path(path).expanduser().resolve()
        if not (self.comfyui_path / "main.py").is_file():
            raise LiveComfyError(f"no main.py in COMFYUI_PATH={self.comfyui_path}")
        self.python = str(python or os.environ.get("COMFYUI_PYTHON") or sys.executable)
        self.pack_dir = Path(pack_dir).resolve() if pack_dir is not None else REPO_ROOT
        self.pack_name = pack_name
        self.start_timeout = float(start_timeout)
        self.extra_args = list(extra_args)
        self.client_id = str(uuid.uuid4())
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.startup_seconds: float | None = None
        self.last_submit: dict | None = None
        self._root: Path | None = None
        self._log_file = None

    # ---- paths -------------------------------------------------------------------------------

    @property
    def base_dir(self) -> Path:
        if self._root is None:
            raise LiveComfyError("server not started")
        return self._root / "base"

    @property
    def models_dir(self) -> Path:
        """``<base>/models``: place model files under it (ComfyUI rescans folders on use)."""
        return self.base_dir / "models"

    @property
    def input_dir(self) -> Path:
        return self.base_dir / "input"

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    @property
    def pack_link(self) -> Path:
        return self.base_dir / "custom_nodes" / self.pack_name

    @property
    def log_path(self) -> Path:
        if self._root is None:
            raise LiveComfyError("server not started")
        return self._root / "server.log"

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    # ---- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> LiveComfy:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _supports(self, flag: str) -> bool:
        try:
            text = (self.comfyui_path / "comfy" / "cli_args.py").read_text(encoding="utf-8")
        except OSError:
            return False
        return f'"{flag}"' in text or f"'{flag}'" in text

    def command(self) -> list[str]:
        cmd = [
            self.python,
            "main.py",
            "--cpu",
            "--listen",
            HOST,
            "--port",
            str(self.port),
            "--base-directory",
            str(self.base_dir),
        ]
        if self._supports("--disable-auto-launch"):
            cmd.append("--disable-auto-launch")
        if self._supports("--database-url"):
            cmd += ["--database-url", "sqlite:///:memory:"]
        return cmd + self.extra_args

    def start(self) -> None:
        if self.proc is not None:
            raise LiveComfyError("already started")
        # No dots in the path: ComfyUI derives the pack's sys.modules name from it.
        self._root = Path(tempfile.mkdtemp(prefix="genrefocus_comfy_"))
        atexit.register(self.close)
        try:
            for sub in ("custom_nodes", "models", "input", "output", "temp", "user"):
                (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
            os.symlink(self.pack_dir, self.pack_link, target_is_directory=True)
            self.port = _free_port()
            env = dict(os.environ)
            env["PYTHONUNBUFFERED"] = "1"
            env.pop("PYTHONPATH", None)  # the pack must import the way ComfyUI imports it
            self._log_file = open(self.log_path, "wb")
            t0 = time.monotonic()
            self.proc = subprocess.Popen(
                self.command(),
                cwd=str(self.comfyui_path),
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
            self._wait_ready(t0)
            self.startup_seconds = time.monotonic() - t0
            self.check_pack_imported()
        except BaseException:
            self.close()
            raise

    def _wait_ready(self, t0: float) -> None:
        deadline = t0 + self.start_timeout
        while True:
            code = self.proc.poll()
            if code is not None:
                raise LiveComfyError(
                    f"ComfyUI exited with code {code} during startup\n"
                    f"command: {' '.join(self.command())}\n--- log tail ---\n{self.log_tail()}"
                )
            try:
                self._get("/system_stats", timeout=2)
                return
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise LiveComfyError(
                    f"ComfyUI did not answer /system_stats within {self.start_timeout:.0f} s\n"
                    f"--- log tail ---\n{self.log_tail()}"
                )
            time.sleep(0.25)

    def pack_import_problems(self) -> list[str]:
        """Log lines in which ComfyUI reports that our pack failed to load."""
        link = str(self.pack_link)
        markers = ("IMPORT FAILED", "Cannot import", "Skip ", "comfy_entrypoint in", "Error while calling")
        return [
            line for line in self.log_text().splitlines() if link in line and any(m in line for m in markers)
        ]

    def check_pack_imported(self) -> None:
        problems = self.pack_import_problems()
        if problems:
            raise PackImportError(
                f"ComfyUI failed to import the pack at {self.pack_link} -> {self.pack_dir}:\n  "
                + "\n  ".join(problems)
                + f"\n--- log tail ---\n{self.log_tail(200)}"
            )

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            except ProcessLookupError:
                pass
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        root, self._root = self._root, None
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)
        atexit.unregister(self.close)

    # ---- log ---------------------------------------------------------------------------------

    def log_text(self) -> str:
        if self._root is None:
            return ""
        try:
            return self.log_path.read_bytes().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(deque(self.log_text().splitlines(), maxlen=lines))

    # ---- HTTP --------------------------------------------------------------------------------

    def _request(self, method: str, path: str, payload=None, timeout: float = 60):
        if self.port is None:
            raise LiveComfyError("server not started")
        data = None
        headers = {}
        if payload is not None:
            data = json.dumps(payload).encode("utf-8")
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        with _OPENER.open(req, timeout=timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def _get(self, path: str, timeout: float = 60):
        return self._request("GET", path, timeout=timeout)

    def _post(self, path: str, payload, timeout: float = 60):
        return self._request("POST", path, payload, timeout=timeout)

    def system_stats(self) -> dict:
        return self._get("/system_stats")

    def object_info(self) -> dict:
        """GET /object_info: every node class, keyed by node id."""
        return self._get("/object_info", timeout=120)

    def node_info(self, node_id: str) -> dict:
        """GET /object_info/<node_id>: the one entry (raises KeyError when unknown)."""
        return self._get("/object_info/" + urllib.parse.quote(node_id, safe=""))[node_id]

    def submit(self, api_prompt: dict, extra_data: dict | None = None) -> str:
        """POST /prompt with an API-format graph; returns the prompt id.

        Raises PromptRejected (carrying the parsed JSON body) on HTTP 400.
        """
        payload = {"prompt": api_prompt, "client_id": self.client_id}
        if extra_data:
            payload["extra_data"] = extra_data
        try:
            answer = self._post("/prompt", payload)
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                body = json.loads(raw)
            except ValueError:
                body = {"error": {"type": "unparsed", "message": raw.decode("utf-8", "replace")}}
            if e.code == 400:
                raise PromptRejected(body, e.code) from None
            raise LiveComfyError(f"POST /prompt: HTTP {e.code}: {body}\n{self.log_tail()}") from None
        # A 200 answer may still list node_errors for outputs that were dropped; keep it for tests.
        self.last_submit = answer
        return answer["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        """The /history entry for a prompt, or None while it is queued or running."""
        return (self._get("/history/" + urllib.parse.quote(prompt_id, safe="")) or {}).get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = 600, poll: float = 0.25) -> dict:
        """Poll /history/<id> until the prompt completed or failed; return its history entry.

        The entry has ``outputs`` ({node_id: {"images": [...]}}) and ``status``
        ({"status_str": "success" | "error", "completed": bool, "messages": [[event, data], ...]}).
        """
        deadline = time.monotonic() + timeout
        while True:
            entry = self.history(prompt_id)
            if entry is not None:
                status = entry.get("status") or {}
                if status.get("completed") or status.get("status_str") == "error":
                    return entry
            if self.proc is None or self.proc.poll() is not None:
                raise LiveComfyError(f"ComfyUI died while running {prompt_id}\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"prompt {prompt_id} not finished after {timeout:.0f} s\n{self.log_tail()}"
                )
            time.sleep(poll)

    def run(self, api_prompt: dict, timeout: float = 600) -> dict:
        """submit() then wait()."""
        return self.wait(self.submit(api_prompt), timeout=timeout)

    def interrupt(self) -> None:
        self._post("/interrupt", {})

    @staticmethod
    def status_messages(entry: dict, event: str) -> list[dict]:
        """The data of every ``event`` message (e.g. "execution_error") in a history entry."""
        return [data for name, data in (entry.get("status") or {}).get("messages", []) if name == event]
