"""The session view as a function of events: each kind of event, and what it changes.

``reactions.view_change`` is pure (no state, no I/O); ``Reactions.observe`` applies what
it returns. These cases pin each kind of event the view follows, in the shapes opencode
1.18.33 sends them, and check the recorded streams yield no surprises.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from orchestratord.reactions import ViewChange, view_change
from orchestratord.sessions import SessionInfo
from orchestratord.stream import Event, normalize
from tests.support.reference import reference_dir

OWN = "ses_own"


def event(etype: str, sid: str | None = None, **props: Any) -> Event:
    if sid is not None:
        props.setdefault("sessionID", sid)
    return Event(None, etype, props, sid, None, "{}")


ASKED = {"id": "per_1", "sessionID": "ses_w", "permission": "bash", "patterns": ["ls"], "metadata": {}}
USER = {"id": "msg_u", "role": "user", "sessionID": "ses_w"}

CASES: list[tuple[str, Event, ViewChange | None]] = [
    ("busy", event("session.status", "ses_w", status={"type": "busy"}), ViewChange(status=("ses_w", "busy"))),
    ("retry", event("session.status", "ses_w", status={"type": "retry", "attempt": 2}),
     ViewChange(status=("ses_w", "retry"))),
    ("status without a type", event("session.status", "ses_w", status="busy"), ViewChange(status=("ses_w", None))),
    ("idle", event("session.idle", "ses_w"), ViewChange(status=("ses_w", None))),
    ("own idle", event("session.idle", OWN), ViewChange(status=(OWN, None), own_activity=True)),
    ("created", event("session.created", "ses_w", info={"id": "ses_w", "title": "worker-1@t", "directory": "/p"}),
     ViewChange(session=SessionInfo("ses_w", "worker-1@t", "/p"))),
    ("updated without an id", event("session.updated", "ses_w", info={"title": "x"}), None),
    ("deleted", event("session.deleted", "ses_w", info={"id": "ses_w"}),
     ViewChange(forget="ses_w", status=("ses_w", None))),
    ("own deleted", event("session.deleted", OWN, info={"id": OWN}),
     ViewChange(forget=OWN, status=(OWN, None), own_activity=True)),
    ("a teammate's prompt", event("message.updated", "ses_w", info=USER), ViewChange(message=("ses_w", USER))),
    ("a prompt in the orchestrator's session", event("message.updated", OWN, info={"id": "msg_o", "role": "user"}),
     ViewChange(own_prompt="msg_o", message=(OWN, {"id": "msg_o", "role": "user"}), own_activity=True)),
    ("a message without info, own", event("message.updated", OWN, info="x"), ViewChange(own_activity=True)),
    ("a message of another role", event("message.updated", "ses_w", info={"id": "m", "role": "system"}), None),
    ("permission asked", event("permission.asked", "ses_w", **{k: v for k, v in ASKED.items() if k != "sessionID"}),
     ViewChange(waiting=("ses_w", "permission bash"), asked=ASKED)),
    ("question asked", event("question.asked", "ses_w", id="que_1"), ViewChange(waiting=("ses_w", "question"))),
    ("permission replied", event("permission.replied", "ses_w", requestID="per_1", reply="once"),
     ViewChange(waiting=("ses_w", None), replied="per_1")),
    ("question rejected", event("question.rejected", "ses_w", requestID="que_1"), ViewChange(waiting=("ses_w", None))),
    ("instance disposed", event("server.instance.disposed"), ViewChange(reset_statuses=True)),
    ("own error", event("session.error", OWN, error={"name": "x"}), ViewChange(own_activity=True)),
    ("a delta", event("message.part.delta", "ses_w", delta="x"), None),
]


@pytest.mark.parametrize("name,ev,expected", CASES, ids=[c[0] for c in CASES])
def test_what_each_event_changes_in_the_session_view(name: str, ev: Event, expected: ViewChange | None) -> None:
    assert view_change(ev, OWN) == expected


def test_the_recorded_streams_change_the_view_only_through_the_kinds_above() -> None:
    kinds = {"session.status", "session.idle", "session.created", "session.updated", "session.deleted",
             "message.updated", "server.instance.disposed", "permission.asked", "question.asked",
             "permission.replied", "question.replied", "question.rejected"}
    seen: set[str] = set()
    for path in sorted(reference_dir().glob("*.sse")):
        for line in path.read_text().splitlines():
            if not line.startswith("data: "):
                continue
            ev = normalize(json.loads(line[6:]), line[6:])
            if ev is None:
                continue
            change = view_change(ev, None)
            if change is not None:
                assert ev.type in kinds, ev.type
                seen.add(ev.type)
    assert {"session.status", "session.idle", "message.updated", "session.created"} <= seen
