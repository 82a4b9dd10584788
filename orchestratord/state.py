"""The daemon's live view of the world, shared in memory between its threads.

Workers write what they observe here (server up or down, stream connected, which
sessions are busy); the supervisor turns it into systemd's STATUS line and copies it
into the ledger for ``orchestratord status``. Durable facts go to the ledger; this is
only the present moment.
"""

from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable


#: how long an abort by the daemon explains a session's MessageAbortedError
ABORT_MEMORY = 30.0


class DaemonState(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DEGRADED = "degraded"
    RELOADING = "reloading"
    STOPPING = "stopping"


@dataclass
class Snapshot:
    state: str
    server_url: str
    server_healthy: bool | None
    server_version: str | None
    stream_connected: bool
    events_total: int
    last_event_at: float | None
    session_id: str | None
    session_busy: bool
    busy_sessions: list[str]
    pending_triggers: int
    ledger_failing: bool = False


@dataclass
class Shared:
    """Thread-safe holder of the present state; all fields are read under ``lock``."""

    server_url: str = ""
    clock: Callable[[], float] = time.monotonic
    lock: threading.Lock = field(default_factory=threading.Lock)
    state: DaemonState = DaemonState.STARTING
    server_healthy: bool | None = None
    #: why the server, up, is not driven (a generation this daemon does not speak), else None
    server_problem: str | None = None
    server_version: str | None = None
    # A server still coming up at the daemon's start is logged at notice, not as an outage,
    # for ``startup_grace`` seconds after ``started`` (monotonic) or until it is first up.
    started: float = 0.0
    startup_grace: float = 0.0
    ever_up: bool = False
    outages: int = 0  # times the server was seen going down: a prompt in flight may have died with it
    stream_connected: bool = False
    # Times a connected stream ended. A restarted server always ends it; a health probe that
    # only timed out (a loaded machine) does not, and is no reason to think a turn died.
    stream_losses: int = 0
    events_total: int = 0
    last_event_at: float | None = None  # wall time
    session_id: str | None = None
    # Set by the dispatcher while it creates the orchestrator's session: a new session titled
    # like it may be ours, and must not be given a teammate's rules before we know.
    own_session_pending: bool = False
    statuses: dict[str, str] = field(default_factory=dict)  # sessionID -> busy | retry
    busy_since: dict[str, float] = field(default_factory=dict)  # monotonic
    # Written by the event reader alone, for every event of a session: plain dict stores
    # (atomic in CPython) without the lock, because this runs for every streamed delta.
    last_activity: dict[str, float] = field(default_factory=dict)  # monotonic
    waiting: dict[str, str] = field(default_factory=dict)  # sessionID -> "permission bash" / "question"
    went_busy: dict[str, float] = field(default_factory=dict)  # monotonic time of the last busy event
    aborted: dict[str, float] = field(default_factory=dict)  # sessions the daemon aborted: monotonic time
    pending_triggers: int = 0
    # Why the dispatcher holds the pending triggers back (dispatch.Hold), as it last decided.
    holds: list[Any] = field(default_factory=list)
    ledger_failing: bool = False  # writes to the ledger fail (see ledgerwatch)
    changed: threading.Event = field(default_factory=threading.Event)

    def update(self, **values: Any) -> None:
        with self.lock:
            for key, value in values.items():
                setattr(self, key, value)
        self.changed.set()

    def starting_up(self) -> bool:
        """True until the server is first seen up, within the startup grace."""
        with self.lock:
            return not self.ever_up and self.clock() - self.started < self.startup_grace

    def stream_lost(self) -> None:
        """The stream was connected and is no more (counted once per connection)."""
        with self.lock:
            if self.stream_connected:
                self.stream_losses += 1
            self.stream_connected = False
        self.changed.set()

    def note_abort(self, session_id: str) -> None:
        """The daemon is about to abort a turn of ``session_id``: its MessageAbortedError is ours."""
        with self.lock:
            now = self.clock()
            self.aborted = {k: v for k, v in self.aborted.items() if now - v < ABORT_MEMORY}
            self.aborted[session_id] = now

    def aborted_at(self, session_id: str) -> float | None:
        """When (this clock) the daemon last aborted a turn of ``session_id``, if it did lately."""
        with self.lock:
            return self.aborted.get(session_id)

    def aborted_recently(self, session_id: str | None) -> bool:
        with self.lock:
            at = self.aborted.get(session_id) if session_id else None
            return at is not None and self.clock() - at < ABORT_MEMORY

    def set_status(self, session_id: str, status: str | None) -> None:
        """Record a session's status from an event (``None`` or ``idle`` clears it)."""
        with self.lock:
            if status in (None, "idle"):
                self.statuses.pop(session_id, None)
                self.busy_since.pop(session_id, None)
            else:
                self.statuses[session_id] = status
                self.busy_since.setdefault(session_id, self.clock())
        self.changed.set()

    def replace_statuses(self, statuses: dict[str, str]) -> None:
        """Take the server's whole status map (after a reconnect nothing is replayed)."""
        now = self.clock()
        with self.lock:
            self.busy_since = {k: self.busy_since.get(k, now) for k in statuses}
            self.statuses = dict(statuses)
        self.changed.set()

    def touch(self, session_id: str) -> None:
        """Something happened in this session (any event): it is not stalled."""
        self.last_activity[session_id] = self.clock()

    def set_waiting(self, session_id: str, what: str | None) -> None:
        """The session waits on a person (a permission request, a question), or no longer."""
        with self.lock:
            if what is None:
                self.waiting.pop(session_id, None)
            else:
                self.waiting[session_id] = what
        self.changed.set()

    def replace_waiting(self, waiting: dict[str, str]) -> None:
        with self.lock:
            self.waiting = dict(waiting)
        self.changed.set()

    def quiet_for(self, session_id: str) -> float:
        """Seconds since the last sign of life: an event, or the start of its busy spell."""
        with self.lock:
            marks = [t for t in (self.last_activity.get(session_id), self.busy_since.get(session_id)) if t is not None]
        return 0.0 if not marks else self.clock() - max(marks)

    def sessions_view(self) -> list[dict[str, Any]]:
        """Busy sessions for ``status``: for how long, last activity, what they wait on."""
        now = self.clock()
        with self.lock:
            out = []
            for sid in sorted(self.statuses):
                since = self.busy_since.get(sid, now)
                last = max(self.last_activity.get(sid, since), since)
                out.append({"id": sid, "status": self.statuses[sid], "own": sid == self.session_id,
                            "busy_seconds": round(now - since, 1), "quiet_seconds": round(now - last, 1),
                            "waiting": self.waiting.get(sid)})
            return out

    def is_busy(self, session_id: str | None) -> bool:
        with self.lock:
            return session_id is not None and session_id in self.statuses

    def busy_for(self, session_id: str) -> float:
        with self.lock:
            since = self.busy_since.get(session_id)
        return 0.0 if since is None else self.clock() - since

    def count_event(self, wall: float, n: int = 1) -> None:
        with self.lock:
            self.events_total += n
            self.last_event_at = wall

    def snapshot(self) -> Snapshot:
        with self.lock:
            return Snapshot(
                state=self.state.value, server_url=self.server_url, server_healthy=self.server_healthy,
                server_version=self.server_version, stream_connected=self.stream_connected,
                events_total=self.events_total, last_event_at=self.last_event_at, session_id=self.session_id,
                session_busy=self.session_id in self.statuses if self.session_id else False,
                busy_sessions=sorted(self.statuses), pending_triggers=self.pending_triggers,
                ledger_failing=self.ledger_failing)

    def status_line(self) -> str:
        """One line for systemd's STATUS=."""
        s = self.snapshot()
        server = "up" if s.server_healthy else ("down" if s.server_healthy is False else "unknown")
        if s.server_version and s.server_healthy:
            server += f" {s.server_version}"
        stream = "connected" if s.stream_connected else "disconnected"
        session = "none" if not s.session_id else ("busy" if s.session_busy else "idle")
        return (f"{s.state}: server {server}, stream {stream}, session {session}, "
                f"{s.pending_triggers} pending trigger{'s' if s.pending_triggers != 1 else ''}, "
                f"{s.events_total} events" + (", ledger failing" if s.ledger_failing else ""))
