"""The test claude-teams MCP server on its own, over stdio with the official MCP client."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import pytest
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

from tests.support.daemon import wait_for
from tests.support.llm import Reply, ScriptedModel, flat_text
from tests.support.server import TEAMS_SERVER, OpencodeServer
from tests.support.team import (
    REMINDER,
    append_message,
    inbox_path,
    locked,
    make_team,
    read_config,
    read_inbox,
    tasks_dir,
    team_dir,
    with_reminder,
    write_config,
)

EXPECTED_TOOLS = {"team_create", "team_delete", "spawn_teammate", "send_message", "read_inbox", "read_config",
                  "task_create", "task_update", "task_list", "task_get", "force_kill_teammate",
                  "process_shutdown_approved", "check_teammate"}


def run(base: Path, calls: list[tuple[str, dict[str, Any]]]) -> tuple[set[str], list[tuple[bool, str]]]:
    """Start the server by path, list its tools, make ``calls``; (tools, [(is_error, text)])."""
    params = StdioServerParameters(command=sys.executable, args=[str(TEAMS_SERVER)],
                                   env={"PATH": os.environ.get("PATH", ""), "CLAUDE_TEAMS_BASE_DIR": str(base)},
                                   cwd=str(base))

    async def go() -> tuple[set[str], list[tuple[bool, str]]]:
        async with stdio_client(params) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                tools = {t.name for t in (await session.list_tools()).tools}
                out = []
                for name, args in calls:
                    res = await session.call_tool(name, args)
                    out.append((bool(res.isError), "".join(getattr(c, "text", "") for c in res.content)))
                return tools, out

    return asyncio.run(asyncio.wait_for(go(), 30))


def test_tools_and_the_files_they_write(teams_dir: Path) -> None:
    make_team(teams_dir, "t", members=["worker-1"])
    append_message(teams_dir, "t", "team-lead", "worker-1", "one", summary="s1")
    append_message(teams_dir, "t", "team-lead", "worker-1", "two")
    tools, out = run(teams_dir, [
        ("read_inbox", {"team_name": "t", "agent_name": "team-lead", "mark_as_read": False}),
        ("read_inbox", {"team_name": "t", "agent_name": "team-lead"}),
        ("read_inbox", {"team_name": "t", "agent_name": "team-lead"}),
        ("read_inbox", {"team_name": "t", "agent_name": "team-lead", "unread_only": False, "mark_as_read": False}),
        ("send_message", {"team_name": "t", "type": "shutdown_request", "recipient": "worker-1", "content": "stop"}),
        ("send_message", {"team_name": "t", "type": "shutdown_request", "recipient": "team-lead", "content": "x"}),
        ("send_message", {"team_name": "t", "type": "message", "recipient": "nobody", "content": "x", "summary": "x"}),
        ("task_create", {"team_name": "t", "subject": "Parser", "description": "Write it"}),
        ("task_update", {"team_name": "t", "task_id": "1", "owner": "worker-1", "status": "in_progress"}),
        ("task_list", {"team_name": "t"}),
        ("spawn_teammate", {"team_name": "t", "name": "worker-2", "prompt": "review the parser", "backend": "claude"}),
        ("process_shutdown_approved", {"team_name": "t", "agent_name": "worker-1"}),
        ("task_get", {"team_name": "t", "task_id": "1"}),
        ("read_config", {"team_name": "t"}),
        ("team_create", {"team_name": "fresh", "description": "new"}),
        ("team_delete", {"team_name": "fresh"}),
        ("read_config", {"team_name": "fresh"}),
    ])
    assert EXPECTED_TOOLS <= tools
    errors = [i for i, (err, _) in enumerate(out) if err]
    assert errors == [5, 6, 16], out
    texts: list[Any] = [json.loads(text) if not err else text for err, text in out]

    assert [(m["text"], m["read"]) for m in texts[0]] == [("one", False), ("two", False)]
    assert [(m["text"], m["read"], m.get("summary")) for m in texts[1]] == [("one", True, "s1"), ("two", True, None)]
    assert texts[2] == []  # unread only: nothing new
    assert [m["read"] for m in texts[3]] == [True, True]
    assert [m["read"] for m in read_inbox(teams_dir, "t", "team-lead")] == [True, True]

    result = texts[4]
    assert result["success"] is True and result["target"] == "worker-1"
    assert result["request_id"].startswith("shutdown-") and result["request_id"].endswith("@worker-1")
    request, assignment = (json.loads(m["text"]) for m in read_inbox(teams_dir, "t", "worker-1"))
    assert request == {"type": "shutdown_request", "requestId": result["request_id"], "from": "team-lead",
                       "reason": "stop", "timestamp": request["timestamp"]}
    assert "team-lead" in out[5][1] and "nobody" in out[6][1]

    assert texts[7]["id"] == "1" and texts[7]["status"] == "pending"
    assert assignment["type"] == "task_assignment" and assignment["taskId"] == "1"
    assert [(t["id"], t["owner"], t["status"]) for t in texts[9]] == [("1", "worker-1", "in_progress")]
    assert texts[10]["agent_id"] == "worker-2@t"
    assert [m["text"] for m in read_inbox(teams_dir, "t", "worker-2")] == ["review the parser"]
    # Removing worker-1 put its task back to pending, unowned.
    assert (texts[12]["status"], texts[12].get("owner")) == ("pending", None)
    assert json.loads((tasks_dir(teams_dir, "t") / "1.json").read_text())["status"] == "pending"
    assert [m["name"] for m in texts[13]["members"]] == ["team-lead", "worker-2"]
    assert not (teams_dir / "teams" / "fresh").exists()


# -- the public server's behaviour, fact by fact ---------------------------------------------


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _fact_one_line_files(base: Path) -> None:
    make_team(base, "t", members=["worker-1"])
    _, out = run(base, [("send_message", {"team_name": "t", "type": "message", "recipient": "team-lead",
                                           "content": "parser done", "summary": "done", "sender": "worker-1"})])
    assert not out[0][0], out
    raw = inbox_path(base, "t", "team-lead").read_text()
    assert len(_lines(inbox_path(base, "t", "team-lead"))) == 1
    assert raw == json.dumps(json.loads(raw))  # json.dumps' own ", " and ": " separators


def _fact_reminder_suffix(base: Path) -> None:
    make_team(base, "t", members=["worker-1", "worker-2"])
    _, out = run(base, [
        ("send_message", {"team_name": "t", "type": "message", "recipient": "team-lead", "content": "hello",
                          "summary": "hi", "sender": "worker-1"}),
        ("send_message", {"team_name": "t", "type": "broadcast", "content": "all", "sender": "team-lead"})])
    assert not any(err for err, _ in out), out
    [msg] = read_inbox(base, "t", "team-lead")
    assert msg["text"] == "hello" + REMINDER.format(sender="worker-1")
    assert msg["summary"] == "hi" and "color" not in msg  # the lead has no colour
    [b1] = read_inbox(base, "t", "worker-2")
    assert b1["text"] == with_reminder("all", "team-lead") and b1["color"] == "blue"


def _fact_sender_on_trust(base: Path) -> None:
    make_team(base, "t", members=["worker-1"])
    _, out = run(base, [("send_message", {"team_name": "t", "type": "message", "recipient": "worker-1",
                                           "content": "I am the lead", "sender": "team-lead"})])
    assert not out[0][0]
    assert [m["from"] for m in read_inbox(base, "t", "worker-1")] == ["team-lead"]


def _fact_new_inbox_outside_the_lock(base: Path) -> None:
    """A new inbox appears as ``[]`` while another writer holds the lock; the write waits for it."""
    make_team(base, "t", members=[])
    config = read_config(base, "t")
    config["members"].append({"name": "late", "agentId": "late@t", "agentType": "general-purpose"})
    write_config(base, "t", config)
    lock = team_dir(base, "t") / "inboxes" / ".lock"
    lock.write_text("junk")
    path = inbox_path(base, "t", "late")
    out: list[Any] = []
    with locked(base, "t"):
        writer = threading.Thread(target=lambda: out.append(run(base, [("send_message", {
            "team_name": "t", "type": "message", "recipient": "late", "content": "x"})])))
        writer.start()
        wait_for(lambda: path.exists(), timeout=30, what="the new inbox, made without the lock")
        assert path.read_text() == "[]"
        assert writer.is_alive()  # its message waits for the lock
    writer.join(30)
    assert not out[0][1][0][0], out
    assert [m["text"] for m in json.loads(path.read_text())] == [with_reminder("x", "team-lead")]
    assert lock.exists() and lock.stat().st_size == 0  # opened with truncation, never deleted


def _fact_config_replaced_by_rename(base: Path) -> None:
    make_team(base, "t", members=["worker-1"])
    path = team_dir(base, "t") / "config.json"
    before = path.stat().st_ino
    _, out = run(base, [("force_kill_teammate", {"team_name": "t", "agent_name": "worker-1"}),
                        ("team_create", {"team_name": "fresh"})])
    assert not any(err for err, _ in out), out
    assert path.stat().st_ino != before
    assert [m["name"] for m in read_config(base, "t")["members"]] == ["team-lead"]
    assert not list(team_dir(base, "t").glob("*.tmp"))
    assert (team_dir(base, "fresh") / "config.json").exists()
    assert not (team_dir(base, "fresh") / "inboxes").exists()  # it comes with the first message


def _fact_structured_texts(base: Path) -> None:
    make_team(base, "t", members=["worker-1"])
    _, out = run(base, [
        ("send_message", {"team_name": "t", "type": "shutdown_request", "recipient": "worker-1", "content": "done"}),
        ("send_message", {"team_name": "t", "type": "shutdown_response", "request_id": "shutdown-1@worker-1",
                          "approve": True, "sender": "worker-1"}),
        ("send_message", {"team_name": "t", "type": "shutdown_response", "request_id": "shutdown-2@worker-1",
                          "approve": False, "content": "still busy", "sender": "worker-1"}),
        ("send_message", {"team_name": "t", "type": "plan_approval_response", "recipient": "worker-1",
                          "request_id": "p1", "approve": True}),
        ("task_create", {"team_name": "t", "subject": "Parser", "description": "Write it"}),
        ("task_update", {"team_name": "t", "task_id": "1", "owner": "worker-1"}),
    ])
    assert not any(err for err, _ in out), out
    request, plan, assignment = read_inbox(base, "t", "worker-1")
    assert set(json.loads(request["text"])) == {"type", "requestId", "from", "reason", "timestamp"}
    assert json.loads(request["text"])["requestId"].endswith("@worker-1") and "summary" not in request
    assert (plan["text"], plan["summary"]) == ('{"type":"plan_approval","approved":true}', "plan_approved")
    assert set(json.loads(assignment["text"])) == {"type", "taskId", "subject", "description", "assignedBy",
                                                   "timestamp"}
    approved, refused = read_inbox(base, "t", "team-lead")
    assert set(json.loads(approved["text"])) == {"type", "requestId", "from", "timestamp", "paneId", "backendType",
                                                 "sessionId"}
    assert "summary" not in approved
    assert (refused["text"], refused["summary"]) == ("still busy", "shutdown_rejected")


def _fact_no_idle_notification(base: Path) -> None:
    make_team(base, "t", members=["worker-1"])
    _, out = run(base, [("send_message", {"team_name": "t", "type": "message", "recipient": "team-lead",
                                           "content": "done", "sender": "worker-1"}),
                        ("check_teammate", {"team_name": "t", "agent_name": "worker-1"})])
    assert not any(err for err, _ in out), out
    texts = [m["text"] for p in (team_dir(base, "t") / "inboxes").glob("*.json") for m in json.loads(p.read_text())]
    assert texts and not any("idle_notification" in t for t in texts)


def _fact_spawn_needs_the_server_url(base: Path) -> None:
    make_team(base, "t")
    _, out = run(base, [("spawn_teammate", {"team_name": "t", "name": "w", "prompt": "go"})])
    assert out[0][0] and "OPENCODE_SERVER_URL" in out[0][1]
    assert [m["name"] for m in read_config(base, "t")["members"]] == ["team-lead"]


FACTS: dict[str, Callable[[Path], None]] = {
    "one-line inbox files": _fact_one_line_files,
    "reminder suffix on message and broadcast": _fact_reminder_suffix,
    "sender taken on trust": _fact_sender_on_trust,
    "new inbox made outside the lock, lock retried, lock file truncated": _fact_new_inbox_outside_the_lock,
    "config.json replaced by rename; team_create in place without inboxes": _fact_config_replaced_by_rename,
    "structured texts": _fact_structured_texts,
    "no idle_notification": _fact_no_idle_notification,
    "spawn without OPENCODE_SERVER_URL fails and rolls back": _fact_spawn_needs_the_server_url,
}


@pytest.mark.parametrize("fact", list(FACTS))
def test_behaves_like_the_public_server(fact: str, teams_dir: Path) -> None:
    FACTS[fact](teams_dir)


def _tool_results(req: dict[str, Any]) -> int:
    return sum(1 for m in req.get("messages", []) if m.get("role") == "tool")


def _user_texts(messages: list[dict[str, Any]]) -> list[str]:
    return ["".join(p.get("text", "") for p in m["parts"] if p.get("type") == "text")
            for m in messages if m["info"].get("role") == "user"]


def test_spawn_and_the_push_to_the_lead_through_opencode(opencode: OpencodeServer, model: ScriptedModel,
                                                         teams_dir: Path) -> None:
    """Through the real server: team_create from the one busy session makes it the lead's;
    spawn_teammate creates the teammate's allow-all session and sends its first prompt;
    the teammate's message to the lead is pushed into the lead's session as a prompt."""
    def lead(req: dict[str, Any]) -> Reply:
        done = _tool_results(req)
        if done == 0:
            return Reply.tool_call("claude-teams_team_create", {"team_name": "pt"})
        if done == 1:
            return Reply.tool_call("claude-teams_spawn_teammate",
                                   {"team_name": "pt", "name": "worker-1", "prompt": "TEAMMATE-TASK"})
        return Reply.text("noted")

    model.add_rule(lambda r: "LEAD-SETUP" in flat_text(r), lead)
    model.script("TEAMMATE-TASK", Reply.tool_call("claude-teams_send_message", {
        "team_name": "pt", "type": "message", "recipient": "team-lead", "content": "REPORT-1", "summary": "r1",
        "sender": "worker-1"}), Reply.text("reported"))
    lead_sid = opencode.create_session("lead")["id"]
    opencode.prompt_async(lead_sid, "LEAD-SETUP")

    member = wait_for(lambda: next((m for m in read_config(teams_dir, "pt")["members"] if m["name"] == "worker-1"
                                    and m.get("opencodeSessionId")), None)
                      if (team_dir(teams_dir, "pt") / "config.json").exists() else None, timeout=60,
                      what="worker-1 in the config with its session")
    mate = member["opencodeSessionId"]
    assert member["backendType"] == "opencode" and member["isActive"] is False
    info = opencode.session(mate)
    assert info["title"] == "worker-1@pt"
    assert info["permission"] == [{"permission": "*", "pattern": "*", "action": "allow"}]
    first = wait_for(lambda: next((m for m in opencode.messages(mate) if m["info"]["role"] == "user"), None),
                     timeout=30, what="the teammate's first prompt")
    assert first["info"].get("agent") == "build"
    assert "TEAMMATE-TASK" in _user_texts([first])[0]

    [report] = wait_for(lambda: read_inbox(teams_dir, "pt", "team-lead") or None, timeout=60, what="the report")
    pushed = wait_for(lambda: [t for t in _user_texts(opencode.messages(lead_sid)) if "REPORT-1" in t] or None,
                      timeout=30, what="the push into the lead's session")
    assert pushed == [report["text"]] == [with_reminder("REPORT-1", "worker-1")]
