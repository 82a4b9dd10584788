"""The worker base class: one thread per concern, guarded iterations, a heartbeat.

Each worker runs ``step()`` in a loop. A step returns how long to wait before the next
one; the wait ends early on ``wake()`` or ``stop()``. An exception in a step is logged
with the worker's name and followed by a capped backoff, never a dead thread. Every
step stamps a monotonic heartbeat that the supervisor reads to decide whether to pet
the systemd watchdog.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from . import ledgerwatch, logs, metrics
from .crashpoints import crash_point
from .ledger import Ledger

if TYPE_CHECKING:
    from .config import Config
    from .opencode import OpencodeClient
    from .sessions import SessionDirectory
    from .state import Shared

__all__ = ["Clock", "Deps", "ServerWorker", "Worker", "crash_point"]  # crash_point: where the workers have long found it

Clock = Callable[[], float]


@dataclass(frozen=True)
class Deps:
    """What the supervisor hands every worker it builds, besides the config: one object, not six arguments."""

    shared: Shared
    sessions: SessionDirectory
    make_client: Callable[[], OpencodeClient]
    ledger_health: ledgerwatch.LedgerHealth
    #: ``wake("dispatch")`` is a callable that wakes the dispatcher (whichever instance runs then)
    wake: Callable[[str], Callable[[], None]]
    #: the broker while it runs, else None (the event reader hands it permission requests)
    desk: Callable[[], Any]
    #: the server was seen up again (the event reader reconnects at once)
    on_server_up: Callable[[], None]
    clock: Clock = time.monotonic


class Worker:
    """Subclasses implement ``step()``; ``setup()`` and ``teardown()`` are optional."""

    name = "worker"
    #: a heartbeat older than this means the worker is hung (seconds)
    stall_after = 30.0
    #: the config sections :meth:`build` reads: a reload that changes one of them restarts this worker
    sections: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def enabled_by(cls, cfg: Config) -> bool:
        """Whether ``cfg`` runs this worker at all."""
        return True

    @classmethod
    def build(cls, cfg: Config, deps: Deps) -> Worker:
        """The worker as ``cfg`` asks for it (read only the :attr:`sections` named)."""
        raise NotImplementedError(cls.__name__)

    def __init__(self, clock: Clock = time.monotonic, ledger_health: ledgerwatch.LedgerHealth | None = None) -> None:
        self.clock = clock
        #: where a failing ledger write is told (the supervisor's one tracker; a private one in tests)
        self.ledger_health = ledger_health if ledger_health is not None else ledgerwatch.LedgerHealth()
        self.log = logs.get(self.name)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.heartbeat = clock()
        self.errors = 0
        self.thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        self._stop.clear()
        self.heartbeat = self.clock()
        self.thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Ask the worker to stop; ``join`` waits for it."""
        self._stop.set()
        self._wake.set()
        self.interrupt()

    def interrupt(self) -> None:
        """Break out of a blocking call (subclasses close their sockets here)."""

    def join(self, timeout: float) -> bool:
        if self.thread is None:
            return True
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def wake(self) -> None:
        self._wake.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def fresh(self, now: float | None = None) -> bool:
        """True while the heartbeat is recent enough for the watchdog."""
        return ((now if now is not None else self.clock()) - self.heartbeat) <= self.stall_after

    def beat(self) -> None:
        self.heartbeat = self.clock()

    def wait(self, seconds: float) -> None:
        """Sleep up to ``seconds``, returning early on wake or stop.

        A worker that waits is not hung: the heartbeat goes on in slices of half its
        ``stall_after``, or a long wait (the hourly cap reached, a long minimum interval)
        would stop the watchdog pings and get the service restarted, again and again.
        """
        end = time.monotonic() + seconds  # the real time Event.wait sleeps, whatever clock is injected
        while seconds > 0 and not self._stop.is_set():
            if self._wake.wait(min(seconds, self.stall_after / 2)):
                break
            self.beat()
            seconds = end - time.monotonic()
        self._wake.clear()

    # -- the loop --------------------------------------------------------------

    def setup(self) -> None:
        """Open per-thread resources (a ledger connection) inside the thread."""

    def teardown(self) -> None:
        """Close what ``setup`` opened; runs even after a failed step."""

    def step(self) -> float:
        """Do one iteration; return seconds until the next."""
        raise NotImplementedError

    def _test_hang(self) -> None:
        """Test hook: ORCHESTRATORD_TEST_HANG=<worker name> makes this worker hang."""
        if os.environ.get("ORCHESTRATORD_TEST_HANG") == self.name:
            self.log.warning(logs.kv("test-hang", worker=self.name))
            threading.Event().wait()

    def run_once(self) -> float:
        """One guarded iteration: what the loop and the tests call."""
        self.beat()
        self._test_hang()
        try:
            delay = self.step()
            self.errors = 0
            return delay
        except Exception as exc:
            self.errors += 1
            if isinstance(exc, sqlite3.Error):
                metrics.ledger_error()
            backoff = min(30.0, 0.5 * 2 ** min(self.errors, 6))
            line = logs.kv("worker-error", worker=self.name, error=f"{type(exc).__name__}: {exc}",
                           retry_in=f"{backoff:g}s")
            if isinstance(exc, sqlite3.Error) and ledgerwatch.is_trouble(exc):
                # One critical line for the whole spell (ledger-failing), not one per worker per retry;
                # the supervisor wakes us as soon as a write goes through again.
                self.ledger_health.failed(exc, where=self.name)
                self.log.debug(line)
            else:
                self.log.error(line, exc_info=self.errors == 1)
            return backoff

    def _run(self) -> None:
        try:
            self.setup()
            while not self._stop.is_set():
                delay = self.run_once()
                self.wait(delay)
        except Exception as exc:
            self.log.critical(logs.kv("worker-died", worker=self.name, error=f"{type(exc).__name__}: {exc}"), exc_info=True)
        finally:
            try:
                self.teardown()
            except Exception as exc:
                self.log.error(logs.kv("worker-teardown-failed", worker=self.name, error=str(exc)))


class ServerWorker(Worker):
    """A worker that talks to the server and writes the ledger, each through its own handle.

    The handles are opened inside the worker's thread (``setup``) because a SQLite
    connection and an HTTP session each belong to one thread.
    """

    def __init__(self, make_client: Callable[[], "OpencodeClient"], ledger_path: str,
                 clock: Clock = time.monotonic, ledger_health: ledgerwatch.LedgerHealth | None = None) -> None:
        super().__init__(clock, ledger_health)
        self.make_client = make_client
        self.ledger_path = ledger_path
        self.ledger: Ledger | None = None
        self.client: "OpencodeClient | None" = None

    def setup(self) -> None:
        self.ledger = Ledger(self.ledger_path)
        self.client = self.make_client()

    def teardown(self) -> None:
        if self.client:
            self.client.close()
        if self.ledger:
            self.ledger.close()
