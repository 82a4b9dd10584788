"""Run the real ``orchestratord`` in a subprocess, with a test NOTIFY_SOCKET.

Tests wait on what the daemon says (log lines, sd_notify messages, ledger rows) with
deadlines, never with sleeps.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], T | None | Literal[False]], timeout: float = 15.0, what: str = "condition",
             interval: float = 0.02) -> T:
    """Poll ``predicate`` until it returns something truthy (None and False are not), or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def holds(predicate: Callable[[], bool], seconds: float, what: str, interval: float = 0.1) -> None:
    """Check that ``predicate`` stays true for ``seconds``: how a test shows something does not happen."""
    deadline = time.monotonic() + seconds
    while True:
        if not predicate():
            raise AssertionError(f"no longer true: {what}")
        if time.monotonic() >= deadline:
            return
        time.sleep(interval)


class NotifyListener:
    """A datagram socket standing in for systemd's notification socket."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            with self._lock:
                self.messages.append(data.decode())

    def all(self) -> list[str]:
        with self._lock:
            return list(self.messages)

    def fields(self) -> list[str]:
        """Every ``KEY=value`` line received, in order."""
        return [line for m in self.all() for line in m.split("\n")]

    def wait(self, prefix: str, timeout: float = 15.0, after: int = 0) -> int:
        """Index (in ``fields()``) of the first line starting with ``prefix`` at or after ``after``."""
        def find() -> int | None:
            for i, line in enumerate(self.fields()):
                if i >= after and line.startswith(prefix):
                    return i + 1  # truthy even for index 0
            return None
        return wait_for(find, timeout, f"sd_notify {prefix!r}") - 1

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join(2)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def write_config(path: Path, *, server_url: str, ledger: Path, teams_base: Path, extra: str = "",
                 debounce: float = 0.2, min_interval: float = 0.0, password_file: Path | None = None,
                 health_interval: float = 0.25, max_per_hour: int = 1000) -> Path:
    """A config for tests: fast intervals, everything under the test's temp dir."""
    pw = f'password_file = "{password_file}"\n' if password_file else ""
    path.write_text(f"""
[server]
url = "{server_url}"
timeout_seconds = 5
{pw}
[ledger]
path = "{ledger}"

[health]
interval_seconds = {health_interval}
timeout_seconds = 1

[events]
read_timeout_seconds = 25
reconnect_max_seconds = 1

[teams]
base_dir = "{teams_base}"
names = ["my-team"]

[dispatch]
debounce_seconds = {debounce}
min_interval_seconds = {min_interval}
max_per_hour = {max_per_hour}

[log]
level = "debug"
{extra}
""")
    return path


class Daemon:
    """``orchestratord run`` as a child process; its stderr collected line by line."""

    def __init__(self, config: Path, workdir: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.workdir = workdir
        self.notify = NotifyListener(str(workdir / f"notify-{os.getpid()}-{id(self)}.sock"))
        self.extra_env = env or {}
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self.log_path = workdir / "daemon.log"

    def start(self, env: dict[str, str] | None = None) -> "Daemon":
        foreign = ("NOTIFY_SOCKET", "WATCHDOG_", "JOURNAL_STREAM", "ORCHESTRATORD_TEST")
        environ = {k: v for k, v in os.environ.items() if not k.startswith(foreign)}
        environ.update(self.extra_env)
        environ.update(env or {})
        environ["NOTIFY_SOCKET"] = self.notify.path
        environ["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen([sys.executable, "-m", "orchestratord", "run", "--config", str(self.config)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=environ,
                                     cwd=str(self.workdir))
        self._reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self._reader.start()
        return self

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        with open(self.log_path, "a") as out:
            for line in proc.stderr:
                out.write(line)
                out.flush()
                with self._lock:
                    self.lines.append(line.rstrip("\n"))

    def log(self) -> list[str]:
        with self._lock:
            return list(self.lines)

    def grep(self, pattern: str) -> list[str]:
        rx = re.compile(pattern)
        return [line for line in self.log() if rx.search(line)]

    def wait_log(self, pattern: str, timeout: float = 15.0, count: int = 1) -> list[str]:
        def found() -> list[str] | None:
            if self.proc is not None and self.proc.poll() is not None and len(self.grep(pattern)) < count:
                raise AssertionError(f"daemon exited ({self.proc.returncode}) before logging {pattern!r}:\n"
                                     + "\n".join(self.log()[-30:]))
            hits = self.grep(pattern)
            return hits if len(hits) >= count else None
        try:
            return wait_for(found, timeout, f"log line {pattern!r} x{count}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nlast lines:\n" + "\n".join(self.log()[-30:])) from None

    def wait_server_down(self, timeout: float = 30.0) -> None:
        """Until the daemon's latest word on the server is ``server-down``.

        The health watch logs transitions only: a probe that timed out on a loaded machine
        just before a fault has said ``server-down`` already, and the fault adds no line.
        """
        def down() -> bool:
            said = self.grep(r"\bserver-(up|down) ")
            return bool(said) and "server-down " in said[-1]
        try:
            wait_for(down, timeout, "the daemon saying server-down")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nlast lines:\n" + "\n".join(self.log()[-30:])) from None

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait_exit(self, timeout: float = 10.0) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        if self._reader:
            self._reader.join(5)
        return code

    def cli(self, *args: str) -> str:
        """Run ``orchestratord <args> --config <this daemon's config>``; its stdout (it must succeed)."""
        proc = subprocess.run([sys.executable, "-m", "orchestratord", *args, "--config", str(self.config)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"orchestratord {' '.join(args)} exited {proc.returncode}: {proc.stderr}"
        return proc.stdout

    def stop(self) -> int | None:
        """SIGTERM, a wait, then SIGKILL; by PID only."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.wait_exit(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.wait_exit(5)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.wait_exit(5)

    def close(self) -> None:
        self.stop()
        self.notify.close()


def ledger_rows(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Read the ledger from outside the daemon (as `orchestratord status` does)."""
    if not path.exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        return db.execute(sql, params).fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        db.close()


def status_json(config: Path) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "orchestratord", "status", "--json", "--config", str(config)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)
