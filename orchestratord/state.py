"""The daemon's live view of the world, shared in memory between its threads.

Workers write what they observe here (server up or down, stream connected, which
sessions are busy); the supervisor turns it into systemd's STATUS line and copies it
into the ledger for ``orchestratord status``. Durable facts go to the ledger; this is
only the present moment.
"""

from __future__ import annotations

import contextlib
import enum
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterable, Iterator, Sequence, TypeVar

#: how long an abort by the daemon explains a session's MessageAbortedError
ABORT_MEMORY = 30.0


class DaemonState(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DEGRADED = "degraded"
    RELOADING = "reloading"
    STOPPING = "stopping"


@dataclass(frozen=True)
class Snapshot:
    """One consistent reading of the scalar fields, for a reader that needs several at once."""

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
    holds: tuple[Any, ...] = ()


T = TypeVar("T")


class _Reading(Generic[T]):
    """A public, read-only face of a private field, read under the holder's lock.

    Assigning to it raises: writes go through the holder's methods, which keep the rule.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.private = "_" + name

    def __get__(self, obj: Any, objtype: type | None = None) -> T:
        with obj._lock:
            value: T = getattr(obj, self.private)
            return value

    def __set__(self, obj: Any, value: T) -> None:
        raise AttributeError(f"{self.private[1:]} is changed through Shared's methods")


class Shared:
    """Thread-safe holder of the present state.

    One rule: every field is private and read or written under ``_lock``, through the
    methods and read-only properties below. Workers on other threads write the same
    maps (the event reader, the dispatcher and the stall watch all set statuses), so
    nothing hands out a live dict: readers get copies or a :class:`Snapshot`.
    """

    def __init__(self, server_url: str = "", clock: Callable[[], float] = time.monotonic, *,
                 started: float = 0.0, startup_grace: float = 0.0) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        #: set on every change; the supervisor clears it when it writes the state row
        self.changed = threading.Event()
        self._server_url = server_url
        self._state = DaemonState.STARTING
        self._server_healthy: bool | None = None
        self._server_version: str | None = None
        #: why the server, up, is not driven (a generation this daemon does not speak), else None
        self._server_problem: str | None = None
        # A server still coming up at the daemon's start is logged at notice, not as an outage,
        # for ``startup_grace`` seconds after ``started`` (monotonic) or until it is first up.
        self._started = started
        self._startup_grace = startup_grace
        self._ever_up = False
        self._outages = 0  # times the server was seen going down: a prompt in flight may have died with it
        self._stream_connected = False
        # Times a connected stream ended. A restarted server always ends it; a health probe that
        # only timed out (a loaded machine) does not, and is no reason to think a turn died.
        self._stream_losses = 0
        self._events_total = 0
        self._last_event_at: float | None = None  # wall time
        self._session_id: str | None = None
        # Set by the dispatcher while it creates the orchestrator's session: a new session titled
        # like it may be ours, and must not be given a teammate's rules before we know.
        self._own_session_pending = False
        self._statuses: dict[str, str] = {}  # sessionID -> busy | retry
        self._busy_since: dict[str, float] = {}  # monotonic
        self._last_activity: dict[str, float] = {}  # monotonic, every event of a session
        self._waiting: dict[str, str] = {}  # sessionID -> "permission bash" / "question"
        self._went_busy: dict[str, float] = {}  # monotonic time of the last busy event
        self._aborted: dict[str, float] = {}  # sessions the daemon aborted: monotonic time
        self._pending_triggers = 0
        # Why the dispatcher holds the pending triggers back (dispatch.Hold), as it last decided.
        self._holds: tuple[Any, ...] = ()
        self._ledger_failing = False  # writes to the ledger fail (see ledgerwatch)

    # -- single readings (each under the lock) -----------------------------------------

    state = _Reading[DaemonState]()
    server_url = _Reading[str]()
    server_healthy = _Reading[bool | None]()
    server_version = _Reading[str | None]()
    server_problem = _Reading[str | None]()
    startup_grace = _Reading[float]()
    stream_connected = _Reading[bool]()
    events_total = _Reading[int]()
    session_id = _Reading[str | None]()
    own_session_pending = _Reading[bool]()
    ledger_failing = _Reading[bool]()

    @property
    def holds(self) -> list[Any]:
        with self._lock:
            return list(self._holds)

    def outages(self) -> tuple[int, int]:
        """(times the server was seen down, times a connected stream ended), read together."""
        with self._lock:
            return self._outages, self._stream_losses

    def statuses(self) -> dict[str, str]:
        """A copy of the busy sessions' statuses."""
        with self._lock:
            return dict(self._statuses)

    def activity(self, session_id: str) -> float | None:
        """Monotonic time of the session's last event, if any was seen."""
        with self._lock:
            return self._last_activity.get(session_id)

    def went_busy_at(self, session_id: str) -> float | None:
        """Monotonic time the stream last said the session went busy."""
        with self._lock:
            return self._went_busy.get(session_id)

    # -- writes ---------------------------------------------------------------------

    @contextlib.contextmanager
    def _changing(self) -> Iterator[None]:
        """Change fields under the lock; then tell the supervisor the live state moved."""
        with self._lock:
            yield
        self.changed.set()

    def set_state(self, state: DaemonState) -> None:
        """The daemon's own state, set by the supervisor alone."""
        with self._changing():
            self._state = state

    def set_server_url(self, url: str) -> None:
        """A reload named another server: nothing known of the old one holds."""
        with self._changing():
            self._server_url = url
            self._server_healthy = None
            self._server_version = None
            self._server_problem = None
            self._session_id = None

    def set_startup_grace(self, seconds: float) -> None:
        with self._changing():
            self._startup_grace = seconds

    def server_seen(self, healthy: bool, version: str | None) -> None:
        """A probe's answer, on a change (or a new version): down counts an outage, up ends the startup grace."""
        with self._changing():
            if healthy:
                self._ever_up = True
                self._server_version = version
            else:
                self._outages += 1
            self._server_healthy = healthy

    def set_server_problem(self, problem: str | None, version: str | None = None) -> None:
        """The server answers but is not driven (``problem`` says why), or is again (None)."""
        with self._changing():
            self._server_problem = problem
            if version is not None:
                self._server_version = version

    def set_stream_connected(self, connected: bool) -> None:
        """Connected, or closed on purpose (a stop): a loss is :meth:`stream_lost`."""
        with self._changing():
            self._stream_connected = connected

    def set_session(self, session_id: str | None) -> None:
        """The orchestrator's session, once found or created; None while it is to be found again."""
        with self._changing():
            self._session_id = session_id

    def set_own_session_pending(self, pending: bool) -> None:
        """While set, a new session titled like ours may be ours: the broker leaves it alone."""
        with self._changing():
            self._own_session_pending = pending

    def set_pending_triggers(self, n: int) -> None:
        """How many triggers no prompt carries yet, for STATUS= and the state row."""
        with self._changing():
            self._pending_triggers = n

    def set_holds(self, holds: Sequence[Any]) -> bool:
        """Record why the pending triggers wait; True if that changed."""
        with self._lock:
            if tuple(holds) == self._holds:
                return False
            self._holds = tuple(holds)
        self.changed.set()
        return True

    def set_ledger_failing(self, failing: bool) -> None:
        with self._lock:
            if self._ledger_failing == failing:
                return
            self._ledger_failing = failing
        self.changed.set()

    def mark_busy(self, session_id: str) -> None:
        """The stream said the session went busy (or retries): its turn started."""
        with self._lock:
            self._went_busy[session_id] = self.clock()

    def starting_up(self) -> bool:
        """True until the server is first seen up, within the startup grace."""
        with self._lock:
            return not self._ever_up and self.clock() - self._started < self._startup_grace

    def stream_lost(self) -> None:
        """The stream was connected and is no more (counted once per connection)."""
        with self._changing():
            if self._stream_connected:
                self._stream_losses += 1
            self._stream_connected = False

    def note_abort(self, session_id: str) -> None:
        """The daemon is about to abort a turn of ``session_id``: its MessageAbortedError is ours."""
        with self._lock:
            now = self.clock()
            self._aborted = {k: v for k, v in self._aborted.items() if now - v < ABORT_MEMORY}
            self._aborted[session_id] = now

    def aborted_at(self, session_id: str) -> float | None:
        """When (this clock) the daemon last aborted a turn of ``session_id``, if it did lately."""
        with self._lock:
            return self._aborted.get(session_id)

    def aborted_recently(self, session_id: str | None) -> bool:
        with self._lock:
            at = self._aborted.get(session_id) if session_id else None
            return at is not None and self.clock() - at < ABORT_MEMORY

    def set_status(self, session_id: str, status: str | None) -> None:
        """Record a session's status from an event (``None`` or ``idle`` clears it)."""
        with self._changing():
            if status in (None, "idle"):
                self._statuses.pop(session_id, None)
                self._busy_since.pop(session_id, None)
            else:
                self._statuses[session_id] = status
                self._busy_since.setdefault(session_id, self.clock())

    def replace_statuses(self, statuses: dict[str, str]) -> None:
        """Take the server's whole status map (after a reconnect nothing is replayed)."""
        now = self.clock()
        with self._changing():
            self._busy_since = {k: self._busy_since.get(k, now) for k in statuses}
            self._statuses = dict(statuses)

    def touch(self, session_id: str) -> None:
        """Something happened in this session (any event): it is not stalled."""
        with self._lock:
            self._last_activity[session_id] = self.clock()

    def restart_activity(self) -> None:
        """After a reconnect what happened while away is unknown: every busy session starts afresh."""
        with self._lock:
            now = self.clock()
            for sid in self._statuses:
                self._last_activity[sid] = now

    def set_waiting(self, session_id: str, what: str | None) -> None:
        """The session waits on a person (a permission request, a question), or no longer."""
        with self._changing():
            if what is None:
                self._waiting.pop(session_id, None)
            else:
                self._waiting[session_id] = what

    def replace_waiting(self, waiting: dict[str, str]) -> None:
        with self._changing():
            self._waiting = dict(waiting)

    def quiet_for(self, session_id: str) -> float:
        """Seconds since the last sign of life: an event, or the start of its busy spell."""
        with self._lock:
            marks = [t for t in (self._last_activity.get(session_id), self._busy_since.get(session_id)) if t is not None]
        return 0.0 if not marks else self.clock() - max(marks)

    def sessions_view(self) -> list[dict[str, Any]]:
        """Busy sessions for ``status``: for how long, last activity, what they wait on."""
        now = self.clock()
        with self._lock:
            out = []
            for sid in sorted(self._statuses):
                since = self._busy_since.get(sid, now)
                last = max(self._last_activity.get(sid, since), since)
                out.append({"id": sid, "status": self._statuses[sid], "own": sid == self._session_id,
                            "busy_seconds": round(now - since, 1), "quiet_seconds": round(now - last, 1),
                            "waiting": self._waiting.get(sid)})
            return out

    def is_busy(self, session_id: str | None) -> bool:
        with self._lock:
            return session_id is not None and session_id in self._statuses

    def busy_for(self, session_id: str) -> float:
        with self._lock:
            since = self._busy_since.get(session_id)
        return 0.0 if since is None else self.clock() - since

    def count_event(self, wall: float, session_id: str | None = None) -> None:
        """One event read (at wall time ``wall``); of ``session_id``, which is then not stalled."""
        with self._lock:
            self._events_total += 1
            self._last_event_at = wall
            if session_id is not None:
                self._last_activity[session_id] = self.clock()

    def count_events(self, n: int, wall: float, sessions: Iterable[str]) -> None:
        """``n`` events read by wall time ``wall``, from ``sessions``, which are then not stalled."""
        with self._lock:
            self._events_total += n
            self._last_event_at = wall
            now = self.clock()
            for sid in sessions:
                self._last_activity[sid] = now

    def snapshot(self) -> Snapshot:
        with self._lock:
            return Snapshot(
                state=self._state.value, server_url=self._server_url, server_healthy=self._server_healthy,
                server_version=self._server_version, stream_connected=self._stream_connected,
                events_total=self._events_total, last_event_at=self._last_event_at, session_id=self._session_id,
                session_busy=self._session_id in self._statuses if self._session_id else False,
                busy_sessions=sorted(self._statuses), pending_triggers=self._pending_triggers,
                ledger_failing=self._ledger_failing, holds=self._holds)

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
