"""The real ``opencode serve`` for tests: own HOME, own project dir, scripted model, test claude-teams.

Started on 127.0.0.1 and a free port; stopped with SIGTERM, a wait, then SIGKILL (the
server sometimes sits on the first SIGTERM for many seconds). ``kill()`` and ``start()``
again on the same port and the same data simulate an outage.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import socket
import string
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[2]
PINNED_BIN = ROOT / "tests" / "opencode" / "node_modules" / ".bin" / "opencode"
#: the oldest 1.x release the registry serves, for the compatibility smoke (tests/opencode-compat)
COMPAT_BIN = ROOT / "tests" / "opencode-compat" / "node_modules" / ".bin" / "opencode"
#: the binary every test runs unless it picks one; ORCHESTRATORD_TEST_OPENCODE runs the suite on another
OPENCODE_BIN = Path(os.environ.get("ORCHESTRATORD_TEST_OPENCODE") or PINNED_BIN)
TEAMS_SERVER = Path(__file__).resolve().parent / "teams_server.py"


_BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase
_ids = itertools.count()


def new_message_id() -> str:
    """A client-made ``msg_`` ID in opencode's own shape (the server checks only the prefix)."""
    stamp = (int(time.time() * 1000) * 0x1000 + next(_ids) % 0x1000) & 0xFFFFFFFFFFFF
    return f"msg_{stamp:012x}" + "".join(random.choice(_BASE62) for _ in range(14))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def opencode_config(model_url: str, teams_dir: Path, permission: dict[str, Any] | None = None,
                    server_url: str | None = None) -> dict[str, Any]:
    """The project's opencode.json; with ``server_url`` the claude-teams server gets
    ``OPENCODE_SERVER_URL`` (spawned teammates get sessions, messages are pushed)."""
    teams_env = {"CLAUDE_TEAMS_BASE_DIR": str(teams_dir)}
    if server_url:
        teams_env["OPENCODE_SERVER_URL"] = server_url
    cfg: dict[str, Any] = {
        "$schema": "https://opencode.ai/config.json",
        "autoupdate": False,
        "share": "disabled",
        "provider": {"scripted": {
            "npm": "@ai-sdk/openai-compatible",
            "name": "Scripted",
            "options": {"baseURL": f"{model_url}/v1", "apiKey": "test"},
            "models": {"scripted-model": {"name": "Scripted model", "tool_call": True,
                                          "limit": {"context": 200000, "output": 8000}}},
        }},
        "model": "scripted/scripted-model",
        "small_model": "scripted/scripted-model",
        "mcp": {"claude-teams": {
            "type": "local",
            "command": [sys.executable, str(TEAMS_SERVER)],
            "environment": teams_env,
            "enabled": True,
        }},
    }
    if permission is not None:
        cfg["permission"] = permission
    return cfg


class OpencodeServer:
    def __init__(self, root: Path, model_url: str, teams_dir: Path, password: str | None = None,
                 permission: dict[str, Any] | None = None, path_prefix: Path | None = None,
                 teams_push: bool = True, binary: Path | None = None) -> None:
        self.binary = binary or OPENCODE_BIN
        if not self.binary.exists():
            raise RuntimeError(f"{self.binary} is missing: run `make opencode` (part of `make test`)")
        self.root = root
        self.home = root / "home"
        self.project = root / "project"
        self.log_path = root / "opencode.log"
        self.password = password
        self.path_prefix = path_prefix  # a directory put first on the server's PATH (command shims)
        self.username = "opencode"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_seconds = 0.0  # of the last start(), until healthy
        self._last_prompt: dict[str, str] = {}  # session -> messageID of its last prompt_async
        for d in (self.home, self.project):
            d.mkdir(parents=True, exist_ok=True)
        (self.project / "opencode.json").write_text(json.dumps(opencode_config(
            model_url, teams_dir, permission, server_url=self.url if teams_push else None), indent=2))
        self.http = requests.Session()
        if password:
            self.http.auth = (self.username, password)

    # -- process ----------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        keep = ("PATH", "LANG", "LC_ALL", "TZ", "SSL_CERT_FILE", "NODE_EXTRA_CA_CERTS")
        env = {k: v for k, v in os.environ.items() if k in keep}
        env.update({
            "HOME": str(self.home),
            "XDG_CONFIG_HOME": str(self.home / ".config"),
            "XDG_DATA_HOME": str(self.home / ".local" / "share"),
            "XDG_CACHE_HOME": str(self.home / ".cache"),
            "XDG_STATE_HOME": str(self.home / ".local" / "state"),
            "TMPDIR": str(self.root),
            "OPENCODE_DISABLE_AUTOUPDATE": "1",
            "OPENCODE_DISABLE_LSP_DOWNLOAD": "true",
            "OPENCODE_DISABLE_MODELS_FETCH": "true",
            # opencode installs @opencode-ai/plugin into its config dir with a built-in npm at
            # startup, and the first prompt waits for it. Offline, that fails at once and
            # harmlessly; online it reaches the registry and, while running, keeps the server
            # from exiting on SIGTERM. Tests never need it: keep it off the network.
            "npm_config_offline": "true",
            "npm_config_update_notifier": "false",
        })
        if self.password:
            env["OPENCODE_SERVER_PASSWORD"] = self.password
        if self.path_prefix is not None:
            env["PATH"] = f"{self.path_prefix}{os.pathsep}{env.get('PATH', os.defpath)}"
        return env

    def start(self, timeout: float = 60.0) -> "OpencodeServer":
        """Start (again, after ``kill()``/``stop()``: same port, same data) and wait until healthy."""
        if self.running:
            return self
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [str(self.binary), "serve", "--hostname", "127.0.0.1", "--port", str(self.port)],
            cwd=self.project, env=self.env(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        log.close()
        started = time.monotonic()
        deadline = started + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"opencode exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.healthy():
                self.startup_seconds = time.monotonic() - started
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"opencode not healthy after {timeout:g}s:\n{self.log_tail()}")

    def healthy(self) -> bool:
        try:
            r = self.http.get(f"{self.url}/global/health", timeout=1)
            return r.ok and bool(r.json().get("healthy"))
        except (requests.RequestException, ValueError):
            return False

    def log_tail(self, lines: int = 40) -> str:
        """The end of the server's output and of its own log file (under the temp HOME)."""
        out = []
        for path in [self.log_path, *sorted((self.home / ".local" / "share" / "opencode" / "log").glob("*.log"))]:
            try:
                text = "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
            except OSError:
                continue
            out.append(f"--- {path} ---\n{text}")
        return "\n".join(out) or "(no log)"

    def _signal_group(self, signum: int) -> None:
        """Signal the server and the children it started (its MCP servers), by process group."""
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signum)
        except ProcessLookupError:
            pass

    def stop(self, grace: float = 3.0) -> None:
        """SIGTERM, a wait, then SIGKILL."""
        if self.proc is None or self.proc.poll() is not None:
            self._reap_group()
            return
        self._signal_group(signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            self.proc.wait(10)
        self._reap_group()

    def kill(self) -> None:
        """An outage: SIGKILL the server and its children at once."""
        if self.proc is not None and self.proc.poll() is None:
            self._signal_group(signal.SIGKILL)
            self.proc.wait(10)
        self._reap_group()

    def _reap_group(self) -> None:
        # Children left in the group (MCP servers) go with it.
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def restart(self, timeout: float = 60.0) -> "OpencodeServer":
        """An outage and a recovery: SIGKILL, then start again on the same port and data."""
        self.kill()
        return self.start(timeout)

    # -- API helpers --------------------------------------------------------------------

    def create_session(self, title: str, permission: list[dict[str, str]] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"title": title}
        if permission is not None:
            body["permission"] = permission
        r = self.http.post(f"{self.url}/session", json=body, timeout=10)
        r.raise_for_status()
        return r.json()

    def prompt_async(self, session_id: str, text: str, message_id: str | None = None, **body: Any) -> str:
        """Post a prompt (204 at once); returns its messageID, made here so a reply can be matched."""
        message_id = message_id or new_message_id()
        r = self.http.post(f"{self.url}/session/{session_id}/prompt_async",
                           json={"messageID": message_id, "parts": [{"type": "text", "text": text}], **body},
                           timeout=10)
        assert r.status_code == 204, (r.status_code, r.text)
        self._last_prompt[session_id] = message_id
        return message_id

    def messages(self, session_id: str) -> list[dict[str, Any]]:
        r = self.http.get(f"{self.url}/session/{session_id}/message", timeout=10)
        r.raise_for_status()
        return r.json()

    def sessions(self) -> list[dict[str, Any]]:
        r = self.http.get(f"{self.url}/session", timeout=10)
        r.raise_for_status()
        return r.json()

    def session_status(self) -> dict[str, Any]:
        r = self.http.get(f"{self.url}/session/status", timeout=10)
        r.raise_for_status()
        return r.json()

    def abort(self, session_id: str) -> None:
        r = self.http.post(f"{self.url}/session/{session_id}/abort", timeout=10)
        r.raise_for_status()

    def session(self, session_id: str) -> dict[str, Any]:
        r = self.http.get(f"{self.url}/session/{session_id}", timeout=10)
        r.raise_for_status()
        return r.json()

    def wait_idle(self, session_id: str, timeout: float = 30.0, message_id: str | None = None) -> list[dict[str, Any]]:
        """Wait until the prompt ``message_id`` (default: the last one sent with ``prompt_async``)
        is answered and the session is idle; return the session's messages.

        Answered: the last message is an assistant message whose parent is the prompt, and it
        is completed with a final finish (not ``tool-calls``), failed, or was aborted.
        """
        message_id = message_id or self._last_prompt.get(session_id)
        deadline = time.monotonic() + timeout
        while True:
            msgs = self.messages(session_id)
            last = msgs[-1]["info"] if msgs else {}
            done = last.get("role") == "assistant" and (message_id is None or last.get("parentID") == message_id) and (
                (bool(last.get("time", {}).get("completed")) and last.get("finish") not in ("tool-calls", "unknown"))
                or last.get("error") is not None)
            if done and session_id not in self.session_status():
                return msgs
            if time.monotonic() > deadline:
                raise AssertionError(f"session {session_id} not idle after {timeout:g}s: {json.dumps(msgs)[-1500:]}")
            time.sleep(0.1)
