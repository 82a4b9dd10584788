"""The test claude-teams MCP server on its own, over stdio with the official MCP client."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

from tests.support.server import TEAMS_SERVER
from tests.support.team import append_message, make_team, read_inbox, tasks_dir

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
        ("spawn_teammate", {"team_name": "t", "name": "worker-2", "prompt": "review the parser"}),
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
    texts = [json.loads(text) if not err else text for err, text in out]

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
