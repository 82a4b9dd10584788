"""Tell slow from stuck: teammate sessions that are busy but have gone quiet.

A session is stalled when the server says it is busy and no event of it (a delta, a part
update, tool progress) has arrived for ``teammate_quiet_seconds``. The event reader
stamps every event's session (:meth:`Shared.touch`), so a slow model that still streams
is never stalled. A session waiting on a person (a permission request, a question) is
reported as waiting instead; a session whose last reply is complete while the status
still says busy is a status that lies, logged once and not reported as a stall. Each
spell is reported once: a new report needs new activity first.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from . import logs
from .ledgerwatch import LedgerHealth
from .opencode import NotFound, OpencodeClient, OpencodeError, last_finished
from .state import Shared
from .worker import Deps, ServerWorker

if TYPE_CHECKING:
    from .config import Config


@dataclass
class _Spell:
    kind: str  # stalled | waiting | status-mismatch
    mark: float  # the session's last activity when it was reported


class StallWatch(ServerWorker):
    """Checks the busy teammate sessions every few seconds against the quiet threshold."""

    name = "stalls"
    sections = ("server", "stalls", "ledger")

    @classmethod
    def enabled_by(cls, cfg: Config) -> bool:
        return cfg.stalls.enabled

    @classmethod
    def build(cls, cfg: Config, deps: Deps) -> StallWatch:
        return cls(shared=deps.shared, make_client=deps.make_client, ledger_path=cfg.ledger.path,
                   quiet=cfg.stalls.teammate_quiet_seconds, on_trigger=deps.wake("dispatch"), clock=deps.clock,
                   ledger_health=deps.ledger_health)

    def __init__(self, *, shared: Shared, make_client: Callable[[], OpencodeClient], ledger_path: str,
                 quiet: float, on_trigger: Callable[[], None], clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time,
                 ledger_health: LedgerHealth | None = None) -> None:
        super().__init__(make_client, ledger_path, clock, ledger_health)
        self.shared = shared
        self.quiet = quiet
        self.on_trigger = on_trigger
        self.wall = wall
        self.every = max(0.2, min(5.0, quiet / 4))
        self.stall_after = max(30.0, 3 * self.every + 20.0)
        self.reported: dict[str, _Spell] = {}
        self.titles: dict[str, str | None] = {}

    def step(self) -> float:
        if self.shared.server_healthy is False or not self.shared.stream_connected:
            return self.every  # without the stream there is no activity to judge by
        own = self.shared.session_id
        busy = {s["id"]: s for s in self.shared.sessions_view() if not s["own"] and s["id"] != own}
        for sid in list(self.reported):
            if sid not in busy:
                del self.reported[sid]  # idle again: the spell is over
        for sid, view in busy.items():
            quiet = self.shared.quiet_for(sid)
            spell = self.reported.get(sid)
            if spell is not None:
                mark = self.shared.activity(sid) or 0.0
                if mark > spell.mark:
                    del self.reported[sid]  # it moved again; a later silence is a new spell
                else:
                    continue
            if quiet >= self.quiet:
                self.check(sid, view, quiet)
        return self.every

    def check(self, sid: str, view: dict[str, Any], quiet: float) -> None:
        """Decide what a quiet busy session is, and report it once."""
        assert self.ledger is not None and self.client is not None
        who = self._title(sid)
        name = who or f"session {sid}"
        mark = self.shared.activity(sid) or 0.0
        minutes = _duration(quiet)
        waiting = view.get("waiting")
        if waiting:
            self.reported[sid] = _Spell("waiting", mark)
            detail = f"{name} has been waiting {minutes} on a {waiting} request; a person must answer it"
            self.ledger.record_stall("waiting", detail, session_id=sid, teammate=who, seconds=round(quiet, 1),
                                     now=self.wall())
            self.log.warning(logs.kv("session-waiting", session=sid, teammate=who, on=waiting,
                                     quiet_seconds=int(quiet)))
            return
        try:
            messages = self.client.messages(sid, limit=1)
        except NotFound:
            self.shared.set_status(sid, None)
            return
        except OpencodeError as exc:
            self.log.debug(logs.kv("stall-check-failed", session=sid, error=str(exc)))
            return
        if last_finished(messages):
            self.reported[sid] = _Spell("status-mismatch", mark)
            detail = f"{name}: the server says busy but its last reply is complete and nothing happened for {minutes}"
            self.ledger.record_stall("status-mismatch", detail, session_id=sid, teammate=who,
                                     seconds=round(quiet, 1), now=self.wall())
            self.log.warning(logs.kv("status-mismatch", session=sid, teammate=who, quiet_seconds=int(quiet),
                                     action="treating it as idle"))
            return
        self.reported[sid] = _Spell("stalled", mark)
        detail = f"{name} has produced nothing for {minutes} while busy; check on it"
        self.ledger.record_stall("stalled", detail, session_id=sid, teammate=who, seconds=round(quiet, 1),
                                 now=self.wall())
        tid = self.ledger.add_trigger("stall", detail, rule="teammate-stalled",
                                      dedup=f"stall:{sid}:{int(self.wall() - quiet)}", teammate=who, session_id=sid,
                                      now=self.wall())
        self.log.warning(logs.kv("teammate-stalled", session=sid, teammate=who, quiet_seconds=int(quiet)))
        if tid is not None:
            self.on_trigger()

    def _title(self, sid: str) -> str | None:
        if sid not in self.titles:
            assert self.client is not None
            try:
                info = self.client.get_session(sid)
                title = info.get("title") if isinstance(info, dict) else None
                self.titles[sid] = title if isinstance(title, str) and title else None
            except OpencodeError:
                return None
        return self.titles[sid]


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{int(seconds)} seconds"
    return f"{int(seconds // 60)} minutes"
