"""Failure cases the real server won't produce on demand, against a misbehaving stand-in.

Each case checks for the clear log line and for the recovery after it.
"""

from __future__ import annotations

import base64
import json
import re
import signal
from pathlib import Path
from typing import Iterator

import pytest

from tests.support.daemon import Daemon, holds, ledger_rows, status_json, wait_for, write_config
from tests.support.fakeserver import FakeOpencode

pytestmark = pytest.mark.faults

SEND_DONE = {
    "type": "message.part.updated",
    "properties": {"sessionID": "ses_teammate", "part": {
        "id": "prt_x", "sessionID": "ses_teammate", "type": "tool", "tool": "claude-teams_send_message",
        "state": {"status": "completed", "input": {"team_name": "my-team", "recipient": "team-lead",
                                                   "content": "hello", "summary": "hi"}}}},
}


@pytest.fixture
def fake() -> Iterator[FakeOpencode]:
    server = FakeOpencode().start()
    yield server
    server.stop()


def start(tmp_path: Path, fake: FakeOpencode, extra: str = "", password_file: Path | None = None) -> Daemon:
    cfg = write_config(tmp_path / "orchestrator.toml", server_url=fake.url, ledger=tmp_path / "ledger.db",
                       teams_base=tmp_path, extra=extra, password_file=password_file)
    return Daemon(cfg, tmp_path).start()


def event(n: int, **over: object) -> dict:
    ev = json.loads(json.dumps(SEND_DONE))
    ev["id"] = f"evt_{n:04d}"
    ev["properties"]["part"]["id"] = f"prt_{n:04d}"
    ev.update(over)
    return ev


def triggers(tmp_path: Path) -> int:
    return len(ledger_rows(tmp_path / "ledger.db", "SELECT id FROM triggers WHERE rule='teammate-message'"))


def test_malformed_frames_are_logged_and_skipped(tmp_path: Path, fake: FakeOpencode) -> None:
    d = start(tmp_path, fake)
    try:
        d.wait_log("stream-connected")
        fake.send(b"data: {not json\n\n")
        fake.send(b"data: [1, 2]\n\n")
        fake.send(b"data: {\"type\": \"x\xff\xfe\"}\n\n")
        for i in range(3):
            fake.send(b"data: broken " + str(i).encode() + b"\n\n")
        fake.send_event(event(1))
        wait_for(lambda: triggers(tmp_path) == 1, what="the valid event after the junk to raise a trigger")
        lines = d.grep("malformed-frame")
        assert lines, "no malformed-frame line"
        assert len(lines) <= 2, "malformed frames must be logged once per burst, not once per frame"
        assert d.proc is not None and d.proc.poll() is None
    finally:
        d.close()


def test_oversized_event_is_skipped_and_the_stream_goes_on(tmp_path: Path, fake: FakeOpencode) -> None:
    d = start(tmp_path, fake, extra="")
    try:
        d.wait_log("stream-connected")
        big = {"id": "evt_big", "type": "message.part.updated", "properties": {"blob": "x" * (5 * 1024 * 1024)}}
        fake.send(b"data: " + json.dumps(big).encode() + b"\n\n")
        fake.send_event(event(2))
        d.wait_log("oversized-event-skipped")
        wait_for(lambda: triggers(tmp_path) == 1, what="the event after the oversized one")
    finally:
        d.close()


def test_health_500_is_down_then_up(tmp_path: Path, fake: FakeOpencode) -> None:
    d = start(tmp_path, fake)
    try:
        d.wait_log("server-up")
        fake.health_status = 500
        [line] = d.wait_log("server-down")
        # A warning (not an error: the server may come back), saying what the probe got.
        assert re.match(r"\d{4}-\d\d-\d\dT[\d:.]+ WARNING server-down ", line), line
        assert "GET /global/health: HTTP 500" in line, line
        fake.health_status = 200
        d.wait_log("server-up", count=2)
        rows = ledger_rows(tmp_path / "ledger.db", "SELECT state FROM transitions WHERE component='server' ORDER BY id")
        assert [r[0] for r in rows] == ["up", "down", "up"], "each transition recorded once"
    finally:
        d.close()


def test_401_names_the_setting_to_fix_and_recovers_with_the_password(tmp_path: Path, fake: FakeOpencode) -> None:
    fake.require_auth = "Basic " + base64.b64encode(b"opencode:s3cret").decode()
    d = start(tmp_path, fake)
    try:
        lines = d.wait_log(r"auth-failed .*401")
        assert any("server.password_file" in line for line in lines)
        assert d.proc is not None and d.proc.poll() is None
        pw = tmp_path / "password"
        pw.write_text("s3cret\n")
        write_config(tmp_path / "orchestrator.toml", server_url=fake.url, ledger=tmp_path / "ledger.db",
                     teams_base=tmp_path, password_file=pw)
        d.signal(signal.SIGHUP)
        d.wait_log("config-reloaded")
        d.wait_log("server-up")
        d.wait_log("stream-connected")
    finally:
        d.close()


def test_silent_stream_times_out_and_reconnects(tmp_path: Path, fake: FakeOpencode) -> None:
    fake.stream_mode = "silent"
    d = start(tmp_path, fake, extra="")
    # The config writer uses a 25 s read timeout; make it short for this case.
    cfg = tmp_path / "orchestrator.toml"
    cfg.write_text(cfg.read_text().replace("read_timeout_seconds = 25", "read_timeout_seconds = 1"))
    d.close()
    d = Daemon(cfg, tmp_path).start()
    try:
        d.wait_log("stream-disconnected.*read timed out")
        fake.stream_mode = "frames"
        d.wait_log("stream-connected", count=2)
        fake.send_event(event(3))
        wait_for(lambda: triggers(tmp_path) == 1, what="a trigger after the reconnect")
    finally:
        d.close()


def test_stream_closed_by_server_reconnects(tmp_path: Path, fake: FakeOpencode) -> None:
    d = start(tmp_path, fake)
    try:
        d.wait_log("stream-connected")
        fake.send(None)  # type: ignore[arg-type]
        d.wait_log("stream-disconnected")
        d.wait_log("stream-connected", count=2)
        fake.send_event(event(4))
        wait_for(lambda: triggers(tmp_path) == 1, what="a trigger on the new stream")
        d.signal(signal.SIGTERM)
        assert d.wait_exit(10) == 0
    finally:
        d.close()


def test_a_server_that_accepts_but_never_answers_is_retried_quickly(tmp_path: Path, fake: FakeOpencode) -> None:
    """A starting server may accept the stream and send no headers: give up on the
    headers after server.timeout_seconds, not after the stream's read timeout."""
    fake.stream_mode = "no-headers"
    cfg = write_config(tmp_path / "orchestrator.toml", server_url=fake.url, ledger=tmp_path / "ledger.db",
                       teams_base=tmp_path)
    cfg.write_text(cfg.read_text().replace("timeout_seconds = 5", "timeout_seconds = 1"))
    d = Daemon(cfg, tmp_path).start()
    try:
        d.wait_log("stream-connect-failed .*timed out", timeout=10)
        fake.stream_mode = "frames"
        d.wait_log("stream-connected", timeout=10)
    finally:
        d.close()


def test_heartbeats_keep_a_quiet_stream_open_past_the_request_timeout(tmp_path: Path, fake: FakeOpencode) -> None:
    """Between heartbeats the stream is silent for longer than server.timeout_seconds;
    only events.read_timeout_seconds may end it."""
    fake.heartbeat_every = 1.5
    cfg = write_config(tmp_path / "orchestrator.toml", server_url=fake.url, ledger=tmp_path / "ledger.db",
                       teams_base=tmp_path)
    cfg.write_text(cfg.read_text().replace("timeout_seconds = 5", "timeout_seconds = 0.5")
                   .replace("read_timeout_seconds = 25", "read_timeout_seconds = 4"))
    d = Daemon(cfg, tmp_path).start()
    try:
        d.wait_log("stream-connected")
        holds(lambda: not d.grep("stream-disconnected"), 5, "the stream stays connected")
    finally:
        d.close()


def test_a_server_of_an_unsupported_generation_is_named_once_and_not_driven(tmp_path: Path, fake: FakeOpencode) -> None:
    """opencode 2.x answers /global/health (with its version) and 405 on POST /session: one
    critical line naming the supported range, no restarts, probing on, status says so."""
    fake.version, fake.session_post_status = "2.0.11", 405
    d = start(tmp_path, fake)
    try:
        [line] = d.wait_log("server-unsupported")
        assert "version=2.0.11" in line and "1.x" in line and ("CRITICAL" in line or "<2>" in line), line
        probes = len([r for r in fake.requests if r == ("GET", "/global/health")])
        wait_for(lambda: len([r for r in fake.requests if r == ("GET", "/global/health")]) > probes + 4, 10,
                 "the health probe going on")
        assert len(d.grep("server-unsupported")) == 1
        assert not d.grep("worker-restart|worker-error|server-down|stream-connect-failed"), d.log()
        assert ("POST", "/session") not in fake.requests and d.proc is not None and d.proc.poll() is None
        status = status_json(d.config)
        assert status["server"]["version"] == "2.0.11" and "not supported" in status["server"]["problem"]
        assert "unsupported 2.0.11" in d.cli("status")
        # A supported server behind the same URL is picked up without a restart.
        fake.version, fake.session_post_status = "1.18.33", 200
        d.wait_log("server-supported")
        wait_for(lambda: ("POST", "/session") in fake.requests or ("GET", "/session") in fake.requests, 15,
                 "the dispatcher talking to the supported server")
        wait_for(lambda: status_json(d.config)["server"]["problem"] is None, 15, "the status row without the problem")
    finally:
        d.close()
