"""A teammate's message, and what tells one apart: one home for its identities.

claude-teams stores a message in the recipient's inbox file; the event stream sees the
``claude-teams_send_message`` call that sent it. The daemon must know the two for one
message, and a message read again (claude-teams never trims an inbox) for one it has:

- :func:`message_identity` (:attr:`TeamMessage.identity`): one element of an inbox file,
  stable across rewrites (not its position, not its ``read`` flag);
- :func:`content_key`: what the stream and the file both know (team, recipient, text),
  from the file by :func:`message_ckey`, from a call by :func:`call_ckey`;
- :func:`text_key`: the text alone, what a push into a session agrees on.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Mapping


def message_identity(team: str, recipient: str, sender: str, timestamp: str, text: str) -> str:
    """Stable across rewrites: not the position in the file, not the ``read`` flag."""
    data = "\0".join((team, recipient, sender, timestamp, text)) + "\0"
    return hashlib.sha256(data.encode("utf-8", "surrogatepass")).hexdigest()[:32]


#: what claude-teams appends to a message's text before it stores it ("This message was sent from …")
_REMINDER = re.compile(r"\s*<system_reminder>(?:(?!<system_reminder>).)*</system_reminder>\s*\Z", re.DOTALL)


def without_reminder(text: str) -> str:
    """The text as its sender wrote it: a trailing ``<system_reminder>`` block taken off.

    The event stream sees the ``content`` of the send_message call, the inbox file the
    stored text; only without the suffix do the two agree.
    """
    return _REMINDER.sub("", text) if text.endswith("</system_reminder>") else text


@dataclass(frozen=True)
class TeamMessage:
    team: str
    recipient: str
    sender: str
    timestamp: str
    text: str
    summary: str | None
    type: str
    read: bool

    @classmethod
    def from_fields(cls, team: str, recipient: str, fields: dict[str, Any]) -> "TeamMessage":
        """From an inbox element that has string ``from``, ``text`` and ``timestamp``."""
        summary = fields.get("summary")
        return cls(team=team, recipient=recipient, sender=fields["from"], timestamp=fields["timestamp"],
                   text=fields["text"], summary=summary if isinstance(summary, str) and summary else None,
                   type=message_type(fields["text"]), read=bool(fields.get("read", False)))

    @property
    def identity(self) -> str:
        """Stable across rewrites: not the position in the file, not the ``read`` flag."""
        return message_identity(self.team, self.recipient, self.sender, self.timestamp, self.text)

    def short(self, limit: int = 120) -> str:
        """One line for the log: the summary, or the start of the text."""
        base = self.summary or without_reminder(self.text)
        if self.type != "message":
            base = f"[{self.type}] {self.summary or _structured_gist(self.text)}"
        one = " ".join(base.split())
        return one if len(one) <= limit else one[: limit - 1] + "…"


def content_key(team: str, recipient: str, text: str) -> str:
    """What the event stream and the file both know about a message: who it is for and what it says."""
    h = hashlib.sha256(f"{team}\0{recipient}\0{text}".encode("utf-8", "surrogatepass")).hexdigest()
    return h[:32]


def text_key(text: str) -> str:
    """A message's text alone, without the reminder: what a push into a session and the
    inbox file (and the send_message call) agree on."""
    return hashlib.sha256(without_reminder(text).encode("utf-8", "surrogatepass")).hexdigest()[:32]


def message_type(text: str) -> str:
    """``message`` for plain text, else the ``type`` of a structured JSON message."""
    stripped = text.lstrip()
    if not stripped.startswith("{"):
        return "message"
    try:
        doc = json.loads(stripped)
    except ValueError:
        return "message"
    kind = doc.get("type") if isinstance(doc, dict) else None
    return kind if isinstance(kind, str) and kind else "message"


def _structured_gist(text: str) -> str:
    try:
        doc = json.loads(text)
    except ValueError:
        return text
    if isinstance(doc, dict):
        for key in ("reason", "content", "message", "summary", "subject", "taskId", "requestId"):
            if isinstance(doc.get(key), str) and doc[key]:
                return doc[key]
    return ""


def message_ckey(m: TeamMessage) -> str:
    """The content key the event stream can compute too (see triggers.describe)."""
    if m.type == "message":
        return content_key(m.team, m.recipient, without_reminder(m.text))
    return content_key(m.team, m.recipient, f"{m.type}:{_structured_gist(m.text)}")


def call_ckey(tool: str, inp: Mapping[str, Any], lead: str = "team-lead") -> str | None:
    """The content key of a send_message call, as the inbox watcher computes it from the file.

    Each kind is keyed as claude-teams stores it in the recipient's inbox: a message or a
    broadcast (to the lead) by its text, a shutdown request by its reason, an approved
    shutdown as a ``shutdown_approved`` of its request ID, a refused one by its plain text.
    """
    if not tool.endswith("send_message"):
        return None
    team, recipient, content = inp.get("team_name"), inp.get("recipient"), inp.get("content")
    kind = inp.get("type") or "message"
    if not isinstance(team, str) or not team or not isinstance(kind, str):
        return None
    content = content if isinstance(content, str) else ""
    if kind == "broadcast":
        return content_key(team, lead, content) if content and inp.get("sender") != lead else None
    if kind == "shutdown_response":
        to = recipient if isinstance(recipient, str) and recipient else lead
        if inp.get("approve") is True:
            rid = inp.get("request_id")
            return content_key(team, to, f"shutdown_approved:{rid}") if isinstance(rid, str) and rid else None
        return content_key(team, to, content or "Shutdown rejected")
    if not isinstance(recipient, str) or not recipient or not isinstance(inp.get("content"), str):
        return None
    if kind == "message":
        return content_key(team, recipient, content)
    return content_key(team, recipient, f"{kind}:{content}")
