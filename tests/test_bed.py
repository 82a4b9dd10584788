"""The test bed itself, without the daemon: real opencode, scripted model, test claude-teams.

If these fail, every daemon test would fail for reasons that are not the daemon's.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
import sseclient

from tests.support.daemon import wait_for
from tests.support.llm import Reply, ScriptedModel, flat_text
from tests.support.server import OpencodeServer
from tests.support.team import append_message, make_team, read_inbox

TEAM = "my-team"


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

    def find(self, predicate: Any) -> list[dict[str, Any]]:
        return [e for e in list(self.events) if predicate(e)]

    def close(self) -> None:
        self.resp.close()


@pytest.fixture
def events(opencode: OpencodeServer) -> Iterator[EventLog]:
    log = EventLog(opencode)
    wait_for(lambda: log.find(lambda e: e.get("type") == "server.connected"), 10, "server.connected")
    try:
        yield log
    finally:
        log.close()


def tool_parts(messages: list[dict[str, Any]], tool: str) -> list[dict[str, Any]]:
    return [p for m in messages for p in m["parts"] if p.get("type") == "tool" and p.get("tool") == tool]


def script(model: ScriptedModel, marker: str, first: Reply, then: Reply) -> None:
    """On ``marker``: answer ``first``; once a tool result is back, answer ``then``."""
    model.add_rule(lambda r: marker in flat_text(r) and r["messages"][-1]["role"] != "tool", first)
    model.add_rule(lambda r: marker in flat_text(r) and r["messages"][-1]["role"] == "tool", then)


def test_prompt_async_read_inbox_round_trip(opencode: OpencodeServer, model: ScriptedModel, teams_dir: Path,
                                            events: EventLog) -> None:
    make_team(teams_dir, TEAM, members=["worker-1"])
    append_message(teams_dir, TEAM, "team-lead", "worker-1", "Finished task 1, tests pass.", summary="done")
    script(model, "CHECK-INBOX",
           Reply.tool_call("claude-teams_read_inbox", {"team_name": TEAM, "agent_name": "team-lead"}),
           Reply.text("worker-1 says task 1 is done"))
    sid = opencode.create_session("bed")["id"]
    opencode.prompt_async(sid, "CHECK-INBOX please")
    messages = opencode.wait_idle(sid, 60)

    (part,) = tool_parts(messages, "claude-teams_read_inbox")
    assert part["state"]["status"] == "completed"
    assert json.loads(part["state"]["output"])[0]["text"] == "Finished task 1, tests pass."
    assert messages[-1]["parts"][-2]["text"] == "worker-1 says task 1 is done" or any(
        p.get("text") == "worker-1 says task 1 is done" for p in messages[-1]["parts"])

    def completed_on_stream(e: dict[str, Any]) -> bool:
        p = e.get("properties", {}).get("part", {})
        return (e.get("type") == "message.part.updated" and p.get("tool") == "claude-teams_read_inbox"
                and p.get("state", {}).get("status") == "completed")
    wait_for(lambda: events.find(completed_on_stream), 10, "the completed tool part on /event")
    # The model's read marked the message read, in place.
    assert read_inbox(teams_dir, TEAM, "team-lead")[0]["read"] is True
    # And the model was asked with the tool result it returned.
    follow_up = model.wait_for_request(lambda r: r["messages"][-1]["role"] == "tool")
    assert "Finished task 1" in json.dumps(follow_up["messages"][-1])


@pytest.mark.parametrize("tool,args,check", [
    ("claude-teams_read_config", {"team_name": TEAM},
     lambda out, base: json.loads(out)["name"] == TEAM),
    ("claude-teams_send_message", {"team_name": TEAM, "type": "message", "recipient": "team-lead",
                                   "content": "parser done", "summary": "done", "sender": "worker-1"},
     lambda out, base: [m["text"] for m in read_inbox(base, TEAM, "team-lead")] == ["parser done"]),
    ("claude-teams_send_message", {"team_name": TEAM, "type": "shutdown_request", "recipient": "worker-1",
                                   "content": "Unsafe output; shutting you down."},
     lambda out, base: json.loads(read_inbox(base, TEAM, "worker-1")[0]["text"])["type"] == "shutdown_request"),
    ("claude-teams_send_message", {"team_name": TEAM, "type": "broadcast", "content": "standup", "sender": "team-lead"},
     lambda out, base: [m["text"] for m in read_inbox(base, TEAM, "worker-1")] == ["standup"]),
])
def test_the_model_can_call_each_team_tool(opencode: OpencodeServer, model: ScriptedModel, teams_dir: Path,
                                           tool: str, args: dict[str, Any], check: Any) -> None:
    make_team(teams_dir, TEAM, members=["worker-1"])
    script(model, "USE-TOOL", Reply.tool_call(tool, args), Reply.text("done"))
    sid = opencode.create_session("tools")["id"]
    opencode.prompt_async(sid, "USE-TOOL now")
    messages = opencode.wait_idle(sid, 60)
    (part,) = tool_parts(messages, tool)
    assert part["state"]["status"] == "completed", part["state"]
    assert check(part["state"]["output"], teams_dir)


def test_model_failure_and_plain_text(opencode: OpencodeServer, model: ScriptedModel) -> None:
    model.add_rule(lambda r: "SAY-HI" in flat_text(r), Reply.text("hi there"))
    model.add_rule(lambda r: "FAIL-NOW" in flat_text(r), Reply.error(500))
    ok = opencode.create_session("ok")["id"]
    opencode.prompt_async(ok, "SAY-HI")
    msgs = opencode.wait_idle(ok, 60)
    assert any(p.get("text") == "hi there" for p in msgs[-1]["parts"])

    # A failing model is retried by the server (even a 4xx): the session shows status
    # "retry" with the model's message until it is aborted.
    failing = opencode.create_session("failing")["id"]
    opencode.prompt_async(failing, "FAIL-NOW")
    status = wait_for(lambda: opencode.session_status().get(failing, {}).get("type") == "retry"
                      and opencode.session_status()[failing], 60, "status retry")
    assert status["message"] == "scripted failure"
    assert opencode.http.post(f"{opencode.url}/session/{failing}/abort", timeout=10).ok
    wait_for(lambda: failing not in opencode.session_status(), 30, "the aborted session idle")
    assert any("FAIL-NOW" in flat_text(r) for r in model.requests)


def test_server_stays_inside_its_temp_home(opencode: OpencodeServer, tmp_path: Path) -> None:
    data = opencode.home / ".local" / "share" / "opencode"
    wait_for(lambda: data.exists(), 10, "opencode's data dir under the temp HOME")
    assert str(opencode.root).startswith(str(tmp_path))
