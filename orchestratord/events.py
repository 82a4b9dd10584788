"""The event stream worker: connect, read, record, catch up after gaps.

What each event means (the session view, judging, triggers) is :mod:`.reactions`; this
module reads the stream, keeps the rows and the sync cursor, and hands every event over.

The server's SSE stream is read over ``iter_content(65536)`` (small reads make a large
event take seconds) and cut into whole frames by a :class:`~.stream.FrameGuard` (the
size and UTF-8 guard), whose frames sseclient-py reads. High-volume events that this
reader would neither store nor match against a rule (``message.part.delta`` with the
default settings) are recognised from the start of their frame's data line, in front of
sseclient-py, and only counted, and their session marked active: parsing and decoding
them would be most of the work and change nothing else. So are the ``sync`` copies of
``/global/event`` when they are not stored: the seq at the start of the frame is all the
cursor needs of them.

(Past 400 lines: the connection, its frame pass and its backoff share the connection's
state, and split further they would hand it back and forth.)
"""

from __future__ import annotations

import json
import logging
import random
import socket
import sqlite3
import threading
import time
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import requests

from . import backlog, ledgerwatch, logs, metrics
from .eventlog import EventLog
from .guard import Judge
from .ledger import EventRow, Ledger
from .opencode import AuthError, OpencodeClient, OpencodeError, SessionStatus
from .reactions import PermissionDesk, Reactions
from .sessions import Prefetch, SessionDirectory
from .state import Shared
from .stream import HEAD, HIGH_VOLUME, Event, FrameGuard, from_sync, normalize, read_data
from .triggers import Rule
from .worker import Deps, Worker

if TYPE_CHECKING:
    from .config import Config

#: count-only events (deltas) are handed to the shared state in tallies at most this old
TALLY_SECONDS = 0.05
#: a connection that lasted this long worked: the reconnect backoff starts over after it
STABLE_SECONDS = 10.0


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
        self._waiting: backlog.Backlog | None = None  # says whether more of the stream is already here
        #: the rows read and the sync cursor they reach, written together
        self.eventlog = EventLog(clock, self._more_waiting)
        self.on_own_activity = on_own_activity
        #: what each event means: the live stream and the catch-up hand every event to it
        self.reactions = Reactions(shared=shared, sessions=sessions if sessions is not None else SessionDirectory(),
                                   rules=rules, judge=judge, desk=desk, rows=self.eventlog, on_trigger=on_trigger,
                                   on_escalation=on_escalation, on_own_activity=on_own_activity, log=self.log)
        # Types whose events have no effect here but to be counted.
        self._count_only = frozenset(t.encode() for t in HIGH_VOLUME
                                     if store != "all" and not self.reactions.rules.for_type(t))
        self.stall_after = read_timeout + 15.0
        self.ledger: Ledger | None = None
        self.client: OpencodeClient | None = None
        self._prefetch: Prefetch | None = None  # looks up the sessions events name, on its own thread
        self._resp: requests.Response | None = None
        self._resp_lock = threading.Lock()
        self._failures = 0  # attempts since the last connection that lasted (STABLE_SECONDS)
        self._connected_at = 0.0
        self._malformed = 0
        self._malformed_logged = 0.0
        self._frame_guard = FrameGuard(max_event_bytes, self._drained)
        # Count-only events are tallied here and handed to the shared state now and then,
        # not one lock round each: (how many, the sessions they came from).
        self._tally = 0
        self._tally_sessions: dict[bytes, None] = {}
        self._tally_since = 0.0
        self._reported_oversized = 0
        self._reported_undecodable = 0

    # -- lifecycle ---------------------------------------------------------------

    def setup(self) -> None:
        self.ledger = Ledger(self.ledger_path)
        self.client = self.make_client()
        self._prefetch = Prefetch(self.reactions.sessions, self.make_client())
        self._prefetch.start()
        self.reactions.bind(self.ledger, self.client, self._prefetch.name)
        self.eventlog.load(self.ledger)

    def teardown(self) -> None:
        self.eventlog.flush()
        self.eventlog.save_seq()
        self.shared.set_stream_connected(False)
        if self._prefetch is not None:
            self._prefetch.stop()
            self._prefetch = None
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
        self._waiting = backlog.for_response(resp, self._frame_guard)
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
                self.eventlog.flush()
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
        return self._lost(reason)

    def _lost(self, reason: str) -> float:
        """The wait before the next attempt after a connection ended. One that ended soon
        after it began (a server or proxy that takes the stream and drops it) is a failed
        attempt: the backoff grows, and every 20th is logged, as with connect failures."""
        lasted = self.clock() - self._connected_at
        brief = lasted < STABLE_SECONDS
        if not brief:
            self._failures = 0
        delay = self._failed(reason, log=False)
        if self._failures == 1 or self._failures % 20 == 0:
            self.log.warning(logs.kv("stream-disconnected", path=self.path, reason=reason,
                                     lasted=f"{lasted:.1f}s" if brief else None,
                                     attempt=self._failures if brief else None, retry_in=f"{delay:.2f}s"))
        return delay

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
        self._connected_at = self.clock()
        self.shared.set_stream_connected(True)
        metrics.stream_connected(True)
        self._transition("connected", self.path)
        self.log.info(logs.kv("stream-connected", path=self.path))
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
        if self.path != "/global/event" or not self.eventlog.last_seq:
            return
        assert self.client is not None
        try:
            records = self.client.sync_history(dict(self.eventlog.last_seq))
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
            self.eventlog.note_seq(event.session_id, record.get("seq"))
            self._handle(event, store=False)
            n += 1
        if n:
            self.log.info(logs.kv("caught-up", events=n))
        self.eventlog.save_seq()

    def _consume(self, resp: requests.Response) -> None:
        frames = self._frame_guard.frames(resp.iter_content(65536))
        try:
            for data in read_data(self._to_decode(frames)):
                self._one_event(data)
        finally:
            self._hand_over_tally()

    def _to_decode(self, frames: Iterator[bytes]) -> Iterator[bytes]:
        """The frames worth decoding; count-only ones (deltas) are tallied and passed over, and
        sync copies that are not stored give their seq to the cursor and are passed over.

        The tally goes to the shared state before a frame is passed on, so an event that
        is handled is never counted ahead of the deltas before it.
        """
        count_only = self._count_only
        skip_syncs = self.store != "all"  # a sync copy's only use then: the seq it carries
        note_seq = self.eventlog.note_seq
        passing = bool(count_only) or skip_syncs  # with neither (store = "all"), every frame is decoded
        guard = self._frame_guard
        stop = self._stop
        head = HEAD.match  # what head_session and head_sync read, a delta's session left undecoded
        for frame in frames:
            if stop.is_set():
                return
            if passing and (m := head(frame)) is not None:
                if (sid := m.group(2)) is not None:
                    if m.group(1) in count_only and b"\\" not in sid:  # stream.plain, inline
                        if not self._tally:
                            self._tally_since = self.clock()
                        self._tally += 1
                        self._tally_sessions[sid] = None  # a streaming session is not a stalled one
                        if guard.oversized != self._reported_oversized or \
                                guard.undecodable != self._reported_undecodable:
                            self._report_frame_guard()
                        continue
                elif skip_syncs and (seq := m.group(3)) is not None and m.group(1) == b"sync" and \
                        b"\\" not in (aggregate := m.group(4)):
                    note_seq(aggregate.decode(), int(seq))
                    continue
            self.beat()
            self._hand_over_tally()
            yield frame

    def _drained(self) -> None:
        """The bytes read so far are used up: the tally goes to the shared state once it is a
        moment old or the stream pauses (the stall watch must not take a session that has
        just streamed for a quiet one), the batch to the ledger (see EventLog.drained)."""
        now = self.clock()
        self.heartbeat = now  # beat(), written out: this runs once per chunk
        if not self._tally:
            self.eventlog.drained(now=now)
            return
        waiting = self._waiting  # _more_waiting, written out; one answer serves the batch too
        more = waiting is not None and waiting.more()
        if not more or now - self._tally_since >= TALLY_SECONDS:
            self._hand_over_tally()
        self.eventlog.drained(more, now)

    def _hand_over_tally(self) -> None:
        if self._tally:
            sessions = [sid.decode() for sid in self._tally_sessions]
            self.shared.count_events(self._tally, time.time(), sessions)
            self._tally = 0
            self._tally_sessions = {}
            for sid in sessions:
                self.reactions.prefetch(sid)

    def _one_event(self, data: str) -> None:
        """The data of an event that is decoded: normalised, then handled."""
        try:
            obj = json.loads(data)
        except ValueError:
            self._malformed_frame("not JSON", data)
            return
        event = normalize(obj, data)
        if event is None:
            self._malformed_frame("not an event", data)
            return
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
                self.eventlog.note_seq(event.session_id, event.sync.get("seq"))
            if store and self.store == "all":
                self.eventlog.add(EventRow(wall, event.id, event.type, event.session_id, event.directory, event.data))
            return
        self.shared.count_event(wall, event.session_id)
        metrics.event(event.type, wall)
        if store and (self.store == "all" or (self.store == "default" and event.type not in HIGH_VOLUME)):
            self.eventlog.add(EventRow(wall, event.id, event.type, event.session_id, event.directory, event.data))
        self.reactions.observe(event)
        before = self.eventlog.saved_seq
        try:
            self.reactions.act(event, wall)
        except Exception as exc:
            if isinstance(exc, sqlite3.Error) and ledgerwatch.is_trouble(exc):
                # Not recorded, so not done: a catch-up after the reconnect sees this event again.
                # (Any other error would come back with it at every reconnect: that one is passed.)
                self.eventlog.rollback(exc)  # a group commit's writes go with it
                self.eventlog.saved_seq = before
                self.eventlog.unwritten([])
            raise

    def _more_waiting(self) -> bool:
        waiting = self._waiting
        return waiting is not None and waiting.more()
