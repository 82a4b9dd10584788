"""A server still coming up when the daemon starts is logged at notice, for the startup grace only."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from orchestratord.health import HealthWatch
from orchestratord.opencode import Health, Unreachable
from orchestratord.state import Shared
from tests.support.logcapture import caplog  # noqa: F401 - the fixture


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Server:
    """A client whose health probe fails until ``up`` is set."""

    def __init__(self) -> None:
        self.up = False

    def health(self, timeout: float) -> Health:
        if not self.up:
            raise Unreachable("GET /global/health: connection refused")
        return Health(True, "1.18.33")

    def close(self) -> None:
        pass


def watch(tmp_path: Path, clock: Clock, server: Server, grace: float) -> HealthWatch:
    shared = Shared(server_url="http://127.0.0.1:4096", clock=clock, started=clock(), startup_grace=grace)
    w = HealthWatch(shared=shared, make_client=lambda: server, ledger_path=str(tmp_path / "l.sqlite3"),  # type: ignore[arg-type, return-value]
                    interval=2.0, timeout=2.0, on_up=lambda: None, clock=clock)
    w.setup()
    return w


def probe(w: HealthWatch, clock: Clock, times: int) -> None:
    """``times`` probes, one every interval."""
    for _ in range(times):
        w.run_once()
        clock.now += 2.0


def lines(caplog: pytest.LogCaptureFixture, event: str) -> list[tuple[str, str]]:
    return [(r.levelname, r.getMessage()) for r in caplog.records if r.getMessage().startswith(event + " ")]


def test_a_server_that_comes_up_within_the_grace_makes_no_warning(tmp_path: Path, caplog: Any) -> None:
    clock, server = Clock(), Server()
    w = watch(tmp_path, clock, server, grace=30.0)
    probe(w, clock, 5)
    server.up = True
    w.run_once()
    assert lines(caplog, "server-starting") and all(level == "NOTICE" for level, _ in lines(caplog, "server-starting"))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert lines(caplog, "server-up")
    # Later outages are outages.
    server.up = False
    clock.now += 60.0
    w.run_once()
    assert [level for level, _ in lines(caplog, "server-down")] == ["WARNING"]
    w.teardown()


def test_a_server_still_down_when_the_grace_runs_out_is_a_warning_once(tmp_path: Path, caplog: Any) -> None:
    clock, server = Clock(), Server()
    w = watch(tmp_path, clock, server, grace=10.0)
    probe(w, clock, 12)
    assert len(lines(caplog, "server-starting")) == 1
    down = lines(caplog, "server-down")
    assert [level for level, _ in down] == ["WARNING"] and "not up since the start" in down[0][1]
    w.teardown()


def test_no_grace_makes_the_first_failure_a_warning(tmp_path: Path, caplog: Any) -> None:
    clock, server = Clock(), Server()
    w = watch(tmp_path, clock, server, grace=0.0)
    w.run_once()
    assert [level for level, _ in lines(caplog, "server-down")] == ["WARNING"] and not lines(caplog, "server-starting")
    w.teardown()


def test_stream_connect_failures_are_notices_while_the_server_starts(caplog: Any) -> None:
    from orchestratord.events import EventReader

    clock = Clock()
    shared = Shared(clock=clock, started=clock(), startup_grace=30.0)
    r = EventReader(shared=shared, make_client=lambda: None, ledger_path="-", stream="global",  # type: ignore[arg-type, return-value]
                    directory=None, read_timeout=25.0, max_event_bytes=1 << 20, reconnect_max=1.0, store="default",
                    rules=(), on_trigger=lambda: None, on_own_activity=lambda: None, clock=clock)
    r._failed("connection refused")
    shared.server_seen(True, None)
    r._failures = 19
    r._failed("connection refused")
    assert [level for level, _ in lines(caplog, "stream-connect-failed")] == ["NOTICE", "WARNING"]


def test_a_stream_attempt_begun_while_the_server_starts_is_a_notice_when_it_fails_later(caplog: Any) -> None:
    """The server accepts the socket while it starts, comes up, and never answers that request."""
    from orchestratord.events import EventReader
    from orchestratord.opencode import OpencodeError

    clock = Clock()
    shared = Shared(clock=clock, started=clock(), startup_grace=30.0)

    class Client:
        def open_stream(self, path: str, read_timeout: float) -> Any:
            shared.server_seen(True, None)  # the health probe saw it up meanwhile
            raise OpencodeError(f"GET {path}: read timed out")

    r = EventReader(shared=shared, make_client=lambda: None, ledger_path="-", stream="global",  # type: ignore[arg-type, return-value]
                    directory=None, read_timeout=25.0, max_event_bytes=1 << 20, reconnect_max=1.0, store="default",
                    rules=(), on_trigger=lambda: None, on_own_activity=lambda: None, clock=clock)
    r.client, r.ledger = Client(), object()  # type: ignore[assignment]
    r.step()
    r.step()  # begun once the server was up: a warning
    assert [level for level, _ in lines(caplog, "stream-connect-failed")] == ["NOTICE"]
    r._failures = 19
    r.step()
    assert [level for level, _ in lines(caplog, "stream-connect-failed")] == ["NOTICE", "WARNING"]
