"""claude-teams inboxes on disk: watching them, and telling messages apart.

Layout (under ``teams.base_dir``)::

    teams/<team>/config.json           name, leadAgentId, members[]
    teams/<team>/inboxes/<agent>.json  JSON array of {from, text, timestamp, read, summary?}
    teams/<team>/inboxes/.lock         writers hold an exclusive flock while rewriting

Each file is read by an :class:`~orchestratord.inboxfile.InboxFile`, which keeps what it
needs to read only the new part next time and streams the whole file when it must. A
parse error may mean a writer is mid-rewrite: it is retried soon, never taken for an
empty inbox. Nothing here writes to the team directory.

What a message is and how it is told apart is :mod:`.teammsg`.

Size: the watcher (notification, rescan, retries of a broken file) and the team rosters,
all on the inbox thread.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from . import logs, metrics
from .config import MISSING_TEAMS_FIX, Config
from .inboxfile import DEFAULT_MAX_ITEM_BYTES, Entry, InboxBusy, InboxError, InboxFile, parse_inbox_bytes
from .ledger import Ledger, MessageRow, OversizedRow
from .ledgerwatch import LedgerHealth
from .teammsg import TeamMessage, message_ckey, text_key
from .worker import Deps, Worker, crash_point

__all__ = ["InboxError", "InboxWatcher", "parse_inbox"]

STRUCTURED_TYPES = ("shutdown_request", "shutdown_approved", "shutdown_rejected", "shutdown_response",
                    "idle_notification", "task_assignment", "task_completed", "plan_approval_request",
                    "plan_approval_response", "broadcast")


def parse_inbox(data: bytes, team: str, recipient: str,
                max_message_bytes: int = DEFAULT_MAX_ITEM_BYTES) -> tuple[list[TeamMessage], list[str]]:
    """The messages in one inbox held in memory, and a note for each entry that had to be skipped.

    Raises InboxError when the file as a whole is unusable. Unparseable JSON is marked
    transient: the caller re-reads before it believes the file is broken.
    """
    messages: list[TeamMessage] = []
    skipped: list[str] = []
    for entry in parse_inbox_bytes(data, team, recipient, max_message_bytes):
        if entry.fields is not None:
            messages.append(TeamMessage.from_fields(team, recipient, entry.fields))
        elif entry.oversized is not None:
            skipped.append(f"message {entry.position}: {entry.oversized.size} bytes, over the {max_message_bytes}-byte "
                           "limit for one message")
        else:
            skipped.append(f"message {entry.position}: {entry.problem}")
    return messages, skipped


# -- the watcher -------------------------------------------------------------------

#: watchdog's names for inotify's open and read-only close: nothing changed
_NOT_A_CHANGE = frozenset({"opened", "closed_no_write"})
RETRY_DELAY = 0.05
#: a file that stays unparseable this long (unchanged) is broken, not half-written
SETTLE_SECONDS = 1.0
CKEY_WINDOW = 600.0


@dataclass
class _FileState:
    signature: tuple[int, int, int] | None = None  # (inode, size, mtime_ns) last read or rejected
    broken: str | None = None  # why the file at ``signature`` was rejected
    first_failure: float | None = None
    reader: InboxFile | None = None


class InboxWatcher(Worker):
    """Reads the team inboxes when they change; records and reports each new message once."""

    name = "inbox"
    sections = ("teams", "safety", "ledger")
    stall_after = 60.0


    @classmethod
    def build(cls, cfg: Config, deps: Deps) -> InboxWatcher:
        from .guard import Judge, seen_in_message  # guard reads this module's messages

        t = cfg.teams
        judge = Judge.from_config(cfg.safety, lead=t.lead)
        return cls(ledger_path=cfg.ledger.path, base_dir=t.base_dir, teams=t.names, lead=t.lead,
                   watch_members=t.watch_members, poll_interval=t.poll_interval_seconds,
                   report_existing=t.report_existing, max_message_bytes=t.max_message_bytes,
                   on_trigger=deps.wake("dispatch"), judge=lambda ledger, m: judge.record(ledger, [seen_in_message(m)]),
                   on_escalation=deps.wake("guard"), clock=deps.clock, ledger_health=deps.ledger_health)

    def __init__(self, *, ledger_path: str, base_dir: str, teams: Sequence[str], lead: str, watch_members: bool,
                 poll_interval: float, report_existing: bool, on_trigger: Callable[[], None],
                 judge: Callable[[Ledger, TeamMessage], int] | None = None,
                 on_escalation: Callable[[], None] = lambda: None, notify: bool = True,
                 max_message_bytes: int = DEFAULT_MAX_ITEM_BYTES,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 ledger_health: LedgerHealth | None = None) -> None:
        super().__init__(clock, ledger_health)
        self.ledger_path = ledger_path
        self.base = Path(base_dir)
        self.teams = tuple(teams)
        self.lead = lead
        self.watch_members = watch_members
        self.poll_interval = poll_interval
        self.report_existing = report_existing
        self.on_trigger = on_trigger
        self.judge = judge
        self.on_escalation = on_escalation
        self.use_notify = notify
        self.max_message_bytes = max_message_bytes
        self.wall = wall
        self.ledger: Ledger | None = None
        self.files: dict[Path, _FileState] = {}
        self.dirty: set[Path] = set()
        self.dirty_lock = threading.Lock()
        self.retry_at: float | None = None
        self.next_scan = 0.0
        self.observer: Any = None
        self.watching: Path | None = None
        self.watch_problem: str | None = None  # why nothing is watched, as last logged
        self.initialized = False
        #: messages (and oversized ones) logged by this process whose "reported" mark did not reach the ledger
        self.logged: set[int] = set()
        self.logged_oversized: set[int] = set()
        #: each team's members as its config.json last said; None until the first look
        self.rosters: dict[str, frozenset[str]] | None = None
        self.missing: set[str] = set()  # teams named in the config, not there, already reported

    # -- lifecycle ---------------------------------------------------------------

    def setup(self) -> None:
        self.ledger = Ledger(self.ledger_path)
        self.initialized = self.ledger.get_meta("inbox.initialized") is not None
        self._watch()

    def teardown(self) -> None:
        self._unwatch()
        if self.ledger:
            self.ledger.close()

    def _watch(self) -> None:
        """Ask the OS to tell us about changes under teams/ (or the base dir until teams/ exists)."""
        if not self.use_notify:
            return
        target = self.base / "teams"
        if not target.is_dir():
            target = self.base
        if not target.is_dir():
            self._unwatch()  # a watch on a directory since deleted would never fire again
            self._cannot_watch(f"missing {target}", lambda: self.log.warning(logs.kv(
                "teams-dir-missing", path=str(target), action=f"looking again every {self.poll_interval:g}s",
                fix=MISSING_TEAMS_FIX)))
            return
        if self.watching == target:
            return
        self._unwatch()
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer
        except ImportError as exc:  # pragma: no cover - watchdog is a dependency
            self.log.warning(logs.kv("inbox-notify-unavailable", error=str(exc), action="polling"))
            self.use_notify = False
            return
        watcher = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:
                if event.event_type in _NOT_A_CHANGE:
                    return  # a read, our own included: reacting to it would read again, and again
                for path in (getattr(event, "src_path", None), getattr(event, "dest_path", None)):
                    if path:
                        watcher._changed(Path(os.fsdecode(path)))

        try:
            observer = Observer()
            observer.schedule(Handler(), str(target), recursive=target.name == "teams")
            observer.daemon = True
            observer.start()
        except OSError as exc:
            error, fix = str(exc), _notify_fix(exc)  # the lambda may outlive this block's ``exc``
            self._cannot_watch(f"{target}: {error}", lambda: self.log.warning(logs.kv(
                "inbox-notify-unavailable", path=str(target), error=error,
                action=f"stat rescan every {self.poll_interval:g}s", fix=fix)))
            return
        level = logging.INFO if self.watch_problem is not None else logging.DEBUG  # info: the problem logged is over
        self.log.log(level, logs.kv("inbox-watching", path=str(target)))
        self.observer, self.watching, self.watch_problem = observer, target, None

    def _cannot_watch(self, problem: str, report: Callable[[], None]) -> None:
        """Say why nothing is watched once, not at every rescan."""
        if problem != self.watch_problem:
            self.watch_problem = problem
            report()

    def _unwatch(self) -> None:
        if self.observer is not None:
            try:
                self.observer.stop()
                self.observer.join(2)
            except Exception:  # noqa: BLE001 - shutting down, nothing to add
                pass
        self.observer, self.watching = None, None

    def _changed(self, path: Path) -> None:
        """Called on the observer's thread: note the file and wake the worker."""
        if path.suffix == ".json" and path.parent.name == "inboxes":
            with self.dirty_lock:
                self.dirty.add(path)
            self.wake()
        elif path.name in ("teams", "inboxes") or path.parent.name == "teams" or path.name == "config.json":
            self.next_scan = 0.0  # a team came or went: rescan now
            self.wake()

    # -- the loop ----------------------------------------------------------------

    def step(self) -> float:
        now = self.clock()
        if now >= self.next_scan:
            self.next_scan = now + self.poll_interval
            self._watch()
            self._rescan()
        if self.retry_at is not None and now >= self.retry_at:
            self.retry_at = None
        with self.dirty_lock:
            batch, self.dirty = self.dirty, set()
        todo = sorted(batch)
        try:
            while todo:
                self._read(todo[0])
                todo.pop(0)
        finally:
            if todo:  # the ledger failed: these files are read again on the next try
                with self.dirty_lock:
                    self.dirty.update(todo)
        if not self.initialized and self.retry_at is None:
            # Only once every inbox was read to its end (none waits for a retry): what a
            # first read left unread is still "already there" when it is read again.
            assert self.ledger is not None
            self.ledger.set_meta("inbox.initialized", str(self.wall()))
            self.initialized = True
        self._report()
        waits = [self.next_scan - self.clock()]
        if self.retry_at is not None:
            waits.append(self.retry_at - self.clock())
        return max(0.0, min(waits))

    def inbox_paths(self) -> list[Path]:
        """Every inbox file we look after, as things stand on disk now."""
        teams_dir = self.base / "teams"
        try:
            names = self.teams or tuple(sorted(p.name for p in teams_dir.iterdir() if p.is_dir()))
        except OSError:
            return []
        paths: list[Path] = []
        for team in names:
            inboxes = teams_dir / team / "inboxes"
            if self.watch_members:
                try:
                    paths.extend(sorted(p for p in inboxes.iterdir() if p.suffix == ".json"))
                except OSError:
                    continue
            else:
                lead = inboxes / f"{self.lead}.json"
                if lead.exists():
                    paths.append(lead)
        return paths

    def _rescan(self) -> None:
        """The safety net: stat every inbox and read the ones whose signature moved."""
        self._look_at_teams()
        for path in self.inbox_paths():
            sig = _signature(path)
            state = self.files.get(path)
            if sig is not None and (state is None or state.signature != sig):
                with self.dirty_lock:
                    self.dirty.add(path)

    def _look_at_teams(self) -> None:
        """Report teams and members as their configs change (claude-teams replaces
        ``config.json`` by rename, so this runs on any change in a team folder)."""
        teams_dir = self.base / "teams"
        try:
            present = sorted(p.name for p in teams_dir.iterdir() if (p / "config.json").is_file())
        except OSError:
            present = []
        first = self.rosters is None
        rosters = dict(self.rosters or {})
        for team in self.teams:
            if team not in present and team not in self.missing:
                self.missing.add(team)
                self.log.warning(logs.kv("team-missing", team=team, path=str(teams_dir / team / "config.json"),
                                         action="watching for it; picked up when it appears",
                                         fix="create the team (claude-teams team_create) or correct teams.names"))
        for team in [t for t in present if not self.teams or t in self.teams]:
            members = _members(teams_dir / team / "config.json")
            if members is None:
                continue  # being written (team_create writes in place): the next look reads it
            old = rosters.get(team)
            rosters[team] = members
            if old is None:
                level = logging.INFO if first else logs.NOTICE
                self.log.log(level, logs.kv("team-found" if not first or team in self.missing else "team-watching",
                                            team=team, members=",".join(sorted(members)) or "-"))
                self.missing.discard(team)
                continue
            for name in sorted(members - old):
                self.log.log(logs.NOTICE, logs.kv("team-member-joined", team=team, member=name))
            for name in sorted(old - members):
                self.log.log(logs.NOTICE, logs.kv("team-member-left", team=team, member=name,
                                                  note="its inbox stays on disk and is still read"))
        for team in [t for t in rosters if t not in present]:
            del rosters[team]
            self.log.info(logs.kv("team-gone", team=team, note="its config.json is no longer there"))
        self.rosters = rosters

    def _wanted(self, path: Path) -> tuple[str, str] | None:
        """(team, recipient) if ``path`` is an inbox we look after."""
        try:
            team = path.parent.parent.name
            if path.parent.parent.parent != self.base / "teams":
                return None
        except (IndexError, ValueError):
            return None
        if self.teams and team not in self.teams:
            return None
        recipient = path.stem
        if not self.watch_members and recipient != self.lead:
            return None
        return team, recipient

    def _read(self, path: Path) -> None:
        wanted = self._wanted(path)
        if wanted is None:
            return
        team, recipient = wanted
        state = self.files.setdefault(path, _FileState())
        sig = _signature(path)
        if sig is None:
            self.files.pop(path, None)
            return
        if state.signature == sig and state.first_failure is None:
            # The version read last (or still the same broken file): nothing to read. A writer
            # notifies several times for one rewrite (truncate, writes, close), and a large
            # file is still being written when the first of them is read.
            return
        if state.reader is None:
            state.reader = InboxFile(path, team, recipient, self.max_message_bytes, path.parent / ".lock")
        baseline = not self.initialized and not self.report_existing
        tally = [0]  # messages this read recorded as already there (the first start's baseline)
        try:
            result = state.reader.read(lambda entries: self._record(path, team, recipient, entries, baseline, tally))
        except InboxError as exc:
            self._failed(path, state, sig, exc)
            return
        except OSError as exc:
            if isinstance(exc, FileNotFoundError):
                self.files.pop(path, None)
                return
            self._failed(path, state, sig, InboxError(f"cannot read: {exc}"))
            return
        finally:
            if tally[0]:
                self.log.info(logs.kv("inbox-baseline", team=team, inbox=recipient, messages=tally[0],
                                      note="already there on first start; not reported (teams.report_existing)"))
        self.log.debug(logs.kv("inbox-read", path=str(path), read="new part" if result.incremental else "whole file",
                               elements=result.elements))
        if state.broken is not None:
            self.log.info(logs.kv("inbox-readable-again", path=str(path)))
        state.broken, state.first_failure = None, None
        if result.skipped:
            self.log.warning(logs.kv("inbox-entries-skipped", path=str(path), count=result.skipped,
                                     first=result.first_skipped,
                                     fix="each message needs string 'from', 'text' and 'timestamp'"))
        # Only now is this version of the file done: if recording failed (the ledger
        # cannot be written), the rescan still sees it as changed and reads it again.
        state.signature = result.signature

    def _failed(self, path: Path, state: _FileState, sig: tuple[int, int, int], exc: InboxError) -> None:
        now = self.clock()
        if isinstance(exc, InboxBusy):
            # A writer is at it: look again shortly, without counting toward "broken".
            with self.dirty_lock:
                self.dirty.add(path)
            self.retry_at = now + RETRY_DELAY if self.retry_at is None else min(self.retry_at, now + RETRY_DELAY)
            return
        if exc.transient:
            # Maybe mid-rewrite: look again shortly, and only call it broken once the
            # file has stayed the same and unparseable for a while.
            if state.first_failure is None or state.signature != sig:
                state.first_failure, state.signature = now, sig
            if now - state.first_failure < SETTLE_SECONDS:
                with self.dirty_lock:
                    self.dirty.add(path)
                self.retry_at = now + RETRY_DELAY if self.retry_at is None else min(self.retry_at, now + RETRY_DELAY)
                return
        state.signature, state.broken, state.first_failure = sig, str(exc), None
        self.log.error(logs.kv("inbox-unreadable", path=str(path), error=str(exc),
                               action="skipped until the file changes",
                               fix="the file must be a JSON array of {from, text, timestamp} messages"))

    def _record(self, path: Path, team: str, recipient: str, entries: Sequence[Entry], baseline: bool,
                tally: list[int]) -> None:
        """Record one batch of a read: the messages the ledger does not know yet, and oversized ones."""
        assert self.ledger is not None
        self.beat()  # a first read of a long inbox is many batches; the worker is not hung
        big = [e.oversized for e in entries if e.oversized is not None]
        if big:
            self.ledger.record_oversized([OversizedRow(ident=b.ident, team=team, recipient=recipient, sender=b.sender,
                                                       sent_at=b.timestamp, size=b.size, path=str(path))
                                          for b in big], now=self.wall())
        by_ident = {e.token: e.fields for e in entries if e.fields is not None}
        if not by_ident:
            return
        known = self.ledger.known_idents(by_ident)
        new = [TeamMessage.from_fields(team, recipient, f) for ident, f in by_ident.items() if ident not in known]
        if not new:
            return
        rows = [MessageRow(ident=m.identity, team=m.team, recipient=m.recipient, sender=m.sender, sent_at=m.timestamp,
                           type=m.type, summary=m.summary, text=m.text) for m in new]
        self.ledger.record_messages(rows, reported=baseline, now=self.wall())
        if baseline:
            tally[0] += len(new)
        crash_point("after-record")

    def _report(self) -> None:
        """Log each recorded but unreported message once, and trigger on the lead's."""
        assert self.ledger is not None
        for big in self.ledger.unreported_oversized():
            if big["id"] not in self.logged_oversized:
                self.logged_oversized.add(big["id"])
                self.log.warning(logs.kv(
                    "inbox-message-oversized", path=big["path"], team=big["team"], to=big["recipient"],
                    **{"from": big["sender"] or "?"}, timestamp=big["sent_at"], bytes=big["size"],
                    limit=self.max_message_bytes, action="recorded as oversized, not read; later messages are",
                    fix=f"raise teams.max_message_bytes above {big['size']} to read it"))
            self.ledger.mark_oversized_reported(big["id"], now=self.wall())
            self.logged_oversized.discard(big["id"])
        triggered = False
        for m in self.ledger.unreported_messages():
            msg = TeamMessage(team=m["team"], recipient=m["recipient"], sender=m["sender"], timestamp=m["timestamp"],
                              text=m["text"], summary=m["summary"], type=m["type"], read=False)
            trigger_id = None
            if msg.recipient == self.lead:
                ckey = message_ckey(msg)
                trigger_id = self.ledger.add_trigger(
                    "inbox", f'message from {msg.sender} to {msg.recipient}: "{msg.short()}"',
                    rule="teammate-message", dedup=f"inbox:{msg.identity}", team=msg.team, teammate=msg.sender,
                    ckey=ckey, window=CKEY_WINDOW, tkey=text_key(msg.text) if msg.type == "message" else None,
                    now=self.wall())
                if trigger_id is None:
                    # Its own trigger from an earlier try (however long ago), else the stream's for the same words.
                    own = self.ledger.trigger_for_dedup(f"inbox:{msg.identity}")
                    trigger_id = own if own is not None else self.ledger.trigger_for_ckey(ckey, self.wall() - CKEY_WINDOW)
                    triggered = triggered or own is not None  # the earlier try may have stopped before the wake
                else:
                    triggered = True
            if m["id"] not in self.logged:  # a retry after a failed mark_reported logs nothing twice
                self.logged.add(m["id"])
                metrics.teammate_message(msg.team)
                self.log.log(logs.NOTICE, logs.kv("teammate-message", team=msg.team, **{"from": msg.sender},
                                                  to=msg.recipient, type=None if msg.type == "message" else msg.type,
                                                  summary=msg.short()))
                crash_point("after-message-line")  # test hook: logged, not yet marked reported
            # Judged before it is marked reported: a crash in between judges it again,
            # and the escalation's key makes that a no-op.
            if self.judge is not None and self.judge(self.ledger, msg):
                self.on_escalation()
            self.ledger.mark_reported(m["id"], trigger_id, now=self.wall())
            self.logged.discard(m["id"])
        if triggered:
            self.on_trigger()


def _members(path: Path) -> frozenset[str] | None:
    """The member names in a team's config.json; None when it cannot be read as one now."""
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    members = doc.get("members") if isinstance(doc, dict) else None
    if not isinstance(members, list):
        return None
    return frozenset(m["name"] for m in members if isinstance(m, dict) and isinstance(m.get("name"), str))


def _notify_fix(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "raise fs.inotify.max_user_watches (the watches are used up)"
    if exc.errno == errno.EMFILE:
        return "raise fs.inotify.max_user_instances (the inotify instances are used up)"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "give the daemon's user read access to the teams directory"
    return "none needed if the rescan is fast enough: changes are found by it"


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)

