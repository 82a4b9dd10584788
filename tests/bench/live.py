"""Reaction time and idle cost, against the real opencode serve and the scripted model.

The daemon runs as ``orchestratord run`` in a subprocess with its default settings,
except a debounce and minimum interval of 0 and the ``teammate-idle`` rule off (it would
add a prompt after every teammate turn). Every turn of the orchestrator session is
answered at once, and the moment its request reaches the model is the end of a trial.

- *inbox*: a teammate writes a message to the lead's inbox file (as claude-teams does);
  from just before the write.
- *tool*: a teammate session's model calls ``claude-teams_send_message`` to the lead;
  from the end of that tool call (``state.time.end`` on the server, in ms).
- *bare*: the same tool trials with the daemon stopped and, in its place, a loop in this
  process that reads ``/global/event``, splits frames, decodes them, and on the
  completed ``send_message`` tool part posts ``prompt_async`` to a session of its own.
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import requests

from tests.support.bed import ORCH_MARK, request_text
from tests.support.daemon import Daemon, ledger_rows, wait_for
from tests.support.llm import Reply, ScriptedModel, last_is_tool_result, last_user_text
from tests.support.server import OpencodeServer, new_message_id
from tests.support.team import append_message, make_team

TEAM = "bench-team"
LEAD = "team-lead"
BARE_MARK = "bare orchestrator:"
TEAMMATE_MARK = "send the lead a report:"


def write_config(path: Path, server_url: str, ledger: Path, teams: Path, team: str = TEAM, extra: str = "") -> Path:
    """A config with the default settings but for the server, the ledger, the team and ``extra``."""
    path.write_text(f"""
[server]
url = "{server_url}"

[ledger]
path = "{ledger}"

[teams]
base_dir = "{teams}"
names = ["{team}"]
{extra}""")
    return path


# Prompts at once for the reaction trials, and none for a teammate going idle.
REACTION_SETTINGS = """
[dispatch]
debounce_seconds = 0
min_interval_seconds = 0
max_per_hour = 1000

[[triggers]]
name = "teammate-idle"
enabled = false
"""


def proc_cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far, from /proc."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def percentiles(values: list[float]) -> dict[str, float]:
    """p50 and p99 (nearest rank) in milliseconds, with the count."""
    ordered = sorted(values)
    if not ordered:
        return {"n": 0}

    def rank(p: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, int(round(p / 100 * len(ordered) + 0.5)) - 1))]

    return {"n": len(ordered), "p50_ms": round(rank(50) * 1000, 1), "p99_ms": round(rank(99) * 1000, 1),
            "min_ms": round(ordered[0] * 1000, 1), "mean_ms": round(statistics.fmean(ordered) * 1000, 1)}


@dataclass
class Arrivals:
    """Orchestrator requests as they reach the model: (marker, monotonic, wall)."""

    seen: list[tuple[str, float, float]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    cond: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self.cond = threading.Condition(self.lock)

    def note(self, text: str) -> None:
        mono, wall = time.monotonic(), time.time()
        with self.cond:
            self.seen.append((text, mono, wall))
            self.cond.notify_all()

    def wait(self, marker: str, timeout: float = 30.0) -> tuple[float, float]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for text, mono, wall in self.seen:
                    if marker in text:
                        return mono, wall
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no orchestrator prompt mentioning {marker!r} within {timeout:g}s")
                self.cond.wait(left)

    def count(self) -> int:
        with self.lock:
            return len(self.seen)


class BareLoop:
    """The least a reactor can do: read the stream, decode, post on the completed tool call."""

    def __init__(self, url: str, session_id: str) -> None:
        self.url = url
        self.session_id = session_id
        self.http = requests.Session()
        self.resp: requests.Response | None = None
        self.thread = threading.Thread(target=self._run, name="bare-loop", daemon=True)
        self.ready = threading.Event()

    def start(self) -> "BareLoop":
        self.thread.start()
        if not self.ready.wait(10):
            raise RuntimeError("the bare loop did not connect")
        return self

    def _run(self) -> None:
        reader = requests.Session()
        try:
            self.resp = reader.get(self.url + "/global/event", stream=True, timeout=30)
            buf = b""
            for chunk in self.resp.iter_content(65536):
                frames = (buf + chunk).split(b"\n\n")
                buf = frames.pop()
                for frame in frames:
                    if not frame.startswith(b"data: "):
                        continue
                    obj = json.loads(frame[6:])
                    payload = obj.get("payload", obj)
                    etype = payload.get("type")
                    if etype == "server.connected":
                        self.ready.set()
                    elif etype == "message.part.updated":
                        part = payload.get("properties", {}).get("part", {})
                        state = part.get("state", {})
                        if (part.get("tool") == "claude-teams_send_message" and state.get("status") == "completed"
                                and part.get("sessionID") != self.session_id):
                            text = f"{BARE_MARK} {state.get('input', {}).get('content')}"
                            self.http.post(f"{self.url}/session/{self.session_id}/prompt_async", timeout=10,
                                           json={"messageID": new_message_id(),
                                                 "parts": [{"type": "text", "text": text}]})
        except (requests.RequestException, AttributeError):
            pass  # closed by stop()
        finally:
            reader.close()

    def stop(self) -> None:
        if self.resp is not None:
            sock = getattr(getattr(self.resp.raw, "connection", None), "sock", None)
            try:
                if sock is not None:
                    sock.shutdown(2)
                self.resp.close()
            except OSError:
                pass
        self.thread.join(5)
        self.http.close()


def _tool_end(server: OpencodeServer, session_id: str, marker: str) -> float:
    """Wall time (s) at which the send_message call carrying ``marker`` ended, per the server."""
    for message in reversed(server.messages(session_id)):
        for part in message.get("parts", []):
            state = part.get("state") or {}
            if part.get("tool") == "claude-teams_send_message" and marker in json.dumps(state.get("input")):
                end = (state.get("time") or {}).get("end")
                if isinstance(end, (int, float)):
                    return end / 1000.0
    raise AssertionError(f"no completed send_message carrying {marker!r} in session {session_id}")


class Live:
    """The real server, the scripted model and a team, for one bench run."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.model = ScriptedModel()
        self.teams = workdir / "claude"
        (self.teams / "teams").mkdir(parents=True)
        make_team(self.teams, TEAM, members=["worker-1"])
        self.server = OpencodeServer(workdir / "opencode", self.model.url, self.teams)
        self.ledger = workdir / "ledger.sqlite3"
        self.config = workdir / "orchestrator.toml"
        self.arrivals = Arrivals()
        self.daemon: Daemon | None = None

        def orchestrator(req: dict[str, Any]) -> Reply:
            self.arrivals.note(last_user_text(req))
            return Reply.text("noted")

        def teammate(req: dict[str, Any]) -> Reply:
            marker = last_user_text(req).split(TEAMMATE_MARK, 1)[1].strip()
            return Reply.tool_call("claude-teams_send_message", {
                "team_name": TEAM, "type": "message", "recipient": LEAD, "content": f"done {marker}",
                "summary": marker, "sender": "worker-1"})

        def is_orchestrator(req: dict[str, Any]) -> bool:
            text = request_text(req)
            return ORCH_MARK in text or BARE_MARK in text

        self.model.add_rule(lambda r: is_orchestrator(r) and not last_is_tool_result(r), orchestrator)
        self.model.add_rule(lambda r: is_orchestrator(r) and last_is_tool_result(r), Reply.text("noted"))
        self.model.add_rule(lambda r: TEAMMATE_MARK in last_user_text(r) and not last_is_tool_result(r), teammate)
        self.model.add_rule(last_is_tool_result, Reply.text("sent"))

    def __enter__(self) -> "Live":
        self.server.start()
        write_config(self.config, self.server.url, self.ledger, self.teams, extra=REACTION_SETTINGS)
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            if self.daemon is not None:
                self.daemon.close()
        finally:
            try:
                self.server.stop()
            finally:
                self.model.close()

    # -- the daemon ---------------------------------------------------------------------

    def start_daemon(self, url: str | None = None) -> Daemon:
        """The daemon on the config, ``url`` being the server's address in it (a proxy's, say)."""
        self.daemon = Daemon(self.config, self.workdir).start()
        wait_for(lambda: ledger_rows(self.ledger, "SELECT value FROM meta WHERE key = ?",
                                     (f"session:{url or self.server.url}",)), 60, "the orchestrator session")
        self.daemon.wait_log("stream-connected", 30)
        return self.daemon

    def stop_daemon(self) -> None:
        if self.daemon is not None:
            self.daemon.close()
            self.daemon = None

    def settled(self, timeout: float = 30.0) -> None:
        """No prompt open in the ledger and no session busy on the server."""
        def quiet() -> bool:
            open_ = ledger_rows(self.ledger, "SELECT COUNT(*) FROM dispatches WHERE state IN ('pending', 'sent')")
            pending = ledger_rows(self.ledger, "SELECT COUNT(*) FROM triggers WHERE dispatch_id IS NULL")
            return bool(open_) and open_[0][0] == 0 and pending[0][0] == 0 and not self.server.session_status()
        wait_for(quiet, timeout, "the daemon to finish its prompt", interval=0.02)

    # -- measures -----------------------------------------------------------------------

    def idle(self, seconds: float, warmup: float) -> dict[str, Any]:
        """The daemon's CPU and prompts over ``seconds`` of nothing happening, after ``warmup``."""
        assert self.daemon is not None and self.daemon.proc is not None
        pid = self.daemon.proc.pid
        self.settled()
        time.sleep(warmup)
        prompts_before, cpu_before, started = self.arrivals.count(), proc_cpu_seconds(pid), time.monotonic()
        time.sleep(seconds)
        cpu = proc_cpu_seconds(pid) - cpu_before
        elapsed = time.monotonic() - started
        return {"seconds": round(elapsed, 1), "cpu_seconds": round(cpu, 3),
                "cpu_percent_of_core": round(100 * cpu / elapsed, 3),
                "prompts": self.arrivals.count() - prompts_before, "rss_mb": round(proc_rss_bytes(pid) / 2**20, 1)}

    def inbox_trials(self, n: int, progress: Callable[[str], None]) -> list[float]:
        """Inbox write to prompt, ``n`` times after one untimed turn (the first starts the MCP server)."""
        out: list[float] = []
        for i in range(-1, n):
            marker = f"inbox-trial-{i}-{time.monotonic_ns()}"
            self.settled()
            time.sleep(0.05)
            t0 = time.monotonic()
            append_message(self.teams, TEAM, LEAD, "worker-1", f"status {marker}", summary=marker)
            mono, _ = self.arrivals.wait(marker, 60)
            if i >= 0:
                out.append(mono - t0)
                progress(f"inbox {i + 1}/{n}")
        self.settled()
        return out

    def tool_trials(self, n: int, teammate: str, progress: Callable[[str], None], label: str) -> list[float]:
        """Tool end to prompt, ``n`` times after one untimed turn."""
        out: list[float] = []
        for i in range(-1, n):
            marker = f"{label}-trial-{i}-{time.monotonic_ns()}"
            if self.daemon is not None:
                self.settled()
            time.sleep(0.05)
            self.server.prompt_async(teammate, f"{TEAMMATE_MARK} {marker}")
            _, wall = self.arrivals.wait(marker, 60)
            self.server.wait_idle(teammate)
            if i >= 0:
                out.append(wall - _tool_end(self.server, teammate, marker))
                progress(f"{label} {i + 1}/{n}")
        return out
