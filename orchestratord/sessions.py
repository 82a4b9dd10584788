"""What the daemon knows of the server's sessions: titles, directories, rulesets.

claude-teams names an opencode teammate's session ``<name>@<team>``; that title is the one
trustworthy statement of who a session is (a message's ``sender`` is taken on trust). The
session's ``directory`` is where its commands run, which the safety rules need to know
what "the project" is. The event reader fills this in from ``session.created`` and
``session.updated`` (their ``info`` carries all of it) and the permission broker from
``GET /session``; every thread reads it, so each access is under one lock. A session no
event or listing has told of is looked up ahead, on a thread of its own (:class:`Prefetch`).
"""

from __future__ import annotations

import queue
import re
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

from . import logs
from .opencode import OpencodeError

if TYPE_CHECKING:
    from .opencode import OpencodeClient

#: claude-teams' agent names: letters, digits, hyphens and underscores; team names likewise
_TEAMMATE_TITLE = re.compile(r"^([A-Za-z0-9_-]{1,64})@([A-Za-z0-9_.-]{1,128})$")

#: how many sessions are remembered; the oldest seen are forgotten first
MAX_SESSIONS = 5000
#: a session the server could not tell of is not asked about again for this long
MISS_SECONDS = 30.0
#: how long one look-up may take
LOOKUP_TIMEOUT = 2.0
#: sessions waiting for the look-up thread at most; beyond, the thread that needs one asks itself
PREFETCH_QUEUE = 256


@dataclass(frozen=True)
class Teammate:
    name: str
    team: str


def teammate_of(title: str | None) -> Teammate | None:
    """The teammate a session title names (``worker-1@my-team``), or None."""
    if not title:
        return None
    m = _TEAMMATE_TITLE.match(title.strip())
    return Teammate(m.group(1), m.group(2)) if m else None


@dataclass(frozen=True)
class SessionInfo:
    id: str
    title: str | None = None
    directory: str | None = None
    parent_id: str | None = None
    permission: tuple[Mapping[str, Any], ...] | None = None  # None: not known

    @property
    def teammate(self) -> Teammate | None:
        return teammate_of(self.title)

    @property
    def label(self) -> str | None:
        """How log lines, triggers and prompts name it: the teammate's name, else the title."""
        mate = self.teammate
        return mate.name if mate else self.title

    @staticmethod
    def from_api(info: Mapping[str, Any]) -> "SessionInfo | None":
        """From a session object as ``GET /session`` and session events carry it."""
        sid = info.get("id")
        if not isinstance(sid, str) or not sid:
            return None
        perm = info.get("permission")
        rules = tuple(r for r in perm if isinstance(r, dict)) if isinstance(perm, list) else None
        return SessionInfo(id=sid, title=_str(info.get("title")), directory=_str(info.get("directory")),
                           parent_id=_str(info.get("parentID")), permission=rules)


class SessionDirectory:
    """Thread-safe map of session ID to what is known of it."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._items: dict[str, SessionInfo] = {}
        self._clock = clock
        self._misses: dict[str, float] = {}  # session -> when the server last failed to tell of it
        self._asking: dict[str, threading.Event] = {}  # sessions a Prefetch is asking about, set when done

    def note(self, info: SessionInfo) -> SessionInfo:
        """Take what an event or a listing says; a field it leaves out keeps its old value."""
        with self._lock:
            old = self._items.pop(info.id, None)
            if old is not None:
                info = SessionInfo(id=info.id, title=info.title or old.title,
                                   directory=info.directory or old.directory,
                                   parent_id=info.parent_id or old.parent_id,
                                   permission=info.permission if info.permission is not None else old.permission)
            self._items[info.id] = info
            while len(self._items) > MAX_SESSIONS:
                self._items.pop(next(iter(self._items)))
            return info

    def get(self, session_id: str | None) -> SessionInfo | None:
        if not session_id:
            return None
        with self._lock:
            return self._items.get(session_id)

    def lookup(self, session_id: str | None, client: "OpencodeClient | None") -> SessionInfo | None:
        """What is known of a session; asked of the server only for one no event or listing has
        told of, briefly, and not again for ``MISS_SECONDS`` if the server could not say: a
        slow or failing server then costs the asking thread one short wait, not one per event.
        One a :class:`Prefetch` is already asking about is waited for, not asked again."""
        info = self.get(session_id)
        if info is not None or not session_id:
            return info
        with self._lock:
            pending = self._asking.get(session_id)
        if pending is not None:
            pending.wait(LOOKUP_TIMEOUT)
            return self.get(session_id)
        if client is None or not self._worth_asking(session_id):
            return None
        return self.fetch(session_id, client)

    def _worth_asking(self, session_id: str) -> bool:
        with self._lock:
            missed = self._misses.get(session_id)
        return missed is None or self._clock() - missed >= MISS_SECONDS

    def fetch(self, session_id: str, client: "OpencodeClient") -> SessionInfo | None:
        """Ask the server about one session (at most ``LOOKUP_TIMEOUT``); a miss is remembered."""
        now = self._clock()
        try:
            fetched = SessionInfo.from_api(client.get_session(session_id, timeout=LOOKUP_TIMEOUT))
        except OpencodeError:
            fetched = None
        if fetched is None:
            with self._lock:
                self._misses.pop(session_id, None)
                self._misses[session_id] = now
                while len(self._misses) > MAX_SESSIONS:
                    self._misses.pop(next(iter(self._misses)))
            return None
        with self._lock:
            self._misses.pop(session_id, None)
        return self.note(fetched)

    def begin_asking(self, session_id: str) -> bool:
        """Mark a session as being asked about (by a :class:`Prefetch`), if it is unknown and
        worth asking about; whether it was marked."""
        if not self._worth_asking(session_id):
            return False
        with self._lock:
            if session_id in self._items or session_id in self._asking:
                return False
            self._asking[session_id] = threading.Event()
            return True

    def done_asking(self, session_id: str) -> None:
        with self._lock:
            pending = self._asking.pop(session_id, None)
        if pending is not None:
            pending.set()

    def forget(self, session_id: str) -> None:
        with self._lock:
            self._items.pop(session_id, None)

    def label(self, session_id: str | None) -> str | None:
        info = self.get(session_id)
        return info.label if info else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


class Prefetch:
    """Asks the server about the sessions the stream names, on a thread of its own.

    The event reader names each session it reads of (the deltas' included) as it goes;
    one the directory does not know is looked up here, so that by the time an event needs
    its title (to name a teammate, to tell a forged sender) it is known, and the reading
    thread has not waited on the server for it. A look-up still under way when the title is
    needed is waited for (at most ``LOOKUP_TIMEOUT``); with this thread gone or its queue
    full, the thread that needs a title asks itself, as before.
    """

    def __init__(self, directory: SessionDirectory, client: "OpencodeClient") -> None:
        self.directory = directory
        self.client = client  # this thread's own: a requests session is not shared
        self._queue: queue.Queue[str | None] = queue.Queue(PREFETCH_QUEUE)
        self._named: dict[str, None] = {}  # sessions named already (the asking thread's own, no lock)
        self._thread = threading.Thread(target=self._run, name="session-lookup", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def name(self, session_id: str) -> None:
        """A session the stream names; asked about once, if the directory does not know it."""
        if session_id in self._named:
            return
        self._named[session_id] = None
        if len(self._named) > MAX_SESSIONS:
            del self._named[next(iter(self._named))]
        if self.directory.begin_asking(session_id):
            try:
                self._queue.put_nowait(session_id)
            except queue.Full:
                self.directory.done_asking(session_id)

    def stop(self, timeout: float = LOOKUP_TIMEOUT + 1.0) -> None:
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            while (session_id := self._queue.get()) is not None:
                try:
                    self.directory.fetch(session_id, self.client)
                except Exception as exc:  # noqa: BLE001 - a look-up is best effort; the asker falls back
                    logs.get("sessions").warning(logs.kv("session-lookup-failed", session=session_id,
                                                         error=str(exc)[:200], fix="none needed; asked again when needed"))
                finally:
                    self.directory.done_asking(session_id)
        finally:
            self.client.close()
            while True:  # what is left is not waited for
                try:
                    left = self._queue.get_nowait()
                except queue.Empty:
                    break
                if left is not None:
                    self.directory.done_asking(left)
