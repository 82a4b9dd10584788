"""What the events of the stream mean to the daemon: the session view, judging, and triggers.

One :class:`Reactions` serves the live stream and the catch-up after a reconnect alike, so
an event read late has the same effect as one read at once. It writes the session view
(statuses, waiting sessions, what is known of each session) into shared state, as the pure
:func:`view_change` says each event changes it; hands permission requests and sessions to
the broker, judges what teammates do, and records the triggers that the rules match, each
before it counts. It does no I/O of its own but through the ledger and, for a session's
title not yet known, the server client: each session an event names is looked up on a
thread of its own first (:class:`~.sessions.Prefetch`), so that client is used only when
that look-up has failed or its queue was full.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol, Sequence

from . import logs
from .guard import Judge, seen_in_event
from .ledger import PUSHED, Ledger
from .opencode import OpencodeClient
from .sessions import SessionDirectory, SessionInfo
from .state import Shared
from .stream import Event
from .teammsg import text_key
from .triggers import Match, Rule, RuleSet

#: why a trigger needs no prompt of its own, by what covered it
_COVER_NOTES = {PUSHED: "claude-teams delivered it into the orchestrator's session itself"}
#: how far back a teammate's turn may reach when its previous idle is not known
TURN_LOOKBACK = 600.0
#: after a request or a session is handed to the broker, no trigger commit is held this long
BROKER_GRACE = 0.1


class Rows(Protocol):
    """The event rows read so far and their transaction (:class:`~.eventlog.EventLog`)."""

    def flush(self, then: Callable[[], Any] | None = None) -> Any:
        """Write them, running ``then`` in the same transaction (which may be held open)."""

    def commit(self, hold_off: float = 0.0) -> None:
        """Commit a held transaction now, and hold none for ``hold_off`` seconds."""


class PermissionDesk(Protocol):
    """Who answers permission requests and looks after sessions (the broker); never blocks."""

    def asked(self, request: dict[str, Any]) -> None: ...
    def replied(self, request_id: str) -> None: ...
    def session_seen(self, info: SessionInfo) -> None: ...
    def resync(self) -> None: ...
    def asks(self, session_id: str, permission: str) -> bool: ...
    def user_message(self, session_id: str, info: dict[str, Any]) -> None: ...


class Reactions:
    """The effects of one event, whichever way it was read (see the module's docstring)."""

    def __init__(self, *, shared: Shared, sessions: SessionDirectory, rules: Sequence[Rule],
                 judge: Judge | None, desk: Callable[[], PermissionDesk | None], rows: Rows,
                 on_trigger: Callable[[], None], on_escalation: Callable[[], None],
                 on_own_activity: Callable[[], None], log: Any) -> None:
        self.shared = shared
        self.sessions = sessions
        self.rules = RuleSet(rules)
        self.judge = judge
        self.desk = desk
        #: writes the event rows read so far with the triggers of the event that follows, in one commit
        self.rows = rows
        self.on_trigger = on_trigger
        self.on_escalation = on_escalation
        self.on_own_activity = on_own_activity
        self.log = log
        self.ledger: Ledger | None = None
        self.client: OpencodeClient | None = None
        self._turn_start: dict[str, float] = {}  # session -> wall time of its last idle
        self._idle_clock: dict[str, float] = {}  # session -> the shared clock at its last idle
        self._user_messages: dict[str, None] = {}  # user messages in the orchestrator's session (newest 200)
        #: told of every session an event names, so its title is looked up before it is needed
        self.prefetch: Callable[[str], None] = lambda session_id: None

    def bind(self, ledger: Ledger, client: OpencodeClient, prefetch: Callable[[str], None] | None = None) -> None:
        """The reading thread's own ledger connection and client, once it has opened them, and
        who looks up, on a thread of its own, the sessions events name (:class:`~.sessions.Prefetch`)."""
        self.ledger, self.client = ledger, client
        if prefetch is not None:
            self.prefetch = prefetch

    def act(self, event: Event, wall: float) -> None:
        """Judge the event and raise the triggers it matches, each recorded before it counts."""
        own = self.shared.session_id
        if self.judge is not None and event.type == "message.part.updated":
            desk = self.desk()
            seen = seen_in_event(event, own, desk.asks if desk is not None else None)
            if seen and self.ledger is not None and self.judge.record(self.ledger, seen, own, self._session):
                self.rows.commit()  # an escalation is not held for a group commit
                self.on_escalation()
        if event.type == "session.error" and _aborted(event) and self.shared.aborted_recently(event.session_id):
            return  # the daemon aborted that turn itself (a restart, the guard): nothing to tell
        if event.type == "session.idle" and event.session_id and self._ends_our_abort(event.session_id, wall):
            return
        if own is not None and event.session_id == own and event.type == "message.part.updated":
            self._pushed(event, own, wall)
        matches = self.rules.match(event, own, self._session)
        if matches:
            # The event rows read so far and these triggers: one commit, the rows first.
            recorded = self.rows.flush(lambda: [self._record(m, event, wall) for m in matches])
            if event.type == "session.idle" and event.session_id:
                self._turn_start.pop(event.session_id, None)
                self._turn_start[event.session_id] = wall
                if len(self._turn_start) > 1000:  # the oldest sessions' turns are long over
                    del self._turn_start[next(iter(self._turn_start))]
            if recorded and self.ledger is not None:
                self.ledger.when_committed(lambda: self._recorded(recorded, event))

    def _recorded(self, recorded: list[tuple[Match, int | None, str | None]], event: Event) -> None:
        """The triggers of one event are committed: say so, and wake the dispatcher for the new ones."""
        added = 0
        for m, tid, covered in recorded:
            if tid is not None and covered is not None:
                self.log.info(logs.kv("trigger-covered", rule=m.rule, session=event.session_id,
                                      teammate=m.teammate, by=covered, note=_COVER_NOTES.get(
                                          covered, "its turn already reported")))
            elif tid is not None:
                added += 1
                self.log.info(logs.kv("trigger", rule=m.rule, session=event.session_id, teammate=m.teammate,
                                      event=event.type))
        if added:
            self.on_trigger()

    def _record(self, m: Match, event: Event, wall: float) -> tuple[Match, int | None, str | None]:
        """One matched trigger in the ledger: (the match as recorded, its id or None if seen
        before, what covers it if it needs no prompt of its own)."""
        assert self.ledger is not None
        covered = None
        if event.type == "session.idle" and event.session_id and m.teammate:
            m, covered = self._idle(m, event.session_id, wall)
        tid = self.ledger.add_trigger(m.kind, m.detail, rule=m.rule, dedup=m.dedup, team=m.team,
                                      teammate=m.teammate, session_id=event.session_id,
                                      event_type=event.type, event_id=event.id, ckey=m.ckey,
                                      covered=covered, tkey=m.tkey, now=wall)
        if tid is not None and covered is None and m.tkey is not None:
            covered = self.ledger.trigger_covered(tid)
        return m, tid, covered

    def _ends_our_abort(self, session_id: str, wall: float) -> bool:
        """Whether this idle ends a turn the daemon aborted itself (the broker's restart of a
        turn prompted before its rules): no news, and the turn that follows starts here."""
        aborted = self.shared.aborted_at(session_id)
        last = self._idle_clock.get(session_id)
        now = self.shared.clock()  # the clock the abort was noted on
        self._idle_clock[session_id] = now
        if len(self._idle_clock) > 1000:
            del self._idle_clock[next(iter(self._idle_clock))]
        if aborted is None or (last is not None and aborted <= last):
            return False
        self._turn_start[session_id] = wall
        return True

    def _pushed(self, event: Event, own: str, wall: float) -> None:
        """A user text in the orchestrator's session: if it is a teammate's message,
        claude-teams pushed it there itself (the orchestrator session is the lead's).
        Remember its text; the trigger of that message needs no prompt. (The daemon's own
        prompts are remembered too, and match no message.)"""
        part = event.properties.get("part")
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            return
        if part.get("messageID") not in self._user_messages or not part["text"].strip():
            return
        assert self.ledger is not None
        covered = self.ledger.record_push(text_key(part["text"]), own, wall - TURN_LOOKBACK, at=wall)
        for tid in covered:
            self.log.info(logs.kv("trigger-covered", trigger=tid, session=own, by=PUSHED,
                                  note=_COVER_NOTES[PUSHED]))

    def _idle(self, m: Match, session_id: str, wall: float) -> tuple[Match, str | None]:
        """A teammate's idle: covered by what it reported in this turn, else worded as a stop.

        One turn of a teammate costs one prompt: a message it sent in the turn (pending or
        already in a prompt) is the news, and the idle that follows adds nothing. The turn
        began at the session's last idle (or, not known since this process started, at most
        ``TURN_LOOKBACK`` ago).
        """
        assert self.ledger is not None
        since = self._turn_start.get(session_id, wall - TURN_LOOKBACK)
        report = self.ledger.turn_report(session_id, m.team, m.teammate, since)
        if report is not None:
            return m, f"turn:{report}"
        where = m.detail[m.detail.find(" in session "):] if " in session " in m.detail else ""
        return dataclasses.replace(m, detail=f"{m.teammate} stopped without reporting{where}"), None

    def observe(self, event: Event) -> None:
        """Keep the session view current from the events that describe it (see :func:`view_change`)."""
        if event.session_id is not None:
            self.prefetch(event.session_id)
        c = view_change(event, self.shared.session_id)
        if c is None:
            return
        if c.status is not None:
            sid, kind = c.status
            self.shared.set_status(sid, kind)
            if kind in ("busy", "retry"):
                self.shared.mark_busy(sid)
        if c.reset_statuses:
            self.shared.replace_statuses({})
        if c.waiting is not None:
            self.shared.set_waiting(*c.waiting)
        if c.forget is not None:
            self.sessions.forget(c.forget)
        if c.own_prompt is not None:
            self._user_messages[c.own_prompt] = None
            if len(self._user_messages) > 200:
                del self._user_messages[next(iter(self._user_messages))]
        desk = self.desk() if c.for_desk else None
        if desk is not None and (c.asked is not None or c.session is not None):
            # The broker writes before it answers a request or sets a new session's rules: a
            # group commit held open now, or opened in the next moments, would keep it waiting.
            self.rows.commit(hold_off=BROKER_GRACE)
        if c.session is not None:
            info = self.sessions.note(c.session)
            if desk is not None:
                desk.session_seen(info)
        if desk is not None:
            if c.message is not None:
                desk.user_message(*c.message)
            if c.asked is not None:
                desk.asked(c.asked)
            if c.replied is not None:
                desk.replied(c.replied)
        if c.own_activity:
            self.on_own_activity()

    def _session(self, session_id: str) -> SessionInfo | None:
        return self.sessions.lookup(session_id, self.client)


def _aborted(event: Event) -> bool:
    err = event.properties.get("error")
    return isinstance(err, dict) and err.get("name") == "MessageAbortedError"


@dataclasses.dataclass(frozen=True)
class ViewChange:
    """What one event changes in the session view; :meth:`Reactions.observe` applies it."""

    status: tuple[str, str | None] | None = None  # (session, busy | retry | None for idle)
    reset_statuses: bool = False  # the server dropped its instance: nothing is busy
    waiting: tuple[str, str | None] | None = None  # (session, what it waits on, or None)
    session: SessionInfo | None = None  # what the event says of a session
    forget: str | None = None  # a session deleted
    own_prompt: str | None = None  # a user message in the orchestrator's own session
    message: tuple[str, dict[str, Any]] | None = None  # (session, a user or assistant message), for the broker
    asked: dict[str, Any] | None = None  # a permission request, for the broker
    replied: str | None = None  # a permission request answered, for the broker
    own_activity: bool = False  # something happened in the orchestrator's own session

    @property
    def for_desk(self) -> bool:
        return self.session is not None or self.message is not None or self.asked is not None or \
            self.replied is not None


_NOTHING = ViewChange()
#: the events of the orchestrator's own session that tell the dispatcher to look again
_OWN_ACTIVITY = frozenset({"session.idle", "session.status", "session.error", "message.updated"})


def view_change(event: Event, own: str | None) -> ViewChange | None:
    """What ``event`` changes in the session view, ``own`` being the orchestrator's session;
    None for an event that changes nothing. A pure function: no state, no I/O."""
    props = event.properties
    etype = event.type
    sid = event.session_id
    c: ViewChange | None = None
    if etype == "session.status" and sid:
        status = props.get("status")
        c = ViewChange(status=(sid, _str(status.get("type")) if isinstance(status, dict) else None))
    elif etype == "session.idle" and sid:
        c = ViewChange(status=(sid, None))
    elif etype in ("session.created", "session.updated"):
        raw = props.get("info")
        info = SessionInfo.from_api(raw) if isinstance(raw, dict) else None
        if info is not None:
            c = ViewChange(session=info)
    elif etype == "session.deleted":
        raw = props.get("info")
        if isinstance(raw, dict) and isinstance(raw.get("id"), str):
            gone = raw["id"]
            return ViewChange(forget=gone, status=(gone, None), own_activity=gone == own)
    elif etype == "message.updated" and sid:
        info = props.get("info")
        if isinstance(info, dict):
            mine = sid == own and info.get("role") == "user" and isinstance(info.get("id"), str)
            c = ViewChange(own_prompt=info["id"] if mine else None,
                           message=(sid, info) if info.get("role") in ("user", "assistant") else None)
    elif etype == "server.instance.disposed":
        c = ViewChange(reset_statuses=True)
    elif etype in ("permission.asked", "question.asked") and sid:
        what = "question" if etype == "question.asked" else f"permission {props.get('permission', '')}".strip()
        c = ViewChange(waiting=(sid, what), asked=props if etype == "permission.asked" else None)
    elif etype in ("permission.replied", "question.replied", "question.rejected") and sid:
        rid = props.get("requestID")
        c = ViewChange(waiting=(sid, None),
                       replied=rid if etype == "permission.replied" and isinstance(rid, str) else None)
    if sid is not None and sid == own and etype in _OWN_ACTIVITY:
        c = dataclasses.replace(c, own_activity=True) if c is not None else ViewChange(own_activity=True)
    return None if c == _NOTHING else c


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None
