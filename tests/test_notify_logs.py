"""systemd notification over a real datagram socket, and the log line format."""

from __future__ import annotations

import io
import logging
import socket
import struct
from pathlib import Path
from typing import Iterator

import pytest

from orchestratord import logs
from orchestratord.notify import Notifier, watchdog_interval


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2.0)
    yield path, sock
    sock.close()


def test_messages_reach_the_socket(notify_socket: tuple[str, socket.socket]) -> None:
    path, sock = notify_socket
    n = Notifier(path)
    assert n.ready("ok") and n.status("busy") and n.reloading() and n.watchdog() and n.stopping()
    got = [sock.recv(4096).decode() for _ in range(5)]
    assert got[0] == "READY=1\nSTATUS=ok"
    assert got[1] == "STATUS=busy"
    assert got[2].startswith("RELOADING=1\nMONOTONIC_USEC=") and int(got[2].split("=")[-1]) > 0
    assert got[3:] == ["WATCHDOG=1", "STOPPING=1"]


def test_no_socket_is_a_noop() -> None:
    n = Notifier("")
    assert not n.enabled and n.ready() is False


def test_failure_logged_once_and_state_message_resent(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = str(tmp_path / "later.sock")
    n = Notifier(path)
    with caplog.at_level(logging.ERROR, logger="orchestratord"):
        logs.get("x").propagate = True
        logging.getLogger("orchestratord").propagate = True
        try:
            assert n.ready() is False
            assert n.watchdog() is False
            assert n.status("s") is False
        finally:
            logging.getLogger("orchestratord").propagate = False
    assert sum("notify-failed" in r.getMessage() for r in caplog.records) == 1
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2.0)
    try:
        assert n.stopping()
        # READY was kept and goes first; WATCHDOG and STATUS were not worth keeping.
        assert sock.recv(4096) == b"READY=1"
        assert sock.recv(4096) == b"STOPPING=1"
    finally:
        sock.close()


def test_watchdog_interval() -> None:
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "10000000"}) == 5.0
    assert watchdog_interval({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "junk"}) is None


def test_kv_quotes_and_drops_none() -> None:
    assert logs.kv("e", a="x", b="two words", c=None, d='q"uote', e="") == 'e a=x b="two words" d="q\\"uote" e=""'
    assert "\n" not in logs.kv("e", text="line1\nline2")


def test_kv_takes_a_field_named_event() -> None:
    # The trigger line names the event type as ``event=``, the same word as the first parameter.
    assert logs.kv("trigger", rule="r", event="session.idle") == "trigger rule=r event=session.idle"


@pytest.mark.parametrize("level,prefix", [(logging.CRITICAL, "<2>"), (logging.ERROR, "<3>"), (logging.WARNING, "<4>"),
                                          (logs.NOTICE, "<5>"), (logging.INFO, "<6>"), (logging.DEBUG, "<7>")])
def test_journal_prefixes(level: int, prefix: str) -> None:
    rec = logging.LogRecord("orchestratord.t", level, __file__, 1, "server-up url=x", None, None)
    assert logs.LineFormatter(journal=True).format(rec).startswith(prefix + "server-up url=x")
    plain = logs.LineFormatter(journal=False).format(rec)
    assert not plain.startswith("<") and "server-up url=x" in plain


def test_setup_writes_one_line_per_event() -> None:
    buf = io.StringIO()
    logger = logging.getLogger("orchestratord")
    saved = logger.handlers[:]
    logger.handlers.clear()
    try:
        logs.setup("debug", stream=buf, journal=True)
        logs.get("t").warning(logs.kv("x", why="a\nb"))
        assert buf.getvalue().count("\n") == 1 and buf.getvalue().startswith("<4>x why=")
    finally:
        logger.handlers[:] = saved


# -- the journal's native protocol -------------------------------------------------------

def parse_journal(data: bytes) -> dict[str, str]:
    """Read a native-protocol datagram back (both the plain and the length-prefixed form)."""
    out: dict[str, str] = {}
    i = 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            out[key.decode()] = value.decode()
            i = nl + 1
        else:
            (size,) = struct.unpack("<Q", data[nl + 1:nl + 9])
            out[line.decode()] = data[nl + 9:nl + 9 + size].decode()
            i = nl + 9 + size + 1
    return out


def test_journal_entry_wire_format() -> None:
    data = logs.journal_entry({"MESSAGE": "one line", "ORCH_TEXT": "two\nlines", "PRIORITY": 2})
    assert data.startswith(b"MESSAGE=one line\nORCH_TEXT\n")
    assert parse_journal(data) == {"MESSAGE": "one line", "ORCH_TEXT": "two\nlines", "PRIORITY": "2"}


def test_journal_handler_sends_structured_fields(tmp_path: Path) -> None:
    path = str(tmp_path / "journal.sock")
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(path)
    sink.settimeout(5)
    handler = logs.JournalHandler(path)
    logger = logging.getLogger("orchestratord.test-journal")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.critical(logs.kv("escalation", rule="recursive-delete", team="my-team", teammate="worker-1",
                                session="ses_1", seen="rm -rf /"))
        logger.info(logs.kv("teammate-message", team="my-team", **{"from": "worker-2"}, summary="hi"))
        logger.info(logs.kv("prompt-sent", message_id="msg_1", event="session.idle"))
        first, second, third = (parse_journal(sink.recv(65536)) for _ in range(3))
    finally:
        logger.removeHandler(handler)
        handler.close()
        sink.close()
    assert first["PRIORITY"] == "2" and first["SYSLOG_IDENTIFIER"] == "orchestratord"
    assert first["ORCH_EVENT"] == "escalation" and first["ORCH_RULE"] == "recursive-delete"
    assert (first["ORCH_TEAM"], first["ORCH_TEAMMATE"], first["ORCH_SESSION"]) == ("my-team", "worker-1", "ses_1")
    assert first["MESSAGE"].startswith("escalation rule=recursive-delete")
    assert second["ORCH_EVENT"] == "teammate-message" and second["ORCH_TEAMMATE"] == "worker-2"
    assert second["PRIORITY"] == "6"
    assert third["ORCH_MESSAGE_ID"] == "msg_1" and third["ORCH_EVENT"] == "prompt-sent"
    assert third["ORCH_EVENT_TYPE"] == "session.idle"


def test_journal_handler_falls_back_to_stderr_lines(tmp_path: Path) -> None:
    out = io.StringIO()
    handler = logs.JournalHandler(str(tmp_path / "nobody-listens.sock"), fallback=out)
    logger = logging.getLogger("orchestratord.test-journal-fallback")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning(logs.kv("server-down", url="http://x"))
        logger.warning(logs.kv("server-down", url="http://y"))
    finally:
        logger.removeHandler(handler)
        handler.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("<4>journal-send-failed ") and len(lines) == 3, lines
    assert lines[1].startswith("<4>server-down url=http://x") and lines[2].startswith("<4>server-down url=http://y")
