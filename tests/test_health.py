"""The health watch: one probe that times out is no outage; two in a row, or a refused
connection, are. Driven one probe at a time, with an injected clock and a client whose
answers the test sets."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from orchestratord.health import HealthWatch
from orchestratord.ledger import Ledger
from orchestratord.opencode import Health, OpencodeClient, TimedOut, Unreachable
from orchestratord.state import Shared
from tests.support.logcapture import caplog  # noqa: F401 - the fixture


class Server:
    """A client whose next health answers are queued: "up", "slow" (read timed out), "refused"."""

    def __init__(self) -> None:
        self.answers: list[str] = []

    def health(self, timeout: float) -> Health:
        answer = self.answers.pop(0) if self.answers else "up"
        if answer == "slow":
            raise TimedOut("GET /global/health: read timed out")
        if answer == "refused":
            raise Unreachable("GET /global/health: connection refused")
        return Health(True, "1.18.33")

    def close(self) -> None:
        pass


def watch(tmp_path: Path, server: Server) -> tuple[HealthWatch, Shared, list[int]]:
    ups: list[int] = []
    shared = Shared(server_url="http://127.0.0.1:4096", clock=lambda: 100.0, started=100.0, startup_grace=0.0)
    w = HealthWatch(shared=shared, make_client=lambda: server, ledger_path=str(tmp_path / "l.sqlite3"),  # type: ignore[arg-type, return-value]
                    interval=2.0, timeout=2.0, on_up=lambda: ups.append(1), clock=lambda: 100.0)
    w.setup()
    return w, shared, ups


def said(caplog: Any, event: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(event + " ")]


def transitions(tmp_path: Path) -> list[str]:
    ledger = Ledger(str(tmp_path / "l.sqlite3"))
    try:
        return [t["state"] for t in reversed(ledger.transitions()) if t["component"] == "server"]
    finally:
        ledger.close()


def test_one_probe_that_times_out_is_probed_again_at_once_and_is_no_outage(tmp_path: Path, caplog: Any) -> None:
    server = Server()
    w, shared, ups = watch(tmp_path, server)
    assert w.run_once() == 2.0 and shared.server_healthy
    server.answers = ["slow"]
    assert w.run_once() == 0.0, "the probe after a slow one is at once"
    assert shared.server_healthy, "one slow answer is not an outage"
    assert w.run_once() == 2.0 and shared.server_healthy
    w.teardown()
    assert not said(caplog, "server-down") and len(said(caplog, "health-probe-slow")) == 1
    assert transitions(tmp_path) == ["up"] and ups == [1]


def test_two_probes_in_a_row_that_time_out_are_an_outage(tmp_path: Path, caplog: Any) -> None:
    server = Server()
    w, shared, ups = watch(tmp_path, server)
    w.run_once()
    server.answers = ["slow", "slow", "slow"]
    assert w.run_once() == 0.0
    assert w.run_once() == 2.0 and not shared.server_healthy
    w.run_once()  # down already: no second doubt, no second line
    w.run_once()  # up again
    w.teardown()
    assert len(said(caplog, "server-down")) == 1 and len(said(caplog, "health-probe-slow")) == 1
    assert transitions(tmp_path) == ["up", "down", "up"] and ups == [1, 1]


def test_a_refused_connection_is_an_outage_at_once(tmp_path: Path, caplog: Any) -> None:
    server = Server()
    w, shared, _ = watch(tmp_path, server)
    w.run_once()
    server.answers = ["refused"]
    assert w.run_once() == 2.0 and not shared.server_healthy
    w.teardown()
    assert len(said(caplog, "server-down")) == 1 and not said(caplog, "health-probe-slow")


def test_the_client_tells_a_probe_that_timed_out_from_a_refused_one() -> None:
    """What the health watch goes by, from the real client: a socket that takes the
    connection and never answers is TimedOut; a closed port is Unreachable, not TimedOut."""
    with socket.socket() as silent, socket.socket() as closed:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)  # the kernel completes the handshake; nobody ever answers
        closed.bind(("127.0.0.1", 0))  # bound, not listening: the connection is refused
        client = OpencodeClient(f"http://127.0.0.1:{silent.getsockname()[1]}")
        with pytest.raises(TimedOut):
            client.health(timeout=0.3)
        client.close()
        client = OpencodeClient(f"http://127.0.0.1:{closed.getsockname()[1]}")
        with pytest.raises(Unreachable) as refused:
            client.health(timeout=0.3)
        client.close()
        assert not isinstance(refused.value, TimedOut)
