"""The health watchdog: probe ``GET /global/health`` and record each transition once.

A server that is up and lets one probe time out is probed again at once before it counts
as down: a busy server (a long tool call, a slow disk) is not an outage, and calling it
one pauses the dispatcher and wakes every worker twice. A refused connection or an error
answer counts at once.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

from . import logs, metrics
from .ledgerwatch import LedgerHealth
from .opencode import SUPPORTED_RANGE, AuthError, OpencodeClient, OpencodeError, TimedOut, unsupported
from .state import Shared
from .worker import Deps, ServerWorker

if TYPE_CHECKING:
    from .config import Config


class HealthWatch(ServerWorker):
    """Probes every ``interval`` seconds; logs and records up/down changes, not every probe."""

    name = "health"
    sections = ("server", "health", "ledger")

    @classmethod
    def build(cls, cfg: Config, deps: Deps) -> HealthWatch:
        return cls(shared=deps.shared, make_client=deps.make_client, ledger_path=cfg.ledger.path,
                   interval=cfg.health.interval_seconds, timeout=cfg.health.timeout_seconds,
                   on_up=deps.on_server_up, clock=deps.clock, ledger_health=deps.ledger_health)

    def __init__(self, *, shared: Shared, make_client: Callable[[], OpencodeClient], ledger_path: str,
                 interval: float, timeout: float, on_up: Callable[[], None],
                 clock: Callable[[], float] = time.monotonic,
                 ledger_health: LedgerHealth | None = None) -> None:
        super().__init__(make_client, ledger_path, clock, ledger_health)
        self.shared = shared
        self.interval = interval
        self.timeout = timeout
        self.on_up = on_up
        self.stall_after = max(10.0, 3 * (interval + timeout))
        self.healthy: bool | None = None
        self.last_error: str | None = None
        self.down_unsaid = False  # down since the start, so far logged only as server-starting
        self.doubted = False  # the last probe timed out while the server was up: this one decides

    def step(self) -> float:
        assert self.client is not None and self.ledger is not None
        version = None
        try:
            health = self.client.health(timeout=self.timeout)
            healthy, version, error = health.healthy, health.version, None if health.healthy else "healthy=false"
        except AuthError as exc:
            healthy, error = False, str(exc)
        except OpencodeError as exc:
            healthy, error = False, str(exc)
            if self.healthy and not self.doubted and isinstance(exc, TimedOut):
                self.doubted = True
                self.log.info(logs.kv("health-probe-slow", url=self.shared.server_url, error=error,
                                      action="probing again before taking the server for down"))
                return 0.0
        self.doubted = False
        if healthy and unsupported(version):
            healthy, error = False, self._unsupported(version)
        elif healthy and self.shared.server_problem is not None:
            self.log.log(logs.NOTICE, logs.kv("server-supported", url=self.shared.server_url, version=version))
            self.shared.set_server_problem(None)
        self._record(healthy, version, error)
        return self.interval

    def _unsupported(self, version: str | None) -> str:
        """One critical line per version; the server then counts as down, so nothing else
        talks to it, and the probe goes on quietly until a supported one answers."""
        problem = f"opencode serve {version} is not supported (supported: {SUPPORTED_RANGE})"
        if problem != self.shared.server_problem:
            self.log.critical(logs.kv(
                "server-unsupported", url=self.shared.server_url, version=version, supported=SUPPORTED_RANGE,
                action="nothing is sent to it; probing until a supported version answers",
                fix="run a supported opencode-ai (npm install -g opencode-ai@1.18.33) behind server.url"))
            self.shared.set_server_problem(problem, version)
            self.down_unsaid = False
        return problem

    def _record(self, healthy: bool, version: str | None, error: str | None) -> None:
        assert self.ledger is not None
        metrics.server_up(healthy)
        url = self.shared.server_url
        auth = bool(error) and ("HTTP 401" in (error or "") or "HTTP 403" in (error or ""))
        if auth and error != self.last_error:
            # Wrong or missing credentials is a config error, not an outage: name it on its own.
            self.log.error(logs.kv("server-auth-failed", url=url, error=error))
        if healthy == self.healthy:
            self.last_error = error
            if not healthy and self.down_unsaid and not self.shared.starting_up() and self.shared.server_problem is None:
                self.down_unsaid = False
                self.log.warning(logs.kv("server-down", url=url, error=error,
                                         note=f"not up since the start ({self.shared.startup_grace:g}s ago)"))
            if healthy and version != self.shared.server_version:
                self.shared.server_seen(True, version)
            return
        previous, self.healthy, self.last_error = self.healthy, healthy, error
        self.shared.server_seen(healthy, version)
        if healthy:
            self.down_unsaid = False
            self.ledger.record_transition("server", "up", version)
            self.log.log(logs.NOTICE, logs.kv("server-up", url=url, version=version))
            self.on_up()
        else:
            self.ledger.record_transition("server", "down", error)
            if auth or self.shared.server_problem is not None or not (previous is None or previous):
                return  # an auth failure, or a version not supported, is logged above
            if self.shared.starting_up():
                self.down_unsaid = True
                self.log.log(logs.NOTICE, logs.kv("server-starting", url=url, error=error,
                                                  grace_seconds=f"{self.shared.startup_grace:g}"))
            else:
                self.log.warning(logs.kv("server-down", url=url, error=error))
