"""A claude-teams MCP server for the tests (stdio), behaving as the public one does.

opencode starts it as a ``local`` MCP server named ``claude-teams``, so the model sees
``claude-teams_read_inbox``, ``claude-teams_send_message`` and the rest, exactly as in
production. Tool names, argument names, result shapes and the on-disk format follow the
public server (see "How the public claude-teams server really behaves" in
/work/shared/reference/README.md): ``team_create``, ``team_delete``, ``spawn_teammate``,
``send_message`` (``message``, ``broadcast``, ``shutdown_request``, ``shutdown_response``,
``plan_approval_response``), ``read_inbox``, ``read_config``, ``task_create``,
``task_update``, ``task_list``, ``task_get``, ``force_kill_teammate``,
``process_shutdown_approved``, ``check_teammate``.

What it does as the public one does, and the tests rely on:
- ``spawn_teammate`` (backend ``opencode``, the default) creates the teammate's session
  with ``POST /session``, title ``<name>@<team>`` and a ruleset that allows everything,
  then sends the first prompt with ``prompt_async`` (agent ``build``). No tmux pane.
- ``message`` and ``broadcast`` texts get the ``<system_reminder>`` suffix; ``sender`` is
  taken on trust; ``idle_notification`` is never written.
- inboxes and ``config.json`` are written as tests/support/team.py describes.
- with ``OPENCODE_SERVER_URL`` set (and only then), ``team_create`` called by opencode
  takes the one busy session as the lead's, in memory; a message to the lead is then
  pushed to that session with ``prompt_async``, and messages to opencode teammates to
  theirs. Failed pushes are silent.

The base directory comes from ``CLAUDE_TEAMS_BASE_DIR`` (default ``~/.claude``). The
caller's name is the ``sender`` argument, defaulting to ``CLAUDE_TEAMS_AGENT_NAME`` or
``team-lead``: one server here serves every session of the opencode under test.

Run by path (no import of the ``tests`` package): ``python tests/support/teams_server.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import team as store  # noqa: E402  (tests/support/team.py, by path)
from mcp.server.fastmcp import Context, FastMCP  # noqa: E402
from mcp.server.fastmcp.exceptions import ToolError  # noqa: E402

BASE = Path(os.environ.get("CLAUDE_TEAMS_BASE_DIR") or os.path.expanduser("~/.claude"))
ME = os.environ.get("CLAUDE_TEAMS_AGENT_NAME", "team-lead")
OPENCODE_URL = os.environ.get("OPENCODE_SERVER_URL") or None
ALLOW_ALL = [{"permission": "*", "pattern": "*", "action": "allow"}]
#: the lead's opencode session, learnt by team_create; in memory only, as in the public server
LEAD: dict[str, str | None] = {"session": None}

server = FastMCP("claude-teams", instructions="Agent teams: team config, inboxes, tasks (test server).")


def _out(value: Any) -> str:
    """Tool results as compact JSON, as the real server's output reads in opencode."""
    return json.dumps(value, separators=(",", ":"))


def _config(team_name: str) -> dict[str, Any]:
    path = store.team_dir(BASE, team_name) / "config.json"
    if not path.exists():
        raise ToolError(f"Team {team_name!r} not found")
    return json.loads(path.read_text())


def _member(team_name: str, name: str) -> dict[str, Any] | None:
    return next((m for m in _config(team_name).get("members", []) if m.get("name") == name), None)


def _lead(team_name: str) -> str:
    return str(_config(team_name).get("leadAgentId", "team-lead@")).split("@")[0] or "team-lead"


def _require_member(team_name: str, name: str) -> dict[str, Any]:
    if not name:
        raise ToolError("recipient must not be empty")
    member = _member(team_name, name)
    if member is None:
        raise ToolError(f"Recipient {name!r} is not a member of team {team_name!r}")
    return member


def _api(method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """One call to the opencode API, without auth (a protected server answers 401)."""
    assert OPENCODE_URL is not None
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"{OPENCODE_URL.rstrip('/')}{path}", data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=15) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else None


def _prompt(session_id: str, text: str, agent: str | None = None) -> None:
    body: dict[str, Any] = {"parts": [{"type": "text", "text": text}]}
    if agent:
        body["agent"] = agent
    _api("POST", f"/session/{session_id}/prompt_async", body)


def _push(session_id: str | None, text: str) -> None:
    """Post ``text`` to a session as a prompt; a failure is swallowed, as the public server does."""
    if not (OPENCODE_URL and session_id):
        return
    try:
        _prompt(session_id, text)
    except (OSError, ValueError):
        pass


def _with_reminder(text: str, sender: str) -> str:
    return store.with_reminder(text, sender)


def _structured(doc: dict[str, Any]) -> str:
    return json.dumps(doc, separators=(",", ":"))


def _remove_member(team_name: str, agent_name: str) -> None:
    config = _config(team_name)
    config["members"] = [m for m in config.get("members", []) if m.get("name") != agent_name]
    store.write_config(BASE, team_name, config)
    for task in _tasks(team_name):
        if task.get("owner") == agent_name and task.get("status") != "completed":
            task["owner"] = None
            task["status"] = "pending"
            _write_task(team_name, {k: v for k, v in task.items() if v is not None})


# -- teams ------------------------------------------------------------------------------


@server.tool()
def team_create(team_name: str, ctx: Context, description: str = "") -> str:
    """Create a new agent team (its config and task directory); the caller is its lead.

    The config is written in place and no inboxes folder is made (it comes with the first
    message). On an existing name the config is replaced. Called from opencode with
    OPENCODE_SERVER_URL set, the one busy session is taken as the lead's.
    """
    root = store.team_dir(BASE, team_name)
    root.mkdir(parents=True, exist_ok=True)
    now = int(time.time() * 1000)
    config = {"name": team_name, "description": description, "createdAt": now, "leadAgentId": f"{ME}@{team_name}",
              "leadSessionId": "", "members": [{"agentId": f"{ME}@{team_name}", "name": ME, "agentType": "team-lead",
                                                "model": "unknown", "joinedAt": now, "tmuxPaneId": "",
                                                "cwd": os.getcwd(), "subscriptions": []}]}
    store.rewrite_in_place(root / "config.json", config)  # type: ignore[arg-type]
    store.tasks_dir(BASE, team_name).mkdir(parents=True, exist_ok=True)
    if OPENCODE_URL and _client_name(ctx) == "opencode":
        LEAD["session"] = _busy_session()
    return _out({"team_name": team_name, "team_file_path": str(root / "config.json"),
                 "lead_agent_id": f"{ME}@{team_name}"})


def _client_name(ctx: Context) -> str:
    params = getattr(ctx.session, "client_params", None)
    info = getattr(params, "clientInfo", None)
    return str(getattr(info, "name", "") or "")


def _busy_session() -> str | None:
    """The one busy session on the server (the lead, mid tool call), or None."""
    try:
        status = _api("GET", "/session/status")
    except (OSError, ValueError):
        return None
    busy = [sid for sid, st in (status or {}).items() if isinstance(st, dict) and st.get("type") == "busy"]
    return busy[0] if len(busy) == 1 else None


@server.tool()
def team_delete(team_name: str) -> str:
    """Delete a team and its tasks. Fails while teammates are still active."""
    config = _config(team_name)
    active = [m["name"] for m in config.get("members", []) if m.get("isActive") and m.get("agentType") != "team-lead"]
    if active:
        raise ToolError(f"Team {team_name!r} still has active teammates: {', '.join(active)}")
    shutil.rmtree(store.team_dir(BASE, team_name), ignore_errors=True)
    shutil.rmtree(store.tasks_dir(BASE, team_name), ignore_errors=True)
    return _out({"success": True, "message": f"Team {team_name!r} deleted", "team_name": team_name})


FIRST_PROMPT = ("You are {name}, a member of team {team}. Your lead is {lead}. Read your inbox with "
                "read_inbox(team_name=\"{team}\", agent_name=\"{name}\") and report to your lead with "
                "send_message(type=\"message\", recipient=\"{lead}\", sender=\"{name}\").\n\n{prompt}")


@server.tool()
def spawn_teammate(team_name: str, name: str, prompt: str, model: str = "balanced", backend: str = "opencode",
                   subagent_type: str = "general-purpose", plan_mode_required: bool = False) -> str:
    """Add a teammate: its opencode session (allow-all), its config entry, its inbox and first prompt."""
    if name == "team-lead":
        raise ToolError("Agent name 'team-lead' is reserved")
    config = _config(team_name)
    if any(m.get("name") == name for m in config.get("members", [])):
        raise ToolError(f"Member {name!r} already exists in team {team_name!r}")
    backend = backend or "opencode"
    session_id = None
    if backend == "opencode":
        if not OPENCODE_URL:
            raise ToolError("Cannot spawn opencode teammate: OPENCODE_SERVER_URL is not set")
        try:
            session_id = str(_api("POST", "/session", {"title": f"{name}@{team_name}", "permission": ALLOW_ALL})["id"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ToolError(f"Cannot create the opencode session: {exc}") from None
    now = int(time.time() * 1000)
    member: dict[str, Any] = {
        "agentId": f"{name}@{team_name}", "name": name, "agentType": subagent_type, "model": model,
        "prompt": prompt, "color": "blue", "planModeRequired": plan_mode_required, "joinedAt": now,
        "tmuxPaneId": "", "cwd": os.getcwd(), "subscriptions": [], "backendType": backend, "isActive": False}
    if session_id:
        member["opencodeSessionId"] = session_id
    config.setdefault("members", []).append(member)
    store.write_config(BASE, team_name, config)
    lead = _lead(team_name)
    store.append_message(BASE, team_name, name, lead, prompt)
    if session_id:
        try:
            _prompt(session_id, FIRST_PROMPT.format(name=name, team=team_name, lead=lead, prompt=prompt),
                    agent="build")
        except (OSError, ValueError) as exc:
            _remove_member(team_name, name)
            raise ToolError(f"Cannot send the first prompt: {exc}") from None
    return _out({"agent_id": f"{name}@{team_name}", "name": name, "team_name": team_name})


@server.tool()
def read_config(team_name: str) -> str:
    """Read the team configuration including all members."""
    return _out(_config(team_name))


@server.tool()
def force_kill_teammate(team_name: str, agent_name: str) -> str:
    """Remove a teammate from the team at once and reset its tasks."""
    if _member(team_name, agent_name) is None:
        raise ToolError(f"Teammate {agent_name!r} not found in team {team_name!r}")
    _remove_member(team_name, agent_name)
    return _out({"success": True, "message": f"{agent_name} has been stopped."})


@server.tool()
def process_shutdown_approved(team_name: str, agent_name: str) -> str:
    """After a shutdown_approved in the lead's inbox: remove the teammate and reset its tasks."""
    if agent_name == _lead(team_name):
        raise ToolError("Cannot process shutdown for team-lead")
    _remove_member(team_name, agent_name)
    return _out({"success": True, "message": f"{agent_name} removed from team."})


@server.tool()
def check_teammate(team_name: str, agent_name: str) -> str:
    """Whether a teammate is still in the team and marked active."""
    member = _member(team_name, agent_name)
    if member is None:
        raise ToolError(f"Teammate {agent_name!r} not found in team {team_name!r}")
    unread = [m for m in store.read_inbox(BASE, team_name, agent_name) if not m.get("read")]
    return _out({"agent_name": agent_name, "alive": bool(member.get("isActive")),
                 "backend": member.get("backendType", ""), "their_unread_count": len(unread)})


# -- messages ---------------------------------------------------------------------------


@server.tool()
def read_inbox(team_name: str, agent_name: str, unread_only: bool = True, mark_as_read: bool = True) -> str:
    """Messages in an agent's inbox; by default only unread ones, which are then marked read."""
    _config(team_name)
    if mark_as_read:
        messages = store.mark_read(BASE, team_name, agent_name, unread_only)
    else:  # without the lock, as the public server reads
        path = store.inbox_path(BASE, team_name, agent_name)
        current = json.loads(path.read_text()) if path.exists() else []
        messages = [m for m in current if not (unread_only and m.get("read"))]
    return _out(messages)


@server.tool()
def send_message(team_name: str, type: str, recipient: str = "", content: str = "", summary: str = "",
                 request_id: str = "", approve: bool | None = None, sender: str = "") -> str:
    """Send a message to a teammate or answer a protocol request.

    type 'message': a direct message (recipient, content, summary). 'broadcast': to every
    other member. 'shutdown_request': ask a teammate to shut down (recipient; content is
    the reason). 'shutdown_response': answer a shutdown request (request_id, approve).
    'plan_approval_response': answer a plan (recipient, request_id, approve).
    """
    me = sender or ME
    config = _config(team_name)
    lead = _lead(team_name)
    if type == "message":
        if not content:
            raise ToolError("Message content must not be empty")
        member = _require_member(team_name, recipient)
        text = _with_reminder(content, me)
        store.append_message(BASE, team_name, recipient, me, text, summary or None,
                             **({"color": member["color"]} if member.get("color") else {}))
        _push(member.get("opencodeSessionId"), text)
        if recipient == lead:
            _push(LEAD["session"], text)
        return _out({"success": True, "message": f"Message sent to {recipient}",
                     "routing": {"sender": me, "target": recipient, "summary": summary, "content": content}})
    if type == "broadcast":
        targets = [m for m in config.get("members", []) if m.get("name") != me]
        text = _with_reminder(content, me)
        for m in targets:
            store.append_message(BASE, team_name, m["name"], me, text, summary or None,
                                 **({"color": m["color"]} if m.get("color") else {}))
            _push(m.get("opencodeSessionId"), text)
        return _out({"success": True, "message": f"Broadcast sent to {len(targets)} teammate(s)"})
    if type == "shutdown_request":
        member = _require_member(team_name, recipient)
        if recipient == lead:
            raise ToolError("Cannot send shutdown request to team-lead")
        now = store.now_iso()
        rid = request_id or f"shutdown-{int(time.time() * 1000)}@{recipient}"
        doc = {"type": "shutdown_request", "requestId": rid, "from": me, "reason": content, "timestamp": now}
        store.append_message(BASE, team_name, recipient, me, _structured(doc))
        _push(member.get("opencodeSessionId"), _structured(doc))
        return _out({"success": True, "message": f"Shutdown request sent to {recipient}", "request_id": rid,
                     "target": recipient})
    if type == "shutdown_response":
        lead = recipient or lead
        if approve:
            member = _member(team_name, me) or {}
            doc = {"type": "shutdown_approved", "requestId": request_id, "from": me, "timestamp": store.now_iso(),
                   "paneId": member.get("tmuxPaneId", ""), "backendType": member.get("backendType", "opencode"),
                   "sessionId": member.get("opencodeSessionId")}
            store.append_message(BASE, team_name, lead, me, _structured(doc))
            return _out({"success": True, "message": f"Shutdown approved for request {request_id}"})
        store.append_message(BASE, team_name, lead, me, content or "Shutdown rejected", "shutdown_rejected")
        return _out({"success": True, "message": f"Shutdown rejected for request {request_id}"})
    if type == "plan_approval_response":
        _require_member(team_name, recipient)
        if approve:
            store.append_message(BASE, team_name, recipient, me, _structured({"type": "plan_approval",
                                                                               "approved": True}), "plan_approved")
        else:
            store.append_message(BASE, team_name, recipient, me, content or "Plan rejected", "plan_rejected")
        return _out({"success": True,
                     "message": f"Plan {'approved' if approve else 'rejected'} for {recipient}"})
    raise ToolError(f"Unknown message type: {type}")


# -- tasks ------------------------------------------------------------------------------


def _tasks(team_name: str) -> list[dict[str, Any]]:
    folder = store.tasks_dir(BASE, team_name)
    out = []
    for path in folder.glob("*.json") if folder.exists() else []:
        try:
            out.append(json.loads(path.read_text()))
        except ValueError:
            continue
    return sorted(out, key=lambda t: int(t["id"]) if str(t.get("id", "")).isdigit() else 0)


def _write_task(team_name: str, task: dict[str, Any]) -> None:
    folder = store.tasks_dir(BASE, team_name)
    folder.mkdir(parents=True, exist_ok=True)
    store.rewrite_in_place(folder / f"{task['id']}.json", task)


def _task(team_name: str, task_id: str) -> dict[str, Any]:
    path = store.tasks_dir(BASE, team_name) / f"{task_id}.json"
    if not path.exists():
        raise ToolError(f"Task {task_id!r} not found in team {team_name!r}")
    return json.loads(path.read_text())


@server.tool()
def task_create(team_name: str, subject: str, description: str, active_form: str = "",
                metadata: dict[str, Any] | None = None) -> str:
    """Create a task for the team; tasks get incrementing IDs."""
    _config(team_name)
    with store.locked(BASE, team_name):
        ids = [int(t["id"]) for t in _tasks(team_name) if str(t.get("id", "")).isdigit()]
        task: dict[str, Any] = {"id": str(max(ids, default=0) + 1), "subject": subject, "description": description,
                                "activeForm": active_form, "status": "pending", "blocks": [], "blockedBy": []}
        if metadata:
            task["metadata"] = metadata
        _write_task(team_name, task)
    return _out(task)


@server.tool()
def task_update(team_name: str, task_id: str, status: str | None = None, owner: str | None = None,
                subject: str | None = None, description: str | None = None, active_form: str | None = None,
                add_blocks: list[str] | None = None, add_blocked_by: list[str] | None = None,
                metadata: dict[str, Any] | None = None) -> str:
    """Update a task. Setting an owner notifies it by inbox; status 'deleted' removes the task."""
    if status not in (None, "pending", "in_progress", "completed", "deleted"):
        raise ToolError(f"Invalid status {status!r}")
    task = _task(team_name, task_id)
    if status == "deleted":
        (store.tasks_dir(BASE, team_name) / f"{task_id}.json").unlink()
        task["status"] = "deleted"
        return _out(task)
    for key, value in (("status", status), ("owner", owner), ("subject", subject), ("description", description),
                       ("activeForm", active_form)):
        if value is not None:
            task[key] = value
    task["blocks"] = sorted(set(task.get("blocks", [])) | set(add_blocks or []))
    task["blockedBy"] = sorted(set(task.get("blockedBy", [])) | set(add_blocked_by or []))
    if metadata:
        merged = {**task.get("metadata", {}), **metadata}
        task["metadata"] = {k: v for k, v in merged.items() if v is not None}
    _write_task(team_name, task)
    if owner:
        doc = {"type": "task_assignment", "taskId": task_id, "subject": task["subject"],
               "description": task["description"], "assignedBy": ME, "timestamp": store.now_iso()}
        if _member(team_name, owner) is not None:
            store.append_message(BASE, team_name, owner, ME, _structured(doc))
    return _out(task)


@server.tool()
def task_list(team_name: str) -> str:
    """Every task of the team with its status and owner."""
    _config(team_name)
    return _out(_tasks(team_name))


@server.tool()
def task_get(team_name: str, task_id: str) -> str:
    """One task by ID."""
    return _out(_task(team_name, task_id))


if __name__ == "__main__":
    server.run("stdio")
