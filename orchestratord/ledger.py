"""The SQLite ledger every worker shares: facts, triggers, dispatches and live state.

One file in WAL mode; each thread opens its own :class:`Ledger` (its own connection).
The schema is versioned with ``PRAGMA user_version``. Writes that decide what happens
next (triggers, dispatch states) are their own committed transactions; high-volume event
rows are written in batches by the event reader. Every query the rest of the package
runs lives here.

Size: every SQL statement of the daemon lives here, with the schema and each migration.
Split by table, the transactions that must span tables (a prompt and its triggers, a
decision and its escalation) would span modules too.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, NamedTuple, Sequence, TypeVar

from . import ledgerwatch, logs, metrics
from .crashpoints import crash_point

SCHEMA_VERSION = 7

log = logs.get("ledger")

_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS state (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS transitions (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    component TEXT NOT NULL,
    state TEXT NOT NULL,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS transitions_at ON transitions(at);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    event_id TEXT,
    type TEXT NOT NULL,
    session_id TEXT,
    directory TEXT,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_at ON events(at);
CREATE INDEX IF NOT EXISTS events_type ON events(type, id);
CREATE TABLE IF NOT EXISTS dispatches (
    id INTEGER PRIMARY KEY,
    message_id TEXT NOT NULL UNIQUE,
    session_id TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    sent_at REAL,
    completed_at REAL,
    prompt TEXT NOT NULL,
    reply_text TEXT,
    tool_calls TEXT,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS dispatches_state ON dispatches(state);
CREATE TABLE IF NOT EXISTS triggers (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    rule TEXT,
    dedup TEXT UNIQUE,
    team TEXT,
    teammate TEXT,
    session_id TEXT,
    event_type TEXT,
    event_id TEXT,
    detail TEXT NOT NULL,
    dispatch_id INTEGER REFERENCES dispatches(id)
);
CREATE INDEX IF NOT EXISTS triggers_dispatch ON triggers(dispatch_id);
"""

# v2: teammate messages read from the inboxes, and a content key on triggers so a
# message seen on the event stream and in the inbox file is one trigger.
_SCHEMA_V2 = """
ALTER TABLE triggers ADD COLUMN ckey TEXT;
CREATE INDEX IF NOT EXISTS triggers_ckey ON triggers(ckey, at);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    ident TEXT NOT NULL UNIQUE,
    team TEXT NOT NULL,
    recipient TEXT NOT NULL,
    sender TEXT NOT NULL,
    sent_at TEXT NOT NULL,
    type TEXT NOT NULL,
    summary TEXT,
    text TEXT NOT NULL,
    first_seen REAL NOT NULL,
    reported_at REAL,
    trigger_id INTEGER
);
CREATE INDEX IF NOT EXISTS messages_unreported ON messages(reported_at) WHERE reported_at IS NULL;
CREATE INDEX IF NOT EXISTS messages_team ON messages(team, id);
"""

# v3: escalations from the safety guard. A row is written by the thread that saw the
# input (so a crash cannot lose it); ``done`` lists the actions the guard has carried
# out, and ``handled_at`` is set when nothing is left to do.
_SCHEMA_V3 = """
CREATE TABLE IF NOT EXISTS escalations (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    at REAL NOT NULL,
    rule TEXT NOT NULL,
    severity TEXT NOT NULL,
    source TEXT NOT NULL,
    kind TEXT NOT NULL,
    session_id TEXT,
    team TEXT,
    teammate TEXT,
    what TEXT NOT NULL,
    text TEXT NOT NULL,
    permission_id TEXT,
    actions TEXT NOT NULL,
    done TEXT NOT NULL DEFAULT '[]',
    outcome TEXT NOT NULL DEFAULT '{}',
    handled_at REAL
);
CREATE INDEX IF NOT EXISTS escalations_open ON escalations(handled_at) WHERE handled_at IS NULL;
CREATE INDEX IF NOT EXISTS escalations_at ON escalations(at);
"""

# v4: what the stall detector found (stalled or waiting teammates, stuck turns, prompts
# the server never ran, statuses that lie), and which prompt a re-driven one supersedes.
_SCHEMA_V4 = """
CREATE TABLE IF NOT EXISTS stalls (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    session_id TEXT,
    teammate TEXT,
    seconds REAL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS stalls_at ON stalls(at);
ALTER TABLE dispatches ADD COLUMN supersedes INTEGER;
"""

# v5: the permission broker. ``brokered`` holds each session the daemon gave its ask rules
# (so a restart does not append them again); ``permissions`` every request it saw, the
# decision with its rule, who made it (policy, person, timeout, elsewhere) and whether the
# answer reached the server. A decision is recorded before the reply is sent.
_SCHEMA_V5 = """
CREATE TABLE IF NOT EXISTS brokered (
    session_id TEXT PRIMARY KEY,
    title TEXT,
    team TEXT,
    teammate TEXT,
    directory TEXT,
    rules TEXT NOT NULL,
    state TEXT NOT NULL,
    error TEXT,
    at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS permissions (
    id TEXT PRIMARY KEY,
    session_id TEXT NOT NULL,
    permission TEXT NOT NULL,
    what TEXT NOT NULL,
    team TEXT,
    teammate TEXT,
    asked_at REAL NOT NULL,
    decision TEXT NOT NULL,
    rule TEXT,
    escalation_id INTEGER,
    decided_by TEXT NOT NULL,
    decided_at REAL NOT NULL,
    reply TEXT,
    message TEXT,
    state TEXT NOT NULL,
    replied_at REAL,
    seconds REAL
);
CREATE INDEX IF NOT EXISTS permissions_open ON permissions(state) WHERE state IN ('open', 'held');
CREATE INDEX IF NOT EXISTS permissions_asked ON permissions(asked_at);
"""

# v6: inbox messages over teams.max_message_bytes, recorded (not read) and reported once.
# ``ident`` covers the team, recipient, sender, timestamp and text, never the read flag.
_SCHEMA_V6 = """
CREATE TABLE IF NOT EXISTS oversized_messages (
    id INTEGER PRIMARY KEY,
    ident TEXT NOT NULL UNIQUE,
    team TEXT NOT NULL,
    recipient TEXT NOT NULL,
    sender TEXT,
    sent_at TEXT,
    size INTEGER NOT NULL,
    path TEXT NOT NULL,
    first_seen REAL NOT NULL,
    reported_at REAL
);
CREATE INDEX IF NOT EXISTS oversized_unreported ON oversized_messages(reported_at) WHERE reported_at IS NULL;
"""

# v7: a trigger that needs no prompt of its own says why in ``covered``: ``turn:<id>`` (a
# teammate's idle after it reported in that turn, trigger <id>) or ``claude-teams`` (the
# message was pushed into the orchestrator's session by claude-teams itself).
# ``tkey`` is a teammate message's text key (its text without claude-teams' reminder), and
# ``pushes`` the text keys of the user messages claude-teams posted into the orchestrator's
# session itself: a message already there needs no prompt.
_SCHEMA_V7 = """
ALTER TABLE triggers ADD COLUMN covered TEXT;
ALTER TABLE triggers ADD COLUMN tkey TEXT;
CREATE INDEX IF NOT EXISTS triggers_tkey ON triggers(tkey) WHERE tkey IS NOT NULL;
CREATE TABLE IF NOT EXISTS pushes (
    tkey TEXT PRIMARY KEY,
    at REAL NOT NULL,
    session_id TEXT NOT NULL
);
"""

MIGRATIONS: tuple[str, ...] = (_SCHEMA_V1, _SCHEMA_V2, _SCHEMA_V3, _SCHEMA_V4, _SCHEMA_V5, _SCHEMA_V6,
                               _SCHEMA_V7)

#: ``triggers.covered`` of a message claude-teams delivered into the orchestrator's session itself
PUSHED = "claude-teams"

# Dispatch states: recorded before the POST, sent after it, then one of the final three.
PENDING, SENT, COMPLETED, FAILED, TIMEOUT = "pending", "sent", "completed", "failed", "timeout"
OPEN_STATES = (PENDING, SENT)

# Permission request states: decided and the reply still to send, held for a person,
# answered (by us or anyone), gone (the server no longer has it).
P_OPEN, P_HELD, P_ANSWERED, P_GONE = "open", "held", "answered", "gone"


class LedgerError(Exception):
    """The ledger file cannot be opened or written; the message says what to fix.

    ``problem`` and ``fix`` are the two halves when they are known apart (``--json`` shows
    them as two fields).
    """

    def __init__(self, problem: str, fix: str | None = None) -> None:
        super().__init__(problem if fix is None else f"{problem}; {fix}")
        self.problem = problem
        self.fix = fix


def damaged(path: str, detail: str) -> tuple[str, str]:
    """(problem, fix) of a file that is not a sound SQLite database."""
    return (f"ledger {path} is damaged or not a SQLite database ({detail})",
            f"move it aside (mv {path} {path}.broken) and start the daemon again, and a fresh ledger is created "
            "there; or point ledger.path at another file")


def open_problem(path: str, exc: BaseException | str) -> str:
    """One line for a ledger that will not open: which file, what is wrong, what to do."""
    text = str(exc)
    if "not a database" in text or "malformed" in text or "corrupt" in text or isinstance(exc, str):
        problem, fix = damaged(path, text)
        return f"{problem}: {fix}"
    return f"cannot open ledger {path}: {text}; {ledgerwatch.fix_for(exc)}"


AS_DAEMON_USER = "run this as root or as the daemon's user (sudo -u opencode-orchestrator orchestratord ...)"


def unreadable(path: str) -> tuple[str, str] | None:
    """(problem, fix) when the file at ``path`` cannot be a ledger to read, from the filesystem alone."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return (f"ledger {path} does not exist yet", "start the daemon once, or fix ledger.path")
    except PermissionError:
        return (f"ledger {path} cannot be reached: permission denied on a directory above it", AS_DAEMON_USER)
    except OSError as exc:
        return (f"ledger {path}: {exc.strerror or exc}", ledgerwatch.fix_for(exc))
    if stat.S_ISDIR(st.st_mode):
        return (f"ledger {path} is a directory, not a ledger file", "point ledger.path at the file itself, "
                f"or move the directory aside (mv {path} {path}.aside)")
    if not stat.S_ISREG(st.st_mode):
        return (f"ledger {path} is not a regular file", "point ledger.path at a file")
    if not os.access(path, os.R_OK):
        return (f"ledger {path} is not readable by this user (permission denied)", AS_DAEMON_USER)
    if st.st_size == 0 and not os.path.exists(path + "-wal"):
        return (f"ledger {path} is empty (0 bytes): no daemon has written it",
                "start the daemon: it sets the ledger up in that file; or point ledger.path at the daemon's ledger")
    return None


def version_problem(path: str, version: int, tables: int) -> tuple[str, str] | None:
    """(problem, fix) for a ledger of a schema this version cannot read; None when it can."""
    if version > SCHEMA_VERSION:
        return newer_schema(path, version)
    if version == 0 and tables == 0:
        return (f"ledger {path} is an empty database: no daemon has written it",
                "start the daemon: it sets the ledger up in that file; or point ledger.path at the daemon's ledger")
    return None


def newer_schema(path: str, version: int) -> tuple[str, str]:
    return (f"ledger {path} has schema {version}, newer than this orchestratord ({SCHEMA_VERSION})",
            "upgrade orchestratord, or run the one that wrote it, or use another ledger.path")


def query_problem(path: str, exc: sqlite3.Error) -> tuple[str, str]:
    """(problem, fix) for a read that failed on a ledger that opened."""
    text = str(exc)
    if isinstance(exc, sqlite3.OperationalError) and ("no such table" in text or "no such column" in text):
        version = schema_version(path)
        if version is not None and version < SCHEMA_VERSION:
            return (f"ledger {path} has schema {version}, older than this orchestratord ({SCHEMA_VERSION})",
                    "start the daemon once: it upgrades the ledger, keeping a copy of the old one beside it")
    if "unable to open" in text or "readonly" in text:
        return (f"cannot read ledger {path}: {text}", AS_DAEMON_USER)
    if not isinstance(exc, sqlite3.OperationalError) or "malformed" in text or "not a database" in text:
        return damaged(path, text)
    return (f"cannot read ledger {path}: {text}", ledgerwatch.fix_for(exc))


def schema_version(path: str) -> int | None:
    """The ledger's ``user_version``, read on a connection of its own; None if it cannot be read."""
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
    except sqlite3.Error:
        return None
    try:
        return int(db.execute("PRAGMA user_version").fetchone()[0])
    except sqlite3.Error:
        return None
    finally:
        db.close()


def backup_name(path: str, version: int) -> str:
    """A name beside ``path`` for its copy before an upgrade from schema ``version``, not yet taken."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.localtime())
    name = f"{path}.v{version}-backup-{stamp}"
    n = 1
    while os.path.exists(name):
        n += 1
        name = f"{path}.v{version}-backup-{stamp}-{n}"
    return name


def copy_database(db: sqlite3.Connection, target: str) -> None:
    """A consistent copy of the open database ``db`` in a new file ``target`` (SQLite's online backup).

    Safe while the daemon writes: the copy is one snapshot of committed transactions.
    A file that exists at ``target`` is never overwritten.
    """
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    os.close(fd)
    try:
        out = sqlite3.connect(target)
        try:
            db.backup(out)
        finally:
            out.close()
    except BaseException:
        os.unlink(target)
        raise


@dataclass(frozen=True)
class Trigger:
    id: int
    at: float
    kind: str
    rule: str | None
    team: str | None
    teammate: str | None
    session_id: str | None
    event_type: str | None
    event_id: str | None
    detail: str
    dispatch_id: int | None


@dataclass(frozen=True)
class Dispatch:
    id: int
    message_id: str
    session_id: str
    state: str
    created_at: float
    sent_at: float | None
    completed_at: float | None
    prompt: str
    reply_text: str | None
    tool_calls: list[dict[str, Any]]
    error: str | None
    attempts: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "message_id": self.message_id, "session_id": self.session_id,
            "state": self.state, "created_at": self.created_at, "sent_at": self.sent_at,
            "completed_at": self.completed_at, "prompt": self.prompt, "reply_text": self.reply_text,
            "tool_calls": self.tool_calls, "error": self.error, "attempts": self.attempts,
        }


@dataclass(frozen=True)
class MessageRow:
    ident: str
    team: str
    recipient: str
    sender: str
    sent_at: str
    type: str
    summary: str | None
    text: str


@dataclass(frozen=True)
class OversizedRow:
    ident: str
    team: str
    recipient: str
    sender: str | None
    sent_at: str | None
    size: int
    path: str


@dataclass(frozen=True)
class Escalation:
    id: int
    key: str
    at: float
    rule: str
    severity: str
    source: str
    kind: str
    session_id: str | None
    team: str | None
    teammate: str | None
    what: str
    text: str
    permission_id: str | None
    actions: tuple[str, ...]
    done: tuple[str, ...]
    outcome: dict[str, Any]
    handled_at: float | None

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "at": self.at, "rule": self.rule, "severity": self.severity, "source": self.source,
                "kind": self.kind, "session_id": self.session_id, "team": self.team, "teammate": self.teammate,
                "what": self.what, "text": self.text, "permission_id": self.permission_id,
                "actions": list(self.actions), "done": list(self.done), "outcome": self.outcome,
                "handled_at": self.handled_at}


@dataclass(frozen=True)
class PermissionRequest:
    """One permission request the broker saw, and what became of it."""

    id: str
    session_id: str
    permission: str
    what: str
    team: str | None
    teammate: str | None
    asked_at: float
    decision: str  # approve | reject | hold | leave
    rule: str | None
    escalation_id: int | None
    decided_by: str  # policy | person | timeout | elsewhere
    decided_at: float
    reply: str | None  # once | reject: what goes (or went) to the server
    message: str | None
    state: str
    replied_at: float | None
    seconds: float | None  # from the request seen to the reply accepted

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class BrokeredSession:
    session_id: str
    title: str | None
    team: str | None
    teammate: str | None
    directory: str | None
    rules: list[dict[str, str]]
    state: str  # brokered | failed | released
    error: str | None
    at: float
    updated_at: float


class EventRow(NamedTuple):
    """One event row; a tuple, so a batch goes to SQLite as it is."""

    at: float
    event_id: str | None
    type: str
    session_id: str | None
    directory: str | None
    data: str


class Ledger:
    """One connection to the ledger file. Not shared between threads."""

    def __init__(self, path: str, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        self._tx_depth = 0  # open transactions on this connection (see _Tx)
        self._after_commit: list[Callable[[], None]] = []  # what waits for the outer commit
        try:
            if readonly:
                trouble = unreadable(path)
                if trouble is not None:
                    raise LedgerError(*trouble)
                self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None,
                                          check_same_thread=False, timeout=5.0)
                version = self.db.execute("PRAGMA user_version").fetchone()[0]
                tables = self.db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0]
                trouble = version_problem(path, version, tables)
                if trouble is not None:
                    self.db.close()
                    raise LedgerError(*trouble)
            else:
                directory = os.path.dirname(os.path.abspath(path))
                os.makedirs(directory, exist_ok=True)
                if not os.access(directory, os.W_OK):
                    # SQLite writes -wal and -shm files beside the ledger: the directory must be writable too.
                    raise LedgerError(f"ledger directory {directory} is not writable (a read-only filesystem or "
                                      f"its permissions): {ledgerwatch.fix_for('readonly')}")
                self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
            self.db.execute("PRAGMA busy_timeout=10000")
            if not readonly:
                self.db.execute("PRAGMA journal_mode=WAL")
                # FULL: each commit is on the disk before it returns. With NORMAL, commits since
                # the last checkpoint live in the page cache, and a filesystem that turns
                # read-only after an error (or a power cut) drops them: messages already
                # reported would be reported again, and a young ledger would come back empty,
                # so the next start took the waiting messages for old ones and skipped them.
                self.db.execute("PRAGMA synchronous=FULL")
                self.db.execute("PRAGMA foreign_keys=ON")
                self._migrate()
        except sqlite3.DatabaseError as exc:
            if readonly:
                raise LedgerError(*query_problem(path, exc)) from exc
            raise LedgerError(open_problem(path, exc)) from exc
        except OSError as exc:
            raise LedgerError(f"cannot create the ledger's directory for {path}: {exc}; check ledger.path "
                              f"and the permissions (systemd: StateDirectory=)") from exc
        #: (device, inode) of the file this connection writes: a file deleted or replaced
        #: under the daemon no longer matches what is at ``path``
        self.identity = ledgerwatch.identity(path)

    def verify(self) -> None:
        """Raise LedgerError if the file is damaged (a quick check of every page, once at start)."""
        try:
            rows = [r[0] for r in self.db.execute("PRAGMA quick_check(3)")]
        except sqlite3.DatabaseError as exc:
            raise LedgerError(open_problem(self.path, exc)) from exc
        if rows != ["ok"]:
            raise LedgerError(open_problem(self.path, "; ".join(rows)))

    def close(self) -> None:
        self.db.close()

    def _migrate(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise LedgerError(*newer_schema(self.path, version))
        if version == SCHEMA_VERSION:
            return
        # A ledger with history is copied first: a migration is one-way, and a copy is the way back.
        backup = self._backup_before_migration(version) if version > 0 else None
        self.db.execute("BEGIN IMMEDIATE")
        try:
            if self.db.execute("PRAGMA user_version").fetchone()[0] != version:
                self.db.execute("COMMIT")  # another process migrated it meanwhile
                return
            for script in MIGRATIONS[version:]:
                for statement in script.split(";"):
                    if statement.strip():
                        self.db.execute(statement)
            self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        if backup is not None:
            log.log(logs.NOTICE, logs.kv("ledger-migrated", path=self.path, **{"from": version}, to=SCHEMA_VERSION,
                                         backup=backup))

    def _backup_before_migration(self, version: int) -> str:
        target = backup_name(self.path, version)
        try:
            copy_database(self.db, target)
        except (OSError, sqlite3.Error) as exc:
            raise LedgerError(f"cannot copy ledger {self.path} to {target} before upgrading it from schema {version} "
                              f"to {SCHEMA_VERSION}: {exc}", "free space beside ledger.path (the copy is as large as "
                              "the ledger) or make its directory writable, then start again; nothing was changed") from exc
        return target

    def _tx(self) -> "_Tx":
        return _Tx(self)

    def when_committed(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` (a metric, a wake-up) once what was just written is committed: now, or
        with the outer commit; never if that rolls back."""
        if self._tx_depth:
            self._after_commit.append(fn)
        else:
            fn()

    def abandon(self) -> None:
        """Roll back what a failed COMMIT left open, if anything, so the next write can begin."""
        if self.db.in_transaction:
            try:
                self.db.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    def transaction(self) -> "_Tx":
        """``with ledger.transaction():`` makes the writes in the block one commit (the
        methods' own transactions join it): event rows and the trigger they lead to, say."""
        return _Tx(self)

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        """A query whose rows are read by column name (:func:`_built`), never by position."""
        cur = self.db.execute(sql, params)
        cur.row_factory = sqlite3.Row
        return cur

    # -- meta and live state ------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str | None) -> None:
        if value is None:
            self.db.execute("DELETE FROM meta WHERE key=?", (key,))
        else:
            self.db.execute("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                            (key, value))

    def set_state(self, values: dict[str, Any], now: float | None = None) -> None:
        """Record live state (JSON values) that ``orchestratord status`` reads."""
        at = now if now is not None else time.time()
        with self._tx():
            self.db.executemany(
                "INSERT INTO state(key, value, updated_at) VALUES(?, ?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value=excluded.value, updated_at=excluded.updated_at",
                [(k, json.dumps(v), at) for k, v in values.items()])

    def get_state(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self.db.execute("SELECT key, value FROM state")}

    def record_transition(self, component: str, state: str, detail: str | None = None, now: float | None = None) -> None:
        self.db.execute("INSERT INTO transitions(at, component, state, detail) VALUES(?, ?, ?, ?)",
                        (now if now is not None else time.time(), component, state, detail))

    def transitions(self, limit: int = 50) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT at, component, state, detail FROM transitions ORDER BY id DESC LIMIT ?", (limit,))
        return [{"at": r[0], "component": r[1], "state": r[2], "detail": r[3]} for r in rows]

    # -- events -----------------------------------------------------------------

    def add_events(self, rows: Sequence[EventRow], meta: dict[str, str] | None = None) -> None:
        """Insert a batch of event rows, and set ``meta`` keys, in one transaction."""
        if not rows and not meta:
            return
        with self._tx():
            if rows:
                self.db.executemany(_INSERT_EVENT, rows)
            for key, value in (meta or {}).items():
                self.set_meta(key, value)

    def events(self, limit: int = 50, type_: str | None = None) -> list[dict[str, Any]]:
        if type_:
            cur = self.db.execute("SELECT id, at, event_id, type, session_id, directory, data FROM events "
                                  "WHERE type=? ORDER BY id DESC LIMIT ?", (type_, limit))
        else:
            cur = self.db.execute("SELECT id, at, event_id, type, session_id, directory, data FROM events "
                                  "ORDER BY id DESC LIMIT ?", (limit,))
        return [{"id": r[0], "at": r[1], "event_id": r[2], "type": r[3], "session_id": r[4],
                 "directory": r[5], "data": json.loads(r[6])} for r in cur.fetchall()]

    # -- triggers ---------------------------------------------------------------

    def add_trigger(self, kind: str, detail: str, *, rule: str | None = None, dedup: str | None = None,
                    team: str | None = None, teammate: str | None = None, session_id: str | None = None,
                    event_type: str | None = None, event_id: str | None = None, ckey: str | None = None,
                    window: float = 600.0, covered: str | None = None, tkey: str | None = None,
                    now: float | None = None) -> int | None:
        """Record a trigger once; returns its id, or None when it was seen before.

        Seen before means the same ``dedup`` key ever, or the same ``ckey`` (a teammate
        message's content key) within ``window`` seconds: the inbox file and the event
        stream report the same message, and one message is one trigger. ``covered`` records
        one that needs no prompt (see the v7 migration); a message whose text key claude-teams
        already pushed into the orchestrator's session (within ``window``) is covered by that.
        """
        at = now if now is not None else time.time()
        with self._tx():
            if tkey is not None and covered is None and self.db.execute(
                    "SELECT 1 FROM pushes WHERE tkey=? AND at >= ?", (tkey, at - window)).fetchone():
                covered = PUSHED
            if ckey is not None and self.db.execute(
                    "SELECT 1 FROM triggers WHERE ckey=? AND at >= ? LIMIT 1", (ckey, at - window)).fetchone():
                return None
            cur = self.db.execute(
                "INSERT OR IGNORE INTO triggers(at, kind, rule, dedup, team, teammate, session_id, event_type, "
                "event_id, detail, ckey, covered, tkey) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (at, kind, rule, dedup, team, teammate, session_id, event_type, event_id, detail, ckey, covered, tkey))
            if not cur.rowcount:
                return None
        self.when_committed(lambda: metrics.trigger(kind))
        return cur.lastrowid

    def trigger_for_dedup(self, dedup: str) -> int | None:
        row = self.db.execute("SELECT id FROM triggers WHERE dedup=?", (dedup,)).fetchone()
        return row[0] if row else None

    def trigger_for_ckey(self, ckey: str, since: float) -> int | None:
        row = self.db.execute("SELECT id FROM triggers WHERE ckey=? AND at >= ? ORDER BY id LIMIT 1",
                              (ckey, since)).fetchone()
        return row[0] if row else None

    def turn_report(self, session_id: str, team: str | None, teammate: str | None, since: float) -> int | None:
        """The first teammate message (a trigger with a content key) from this session, or
        signed by this teammate, recorded since ``since``: what its turn already reported."""
        row = self.db.execute(
            "SELECT id FROM triggers WHERE ckey IS NOT NULL AND at >= ? AND "
            "(session_id = ? OR (teammate = ? AND (team = ? OR ? IS NULL))) ORDER BY id LIMIT 1",
            (since, session_id, teammate, team, team)).fetchone()
        return row[0] if row else None

    def record_push(self, tkey: str, session_id: str, since: float, at: float) -> list[int]:
        """A message claude-teams pushed into the orchestrator's session: remember its text key
        and mark the pending triggers of that text (since ``since``) delivered; their ids."""
        with self._tx():
            self.db.execute("INSERT OR IGNORE INTO pushes(tkey, at, session_id) VALUES(?, ?, ?)", (tkey, at, session_id))
            ids = [r[0] for r in self.db.execute(
                "SELECT id FROM triggers WHERE tkey=? AND at >= ? AND dispatch_id IS NULL AND covered IS NULL",
                (tkey, since))]
            self.db.executemany("UPDATE triggers SET covered=? WHERE id=?", [(PUSHED, i) for i in ids])
        return ids

    def trigger_covered(self, trigger_id: int) -> str | None:
        row = self.db.execute("SELECT covered FROM triggers WHERE id=?", (trigger_id,)).fetchone()
        return row[0] if row else None

    def pending_triggers(self) -> list[Trigger]:
        """Triggers not yet covered by any prompt, oldest first."""
        cur = self._rows(_TRIGGER_COLUMNS + " WHERE dispatch_id IS NULL AND covered IS NULL ORDER BY id")
        return [_built(Trigger, row) for row in cur.fetchall()]

    def triggers_for(self, dispatch_id: int) -> list[Trigger]:
        cur = self._rows(_TRIGGER_COLUMNS + " WHERE dispatch_id=? ORDER BY id", (dispatch_id,))
        return [_built(Trigger, row) for row in cur.fetchall()]

    def count_pending_triggers(self) -> int:
        return self.db.execute(
            "SELECT COUNT(*) FROM triggers WHERE dispatch_id IS NULL AND covered IS NULL").fetchone()[0]

    # -- dispatches -------------------------------------------------------------

    def create_dispatch(self, message_id: str, session_id: str, prompt: str, trigger_ids: Iterable[int],
                        now: float | None = None) -> int:
        """Record a prompt before it is sent and tie its triggers to it, in one transaction."""
        at = now if now is not None else time.time()
        with self._tx():
            cur = self.db.execute(
                "INSERT INTO dispatches(message_id, session_id, state, created_at, prompt) VALUES(?, ?, ?, ?, ?)",
                (message_id, session_id, PENDING, at, prompt))
            dispatch_id = int(cur.lastrowid or 0)
            self.db.executemany("UPDATE triggers SET dispatch_id=? WHERE id=? AND dispatch_id IS NULL",
                                [(dispatch_id, t) for t in trigger_ids])
        return dispatch_id

    def mark_sent(self, dispatch_id: int, now: float | None = None) -> None:
        self.db.execute("UPDATE dispatches SET state=?, sent_at=COALESCE(sent_at, ?), attempts=attempts+1 WHERE id=?",
                        (SENT, now if now is not None else time.time(), dispatch_id))

    def finish_dispatch(self, dispatch_id: int, state: str, reply_text: str | None = None,
                        tool_calls: list[dict[str, Any]] | None = None, error: str | None = None, *,
                        release: bool = False, now: float | None = None) -> None:
        """Close a prompt and settle its triggers, in one transaction.

        With ``release`` its triggers go back to the queue (the model never saw them: the
        next prompt carries them); else they stay with it, settled. Either both happen or
        neither: a prompt closed with triggers still tied to it that it never delivered
        would be a report lost for good.
        """
        at = now if now is not None else time.time()
        with self._tx():
            self.db.execute(
                "UPDATE dispatches SET state=?, completed_at=?, reply_text=?, tool_calls=?, error=? WHERE id=?",
                (state, at, reply_text, json.dumps(tool_calls or []), error, dispatch_id))
            if release:
                self.db.execute("UPDATE triggers SET dispatch_id=NULL WHERE dispatch_id=?", (dispatch_id,))
            crash_point("before-settle-commit")  # test hook: a crash with both writes made, neither committed

    def open_dispatches(self) -> list[Dispatch]:
        cur = self._rows(_DISPATCH_COLUMNS + " WHERE state IN (?, ?) ORDER BY id", OPEN_STATES)
        return [_dispatch(row) for row in cur.fetchall()]

    def dispatches(self, limit: int = 20) -> list[Dispatch]:
        cur = self._rows(_DISPATCH_COLUMNS + " ORDER BY id DESC LIMIT ?", (limit,))
        return [_dispatch(row) for row in cur.fetchall()]

    def get_dispatch(self, dispatch_id: int) -> Dispatch | None:
        row = self._rows(_DISPATCH_COLUMNS + " WHERE id=?", (dispatch_id,)).fetchone()
        return _dispatch(row) if row else None

    def dispatch_totals(self) -> dict[str, Any]:
        sent = self.db.execute("SELECT COUNT(*), MAX(sent_at) FROM dispatches WHERE sent_at IS NOT NULL").fetchone()
        last = self.db.execute("SELECT state FROM dispatches WHERE state NOT IN (?, ?) ORDER BY id DESC LIMIT 1",
                               OPEN_STATES).fetchone()
        return {"sent_total": sent[0], "last_sent_at": sent[1], "last_outcome": last[0] if last else None}

    # -- teammate messages ------------------------------------------------------

    def record_messages(self, rows: Sequence[MessageRow], reported: bool, now: float | None = None) -> list[int]:
        """Insert the messages not seen before (by identity), in one transaction; their ids.

        ``reported`` marks them reported at once (messages already there on a first start).
        """
        at = now if now is not None else time.time()
        new: list[int] = []
        with self._tx():
            for r in rows:
                cur = self.db.execute(
                    "INSERT OR IGNORE INTO messages(ident, team, recipient, sender, sent_at, type, summary, text, "
                    "first_seen, reported_at) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (r.ident, r.team, r.recipient, r.sender, r.sent_at, r.type, r.summary, r.text, at,
                     at if reported else None))
                if cur.rowcount:
                    new.append(int(cur.lastrowid or 0))
                if len(new) == 1:
                    crash_point("mid-batch")  # test hook: a crash inside the transaction
        return new

    def record_oversized(self, rows: Sequence[OversizedRow], now: float | None = None) -> None:
        """Insert the oversized messages not seen before (by identity), in one transaction."""
        at = now if now is not None else time.time()
        with self._tx():
            self.db.executemany(
                "INSERT OR IGNORE INTO oversized_messages(ident, team, recipient, sender, sent_at, size, path, "
                "first_seen) VALUES(?, ?, ?, ?, ?, ?, ?, ?)",
                [(r.ident, r.team, r.recipient, r.sender, r.sent_at, r.size, r.path, at) for r in rows])

    def unreported_oversized(self) -> list[dict[str, Any]]:
        keys = ("id", "team", "recipient", "sender", "sent_at", "size", "path", "first_seen")
        cur = self.db.execute(f"SELECT {', '.join(keys)} FROM oversized_messages WHERE reported_at IS NULL ORDER BY id")
        return [dict(zip(keys, r, strict=True)) for r in cur.fetchall()]

    def mark_oversized_reported(self, row_id: int, now: float | None = None) -> None:
        self.db.execute("UPDATE oversized_messages SET reported_at=? WHERE id=?",
                        (now if now is not None else time.time(), row_id))

    def known_idents(self, idents: Iterable[str]) -> set[str]:
        found: set[str] = set()
        items = list(idents)
        for i in range(0, len(items), 500):
            chunk = items[i:i + 500]
            marks = ",".join("?" * len(chunk))
            found.update(r[0] for r in self.db.execute(f"SELECT ident FROM messages WHERE ident IN ({marks})", chunk))
        return found

    def unreported_messages(self) -> list[dict[str, Any]]:
        cur = self.db.execute(_MESSAGE_COLUMNS + " WHERE reported_at IS NULL ORDER BY id")
        return [_message(r) for r in cur.fetchall()]

    def mark_reported(self, message_id: int, trigger_id: int | None, now: float | None = None) -> None:
        self.db.execute("UPDATE messages SET reported_at=?, trigger_id=COALESCE(?, trigger_id) WHERE id=?",
                        (now if now is not None else time.time(), trigger_id, message_id))

    def messages(self, limit: int = 50, team: str | None = None) -> list[dict[str, Any]]:
        if team:
            cur = self.db.execute(_MESSAGE_COLUMNS + " WHERE team=? ORDER BY id DESC LIMIT ?", (team, limit))
        else:
            cur = self.db.execute(_MESSAGE_COLUMNS + " ORDER BY id DESC LIMIT ?", (limit,))
        return [_message(r) for r in cur.fetchall()]

    # -- escalations -------------------------------------------------------------

    def add_escalation(self, key: str, *, rule: str, severity: str, source: str, kind: str, what: str, text: str,
                       actions: Sequence[str], session_id: str | None = None, team: str | None = None,
                       teammate: str | None = None, permission_id: str | None = None,
                       now: float | None = None) -> tuple[int | None, bool]:
        """Record an escalation once by ``key``; (its id, whether it is new).

        The same act seen again with a permission request attached (the tool part first,
        then the server asking whether it may run) reopens the row so the guard can
        carry out what is left; nothing else is repeated.
        """
        with self._tx():
            eid, new = self._escalation_in_tx(key, rule=rule, severity=severity, source=source, kind=kind, what=what,
                                              text=text, actions=actions, session_id=session_id, team=team,
                                              teammate=teammate, permission_id=permission_id, now=now)
        if new:
            metrics.escalation(rule, severity)
        return eid, new

    def _escalation_in_tx(self, key: str, *, rule: str, severity: str, source: str, kind: str, what: str, text: str,
                          actions: Sequence[str], session_id: str | None = None, team: str | None = None,
                          teammate: str | None = None, permission_id: str | None = None,
                          now: float | None = None) -> tuple[int | None, bool]:
        at = now if now is not None else time.time()
        cur = self.db.execute(
            "INSERT OR IGNORE INTO escalations(key, at, rule, severity, source, kind, session_id, team, teammate, "
            "what, text, permission_id, actions) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (key, at, rule, severity, source, kind, session_id, team, teammate, what, text[:4000],
             permission_id, json.dumps(list(actions))))
        if cur.rowcount:
            return int(cur.lastrowid or 0), True
        row = self.db.execute("SELECT id, permission_id FROM escalations WHERE key=?", (key,)).fetchone()
        if row is None:
            return None, False
        if permission_id and row[1] != permission_id:
            self.db.execute("UPDATE escalations SET permission_id=?, handled_at=NULL WHERE id=?",
                            (permission_id, row[0]))
        return int(row[0]), False

    def _mark_done_in_tx(self, escalation_id: int | None, action: str, outcome: dict[str, Any]) -> None:
        if escalation_id is None:
            return
        row = self.db.execute("SELECT done, outcome FROM escalations WHERE id=?", (escalation_id,)).fetchone()
        if row is None:
            return
        done, before = json.loads(row[0]), json.loads(row[1])
        if action not in done:
            done.append(action)
        self.db.execute("UPDATE escalations SET done=?, outcome=? WHERE id=?",
                        (json.dumps(done), json.dumps({**before, **outcome}), escalation_id))

    def open_escalations(self, limit: int = 100) -> list[Escalation]:
        cur = self._rows(_ESCALATION_COLUMNS + " WHERE handled_at IS NULL ORDER BY id LIMIT ?", (limit,))
        return [_escalation(r) for r in cur.fetchall()]

    def update_escalation(self, escalation_id: int, done: Sequence[str], outcome: dict[str, Any],
                          handled: bool, now: float | None = None) -> None:
        self.db.execute("UPDATE escalations SET done=?, outcome=?, handled_at=? WHERE id=?",
                        (json.dumps(list(done)), json.dumps(outcome),
                         (now if now is not None else time.time()) if handled else None, escalation_id))

    def escalations(self, limit: int = 50) -> list[Escalation]:
        cur = self._rows(_ESCALATION_COLUMNS + " ORDER BY id DESC LIMIT ?", (limit,))
        return [_escalation(r) for r in cur.fetchall()]

    def count_escalations(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM escalations").fetchone()[0]


    # -- the permission broker -------------------------------------------------------

    def brokered(self, session_id: str) -> BrokeredSession | None:
        row = self._rows(_BROKERED_COLUMNS + " WHERE session_id=?", (session_id,)).fetchone()
        return _brokered(row) if row else None

    def brokered_sessions(self, state: str | None = None) -> list[BrokeredSession]:
        if state is None:
            cur = self._rows(_BROKERED_COLUMNS + " ORDER BY at")
        else:
            cur = self._rows(_BROKERED_COLUMNS + " WHERE state=? ORDER BY at", (state,))
        return [_brokered(r) for r in cur.fetchall()]

    def set_brokered(self, session_id: str, *, state: str, rules: Sequence[dict[str, str]], title: str | None = None,
                     team: str | None = None, teammate: str | None = None, directory: str | None = None,
                     error: str | None = None, now: float | None = None) -> None:
        at = now if now is not None else time.time()
        self.db.execute(
            "INSERT INTO brokered(session_id, title, team, teammate, directory, rules, state, error, at, updated_at) "
            "VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(session_id) DO UPDATE SET title=excluded.title, "
            "team=excluded.team, teammate=excluded.teammate, directory=excluded.directory, rules=excluded.rules, "
            "state=excluded.state, error=excluded.error, updated_at=excluded.updated_at",
            (session_id, title, team, teammate, directory, json.dumps(list(rules)), state, error, at, at))

    def decide_permission(self, request: PermissionRequest, escalations: Sequence[dict[str, Any]] = ()
                          ) -> tuple[PermissionRequest, list[tuple[int | None, bool]]]:
        """Record a decision and its escalations in one transaction, before the reply is sent.

        A request seen again (a restart, a reconnect that lists it) keeps the decision
        first recorded for it: the row that exists is returned with ``(id, new)`` of each
        escalation. A rejection is marked done on its escalation here, for the broker
        sends it itself.
        """
        with self._tx():
            row = self._rows(_PERMISSION_COLUMNS + " WHERE id=?", (request.id,)).fetchone()
            if row is not None:
                return _permission(row), []
            results = [self._escalation_in_tx(**e) for e in escalations]
            eid = next((i for i, _ in results if i is not None), None)
            request = replace(request, escalation_id=eid)
            self.db.execute(_INSERT_PERMISSION, _permission_values(request))
            if request.decision == "reject":
                for i, _ in results:
                    self._mark_done_in_tx(i, f"reject:{request.id}", {"reject": f"{request.id}: rejected"})
        for (_, new), spec in zip(results, escalations, strict=True):
            if new:
                metrics.escalation(spec["rule"], spec["severity"])
        return request, results

    def permission_totals(self) -> dict[str, int]:
        held = self.db.execute("SELECT COUNT(*) FROM permissions WHERE state=?", (P_HELD,)).fetchone()[0]
        total = self.db.execute("SELECT COUNT(*) FROM permissions").fetchone()[0]
        brokered = self.db.execute("SELECT COUNT(*) FROM brokered WHERE state='brokered'").fetchone()[0]
        return {"held": held, "total": total, "brokered_sessions": brokered}

    def permission(self, request_id: str) -> PermissionRequest | None:
        row = self._rows(_PERMISSION_COLUMNS + " WHERE id=?", (request_id,)).fetchone()
        return _permission(row) if row else None

    def permissions(self, states: Sequence[str] | None = None, limit: int = 200) -> list[PermissionRequest]:
        """Requests, oldest first: those in ``states``, or the latest ``limit`` of all."""
        if states:
            marks = ",".join("?" * len(states))
            cur = self._rows(_PERMISSION_COLUMNS + f" WHERE state IN ({marks}) ORDER BY asked_at, id LIMIT ?",
                                  (*states, limit))
            return [_permission(r) for r in cur.fetchall()]
        cur = self._rows(_PERMISSION_COLUMNS + " ORDER BY asked_at DESC, id DESC LIMIT ?", (limit,))
        return [_permission(r) for r in reversed(cur.fetchall())]

    def answer_permission(self, request_id: str, *, decision: str, reply: str, message: str | None, by: str,
                          now: float | None = None) -> bool:
        """A held request decided (by a person or the timeout): True if this answer is the one that counts."""
        at = now if now is not None else time.time()
        cur = self.db.execute(
            "UPDATE permissions SET decision=?, reply=?, message=?, decided_by=?, decided_at=?, state=? "
            "WHERE id=? AND state=?", (decision, reply, message, by, at, P_OPEN, request_id, P_HELD))
        return cur.rowcount == 1

    def permission_replied(self, request_id: str, seconds: float | None = None, now: float | None = None) -> None:
        self.db.execute("UPDATE permissions SET state=?, replied_at=?, seconds=COALESCE(?, seconds) WHERE id=?",
                        (P_ANSWERED, now if now is not None else time.time(), seconds, request_id))

    def permission_gone(self, request_id: str, why: str, now: float | None = None) -> None:
        """The server no longer has the request: answered elsewhere, or its session ended."""
        self.db.execute(
            "UPDATE permissions SET state=?, replied_at=COALESCE(replied_at, ?), "
            "decided_by=CASE WHEN state=? THEN 'elsewhere' ELSE decided_by END, "
            "message=CASE WHEN state=? THEN ? ELSE message END WHERE id=? AND state IN (?, ?)",
            (P_GONE, now if now is not None else time.time(), P_HELD, P_HELD, why, request_id, P_OPEN, P_HELD))

    # -- stalls ------------------------------------------------------------------

    def record_stall(self, kind: str, detail: str, *, session_id: str | None = None, teammate: str | None = None,
                     seconds: float | None = None, now: float | None = None) -> int:
        cur = self.db.execute("INSERT INTO stalls(at, kind, session_id, teammate, seconds, detail) "
                              "VALUES(?, ?, ?, ?, ?, ?)",
                              (now if now is not None else time.time(), kind, session_id, teammate, seconds, detail))
        metrics.stall(kind)
        return int(cur.lastrowid or 0)

    def stalls(self, limit: int = 20) -> list[dict[str, Any]]:
        cur = self.db.execute("SELECT id, at, kind, session_id, teammate, seconds, detail FROM stalls "
                              "ORDER BY id DESC LIMIT ?", (limit,))
        keys = ("id", "at", "kind", "session_id", "teammate", "seconds", "detail")
        return [dict(zip(keys, r, strict=True)) for r in cur.fetchall()]

    def redrive_dispatch(self, old: Dispatch, message_id: str, prompt: str, reason: str,
                         now: float | None = None) -> int:
        """Close ``old`` as failed and move its triggers to a new pending prompt that supersedes it."""
        at = now if now is not None else time.time()
        with self._tx():
            self.db.execute("UPDATE dispatches SET state=?, completed_at=?, error=? WHERE id=?",
                            (FAILED, at, reason, old.id))
            cur = self.db.execute(
                "INSERT INTO dispatches(message_id, session_id, state, created_at, prompt, supersedes) "
                "VALUES(?, ?, ?, ?, ?, ?)", (message_id, old.session_id, PENDING, at, prompt, old.id))
            new_id = int(cur.lastrowid or 0)
            self.db.execute("UPDATE triggers SET dispatch_id=? WHERE dispatch_id=?", (new_id, old.id))
        return new_id

    def supersedes(self, dispatch_id: int) -> int | None:
        row = self.db.execute("SELECT supersedes FROM dispatches WHERE id=?", (dispatch_id,)).fetchone()
        return row[0] if row else None

    # -- housekeeping -----------------------------------------------------------

    def prune(self, before: float) -> int:
        """Delete what is older than ``before`` (wall time), keeping open work."""
        with self._tx():
            n = self.db.execute("DELETE FROM events WHERE at < ?", (before,)).rowcount
            n += self.db.execute("DELETE FROM transitions WHERE at < ?", (before,)).rowcount
            # Message identities are what stops a second report, and claude-teams never trims
            # an inbox: an old message may still be in it at the next whole read. So the
            # identity stays for good and only the text goes (a row is then a few dozen bytes).
            n += self.db.execute("UPDATE messages SET text='', summary=NULL WHERE first_seen < ? "
                                 "AND reported_at IS NOT NULL AND (text != '' OR summary IS NOT NULL)",
                                 (before,)).rowcount
            n += self.db.execute("DELETE FROM stalls WHERE at < ?", (before,)).rowcount
            n += self.db.execute("DELETE FROM permissions WHERE asked_at < ? AND state NOT IN (?, ?)",
                                 (before, P_OPEN, P_HELD)).rowcount
            n += self.db.execute("DELETE FROM escalations WHERE at < ? AND handled_at IS NOT NULL",
                                 (before - 30 * 86400,)).rowcount
            n += self.db.execute(
                "DELETE FROM triggers WHERE at < ? AND dispatch_id IN "
                "(SELECT id FROM dispatches WHERE state NOT IN (?, ?))", (before, *OPEN_STATES)).rowcount
            n += self.db.execute("DELETE FROM triggers WHERE at < ? AND covered IS NOT NULL AND dispatch_id IS NULL",
                                 (before,)).rowcount
            n += self.db.execute("DELETE FROM pushes WHERE at < ?", (before,)).rowcount
            n += self.db.execute(
                "DELETE FROM dispatches WHERE created_at < ? AND state NOT IN (?, ?) "
                "AND id NOT IN (SELECT dispatch_id FROM triggers WHERE dispatch_id IS NOT NULL)",
                (before, *OPEN_STATES)).rowcount
        return n

    def integrity_ok(self) -> bool:
        return self.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


_INSERT_EVENT = "INSERT INTO events(at, event_id, type, session_id, directory, data) VALUES(?, ?, ?, ?, ?, ?)"
_TRIGGER_COLUMNS = ("SELECT id, at, kind, rule, team, teammate, session_id, event_type, event_id, detail, dispatch_id "
                    "FROM triggers")
_DISPATCH_COLUMNS = ("SELECT id, message_id, session_id, state, created_at, sent_at, completed_at, prompt, "
                     "reply_text, tool_calls, error, attempts FROM dispatches")


_MESSAGE_COLUMNS = ("SELECT id, team, recipient, sender, sent_at, type, summary, text, first_seen, reported_at, "
                    "trigger_id FROM messages")
_MESSAGE_KEYS = ("id", "team", "recipient", "sender", "timestamp", "type", "summary", "text", "first_seen",
                 "reported_at", "trigger_id")


_ESCALATION_COLUMNS = ("SELECT id, key, at, rule, severity, source, kind, session_id, team, teammate, what, text, "
                       "permission_id, actions, done, outcome, handled_at FROM escalations")


_BROKERED_COLUMNS = ("SELECT session_id, title, team, teammate, directory, rules, state, error, at, updated_at "
                     "FROM brokered")
_PERMISSION_FIELDS = ("id", "session_id", "permission", "what", "team", "teammate", "asked_at", "decision", "rule",
                      "escalation_id", "decided_by", "decided_at", "reply", "message", "state", "replied_at",
                      "seconds")
_PERMISSION_COLUMNS = f"SELECT {', '.join(_PERMISSION_FIELDS)} FROM permissions"
_INSERT_PERMISSION = (f"INSERT INTO permissions({', '.join(_PERMISSION_FIELDS)}) "
                      f"VALUES({', '.join('?' * len(_PERMISSION_FIELDS))})")


Row = TypeVar("Row")


def _built(cls: Callable[..., Row], row: sqlite3.Row, **decode: Callable[[Any], Any]) -> Row:
    """A dataclass from a row, field by column name; the ``decode`` columns pass through their function."""
    values = {key: row[key] for key in row.keys()}
    for key, fn in decode.items():
        values[key] = fn(values[key])
    return cls(**values)


def _json_tuple(text: str) -> tuple[Any, ...]:
    return tuple(json.loads(text))


def _permission(row: sqlite3.Row) -> PermissionRequest:
    return _built(PermissionRequest, row)


def _permission_values(p: PermissionRequest) -> tuple[Any, ...]:
    return tuple(getattr(p, f) for f in _PERMISSION_FIELDS)


def _brokered(row: sqlite3.Row) -> BrokeredSession:
    return _built(BrokeredSession, row, rules=json.loads)


def _escalation(row: sqlite3.Row) -> Escalation:
    return _built(Escalation, row, actions=_json_tuple, done=_json_tuple, outcome=json.loads)


def _message(row: Sequence[Any]) -> dict[str, Any]:
    return dict(zip(_MESSAGE_KEYS, row, strict=True))


def _dispatch(row: sqlite3.Row) -> Dispatch:
    return _built(Dispatch, row, tool_calls=lambda text: json.loads(text) if text else [])


class _Tx:
    """``with ledger._tx():`` runs the block in BEGIN IMMEDIATE ... COMMIT; inside another
    one it joins that one (its commit, or its rollback on an error, is the outer one's)."""

    def __init__(self, ledger: "Ledger") -> None:
        self.ledger = ledger
        self.db = ledger.db

    def __enter__(self) -> sqlite3.Connection:
        if self.ledger._tx_depth == 0:
            self.db.execute("BEGIN IMMEDIATE")
        self.ledger._tx_depth += 1
        return self.db

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.ledger._tx_depth -= 1
        if self.ledger._tx_depth:
            return
        after, self.ledger._after_commit = self.ledger._after_commit, []
        if exc_type is None:
            self.db.execute("COMMIT")
            for fn in after:
                fn()
        else:
            self.db.execute("ROLLBACK")
