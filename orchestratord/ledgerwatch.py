"""Ledger trouble at run time: writes that fail, and a file deleted under the daemon.

Every thread writes the ledger, so every thread can be the first to see it fail. They
all report to one :class:`LedgerHealth`, which turns a burst of failures into one
critical ``ledger-failing`` line and, once writes go through again, one
``ledger-recovered`` line. The supervisor probes with its state write while the ledger
fails, and wakes the workers when a probe goes through, so each retries what it could
not record (nothing is marked done before it is written).

A ledger file deleted or replaced while it is open is the quiet kind of trouble: SQLite
keeps writing into the unlinked inode and all of it is gone at the next start.
:func:`restore` writes the open database back to its path.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from . import logs

log = logs.get("ledger")

#: a failure this recent keeps the ledger "failing" even when a probe goes through
SETTLE_SECONDS = 2.0

# SQLite's primary result codes that mean the file or its filesystem is in trouble, not
# that a statement is wrong: the daemon cannot fix these by itself.
_TROUBLE_CODES = {
    3: "SQLITE_PERM", 8: "SQLITE_READONLY", 10: "SQLITE_IOERR", 11: "SQLITE_CORRUPT", 13: "SQLITE_FULL",
    14: "SQLITE_CANTOPEN", 26: "SQLITE_NOTADB",
}


def is_trouble(exc: BaseException) -> bool:
    """True when ``exc`` says the ledger's file cannot be written (full, read-only, I/O, corrupt)."""
    if isinstance(exc, OSError):
        return True
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return (code & 0xFF) in _TROUBLE_CODES
    text = str(exc)
    return any(s in text for s in ("disk is full", "readonly database", "disk I/O error", "unable to open",
                                   "malformed", "not a database"))


#: what :func:`read_only_filesystem` says of a filesystem the kernel made read-only
AFTER_ERROR = "the filesystem turned read-only after an error"


def read_only_filesystem(path: str) -> str | None:
    """Whether the filesystem under ``path``'s directory is read-only now, and why; None if not.

    ext4 with ``errors=remount-ro`` stops writes after an error; newer kernels show that
    only as ``emergency_ro`` in the mount's options (``statvfs`` still says writable), older
    ones as ``ro`` with errors counted under /sys/fs/ext4.
    """
    directory = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    try:
        dev = os.stat(directory).st_dev
        read_only = bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except OSError:
        return None
    mount = _mount_of(directory, f"{os.major(dev)}:{os.minor(dev)}")
    if mount is None:
        return "the filesystem is read-only" if read_only else None
    source, options, super_options = mount
    if "emergency_ro" in options | super_options:
        return AFTER_ERROR
    if not (read_only or "ro" in options or "ro" in super_options):
        return None
    if "ro" in super_options and source:  # the filesystem itself, not one read-only view of it
        try:
            with open(f"/sys/fs/ext4/{os.path.basename(source)}/errors_count") as fh:
                if int(fh.read().strip() or 0) > 0:
                    return AFTER_ERROR
        except (OSError, ValueError):
            pass
    return "the filesystem is read-only"


def _mount_of(directory: str, dev: str, table: str = "/proc/self/mountinfo") -> tuple[str, set[str], set[str]] | None:
    """(source, mount options, superblock options) of the mount ``directory`` is on.

    The deepest mount point above it on that device: a service's read-only view of
    ``/`` (ProtectSystem=strict) shares the device with its writable state directory.
    """
    best: tuple[int, tuple[str, set[str], set[str]]] | None = None
    try:
        with open(table) as fh:
            for line in fh:
                fields = line.split()
                if len(fields) < 7 or fields[2] != dev or "-" not in fields[6:]:
                    continue
                point = fields[4].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
                if not (directory == point or directory.startswith(point.rstrip("/") + "/")):
                    continue
                tail = fields[fields.index("-", 6) + 1:]
                found = (tail[1] if len(tail) > 1 else "", set(fields[5].split(",")),
                         set((tail[2] if len(tail) > 2 else "").split(",")))
                if best is None or len(point) >= best[0]:  # later mounts over the same point win
                    best = (len(point), found)
    except OSError:
        return None
    return None if best is None else best[1]


def fix_for(exc: BaseException | str) -> str:
    """What an operator should do about this error, in a few words."""
    text = str(exc)
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    if AFTER_ERROR in text:
        return ("stop the daemon, unmount the ledger's filesystem, fsck it and mount it again (see dmesg for "
                "the error), then start the daemon: it reads what it could not record from the inboxes")
    if primary == 13 or "disk is full" in text or "No space" in text:
        return "free space on the ledger's filesystem"
    if primary in (3, 8) or "readonly" in text or "ead-only" in text or "ermission" in text:
        return "make the ledger's directory and file writable by the daemon (systemd: StateDirectory=), or change ledger.path"
    if primary in (11, 26) or "malformed" in text or "not a database" in text:
        return "stop the daemon, move the ledger file aside and start again: a fresh one is created"
    return "check the disk and filesystem of ledger.path (dmesg), its free space and permissions, or change ledger.path"


@dataclass
class Episode:
    """One spell of failing writes, as ``status`` shows it."""

    since: float  # wall time
    error: str
    until: float | None = None


class LedgerHealth:
    """Whether the ledger takes writes; logs a line on each change, never one per failure.

    Failing starts with the first failure. It ends when a write goes through and no
    write has failed for ``settle`` seconds, so writes that fail now and then while the
    disk is nearly full make one episode, not a line every few seconds.
    """

    def __init__(self, path: str = "", settle: float = SETTLE_SECONDS,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self.path = path
        self.settle = settle
        self.clock = clock
        self.wall = wall
        self.lock = threading.Lock()
        self.current: Episode | None = None
        self.last: Episode | None = None
        self.last_failure = 0.0
        self.episodes = 0

    @property
    def failing(self) -> bool:
        return self.current is not None

    def failed(self, exc: BaseException | str, where: str = "") -> bool:
        """A write failed; True (and the critical line) if that starts an episode."""
        error = f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException) else exc
        if self.current is None and self.path:  # a new spell: say so if the filesystem went read-only
            why = read_only_filesystem(self.path)
            if why and why not in error:
                error = f"{error} ({why})"
        with self.lock:
            self.last_failure = self.clock()
            if self.current is not None:
                return False
            self.current = Episode(since=self.wall(), error=error)
            self.episodes += 1
        log.critical(logs.kv("ledger-failing", path=self.path, error=error, where=where or None,
                             fix=fix_for(error if AFTER_ERROR in error else exc),
                             action="still watching; what cannot be recorded now is retried, not dropped"))
        return True

    def succeeded(self) -> bool:
        """A write went through; True (and the recovered line) if that ends an episode."""
        with self.lock:
            episode = self.current
            if episode is None or self.clock() - self.last_failure < self.settle:
                return False
            episode.until = self.wall()
            self.current, self.last = None, episode
        log.log(logs.NOTICE, logs.kv("ledger-recovered", path=self.path, failing_for=f"{episode.until - episode.since:.0f}s",
                                     error=episode.error))
        return True

    def view(self) -> dict[str, Any]:
        """For the ledger's state row and ``status``."""
        with self.lock:
            cur, last = self.current, self.last
        return {"path": self.path, "failing": cur is not None, "since": cur.since if cur else None,
                "error": cur.error if cur else None, "fix": fix_for(cur.error) if cur else None,
                "episodes": self.episodes,
                "last": None if last is None else {"since": last.since, "until": last.until, "error": last.error}}


def identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of the file at ``path``, or None if there is none."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


def copy_out(db: sqlite3.Connection, path: str) -> str:
    """Copy the open database ``db`` into a new file beside ``path``; its name.

    The caller then closes ``db`` and every other connection to the old file before
    :func:`put_back`: closing the last one removes the ``-wal`` and ``-shm`` files by
    name, and those names are the restored file's too.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    tmp = f"{path}.restore-{os.getpid()}"
    for leftover in (tmp, tmp + "-journal"):
        if os.path.exists(leftover):
            os.unlink(leftover)
    target = sqlite3.connect(tmp)
    try:
        db.backup(target)
    finally:
        target.close()
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    return tmp


def put_back(tmp: str, path: str, now: float | None = None) -> str | None:
    """Rename the copy to ``path``; a file found there is moved aside, never overwritten.

    Returns where that file went, if there was one.
    """
    aside = None
    if os.path.lexists(path):
        aside = f"{path}.replaced-{int(now if now is not None else time.time())}"
        os.replace(path, aside)
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return aside
