"""Running without a service manager: ``run --daemon --pidfile PATH``.

For init systems that only start a program and expect it to detach (sysvinit,
start-stop-daemon, OpenRC without supervise-daemon). Under systemd or launchd, run in
the foreground instead: they supervise, log and restart better than a pidfile can.

The pidfile is held with ``flock`` for the daemon's whole life, so a second instance
finds it locked and refuses, and a pidfile left by a killed daemon holds no lock and is
simply taken over. The command returns only once the daemon has started (exit 0) or
failed to (exit 1, with the reason), as an init script expects.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import sys
from types import TracebackType
from typing import Callable, TextIO

import daemon

from . import logs

UMASK = 0o027


class AlreadyRunning(Exception):
    """Another process holds the pidfile; ``pid`` is what the file says (may be None)."""

    def __init__(self, path: str, pid: int | None) -> None:
        who = f"pid {pid}" if pid else "another process"
        super().__init__(f"already running ({who} holds {path})")
        self.pid = pid


class PidFile:
    """A pidfile locked with flock while the process runs; a context manager for python-daemon."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.fd: int | None = None

    def _open_locked(self) -> int:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = read_pid(self.path)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise AlreadyRunning(self.path, holder) from None
            raise
        return fd

    def check(self) -> None:
        """Raise AlreadyRunning if a live process holds the pidfile; hold nothing afterwards.

        Run before detaching: a lock held across the fork would be shared with the child.
        """
        os.close(self._open_locked())

    def acquire(self) -> None:
        fd = self._open_locked()
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "PidFile":
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def read_pid(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as fh:
            text = fh.read().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def daemonize(pidfile: PidFile, log_file: TextIO, start: Callable[[], None], run: Callable[[], int],
              on_signal: Callable[[int, object], None]) -> int:
    """Detach, then ``start()`` and ``run()`` in the daemon; return the exit code for this process.

    The calling process waits on a pipe until the daemon reports that ``start()`` finished
    (or failed, or the daemon died), so its exit code says whether the daemon came up.
    Everything that must survive detaching is opened before: the log file (it becomes the
    daemon's stdout and stderr) and the pipe. The ledger is opened by ``start()`` in the
    daemon, never before: an SQLite connection must not cross a fork.
    """
    pidfile.check()
    read_end, write_end = os.pipe()
    child = os.fork()
    if child:
        os.close(write_end)
        report = _read_all(read_end)
        os.waitpid(child, 0)  # the intermediate process exits as soon as the daemon is detached
        if report.startswith("ok"):
            return 0
        print(report.strip() or f"error: the daemon exited during startup; see {log_file.name}",
              file=sys.stderr)
        return 1

    os.close(read_end)
    context = daemon.DaemonContext(
        working_directory="/",
        umask=UMASK,
        detach_process=True,
        pidfile=pidfile,
        files_preserve=[log_file, write_end],
        stdout=log_file,
        stderr=log_file,
        # python-daemon's default for SIGTERM raises SystemExit wherever the program is;
        # ours only queues the signal for the main loop, as in the foreground.
        signal_map={signal.SIGTERM: on_signal, signal.SIGINT: on_signal, signal.SIGHUP: on_signal,
                    signal.SIGTSTP: None, signal.SIGTTIN: None, signal.SIGTTOU: None},
    )
    try:
        context.open()
    except AlreadyRunning as exc:
        _report(write_end, f"error: {exc}")
        os._exit(1)
    try:
        try:
            start()
        except Exception as exc:
            _report(write_end, f"error: {exc}")
            logs.get("service").critical(logs.kv("startup-failed", error=str(exc)))
            return 1
        _report(write_end, f"ok pid={os.getpid()}")
        return run()
    finally:
        context.close()


def _report(fd: int, text: str) -> None:
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _read_all(fd: int) -> str:
    chunks = []
    with os.fdopen(fd, "rb") as fh:
        while chunk := fh.read(4096):
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")
