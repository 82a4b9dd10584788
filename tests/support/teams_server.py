"""A claude-teams MCP server for the tests (stdio), on the real on-disk format.

opencode starts it as a ``local`` MCP server named ``claude-teams``, so the model sees
``claude-teams_read_inbox``, ``claude-teams_send_message`` and the rest, exactly as in
production. The base directory comes from ``CLAUDE_TEAMS_BASE_DIR``; the caller's name
(the ``from`` of what it sends) from ``CLAUDE_TEAMS_AGENT_NAME`` (default ``team-lead``),
or per call from the optional ``sender`` argument, since one server here serves every
session of the opencode under test.

Run by path: ``python tests/support/teams_server.py``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mcp.server.fastmcp import FastMCP  # noqa: E402

import team as store  # noqa: E402  (tests/support/team.py, by path)

BASE = Path(os.environ.get("CLAUDE_TEAMS_BASE_DIR") or os.path.expanduser("~/.claude"))
ME = os.environ.get("CLAUDE_TEAMS_AGENT_NAME", "team-lead")

server = FastMCP("claude-teams")


def _config(team_name: str) -> dict[str, Any]:
    path = store.team_dir(BASE, team_name) / "config.json"
    if not path.exists():
        raise ValueError(f"team {team_name!r} does not exist")
    return json.loads(path.read_text())


def _members(team_name: str) -> list[str]:
    return [m["name"] for m in _config(team_name).get("members", [])]


@server.tool()
def team_create(team_name: str, description: str = "") -> str:
    """Create a team with an empty roster (the caller is its lead)."""
    store.make_team(BASE, team_name, members=[], lead=ME)
    return json.dumps({"team_name": team_name, "lead": ME})


@server.tool()
def team_delete(team_name: str) -> str:
    """Delete a team's directory."""
    import shutil
    shutil.rmtree(store.team_dir(BASE, team_name), ignore_errors=True)
    return json.dumps({"deleted": team_name})


@server.tool()
def read_config(team_name: str) -> str:
    """The team's config.json."""
    return json.dumps(_config(team_name))


@server.tool()
def read_inbox(team_name: str, agent_name: str, unread_only: bool = True, mark_as_read: bool = True) -> str:
    """Messages in an agent's inbox; by default only unread ones, which are then marked read."""
    _config(team_name)
    if mark_as_read:
        messages = store.mark_read(BASE, team_name, agent_name, unread_only)
    else:
        messages = [m for m in store.read_inbox(BASE, team_name, agent_name) if not (unread_only and m.get("read"))]
    return json.dumps(messages)


@server.tool()
def send_message(team_name: str, type: str, recipient: str = "", content: str = "", summary: str = "",
                 request_id: str = "", approve: bool = False, sender: str = "") -> str:
    """Send a message, a broadcast, or a shutdown request/response to teammates' inboxes."""
    me = sender or ME
    members = _members(team_name)
    if type == "message":
        if recipient not in members:
            raise ValueError(f"no member {recipient!r} in team {team_name!r}")
        store.append_message(BASE, team_name, recipient, me, content, summary or None)
        return json.dumps({"sent": True, "recipient": recipient})
    if type == "broadcast":
        sent = [m for m in members if m != me]
        for m in sent:
            store.append_message(BASE, team_name, m, me, content, summary or None)
        return json.dumps({"sent": True, "recipients": sent})
    if type == "shutdown_request":
        if recipient not in members:
            raise ValueError(f"no member {recipient!r} in team {team_name!r}")
        ts = store.now_iso()
        rid = request_id or f"shutdown-{ts}@{recipient}"
        doc = {"type": "shutdown_request", "requestId": rid, "from": me, "reason": content, "timestamp": ts}
        store.append_message(BASE, team_name, recipient, me, json.dumps(doc, separators=(",", ":")))
        return json.dumps({"sent": True, "request_id": rid})
    if type == "shutdown_response":
        kind = "shutdown_approved" if approve else "shutdown_rejected"
        doc = {"type": kind, "requestId": request_id, "from": me, "reason": content, "timestamp": store.now_iso()}
        lead = _config(team_name).get("leadAgentId", "team-lead@").split("@")[0]
        store.append_message(BASE, team_name, recipient or lead, me, json.dumps(doc, separators=(",", ":")))
        return json.dumps({"sent": True})
    raise ValueError(f"unknown message type {type!r}")


if __name__ == "__main__":
    server.run("stdio")
