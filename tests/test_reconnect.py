"""The wait between stream connections: a stream the server takes and drops at once is a
failed attempt (the backoff grows, few lines are logged); one that lasted starts it over.

The server is the misbehaving stand-in (the real one does not drop a stream it has just
opened); the reader is the daemon's own, with its real client, stepped one connection at a
time with an injected clock.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

from orchestratord.events import STABLE_SECONDS, EventReader
from orchestratord.opencode import OpencodeClient
from orchestratord.state import Shared
from tests.support.fakeserver import FakeOpencode
from tests.support.logcapture import caplog  # noqa: F401 - the fixture


@pytest.fixture
def dropping() -> Iterator[FakeOpencode]:
    server = FakeOpencode().start()
    server.stream_mode = "drop"
    yield server
    server.stop()


def _reader(tmp_path: Path, url: str, clock: Any) -> EventReader:
    r = EventReader(shared=Shared(server_url=url), make_client=lambda: OpencodeClient(url),
                    ledger_path=str(tmp_path / "ledger.db"), stream="global", directory=None, read_timeout=5,
                    max_event_bytes=1 << 20, reconnect_max=5.0, store="default", rules=(),
                    on_trigger=lambda: None, on_own_activity=lambda: None, clock=clock)
    r.setup()
    return r


def _disconnects(caplog: Any) -> list[str]:
    return [rec.getMessage() for rec in caplog.records if rec.getMessage().startswith("stream-disconnected")]


def test_a_stream_dropped_at_once_waits_longer_each_time_and_says_so_once(
        tmp_path: Path, dropping: FakeOpencode, caplog: Any) -> None:
    r = _reader(tmp_path, dropping.url, clock=lambda: 100.0)  # no time passes: every connection is brief
    try:
        delays = [r.step() for _ in range(4)]
    finally:
        r.teardown()
    assert dropping.stream_connects == 4
    assert delays[0] <= 0.5 < 2.0 <= delays[3], delays  # jittered 0.25 * 2**n, n = 1 .. 4
    said = _disconnects(caplog)
    assert len(said) == 1 and "lasted=0.0s" in said[0] and "attempt=1" in said[0], said


def test_a_stream_that_lasted_starts_the_backoff_over(tmp_path: Path, dropping: FakeOpencode, caplog: Any) -> None:
    now = [100.0]

    def clock() -> float:  # each look at the clock is STABLE_SECONDS later: every connection lasted
        now[0] += STABLE_SECONDS
        return now[0]

    r = _reader(tmp_path, dropping.url, clock)
    try:
        delays = [r.step() for _ in range(4)]
    finally:
        r.teardown()
    assert dropping.stream_connects == 4
    assert all(d <= 0.5 for d in delays), delays
    said = _disconnects(caplog)
    assert len(said) == 4 and not any("lasted=" in line for line in said), said
