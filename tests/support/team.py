"""A claude-teams team on disk, laid out and written the way the public server does it.

``teams/<team>/config.json``, ``teams/<team>/inboxes/<agent>.json`` and the ``.lock``
file writers hold an exclusive flock on while they rewrite an inbox in place (truncate
and write the same inode, not an atomic rename). Inboxes are one line of ``json.dumps``;
a new inbox is first created as ``[]`` without the lock; the lock is taken non-blocking
and retried every 50 ms, on a lock file opened with truncation and never deleted; member
changes replace ``config.json`` by rename, without the lock. The test MCP server uses
these same functions, so tests and the "real" tools agree on the format.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator


def now_iso() -> str:
    """ISO 8601 with milliseconds and Z, as claude-teams writes timestamps."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def team_dir(base: Path | str, team: str) -> Path:
    return Path(base) / "teams" / team


def inbox_path(base: Path | str, team: str, agent: str) -> Path:
    return team_dir(base, team) / "inboxes" / f"{agent}.json"


LOCK_RETRY = 0.05


@contextlib.contextmanager
def locked(base: Path | str, team: str) -> Iterator[None]:
    """Hold the team's inbox lock exclusively, as a writer does: the file is opened with
    truncation, the flock tried without blocking and tried again every 50 ms."""
    lock = team_dir(base, team) / "inboxes" / ".lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(LOCK_RETRY)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def make_team(base: Path | str, team: str, members: list[str] | None = None, lead: str = "team-lead",
              cwd: str = "/srv/project") -> Path:
    """Lay out a team with empty inboxes for the lead and every member."""
    members = members or []
    root = team_dir(base, team)
    (root / "inboxes").mkdir(parents=True, exist_ok=True)
    (root / "inboxes" / ".lock").touch()
    joined = int(dt.datetime.now().timestamp() * 1000)

    def member(name: str, kind: str) -> dict[str, Any]:
        return {"agentId": f"{name}@{team}", "name": name, "agentType": kind, "model": "scripted",
                "joinedAt": joined, "tmuxPaneId": "", "cwd": cwd, "subscriptions": []}

    config = {"name": team, "description": "", "createdAt": joined, "leadAgentId": f"{lead}@{team}",
              "leadSessionId": "", "members": [member(lead, "team-lead")] + [
                  {**member(m, "general-purpose"), "prompt": "", "color": "blue", "planModeRequired": False,
                   "backendType": "opencode", "isActive": True} for m in members]}
    (root / "config.json").write_text(json.dumps(config, indent=2))
    for name in [lead, *members]:
        path = inbox_path(base, team, name)
        if not path.exists():
            path.write_text("[]")
    return root


def read_inbox(base: Path | str, team: str, agent: str) -> list[dict[str, Any]]:
    path = inbox_path(base, team, agent)
    with locked(base, team):
        text = path.read_text() if path.exists() else ""
    # claude-teams creates an inbox outside the lock before it writes it: empty is no messages yet
    return json.loads(text) if text.strip() else []


def rewrite_in_place(path: Path, messages: Any) -> None:
    """Truncate and write the same file (same inode) as one line, as claude-teams does."""
    with open(path, "a+", encoding="utf-8") as fh:
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps(messages))
        fh.flush()


def ensure_inbox(base: Path | str, team: str, agent: str) -> Path:
    """Create an inbox as ``[]`` if it is not there, without the lock (as the public server does)."""
    path = inbox_path(base, team, agent)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("[]")
    return path


def append_message(base: Path | str, team: str, recipient: str, sender: str, text: str,
                   summary: str | None = None, **extra: Any) -> dict[str, Any]:
    """Add one message to ``recipient``'s inbox under the lock; returns the message."""
    message: dict[str, Any] = {"from": sender, "text": text, "timestamp": now_iso(), "read": False}
    if summary:
        message["summary"] = summary
    message.update(extra)
    ensure_inbox(base, team, recipient)
    path = inbox_path(base, team, recipient)
    with locked(base, team):
        current = json.loads(path.read_text()) if path.exists() and path.stat().st_size else []
        current.append(message)
        rewrite_in_place(path, current)
    return message


REMINDER = ("\n\n<system_reminder>This message was sent from {sender}. Use your send_message tool to "
            "respond.</system_reminder>")


def with_reminder(text: str, sender: str) -> str:
    """A message or broadcast text as the public server stores it: the reminder appended."""
    return text + REMINDER.format(sender=sender)


def history(count: int, first: int = 0, read: bool = True) -> list[dict[str, Any]]:
    """``count`` messages as a long-lived lead inbox holds them: about 300 bytes each, the
    reminder suffix the real server appends included, marked read, a second apart."""
    start = dt.datetime(2026, 1, 5, 9, 0, tzinfo=dt.timezone.utc)
    out = []
    for i in range(first, first + count):
        sender = f"worker-{i % 4 + 1}"
        stamp = (start + dt.timedelta(seconds=i)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        out.append({"from": sender, "text": f"report {i}: step {i % 17} of the parser done, its tests pass, "
                                            f"branch work-{i % 5} pushed" + REMINDER.format(sender=sender),
                    "summary": f"report {i}", "timestamp": stamp, "color": "blue", "read": read})
    return out


def mark_read(base: Path | str, team: str, agent: str, unread_only: bool = True) -> list[dict[str, Any]]:
    """What ``read_inbox(mark_as_read=true)`` does: return the messages and flip ``read``."""
    path = inbox_path(base, team, agent)
    with locked(base, team):
        current = json.loads(path.read_text()) if path.exists() and path.stat().st_size else []
        picked = [m for m in current if not (unread_only and m.get("read"))]
        if any(not m.get("read") for m in picked):
            for m in picked:
                m["read"] = True
            rewrite_in_place(path, current)
    return [dict(m) for m in picked]


def tasks_dir(base: Path | str, team: str) -> Path:
    return Path(base) / "tasks" / team


def read_config(base: Path | str, team: str) -> dict[str, Any]:
    return json.loads((team_dir(base, team) / "config.json").read_text())


def write_config(base: Path | str, team: str, config: dict[str, Any]) -> None:
    """A member change: a temporary file in the team folder renamed over ``config.json``
    (a new inode, no lock), so a watcher of the file itself loses it; watch the folder."""
    root = team_dir(base, team)
    tmp = root / f".config-{os.getpid()}-{time.monotonic_ns()}.tmp"
    tmp.write_text(json.dumps(config, indent=2))
    os.replace(tmp, root / "config.json")
