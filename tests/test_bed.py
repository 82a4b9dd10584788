"""The test bed itself, without the daemon: real opencode, scripted model, test claude-teams.

If these fail, every daemon test would fail for reasons that are not the daemon's. Most
cases share one server (``shared``); the ones that kill, restart or secure a server start
their own.
"""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import requests
import sseclient

from orchestratord.teammsg import without_reminder
from tests.conftest import SharedBed
from tests.support.daemon import wait_for
from tests.support.llm import Reply, ScriptedModel, flat_text, is_title_request, last_is_tool_result, last_user_text
from tests.support.server import OpencodeServer
from tests.support.team import append_message, inbox_path, make_team, read_inbox, tasks_dir


class EventLog:
    """Reads an SSE stream of the server in a thread and keeps every event."""

    def __init__(self, server: OpencodeServer, path: str = "/event") -> None:
        self.events: list[dict[str, Any]] = []
        self.resp = server.http.get(f"{server.url}{path}", stream=True, timeout=(5, 30))
        self.resp.raise_for_status()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for frame in sseclient.SSEClient(self.resp.iter_content(65536)).events():
                try:
                    self.events.append(json.loads(frame.data))
                except ValueError:
                    pass
        except (requests.RequestException, AttributeError, ValueError):
            return

    def find(self, predicate: Callable[[dict[str, Any]], Any]) -> list[dict[str, Any]]:
        return [e for e in list(self.events) if predicate(e)]

    def close(self) -> None:
        # Shut the socket first: a plain close() waits for the reader thread's next frame
        # (up to a 10 s heartbeat).
        sock = getattr(getattr(self.resp.raw, "_connection", None), "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.resp.close()
        self.thread.join(5)


@pytest.fixture
def events(shared: SharedBed) -> Iterator[EventLog]:
    log = EventLog(shared.server)
    wait_for(lambda: log.find(lambda e: e.get("type") == "server.connected"), 10, "server.connected")
    try:
        yield log
    finally:
        log.close()


def tool_parts(messages: list[dict[str, Any]], tool: str | None = None) -> list[dict[str, Any]]:
    return [p for m in messages for p in m["parts"]
            if p.get("type") == "tool" and (tool is None or p.get("tool") == tool)]


def texts(messages: list[dict[str, Any]]) -> list[str]:
    return [p["text"] for m in messages if m["info"]["role"] == "assistant" for p in m["parts"]
            if p.get("type") == "text"]


def run_turn(shared: SharedBed, marker: str, first: Reply, then: Reply | None = None,
             title: str = "bed") -> tuple[str, list[dict[str, Any]]]:
    """Script one turn on ``marker``, prompt a new session with it, wait until it is idle."""
    shared.model.script(marker, first, then or Reply.text("done"))
    sid = shared.server.create_session(title)["id"]
    shared.server.prompt_async(sid, f"{marker} please")
    return sid, shared.server.wait_idle(sid, 60)


# -- (a) one full round trip, seen in the messages and on the event stream -------------------


def test_prompt_async_read_inbox_round_trip(shared: SharedBed, events: EventLog) -> None:
    team = shared.team_name()
    make_team(shared.teams_dir, team, members=["worker-1"])
    append_message(shared.teams_dir, team, "team-lead", "worker-1", "Finished task 1, tests pass.", summary="done")
    sid, messages = run_turn(shared, "CHECK-INBOX",
                             Reply.tool_call("claude-teams_read_inbox", {"team_name": team, "agent_name": "team-lead"}),
                             Reply.text("worker-1 says task 1 is done"))

    (part,) = tool_parts(messages, "claude-teams_read_inbox")
    assert part["state"]["status"] == "completed"
    (msg,) = json.loads(part["state"]["output"])
    assert (msg["from"], msg["text"], msg["summary"], msg["read"]) == ("worker-1", "Finished task 1, tests pass.",
                                                                       "done", True)
    assert texts(messages)[-1] == "worker-1 says task 1 is done"
    final = messages[-1]["info"]
    assert final["role"] == "assistant" and final["finish"] == "stop" and final["time"]["completed"]

    def completed_on_stream(e: dict[str, Any]) -> bool:
        p = e.get("properties", {}).get("part", {})
        return (e.get("type") == "message.part.updated" and p.get("sessionID") == sid
                and p.get("tool") == "claude-teams_read_inbox" and p.get("state", {}).get("status") == "completed")
    (event,) = wait_for(lambda: events.find(completed_on_stream), 10, "the completed tool part on /event")
    assert "Finished task 1" in event["properties"]["part"]["state"]["output"]
    # The model's read marked the message read, in place.
    assert read_inbox(shared.teams_dir, team, "team-lead")[0]["read"] is True
    # And the model was asked again with the tool result it returned.
    follow_up = shared.model.wait_for_request(lambda r: "CHECK-INBOX" in flat_text(r) and last_is_tool_result(r))
    assert "Finished task 1" in json.dumps(follow_up["messages"][-1])
    assert any(t["function"]["name"] == "claude-teams_read_inbox" for t in follow_up.get("tools", []))


# -- (b) every claude-teams tool the daemon's orchestrator needs ------------------------------


def _inbox_texts(base: Path, team: str, agent: str) -> list[str]:
    """The texts as their senders wrote them (the server appends claude-teams' reminder)."""
    return [without_reminder(m["text"]) for m in read_inbox(base, team, agent)]


TOOL_CASES: list[tuple[str, str, dict[str, Any], Callable[[str, Path, str], bool]]] = [
    ("read_inbox", "claude-teams_read_inbox",
     {"agent_name": "team-lead", "unread_only": True, "mark_as_read": False},
     lambda out, base, team: [m["text"] for m in json.loads(out)] == ["hello lead"]
     and read_inbox(base, team, "team-lead")[0]["read"] is False),
    ("read_config", "claude-teams_read_config", {},
     lambda out, base, team: json.loads(out)["name"] == team
     and [m["name"] for m in json.loads(out)["members"]] == ["team-lead", "worker-1"]),
    ("message", "claude-teams_send_message",
     {"type": "message", "recipient": "worker-1", "content": "parser next", "summary": "next"},
     lambda out, base, team: json.loads(out)["success"] is True
     and _inbox_texts(base, team, "worker-1")[-1] == "parser next"
     and read_inbox(base, team, "worker-1")[-1]["from"] == "team-lead"),
    ("message-as-teammate", "claude-teams_send_message",
     {"type": "message", "recipient": "team-lead", "content": "parser done", "summary": "done", "sender": "worker-1"},
     lambda out, base, team: _inbox_texts(base, team, "team-lead") == ["hello lead", "parser done"]
     and read_inbox(base, team, "team-lead")[-1]["from"] == "worker-1"),
    ("shutdown_request", "claude-teams_send_message",
     {"type": "shutdown_request", "recipient": "worker-1", "content": "Unsafe output; shutting you down."},
     lambda out, base, team: (lambda doc, res: doc["type"] == "shutdown_request"
                              and doc["reason"] == "Unsafe output; shutting you down."
                              and doc["requestId"] == res["request_id"] and res["target"] == "worker-1")(
         json.loads(read_inbox(base, team, "worker-1")[-1]["text"]), json.loads(out))),
    ("shutdown_response", "claude-teams_send_message",
     {"type": "shutdown_response", "request_id": "shutdown-1@worker-1", "approve": True, "sender": "worker-1"},
     lambda out, base, team: json.loads(read_inbox(base, team, "team-lead")[-1]["text"])["type"]
     == "shutdown_approved"),
    ("broadcast", "claude-teams_send_message", {"type": "broadcast", "content": "standup", "summary": "standup"},
     lambda out, base, team: _inbox_texts(base, team, "worker-1") == ["standup"]),
    ("task_create", "claude-teams_task_create", {"subject": "Write parser", "description": "A parser."},
     lambda out, base, team: json.loads((tasks_dir(base, team) / "1.json").read_text())["subject"] == "Write parser"),
]


@pytest.mark.parametrize("case,tool,args,check", TOOL_CASES, ids=[c[0] for c in TOOL_CASES])
def test_the_model_can_call_each_team_tool(shared: SharedBed, case: str, tool: str, args: dict[str, Any],
                                           check: Callable[[str, Path, str], bool]) -> None:
    team = shared.team_name()
    make_team(shared.teams_dir, team, members=["worker-1"])
    append_message(shared.teams_dir, team, "team-lead", "worker-1", "hello lead")
    marker = f"USE-TOOL-{team}"
    _, messages = run_turn(shared, marker, Reply.tool_call(tool, {"team_name": team, **args}))
    (part,) = tool_parts(messages, tool)
    assert part["state"]["status"] == "completed", part["state"]
    assert check(part["state"]["output"], shared.teams_dir, team), part["state"]["output"]


def test_several_tool_calls_in_one_reply_and_a_failing_tool(shared: SharedBed) -> None:
    team = shared.team_name()
    make_team(shared.teams_dir, team, members=["worker-1", "worker-2"])
    calls = [("claude-teams_send_message", {"team_name": team, "type": "message", "recipient": f"worker-{i}",
                                            "content": f"task {i}", "summary": f"task {i}"}) for i in (1, 2)]
    calls.append(("claude-teams_read_config", {"team_name": "no-such-team"}))
    _, messages = run_turn(shared, "FAN-OUT", Reply.tool_calls(calls))
    parts = tool_parts(messages)
    assert [p["state"]["status"] for p in parts] == ["completed", "completed", "error"]
    assert "no-such-team" in parts[2]["state"]["error"]
    assert _inbox_texts(shared.teams_dir, team, "worker-1") == ["task 1"]
    assert _inbox_texts(shared.teams_dir, team, "worker-2") == ["task 2"]
    assert inbox_path(shared.teams_dir, team, "team-lead").read_text() == "[]"


# -- (c) plain text, model failures, slow and held answers -----------------------------------


def test_plain_text_reply(shared: SharedBed) -> None:
    shared.model.add_rule(lambda r: "SAY-HI" in flat_text(r), Reply.text("hi there"))
    sid = shared.server.create_session("hi")["id"]
    shared.server.prompt_async(sid, "SAY-HI")
    messages = shared.server.wait_idle(sid, 60)
    assert texts(messages) == ["hi there"]
    assert [m["info"]["role"] for m in messages] == ["user", "assistant"]
    assert messages[-1]["info"]["parentID"] == messages[0]["info"]["id"]
    assert shared.model.wait_for_request(lambda r: "SAY-HI" in flat_text(r)).get("stream") is True


def test_model_error_is_retried_until_aborted(shared: SharedBed) -> None:
    # A failing model is retried by the server (even a 4xx): the session shows status
    # "retry" with the model's message until it is aborted.
    shared.model.add_rule(lambda r: "FAIL-NOW" in flat_text(r), Reply.error(500, "scripted failure"))
    sid = shared.server.create_session("failing")["id"]
    shared.server.prompt_async(sid, "FAIL-NOW")
    status = wait_for(lambda: (shared.server.session_status().get(sid) or {}).get("type") == "retry"
                      and shared.server.session_status()[sid], 60, "status retry")
    assert status["message"] == "scripted failure"
    shared.server.abort(sid)
    messages = shared.server.wait_idle(sid, 30)
    # Aborted while retrying: the assistant message is completed with no finish and no parts.
    last = messages[-1]["info"]
    assert last["role"] == "assistant" and last["time"]["completed"] and "finish" not in last
    assert messages[-1]["parts"] == []


def test_hang_holds_the_session_busy_until_released(shared: SharedBed) -> None:
    release = threading.Event()
    shared.model.add_rule(lambda r: "HOLD-ON" in flat_text(r), Reply.hang(release, then=Reply.slow("let go now", 0.05)))
    sid = shared.server.create_session("held")["id"]
    shared.server.prompt_async(sid, "HOLD-ON")
    shared.model.wait_for_request(lambda r: "HOLD-ON" in flat_text(r))
    assert shared.server.session_status().get(sid) == {"type": "busy"}
    release.set()
    assert texts(shared.server.wait_idle(sid, 30)) == ["let go now"]


def test_two_sessions_scripted_at_once(shared: SharedBed) -> None:
    shared.model.add_rule(lambda r: "ALPHA" in flat_text(r), Reply.slow("alpha answer", 0.05))
    shared.model.add_rule(lambda r: "BETA" in flat_text(r), Reply.text("beta answer"))
    a = shared.server.create_session("a")["id"]
    b = shared.server.create_session("b")["id"]
    shared.server.prompt_async(a, "ALPHA")
    shared.server.prompt_async(b, "BETA")
    assert texts(shared.server.wait_idle(a, 30)) == ["alpha answer"]
    assert texts(shared.server.wait_idle(b, 30)) == ["beta answer"]


def test_queue_and_title_requests(shared: SharedBed) -> None:
    # A session made without a title gets one from the (small) model: that request is
    # answered on its own and does not take the queued reply.
    shared.model.enqueue(Reply.text("from the queue"))
    sid = _untitled_session(shared.server)
    shared.server.prompt_async(sid, "QUEUED")
    assert texts(shared.server.wait_idle(sid, 30)) == ["from the queue"]
    wait_for(lambda: shared.server.session(sid)["title"] == "Scripted session", 30, "the scripted title")
    assert any(is_title_request(r) for r in shared.model.requests)
    assert not shared.model.queue


def _untitled_session(server: OpencodeServer) -> str:
    r = server.http.post(f"{server.url}/session", json={}, timeout=10)
    r.raise_for_status()
    return str(r.json()["id"])


def test_server_stays_inside_its_temp_home(shared: SharedBed, tmp_path_factory: pytest.TempPathFactory) -> None:
    server = shared.server
    assert str(server.root).startswith(str(tmp_path_factory.getbasetemp()))
    assert (server.home / ".local" / "share" / "opencode" / "opencode.db").exists()
    # The plugin install opencode attempts at startup stays off the network.
    assert not (server.home / ".npm").exists()
    assert not (server.home / ".config" / "opencode" / "node_modules").exists()


# -- servers of their own ---------------------------------------------------------------


def test_kill_and_start_again_on_the_same_port(opencode: OpencodeServer, model: ScriptedModel) -> None:
    # Rules see the whole history: match on the last user message.
    model.add_rule(lambda r: "BEFORE" in last_user_text(r), Reply.text("before the outage"))
    sid = opencode.create_session("survivor")["id"]
    opencode.prompt_async(sid, "BEFORE")
    opencode.wait_idle(sid, 60)
    port, pid = opencode.port, opencode.pid

    opencode.kill()
    assert not opencode.healthy()
    opencode.start()
    assert (opencode.port, opencode.url) == (port, f"http://127.0.0.1:{port}") and opencode.pid != pid
    assert texts(opencode.messages(sid)) == ["before the outage"]
    model.add_rule(lambda r: "AFTER" in last_user_text(r), Reply.text("after the outage"))
    opencode.prompt_async(sid, "AFTER")
    assert texts(opencode.wait_idle(sid, 60)) == ["before the outage", "after the outage"]


def test_password_protects_every_route(tmp_path: Path, model: ScriptedModel, teams_dir: Path) -> None:
    server = OpencodeServer(tmp_path / "secured", model.url, teams_dir, password="s3cret")
    server.start()
    try:
        for path in ("/global/health", "/session", "/event"):
            r = requests.get(f"{server.url}{path}", timeout=5, stream=True)
            assert r.status_code == 401, (path, r.status_code)
            r.close()
        assert server.healthy()  # with basic auth, user "opencode"
        assert server.create_session("authed")["id"].startswith("ses_")
    finally:
        server.stop()
