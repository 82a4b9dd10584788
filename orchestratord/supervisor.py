"""The main thread: start the workers, watch them, reload, stop.

Signal handlers only queue the signal; everything else happens in :meth:`Supervisor.tick`,
which the main loop runs after each signal or every ``TICK`` seconds. That is where the
systemd watchdog is petted, and only while every worker's heartbeat is fresh, so a hung
thread gets the service restarted by systemd.

Size: start, signals, reload, restarts, the watchdog, the state row and pruning all run in
the main thread's tick; the workers build themselves (each worker's ``build``).
"""

from __future__ import annotations

import dataclasses
import os
import queue
import signal
import sqlite3
import threading
import time
from typing import Any, Callable

from . import ledgerwatch, logs, metrics
from .broker import Broker
from .config import Config, ConfigError, load_config
from .dispatch import Dispatcher
from .events import EventReader
from .guard import Guard
from .health import HealthWatch
from .inbox import InboxWatcher
from .ledger import Ledger, LedgerError
from .notify import Notifier, watchdog_interval
from .opencode import OpencodeClient, read_password
from .sessions import SessionDirectory
from .stalls import StallWatch
from .state import DaemonState, Shared
from .worker import Deps, Worker

log = logs.get("supervisor")

TICK = 1.0
STATE_EVERY = 5.0
PRUNE_EVERY = 3600.0
STOP_TIMEOUT = 5.0

#: every worker, in the order they start; each declares its config sections and builds itself
WORKERS: tuple[type[Worker], ...] = (HealthWatch, EventReader, Dispatcher, InboxWatcher, Guard, Broker, StallWatch)
#: which config sections each worker is built from: a reload restarts only the workers whose sections changed
WORKER_SECTIONS: dict[str, tuple[str, ...]] = {w.name: w.sections for w in WORKERS}
_BY_NAME: dict[str, type[Worker]] = {w.name: w for w in WORKERS}
#: the sections of a config (its fields that take part in comparing two configs)
SECTIONS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Config) if f.compare)


class StartupError(Exception):
    """The daemon cannot start; the message says what to fix."""


def changed_sections(old: Config, new: Config) -> set[str]:
    return {name for name in SECTIONS if getattr(old, name) != getattr(new, name)}


class Supervisor:
    def __init__(self, cfg: Config, config_path: str, notifier: Notifier | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.notifier = notifier or Notifier()
        self.clock = clock
        self.shared = Shared(server_url=cfg.server.url, clock=clock, started=clock(),
                             startup_grace=cfg.health.startup_grace_seconds)
        self.sessions = SessionDirectory()
        self.signals: "queue.SimpleQueue[int]" = queue.SimpleQueue()
        self.workers: dict[str, Worker] = {}
        self.restarts: dict[str, list[float]] = {}
        self._restoring = False  # a deleted ledger found, its restore waiting for the workers to stop
        self._woken_in = 0  # the ledger failure spell whose recovery the workers were woken for
        self.password: str | None = None
        self.ledger: Ledger | None = None
        self.watchdog_every = watchdog_interval()
        self.last_pet = 0.0
        self.hung: set[str] = set()
        self.last_status = ""
        self.last_state_write = 0.0
        self.last_prune = clock()
        self.last_textfile = 0.0
        self.stop_requested = False
        self.exit_code = 0
        self.ledger_health = ledgerwatch.LedgerHealth(cfg.ledger.path, clock=clock)
        self.deps = Deps(shared=self.shared, sessions=self.sessions, make_client=self._client,
                         ledger_health=self.ledger_health, wake=self._wake, desk=self._broker,
                         on_server_up=self._server_up, clock=clock)

    # -- start -------------------------------------------------------------------

    def start(self) -> None:
        """Open the ledger, start the workers and tell systemd we are ready."""
        self.password = self._password(self.cfg)
        try:
            self.ledger = Ledger(self.cfg.ledger.path)
            self.ledger.verify()
        except LedgerError as exc:
            if self.ledger is not None:
                self.ledger.close()
                self.ledger = None
            raise StartupError(str(exc)) from exc
        try:
            self.ledger.set_state({"daemon": {"pid": os.getpid(), "state": "starting", "started_at": time.time(),
                                              "config": self.config_path, "config_digest": self.cfg.digest}})
        except sqlite3.Error as exc:
            self.ledger.close()
            self.ledger = None
            raise StartupError(f"cannot write ledger {self.cfg.ledger.path}: {exc}; {ledgerwatch.fix_for(exc)}") from exc
        self.shared.set_session(self.ledger.get_meta(f"session:{self.cfg.server.url}") or self.cfg.session.id)
        self._metrics(self.cfg)
        for name in WORKER_SECTIONS:
            if self._enabled(name):
                self._start_worker(name)
        self.shared.set_state(DaemonState.READY)
        log.log(logs.NOTICE, logs.kv("started", config=self.config_path, digest=self.cfg.digest,
                                     server=self.cfg.server.url,
                                     ledger=self.cfg.ledger.path, pid=os.getpid()))
        self.notifier.ready(self.shared.status_line())
        self._write_state(force=True)

    def _metrics(self, cfg: Config) -> None:
        """Match the metrics endpoint and textfile to ``cfg``; a port in use is a startup error."""
        m = cfg.metrics
        try:
            if m.listen or m.textfile:
                metrics.enable()
            metrics.serve(m.listen)
        except (metrics.MetricsUnavailable, OSError) as exc:
            raise StartupError(f"metrics.listen {m.listen}: {getattr(exc, 'strerror', None) or exc}; "
                               "choose a free address or remove metrics.listen") from exc
        self.last_textfile = 0.0

    def _password(self, cfg: Config) -> str | None:
        try:
            return read_password(cfg.server.password_file)
        except OSError as exc:
            raise StartupError(f"cannot read server.password_file {cfg.server.password_file}: "
                               f"{exc.strerror or exc}; fix the path or its permissions") from exc

    def _client(self) -> OpencodeClient:
        return OpencodeClient(self.cfg.server.url, self.cfg.server.username, self.password,
                              self.cfg.server.timeout_seconds)

    def _build(self, name: str) -> Worker:
        return _BY_NAME[name].build(self.cfg, self.deps)

    def _enabled(self, name: str) -> bool:
        return _BY_NAME[name].enabled_by(self.cfg)

    def _broker(self) -> Broker | None:
        worker = self.workers.get("broker")
        return worker if isinstance(worker, Broker) else None

    def _wake(self, name: str) -> Callable[[], None]:
        def wake() -> None:
            worker = self.workers.get(name)
            if worker is not None:
                worker.wake()
        return wake

    def _server_up(self) -> None:
        events = self.workers.get("events")
        if isinstance(events, EventReader):
            events.wake_reconnect()
        self._wake("dispatch")()

    def _start_worker(self, name: str) -> None:
        worker = self._build(name)
        self.workers[name] = worker
        worker.start()

    def _stop_workers(self, names: list[str]) -> None:
        workers = [self.workers[n] for n in names if n in self.workers]
        for w in workers:
            w.stop()
        deadline = self.clock() + STOP_TIMEOUT
        for w in workers:
            if not w.join(max(0.1, deadline - self.clock())):
                log.error(logs.kv("worker-stop-timeout", worker=w.name, seconds=STOP_TIMEOUT))

    # -- the main loop -------------------------------------------------------------

    def install_signals(self) -> None:
        for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        # No logging, no locks: only queue it for the main loop.
        self.signals.put(signum)

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the exit code."""
        while not self.stop_requested:
            try:
                signum: int | None = self.signals.get(timeout=TICK if self.watchdog_every is None
                                                      else min(TICK, self.watchdog_every))
            except queue.Empty:
                signum = None
            if signum is not None:
                self.handle_signal(signum)
            self.tick()
        return self.shutdown()

    def handle_signal(self, signum: int) -> None:
        if signum == signal.SIGHUP:
            if self.stop_requested:
                return
            self.reload()
        elif signum in (signal.SIGTERM, signal.SIGINT):
            log.info(logs.kv("stop-requested", signal=signal.Signals(signum).name))
            self.stop_requested = True

    def tick(self, now: float | None = None) -> None:
        """One supervision pass: restart dead workers, pet the watchdog, publish status."""
        now = self.clock() if now is None else now
        for name, worker in list(self.workers.items()):
            if not worker.alive() and not worker.stopping and not self.stop_requested:
                self._restart(name, now)
        stale = {name for name, w in self.workers.items() if not w.fresh(now)}
        for name in stale - self.hung:
            log.error(logs.kv("worker-hung", worker=name, seconds=int(now - self.workers[name].heartbeat),
                              action="no more watchdog pings; systemd will restart the service"))
        for name in self.hung - stale:
            log.info(logs.kv("worker-recovered", worker=name))
        self.hung = stale
        if self.watchdog_every is not None and not stale and now - self.last_pet >= self.watchdog_every * 0.9:
            if self.notifier.watchdog():
                self.last_pet = now
        self._check_ledger_file()
        self._write_state(now=now)
        self.shared.set_ledger_failing(self.ledger_health.failing)
        snap = self.shared.snapshot()
        degraded = (snap.server_healthy is False or not snap.stream_connected or bool(stale)
                    or snap.ledger_failing)
        if self.shared.state in (DaemonState.READY, DaemonState.DEGRADED):
            self.shared.set_state(DaemonState.DEGRADED if degraded else DaemonState.READY)
        line = self.shared.status_line()
        if line != self.last_status:
            self.last_status = line
            self.notifier.status(line)
        textfile = self.cfg.metrics.textfile
        if textfile and now - self.last_textfile >= self.cfg.metrics.textfile_interval_seconds:
            self.last_textfile = now
            metrics.write_textfile(textfile)
        if now - self.last_prune >= PRUNE_EVERY:
            self.last_prune = now
            self._prune()

    def _restart(self, name: str, now: float) -> None:
        history = [t for t in self.restarts.get(name, []) if now - t < 300]
        if history and now - history[-1] < min(60.0, 2.0 ** len(history)):
            return  # back off between restarts
        history.append(now)
        self.restarts[name] = history
        log.error(logs.kv("worker-restart", worker=name, restarts_5min=len(history)))
        metrics.worker_restart(name)
        self._start_worker(name)

    def _write_state(self, now: float | None = None, force: bool = False) -> None:
        """Copy the live state to the ledger; while the ledger fails, this write is the probe."""
        now = self.clock() if now is None else now
        force = force or self.ledger_health.failing
        if self.ledger is None or (not force and not self.shared.changed.is_set() and now - self.last_state_write < STATE_EVERY):
            return
        self.shared.changed.clear()
        self.last_state_write = now
        s = self.shared.snapshot()
        wall, mono = time.time(), self.clock()
        # The dispatcher's deadlines are monotonic; another process reads them as wall times of this moment.
        holds = [{"reason": h.reason, "detail": h.detail, "until": None if h.until is None else wall + h.until - mono}
                 for h in s.holds]
        try:
            self.ledger.set_state({
                "daemon": {"pid": os.getpid(), "state": s.state, "config": self.config_path,
                           "config_digest": self.cfg.digest, "status_line": self.shared.status_line(),
                           "metrics_listen": self.cfg.metrics.listen, "written_at": wall},
                "dispatch": {"holds": holds},
                "ledger": self.ledger_health.view(),
                "server": {"url": s.server_url, "healthy": s.server_healthy, "version": s.server_version,
                           "problem": self.shared.server_problem},
                "stream": {"connected": s.stream_connected, "events_total": s.events_total,
                           "last_event_at": s.last_event_at},
                "session": {"id": s.session_id, "busy": s.session_busy, "busy_sessions": s.busy_sessions},
                "sessions": self.shared.sessions_view(),
            })
        except Exception as exc:
            metrics.ledger_error()
            if ledgerwatch.is_trouble(exc):
                self.ledger_health.failed(exc, where="supervisor")
            else:
                log.error(logs.kv("ledger-write-failed", what="status", error=str(exc),
                                  fix="check free space and permissions of ledger.path"))
            return
        if self.ledger_health.failing:
            # Writes go through again: every worker retries what it could not record now,
            # not at the end of its backoff; once per spell and at its end, not at every
            # probe (writes that keep failing now and then would have the stream reconnect
            # every second).
            ended = self.ledger_health.succeeded()
            if ended or self._woken_in != self.ledger_health.episodes:
                self._woken_in = self.ledger_health.episodes
                for worker in self.workers.values():
                    worker.wake()
            if ended:
                self.shared.changed.set()  # write the recovered view at once

    def _check_ledger_file(self) -> None:
        """Restore the ledger if its file was deleted or replaced under the running daemon.

        SQLite would go on writing into the deleted inode, and all of it would be gone
        at the next start. The open connection still has everything: the workers are
        stopped (closing their connections), the database is copied back to its path,
        and they start again on it.
        """
        if self.ledger is None or self.ledger.identity is None:
            return
        path = self.cfg.ledger.path
        try:
            found = ledgerwatch.identity(path)
        except OSError:
            return  # cannot tell (EIO, EACCES): the failing writes say what is wrong
        if found == self.ledger.identity:
            return
        names = list(self.workers)
        if not self._restoring:
            what = "deleted" if found is None else "replaced by another file"
            log.critical(logs.kv("ledger-missing", path=path, what=what,
                                 action="restoring it from the daemon's open connection; workers reopen it",
                                 fix="never delete or replace the ledger of a running daemon; stop it first"))
            self._restoring = True
        self._stop_workers(names)
        if any(w.alive() for w in self.workers.values()):
            # A worker still holds the old file: copying now would give the restored file
            # -wal and -shm names the old connection still writes. Try again at the next tick.
            return
        self._restoring = False
        old = self.ledger
        try:
            tmp = ledgerwatch.copy_out(old.db, path)
        except (OSError, sqlite3.Error) as exc:
            tmp = None
            log.critical(logs.kv("ledger-restore-failed", path=path, error=f"{type(exc).__name__}: {exc}",
                                 lost="what the daemon recorded before now",
                                 action="starting again on a new ledger at the same path",
                                 fix=ledgerwatch.fix_for(exc)))
        old.close()
        aside = None
        try:
            if tmp is not None:
                aside = ledgerwatch.put_back(tmp, path)
            self.ledger = Ledger(path)
        except (OSError, LedgerError) as exc:
            # Nothing to write to: stop, and let the service manager start us again.
            log.critical(logs.kv("ledger-restore-failed", path=path, error=str(exc), action="stopping",
                                 fix=ledgerwatch.fix_for(exc)))
            self.ledger = None
            self.stop_requested = True
            self.exit_code = 1
            return
        if tmp is not None:
            log.log(logs.NOTICE, logs.kv("ledger-restored", path=path, moved_aside=aside))
        for name in names:
            self._start_worker(name)
        self.shared.changed.set()

    def _prune(self) -> None:
        assert self.ledger is not None
        before = time.time() - self.cfg.ledger.retention_days * 86400
        try:
            removed = self.ledger.prune(before)
            if removed:
                log.info(logs.kv("ledger-pruned", rows=removed, retention_days=self.cfg.ledger.retention_days))
        except Exception as exc:
            log.error(logs.kv("ledger-prune-failed", error=str(exc)))

    # -- reload and stop -------------------------------------------------------------

    def reload(self) -> bool:
        """Load the config file again; keep the old one on any error."""
        self.shared.set_state(DaemonState.RELOADING)
        self.notifier.reloading()
        try:
            try:
                new = load_config(self.config_path)
                password = self._password(new)
            except ConfigError as exc:
                for problem in exc.problems:
                    log.error(logs.kv("config-rejected", problem=problem))
                log.error(logs.kv("config-reload-failed", config=self.config_path, errors=len(exc.problems),
                                  action="still running on the previous config"))
                metrics.reload(False)
                return False
            except StartupError as exc:
                log.error(logs.kv("config-rejected", problem=str(exc)))
                log.error(logs.kv("config-reload-failed", config=self.config_path, errors=1,
                                  action="still running on the previous config"))
                metrics.reload(False)
                return False
            if new.ledger.path != self.cfg.ledger.path:
                try:
                    Ledger(new.ledger.path).close()
                except LedgerError as exc:
                    log.error(logs.kv("config-rejected", problem=str(exc)))
                    metrics.reload(False)
                    return False
            if new.metrics != self.cfg.metrics:
                try:
                    self._metrics(new)
                except StartupError as exc:
                    log.error(logs.kv("config-rejected", problem=str(exc)))
                    metrics.reload(False)
                    return False
            changed = changed_sections(self.cfg, new)
            if password != self.password:
                changed.add("server")
            old = self.cfg
            self.cfg, self.password = new, password
            if "log" in changed:
                logs.set_level(new.log.level)
            self.shared.set_startup_grace(new.health.startup_grace_seconds)
            if "ledger" in changed and new.ledger.path != old.ledger.path:
                assert self.ledger is not None
                self.ledger.close()
                self.ledger = Ledger(new.ledger.path)
                self.ledger_health.path = new.ledger.path
            if "server" in changed:
                self.shared.set_server_url(new.server.url)
            restart = [name for name, sections in WORKER_SECTIONS.items() if changed & set(sections)]
            self._stop_workers(restart)
            for name in restart:
                if self._enabled(name):
                    self._start_worker(name)
                else:
                    self.workers.pop(name, None)
            metrics.reload(True)
            self.shared.changed.set()  # the digest in the live state
            log.log(logs.NOTICE, logs.kv("config-reloaded", config=self.config_path, digest=new.digest,
                                         changed=",".join(sorted(changed)) or "nothing",
                                         restarted=",".join(restart) or "none"))
            return True
        finally:
            self.shared.set_state(DaemonState.READY)
            self.notifier.ready(self.shared.status_line())

    def shutdown(self) -> int:
        self.shared.set_state(DaemonState.STOPPING)
        self.notifier.stopping()
        log.info(logs.kv("stopping", workers=",".join(self.workers)))
        broker = self._broker()
        if broker is not None:
            broker.release_at_stop = True  # a clean stop, not a restart: release if the config says so
        self._stop_workers(list(self.workers))
        if self.cfg.metrics.textfile:
            metrics.write_textfile(self.cfg.metrics.textfile)
        metrics.stop()
        if self.ledger is not None:
            try:
                self.ledger.set_state({"daemon": {"pid": os.getpid(), "state": "stopped", "stopped_at": time.time(),
                                                  "config": self.config_path}})
            except Exception as exc:
                log.error(logs.kv("ledger-write-failed", what="final state", error=str(exc)))
            self.ledger.close()
        log.log(logs.NOTICE, logs.kv("stopped"))
        return self.exit_code


def threads_alive() -> list[str]:
    return [t.name for t in threading.enumerate() if t is not threading.main_thread()]
