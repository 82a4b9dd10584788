"""What the daemon knows of the server's sessions: titles, directories, rulesets.

claude-teams names an opencode teammate's session ``<name>@<team>``; that title is the one
trustworthy statement of who a session is (a message's ``sender`` is taken on trust). The
session's ``directory`` is where its commands run, which the safety rules need to know
what "the project" is. The event reader fills this in from ``session.created`` and
``session.updated`` (their ``info`` carries all of it) and the permission broker from
``GET /session``; every thread reads it, so each access is under one lock.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

from .opencode import OpencodeError

if TYPE_CHECKING:
    from .opencode import OpencodeClient

#: claude-teams' agent names: letters, digits, hyphens and underscores; team names likewise
_TEAMMATE_TITLE = re.compile(r"^([A-Za-z0-9_-]{1,64})@([A-Za-z0-9_.-]{1,128})$")

#: how many sessions are remembered; the oldest seen are forgotten first
MAX_SESSIONS = 5000
#: a session the server could not tell of is not asked about again for this long
MISS_SECONDS = 30.0
#: how long one look-up may take: it runs on the thread that asks (the stream's, say)
LOOKUP_TIMEOUT = 2.0


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
        slow or failing server then costs the asking thread one short wait, not one per event."""
        info = self.get(session_id)
        if info is not None or not session_id or client is None:
            return info
        now = self._clock()
        with self._lock:
            missed = self._misses.get(session_id)
            if missed is not None and now - missed < MISS_SECONDS:
                return None
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

    def forget(self, session_id: str) -> None:
        with self._lock:
            self._items.pop(session_id, None)

    def label(self, session_id: str | None) -> str | None:
        info = self.get(session_id)
        return info.label if info else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None
