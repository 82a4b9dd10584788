"""One test's world for daemon tests: the real server, the scripted model, a team, daemons.

Shared by the daemon test modules; each piece is a fixture-managed object that cleans up
after itself.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import pytest

from tests.support.daemon import Daemon, ledger_rows, wait_for, write_config
from tests.support.llm import Reply, ScriptedModel, last_user_text
from tests.support.server import OpencodeServer
from tests.support.team import make_team

if TYPE_CHECKING:
    from tests.support.faultproxy import FaultProxy

TEAM = "my-team"
ORCH_MARK = "orchestrator of the agent team"
#: the ruleset claude-teams gives every opencode teammate it spawns
ALLOW_ALL = [{"permission": "*", "pattern": "*", "action": "allow"}]


def request_text(req: dict[str, Any]) -> str:
    """Everything the model was shown in one request, as text."""
    return json.dumps(req.get("messages", []))


def last_is_tool_result(req: dict[str, Any]) -> bool:
    msgs = req.get("messages") or []
    return bool(msgs) and msgs[-1].get("role") == "tool"


def is_orchestrator(req: dict[str, Any]) -> bool:
    return ORCH_MARK in request_text(req)


def orchestrator_prompts(model: ScriptedModel) -> list[dict[str, Any]]:
    """Requests that start an orchestrator turn (not tool follow-ups, not title requests)."""
    return [r for r in model.requests if is_orchestrator(r) and not last_is_tool_result(r)
            and r.get("messages", [{}])[-1].get("role") == "user"]


def send_message_args(content: str, recipient: str = "team-lead", sender: str = "worker-1") -> dict[str, Any]:
    """A teammate's send_message call (``sender`` stands in for the caller's identity)."""
    return {"team_name": TEAM, "type": "message", "recipient": recipient, "content": content,
            "summary": content[:30], "sender": sender}


@pytest.fixture
def team(teams_dir: Path) -> Path:
    make_team(teams_dir, TEAM, members=["worker-1", "worker-2"])
    return teams_dir


class Bed:
    """One test's world: the server, the model, the team dir, and daemons on it."""

    def __init__(self, tmp: Path, server: OpencodeServer, model: ScriptedModel, teams_dir: Path) -> None:
        self.tmp = tmp
        self.server = server
        self.model = model
        self.teams_dir = teams_dir
        self.ledger = tmp / "ledger.sqlite3"
        self.config = tmp / "orchestrator.toml"
        self.daemons: list[Daemon] = []

    def write_config(self, extra: str = "", **kw: Any) -> Path:
        return write_config(self.config, server_url=self.server.url, ledger=self.ledger, teams_base=self.teams_dir,
                            extra=extra, **kw)

    def daemon(self, env: dict[str, str] | None = None) -> Daemon:
        if not self.config.exists():
            self.write_config()
        d = Daemon(self.config, self.tmp, env=env)
        self.daemons.append(d)
        return d.start()

    def ready_daemon(self) -> Daemon:
        """A daemon that is READY, has its session, and has made its first inbox scan."""
        d = self.daemon()
        d.notify.wait("READY=1")
        self.session_id()
        wait_for(lambda: ledger_rows(self.ledger, "SELECT value FROM meta WHERE key = 'inbox.initialized'"), 30,
                 "the inbox watcher's first scan")
        return d

    def session_id(self) -> str:
        rows = wait_for(lambda: ledger_rows(self.ledger, "SELECT value FROM meta WHERE key = ?",
                                            (f"session:{self.server.url}",)), 30, "the orchestrator session in the ledger")
        return rows[0][0]

    def dispatches(self) -> list[dict[str, Any]]:
        cols = ["id", "message_id", "state", "prompt", "reply_text", "tool_calls", "error"]
        rows = ledger_rows(self.ledger, f"SELECT {', '.join(cols)} FROM dispatches ORDER BY id")
        return [dict(zip(cols, r, strict=True)) for r in rows]

    def teammate(self, title: str, script: Callable[[], None] | None = None) -> str:
        """A teammate session on the server, titled with the teammate's name.

        With a daemon running, it returns once the broker's rules are on the session: a
        prompt sent before them has its turn restarted (a case of its own, in test_broker),
        and opencode 1.18 can abort every later turn of a session so restarted.
        """
        sid = self.server.create_session(title)["id"]
        if any(d.proc is not None and d.proc.poll() is None for d in self.daemons):
            deadline = time.monotonic() + 10.0  # a config without the broker never rules it: go on then
            while not self.server.session(sid).get("permission") and time.monotonic() < deadline:
                time.sleep(0.02)
        return sid

    def warm(self) -> None:
        """One finished turn, so the server has its MCP servers up (as a server that runs for a while does)."""
        self.model.add_rule(lambda r: "warm up" in request_text(r), Reply.text("warm"))
        sid = self.server.create_session("warm-up")["id"]
        self.server.prompt_async(sid, "warm up")
        self.server.wait_idle(sid, timeout=60)

    def spawn(self, name: str, prompt: str | None = None, team: str = TEAM) -> str:
        """A teammate made as claude-teams makes one: titled ``name@team``, allowed everything, then prompted."""
        sid = self.server.create_session(f"{name}@{team}", permission=ALLOW_ALL)["id"]
        if prompt is not None:
            self.server.prompt_async(sid, prompt)
        return sid

    def close(self) -> None:
        for d in self.daemons:
            d.close()


@pytest.fixture
def bed(tmp_path: Path, opencode: OpencodeServer, model: ScriptedModel, team: Path) -> Iterator[Bed]:
    b = Bed(tmp_path, opencode, model, team)
    try:
        yield b
    finally:
        b.close()


@pytest.fixture
def proxy(bed: Bed) -> Iterator["FaultProxy"]:
    """A fault proxy in front of the bed's server (passing everything until told otherwise)."""
    from tests.support.faultproxy import FaultProxy

    p = FaultProxy(bed.server.port).start()
    try:
        yield p
    finally:
        p.stop()


def script_teammate(model: ScriptedModel, marker: str, calls: list[dict[str, Any]], text: str = "sent") -> None:
    """A teammate turn: on a prompt saying ``marker`` call send_message once per entry, then answer ``text``.

    Only the prompt itself counts (as a model would do what it is asked last): a turn the
    daemon restarts with "carry on" does not send them all again.
    """
    model.add_rule(lambda r: marker in last_user_text(r) and not last_is_tool_result(r),
                   Reply.tool_calls([("claude-teams_send_message", c) for c in calls]))
    model.add_rule(lambda r: marker in request_text(r) and last_is_tool_result(r), Reply.text(text))


def tool_results(req: dict[str, Any]) -> int:
    """How many tool results the conversation in ``req`` holds: the steps taken so far."""
    return sum(1 for m in req.get("messages") or [] if m.get("role") == "tool")


def script_commands(model: ScriptedModel, marker: str, commands: list[str], text: str = "done",
                    first_delay: float = 0.0, first: bool = False) -> None:
    """A teammate turn that runs ``commands`` one bash call at a time, then answers ``text``.

    ``first_delay`` is how long the model takes to its first call (a real model's think time).
    """
    def answer(req: dict[str, Any]) -> Reply:
        step = tool_results(req)
        if step == 0 and first_delay:
            time.sleep(first_delay)  # the model's own pace, not a wait of the test's
        if step < len(commands):
            return Reply.tool_call("bash", {"command": commands[step], "description": f"step {step + 1}"})
        return Reply.text(text)

    model.add_rule(lambda r: marker in request_text(r), answer, first=first)


def script_orchestrator(model: ScriptedModel, reply: str = "Checked the inbox; worker-1 is on track.",
                        hold: threading.Event | None = None) -> None:
    """An orchestrator turn: read the lead's inbox, then answer (optionally held until ``hold``)."""
    first = Reply.hang(hold) if hold is not None else None

    def start(req: dict[str, Any]) -> Any:
        if first is not None and not hold.is_set():  # type: ignore[union-attr]
            return first
        return Reply.tool_call("claude-teams_read_inbox", {"team_name": TEAM, "agent_name": "team-lead"})

    model.add_rule(lambda r: is_orchestrator(r) and not last_is_tool_result(r), start)
    model.add_rule(lambda r: is_orchestrator(r) and last_is_tool_result(r), Reply.text(reply))


NO_IDLE = '\n[[triggers]]\nname = "teammate-idle"\nenabled = false\n'
