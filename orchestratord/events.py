"""The event stream worker: connect, read, record, match rules, catch up after gaps.

The server's SSE stream is read over ``iter_content(65536)`` (small reads make a large
event take seconds) and cut into whole frames by a :class:`~.stream.FrameGuard`.
High-volume events that this reader would neither store nor match against a rule
(``message.part.delta`` with the default settings) are recognised from the start of
their frame and only counted, and their session marked active: decoding them would be
most of the work and change nothing else.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import select
import socket
import sqlite3
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

import requests

from . import ledgerwatch, logs, metrics
from .guard import Judge, seen_in_event
from .inbox import text_key
from .ledger import PUSHED, EventRow, Ledger
from .opencode import AuthError, OpencodeClient, OpencodeError, SessionStatus
from .sessions import SessionDirectory, SessionInfo
from .state import Shared
from .stream import HIGH_VOLUME, Event, FrameGuard, frame_data, from_sync, head_session, normalize
from .triggers import Match, Rule, RuleSet
from .worker import Deps, Worker

if TYPE_CHECKING:
    from .config import Config


#: event rows are written when the stream pauses, or at this many rows, or this old
_COVER_NOTES = {PUSHED: "claude-teams delivered it into the orchestrator's session itself"}
#: how far back a teammate's turn may reach when its previous idle is not known
TURN_LOOKBACK = 600.0
BATCH_ROWS = 1000
BATCH_SECONDS = 1.0


class PermissionDesk(Protocol):
    """Who answers permission requests and looks after sessions (the broker); never blocks."""

    def asked(self, request: dict[str, Any]) -> None: ...
    def replied(self, request_id: str) -> None: ...
    def session_seen(self, info: SessionInfo) -> None: ...
    def resync(self) -> None: ...
    def asks(self, session_id: str, permission: str) -> bool: ...
    def user_message(self, session_id: str, info: dict[str, Any]) -> None: ...


class EventReader(Worker):
    """Reads the stream, records events, raises triggers, and keeps the session view."""

    name = "events"
    sections = ("server", "events", "triggers", "safety", "teams", "ledger")  # teams: the lead, for the judge

    @classmethod
    def build(cls, cfg: Config, deps: Deps) -> EventReader:
        e = cfg.events
        return cls(shared=deps.shared, make_client=deps.make_client, ledger_path=cfg.ledger.path,
                   stream=e.stream, directory=e.directory, read_timeout=e.read_timeout_seconds,
                   max_event_bytes=e.max_event_bytes, reconnect_max=e.reconnect_max_seconds,
                   store=cfg.ledger.store_events, rules=cfg.triggers, on_trigger=deps.wake("dispatch"),
                   on_own_activity=deps.wake("dispatch"), judge=Judge.from_config(cfg.safety, lead=cfg.teams.lead),
                   on_escalation=deps.wake("guard"), sessions=deps.sessions, desk=deps.desk, clock=deps.clock,
                   ledger_health=deps.ledger_health)

    def __init__(self, *, shared: Shared, make_client: Callable[[], OpencodeClient], ledger_path: str,
                 stream: str, directory: str | None, read_timeout: float, max_event_bytes: int,
                 reconnect_max: float, store: str, rules: Sequence[Rule],
                 on_trigger: Callable[[], None], on_own_activity: Callable[[], None],
                 judge: Judge | None = None, on_escalation: Callable[[], None] = lambda: None,
                 sessions: SessionDirectory | None = None,
                 desk: Callable[[], PermissionDesk | None] = lambda: None,
                 clock: Callable[[], float] = time.monotonic,
                 ledger_health: ledgerwatch.LedgerHealth | None = None) -> None:
        super().__init__(clock, ledger_health)
        self.sessions = sessions if sessions is not None else SessionDirectory()
        self.desk = desk
        self.shared = shared
        self.make_client = make_client
        self.ledger_path = ledger_path
        self.path = "/global/event" if stream == "global" else "/event"
        if stream != "global" and directory:
            self.path += "?" + requests.compat.urlencode({"directory": directory})
        self.read_timeout = read_timeout
        self.max_event_bytes = max_event_bytes
        self.reconnect_max = reconnect_max
        self.store = store
        self.rules = RuleSet(rules)
        self._turn_start: dict[str, float] = {}  # session -> wall time of its last idle
        self._idle_clock: dict[str, float] = {}  # session -> the shared clock at its last idle
        self._user_messages: dict[str, None] = {}  # user messages in the orchestrator's session (newest 200)
        # Types whose events have no effect here but to be counted.
        self._count_only = frozenset(t.encode() for t in HIGH_VOLUME
                                     if store != "all" and not self.rules.for_type(t))
        self.on_trigger = on_trigger
        self.on_own_activity = on_own_activity
        self.judge = judge
        self.on_escalation = on_escalation
        self.stall_after = read_timeout + 15.0
        self.ledger: Ledger | None = None
        self.client: OpencodeClient | None = None
        self._resp: requests.Response | None = None
        self._resp_lock = threading.Lock()
        self._batch: list[EventRow] = []
        self._failures = 0
        self._malformed = 0
        self._malformed_logged = 0.0
        self.last_seq: dict[str, int] = {}
        self._frame_guard = FrameGuard(max_event_bytes, self._drained)
        self._batch_since = 0.0  # monotonic time of the oldest row in the batch
        self._waiting: select.poll | None = None  # says whether more of the stream is already here
        self._seq_changed = False  # since it was last written to the ledger
        self._reported_oversized = 0
        self._reported_undecodable = 0
        self._saved_seq: dict[str, int] = {}  # the seq the ledger holds

    # -- lifecycle ---------------------------------------------------------------

    def setup(self) -> None:
        self.ledger = Ledger(self.ledger_path)
        self.client = self.make_client()
        saved = self.ledger.get_meta("sync.last_seq")
        if saved:
            try:
                self.last_seq = {k: int(v) for k, v in json.loads(saved).items()}
            except (ValueError, AttributeError):
                self.last_seq = {}
        self._saved_seq = dict(self.last_seq)

    def teardown(self) -> None:
        self._flush()
        self._save_seq()
        self.shared.set_stream_connected(False)
        if self.client:
            self.client.close()
        if self.ledger:
            self.ledger.close()

    def interrupt(self) -> None:
        with self._resp_lock:
            resp = self._resp
        if resp is not None:
            # close() alone does not wake a thread blocked in recv(); shutdown() does.
            sock = getattr(getattr(resp.raw, "connection", None), "sock", None)
            try:
                if sock is not None:
                    sock.shutdown(socket.SHUT_RDWR)
                resp.close()
            except Exception:  # noqa: BLE001 - already closed or never opened: nothing to stop
                pass

    def wake_reconnect(self) -> None:
        """The server came back: skip the rest of the backoff."""
        self._failures = 0
        self.wake()

    # -- one connection ------------------------------------------------------------

    def step(self) -> float:
        assert self.client is not None and self.ledger is not None
        if self.shared.server_problem is not None:
            return 1.0  # a server generation this daemon does not speak: the health watch said so once
        # Judged when the attempt begins: one begun while the server was still coming up can
        # time out after the server is up (it accepted the socket but never answered it).
        starting = self.shared.starting_up()
        try:
            resp = self.client.open_stream(self.path, self.read_timeout)
        except AuthError as exc:
            return self._failed(f"{exc}", level="error")
        except OpencodeError as exc:
            return self._failed(str(exc), starting=starting)
        with self._resp_lock:
            self._resp = resp
        self._waiting = _poller(resp)
        try:
            try:
                self._connected()
                self._consume(resp)
                reason = "server closed the stream"
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
                reason = "read timed out" if "timed out" in str(exc) else f"connection lost: {str(exc)[:120]}"
            finally:
                with self._resp_lock:
                    self._resp = None
                self._waiting = None
                resp.close()
                self._flush()
        except BaseException:
            # A failed write (or anything else) ends this connection too: say so, or status,
            # the stall watch and the dispatcher would trust a stream nobody is reading.
            self.shared.stream_lost()
            metrics.stream_connected(False)
            raise
        if self.stopping:
            return 0.0
        self.shared.stream_lost()
        metrics.stream_connected(False)
        self._transition("disconnected", reason)
        self.log.warning(logs.kv("stream-disconnected", path=self.path, reason=reason))
        return self._failed(reason, log=False)

    def _failed(self, reason: str, level: str = "warning", log: bool = True, starting: bool = False) -> float:
        self._failures += 1
        delay = min(self.reconnect_max, 0.25 * 2 ** min(self._failures, 8))
        delay *= random.uniform(0.5, 1.0)
        if log and (self._failures == 1 or self._failures % 20 == 0):
            quiet = starting or self.shared.starting_up()
            priority = logging.ERROR if level == "error" else logs.NOTICE if quiet else logging.WARNING
            self.log.log(priority, logs.kv("stream-connect-failed", path=self.path, error=reason,
                                           attempt=self._failures, retry_in=f"{delay:.2f}s"))
        return delay

    def _connected(self) -> None:
        assert self.client is not None and self.ledger is not None
        first = self._failures == 0 and not self.shared.stream_connected
        self._failures = 0
        self.shared.set_stream_connected(True)
        metrics.stream_connected(True)
        self._transition("connected", self.path)
        self.log.info(logs.kv("stream-connected", path=self.path))
        del first
        # Events are not replayed: re-read what they would have told us.
        try:
            statuses = self.client.session_status()
            self.shared.replace_statuses(SessionStatus.busy_map(statuses))
        except OpencodeError as exc:
            self.log.warning(logs.kv("status-reread-failed", error=str(exc)))
        self._reread_permissions()
        self._catch_up()
        self.on_own_activity()

    def _transition(self, state: str, detail: str) -> None:
        """Note a connect or disconnect in the ledger's history; a failing ledger does not end the stream."""
        assert self.ledger is not None
        try:
            self.ledger.record_transition("stream", state, detail)
        except sqlite3.Error as exc:
            if not ledgerwatch.is_trouble(exc):
                raise
            self.ledger_health.failed(exc, where=self.name)

    def _reread_permissions(self) -> None:
        """Requests asked and sessions made while we were away are not replayed: the broker lists them."""
        self.shared.restart_activity()
        desk = self.desk()
        if desk is not None:
            desk.resync()

    def _catch_up(self) -> None:
        """Ask for the durable events after the last seq we saw, per session."""
        if self.path != "/global/event" or not self.last_seq:
            return
        assert self.client is not None
        try:
            records = self.client.sync_history(dict(self.last_seq))
        except OpencodeError as exc:
            self.log.warning(logs.kv("catch-up-failed", error=str(exc), fix="none needed; triggers may be late"))
            return
        n = 0
        for record in records:
            if not isinstance(record, dict):
                continue
            event = from_sync(record)
            if event is None:
                continue
            self._note_seq(event.session_id, record.get("seq"))
            self._handle(event, store=False)
            n += 1
        if n:
            self.log.info(logs.kv("caught-up", events=n))
        self._save_seq()

    def _consume(self, resp: requests.Response) -> None:
        count_only = self._count_only
        for frame in self._frame_guard.frames(resp.iter_content(65536)):
            self.beat()
            if self.stopping:
                return
            if count_only and (head := head_session(frame)) is not None and head[0] in count_only:
                self.shared.count_event(time.time(), head[1])  # a streaming session is not a stalled one
                self._report_frame_guard()
                continue
            data = frame_data(frame)
            if data is None:
                continue
            try:
                obj = json.loads(data)
            except ValueError:
                self._malformed_frame("not JSON", data)
                continue
            event = normalize(obj, data)
            if event is None:
                self._malformed_frame("not an event", data)
                continue
            self._handle(event, store=True)
            self._report_frame_guard()

    def _malformed_frame(self, why: str, data: str) -> None:
        self._malformed += 1
        now = self.clock()
        if now - self._malformed_logged >= 60.0:
            self._malformed_logged = now
            self.log.warning(logs.kv("malformed-frame", why=why, total=self._malformed, sample=data[:80]))

    def _report_frame_guard(self) -> None:
        g = self._frame_guard
        if g.oversized != self._reported_oversized:
            self._reported_oversized = g.oversized
            self.log.warning(logs.kv("oversized-event-skipped", limit=self.max_event_bytes, total=g.oversized,
                                     fix="raise events.max_event_bytes if such events matter"))
        if g.undecodable != self._reported_undecodable:
            self._reported_undecodable = g.undecodable
            self._malformed_frame("invalid UTF-8", "")

    # -- one event ----------------------------------------------------------------

    def _handle(self, event: Event, store: bool) -> None:
        wall = time.time()
        if event.type == "sync":
            if event.sync is not None:
                self._note_seq(event.session_id, event.sync.get("seq"))
            if store and self.store == "all":
                self._add_row(EventRow(wall, event.id, event.type, event.session_id, event.directory, event.data))
            return
        self.shared.count_event(wall, event.session_id)
        metrics.event(event.type, wall)
        if store and (self.store == "all" or (self.store == "default" and event.type not in HIGH_VOLUME)):
            self._add_row(EventRow(wall, event.id, event.type, event.session_id, event.directory, event.data))
        self._observe(event)
        before = self._saved_seq
        try:
            self._act(event, wall)
        except Exception as exc:
            if isinstance(exc, sqlite3.Error) and ledgerwatch.is_trouble(exc):
                # Not recorded, so not done: a catch-up after the reconnect sees this event again.
                # (Any other error would come back with it at every reconnect: that one is passed.)
                self._saved_seq = before
                self._unwritten([])
            raise

    def _act(self, event: Event, wall: float) -> None:
        """Judge the event and raise the triggers it matches, each recorded before it counts."""
        own = self.shared.session_id
        if self.judge is not None and event.type == "message.part.updated":
            desk = self.desk()
            seen = seen_in_event(event, own, desk.asks if desk is not None else None)
            if seen and self.ledger is not None and self.judge.record(self.ledger, seen, own, self._session):
                self.on_escalation()
        if event.type == "session.error" and _aborted(event) and self.shared.aborted_recently(event.session_id):
            return  # the daemon aborted that turn itself (a restart, the guard): nothing to tell
        if event.type == "session.idle" and event.session_id and self._ends_our_abort(event.session_id, wall):
            return
        if own is not None and event.session_id == own and event.type == "message.part.updated":
            self._pushed(event, own, wall)
        matches = self.rules.match(event, own, self._session)
        if matches:
            self._flush()
            assert self.ledger is not None
            added = 0
            for m in matches:
                covered = None
                if event.type == "session.idle" and event.session_id and m.teammate:
                    m, covered = self._idle(m, event.session_id, wall)
                tid = self.ledger.add_trigger(m.kind, m.detail, rule=m.rule, dedup=m.dedup, team=m.team,
                                              teammate=m.teammate, session_id=event.session_id,
                                              event_type=event.type, event_id=event.id, ckey=m.ckey,
                                              covered=covered, tkey=m.tkey, now=wall)
                if tid is not None and covered is None and m.tkey is not None:
                    covered = self.ledger.trigger_covered(tid)
                if tid is not None and covered is not None:
                    self.log.info(logs.kv("trigger-covered", rule=m.rule, session=event.session_id,
                                          teammate=m.teammate, by=covered, note=_COVER_NOTES.get(
                                              covered, "its turn already reported")))
                elif tid is not None:
                    added += 1
                    self.log.info(logs.kv("trigger", rule=m.rule, session=event.session_id, teammate=m.teammate,
                                          event=event.type))
            if event.type == "session.idle" and event.session_id:
                self._turn_start.pop(event.session_id, None)
                self._turn_start[event.session_id] = wall
                if len(self._turn_start) > 1000:  # the oldest sessions' turns are long over
                    del self._turn_start[next(iter(self._turn_start))]
            if added:
                self.on_trigger()

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

    def _observe(self, event: Event) -> None:
        """Keep the session view current from the events that describe it."""
        props = event.properties
        etype = event.type
        sid = event.session_id
        if etype == "session.status" and sid:
            status = props.get("status")
            kind = status.get("type") if isinstance(status, dict) else None
            self.shared.set_status(sid, kind)
            if kind in ("busy", "retry"):
                self.shared.mark_busy(sid)
        elif etype == "session.idle" and sid:
            self.shared.set_status(sid, None)
        elif etype in ("session.created", "session.updated"):
            raw = props.get("info")
            info = SessionInfo.from_api(raw) if isinstance(raw, dict) else None
            if info is not None:
                info = self.sessions.note(info)
                desk = self.desk()
                if desk is not None:
                    desk.session_seen(info)
        elif etype == "session.deleted":
            info = props.get("info")
            if isinstance(info, dict) and isinstance(info.get("id"), str):
                self.sessions.forget(info["id"])
                self.shared.set_status(info["id"], None)
                if info["id"] == self.shared.session_id:
                    self.on_own_activity()
        elif etype == "message.updated" and sid:
            info = props.get("info")
            if sid == self.shared.session_id and isinstance(info, dict) and info.get("role") == "user" and \
                    isinstance(info.get("id"), str):
                self._user_messages[info["id"]] = None
                if len(self._user_messages) > 200:
                    del self._user_messages[next(iter(self._user_messages))]
            desk = self.desk()
            if desk is not None and isinstance(info, dict) and info.get("role") in ("user", "assistant"):
                desk.user_message(sid, info)
        elif etype == "server.instance.disposed":
            self.shared.replace_statuses({})
        elif etype in ("permission.asked", "question.asked") and sid:
            what = "question" if etype == "question.asked" else f"permission {props.get('permission', '')}".strip()
            self.shared.set_waiting(sid, what)
            desk = self.desk()
            if etype == "permission.asked" and desk is not None:
                desk.asked(props)
        elif etype in ("permission.replied", "question.replied", "question.rejected") and sid:
            self.shared.set_waiting(sid, None)
            desk = self.desk()
            if etype == "permission.replied" and desk is not None and isinstance(props.get("requestID"), str):
                desk.replied(props["requestID"])
        if sid is not None and sid == self.shared.session_id and etype in (
                "session.idle", "session.status", "session.error", "message.updated"):
            self.on_own_activity()

    def _session(self, session_id: str) -> SessionInfo | None:
        return self.sessions.lookup(session_id, self.client)

    def _note_seq(self, session_id: str | None, seq: Any) -> None:
        if session_id and isinstance(seq, int) and seq > self.last_seq.get(session_id, -1):
            self.last_seq[session_id] = seq
            self._seq_changed = True

    def _seq_to_save(self) -> dict[str, str] | None:
        """The ``sync.last_seq`` meta value, if it changed since it was last written."""
        if not self.last_seq or not self._seq_changed:
            return None
        if len(self.last_seq) > 500:  # keep the newest sessions only
            self.last_seq = dict(sorted(self.last_seq.items(), key=lambda kv: kv[0])[-500:])
        return {"sync.last_seq": json.dumps(self.last_seq)}

    def _save_seq(self) -> None:
        if self.ledger is not None and (meta := self._seq_to_save()):
            try:
                self.ledger.add_events((), meta)
            except Exception:
                self._unwritten([])
                raise
            self._seq_changed = False
            self._saved_seq = dict(self.last_seq)

    def _add_row(self, row: EventRow) -> None:
        if not self._batch:
            self._batch_since = self.clock()
        self._batch.append(row)
        if len(self._batch) >= BATCH_ROWS:
            self._flush()

    def _drained(self) -> None:
        """The bytes read so far are used up: write the batch, unless more is already waiting.

        opencode sends each event in its own HTTP chunk, so this runs after every event.
        While the stream runs ahead of us, rows are written in batches (at most
        ``BATCH_ROWS`` or ``BATCH_SECONDS`` old); once it pauses, at once.
        """
        if self._batch and (self.clock() - self._batch_since >= BATCH_SECONDS or not self._more_waiting()):
            self._flush()

    def _more_waiting(self) -> bool:
        poller = self._waiting
        if poller is None:
            return False
        try:
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return False

    def _flush(self) -> None:
        if self._batch and self.ledger is not None:
            batch, self._batch = self._batch, []
            meta = self._seq_to_save()
            try:
                self.ledger.add_events(batch, meta)  # the rows and the seq they reach, in one transaction
            except Exception:
                self._unwritten(batch)
                raise
            self._seq_changed = False
            self._saved_seq = dict(self.last_seq)

    def _unwritten(self, batch: list[EventRow]) -> None:
        """A write failed: keep the rows for the next flush, and step back to the last saved seq.

        The stream is read again after a reconnect, from the seq the ledger holds: what
        came after it is caught up (and its triggers raised) once the ledger takes
        writes again, instead of being taken as done.
        """
        self._batch[:0] = batch[-BATCH_ROWS * 10:]
        if self.last_seq != self._saved_seq:
            self.last_seq = dict(self._saved_seq)
            self._seq_changed = False


def _aborted(event: Event) -> bool:
    err = event.properties.get("error")
    return isinstance(err, dict) and err.get("name") == "MessageAbortedError"


def _poller(resp: requests.Response) -> select.poll | None:
    """A poll on the stream's socket, to see without blocking whether more bytes have come."""
    sock = getattr(getattr(resp.raw, "connection", None), "sock", None)
    if sock is None or getattr(sock, "pending", None) is not None:
        return None  # no socket, or TLS: bytes may wait inside the TLS layer; write at every pause
    try:
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
    except (OSError, ValueError):
        return None
    return poller
