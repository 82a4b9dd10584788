"""One log line per event, ``key=value`` fields; native journal entries under systemd.

Lines look like ``server-down url=http://127.0.0.1:4096 error="connection refused"``.
When stderr is the journal (``JOURNAL_STREAM``), each entry goes to journald over its
native protocol instead, with ``PRIORITY``, ``SYSLOG_IDENTIFIER`` and fields of its own
(``ORCH_EVENT=server-down``, ``ORCH_URL=…``), so ``journalctl ORCH_EVENT=escalation``
works; if that socket cannot be used, the line goes to stderr with the sd-daemon
priority prefix (``<4>``). Elsewhere a line starts with a timestamp and the level.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import struct
import sys
import threading
import time
from typing import Any, TextIO

NOTICE = 25
logging.addLevelName(NOTICE, "NOTICE")

LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "notice": NOTICE,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# sd-daemon(3) priorities: 2 crit, 3 err, 4 warning, 5 notice, 6 info, 7 debug.
_PRIORITY = (
    (logging.CRITICAL, 2),
    (logging.ERROR, 3),
    (logging.WARNING, 4),
    (NOTICE, 5),
    (logging.INFO, 6),
)

ROOT = "orchestratord"


def priority(levelno: int) -> int:
    """The syslog priority for a logging level number."""
    for threshold, prio in _PRIORITY:
        if levelno >= threshold:
            return prio
    return 7


def _quote(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    text = text.replace("\r", " ").replace("\n", " ")
    if text == "" or any(c in text for c in ' "=\t'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


class Line(str):
    """A formatted line that still knows its event name and fields (for the journal)."""

    event: str
    fields: dict[str, Any]


def kv(event: str, /, **fields: Any) -> Line:
    """Format an event name and its fields as one line; ``None`` fields are left out."""
    parts = [event]
    kept: dict[str, Any] = {}
    for key, value in fields.items():
        if value is None:
            continue
        kept[key] = value
        parts.append(f"{key}={_quote(value)}")
    line = Line(" ".join(parts))
    line.event, line.fields = event, kept
    return line


# -- the journal's native protocol --------------------------------------------------

JOURNAL_SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "orchestratord"
# Field names that mean the same thing under another name in a log line.
FIELD_ALIASES = {"from": "TEAMMATE", "to": "RECIPIENT", "event": "EVENT_TYPE"}
MAX_DATAGRAM = 200_000


def journal_field(key: str) -> str:
    """``message_id`` -> ``ORCH_MESSAGE_ID``: upper case, letters, digits and underscores."""
    name = FIELD_ALIASES.get(key) or re.sub(r"[^A-Z0-9_]", "_", key.upper())
    return ("ORCH_" + name)[:64]


def journal_entry(fields: dict[str, Any]) -> bytes:
    """The native protocol's datagram: ``KEY=value`` lines, or a length-prefixed value with newlines."""
    out = bytearray()
    for key, value in fields.items():
        data = str(value).encode("utf-8", "replace")
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


class JournalHandler(logging.Handler):
    """Sends each record to journald as a structured entry; falls back to a stderr line."""

    def __init__(self, path: str | None = None, fallback: TextIO | None = None) -> None:
        super().__init__()
        self.path = path or os.environ.get("ORCHESTRATORD_JOURNAL_SOCKET") or JOURNAL_SOCKET
        self.fallback = fallback or sys.stderr
        self.lines = LineFormatter(journal=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.failed = False
        self._lock_send = threading.Lock()

    def fields(self, record: logging.LogRecord) -> dict[str, Any]:
        message = record.getMessage().replace("\n", " ")
        if record.exc_info:
            exc = record.exc_info[1]
            message += " " + kv("", exception=f"{type(exc).__name__}: {exc}").strip()
        out: dict[str, Any] = {"MESSAGE": message, "PRIORITY": priority(record.levelno),
                               "SYSLOG_IDENTIFIER": IDENTIFIER, "ORCH_THREAD": record.threadName or "",
                               "CODE_FUNC": record.funcName, "CODE_LINE": record.lineno}
        msg = record.msg
        if isinstance(msg, Line):
            out["ORCH_EVENT"] = msg.event
            for key, value in msg.fields.items():
                out.setdefault(journal_field(key), value)
        return out

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = journal_entry(self.fields(record))
            if len(data) > MAX_DATAGRAM:
                raise OSError("entry too large for one datagram")
            with self._lock_send:
                self.sock.sendto(data, self.path)
            self.failed = False
        except OSError as exc:
            try:
                if not self.failed:
                    self.failed = True
                    self.fallback.write(f"<4>journal-send-failed socket={self.path} error=\"{exc}\" "
                                        "action=\"writing lines to stderr\"\n")
                self.fallback.write(self.lines.format(record) + "\n")
                self.fallback.flush()
            except Exception:  # noqa: BLE001 - logging must never raise
                self.handleError(record)
        except Exception:  # noqa: BLE001
            self.handleError(record)

    def close(self) -> None:
        self.sock.close()
        super().close()


class LineFormatter(logging.Formatter):
    """Priority prefix for the journal, or a timestamp and level for a terminal."""

    def __init__(self, journal: bool) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage().replace("\n", " ")
        thread = record.threadName or ""
        if record.exc_info:
            exc = record.exc_info[1]
            message += " " + kv("", exception=f"{type(exc).__name__}: {exc}").strip()
        if self.journal:
            return f"<{priority(record.levelno)}>{message} thread={thread}"
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        millis = int(record.msecs)
        return f"{stamp}.{millis:03d} {record.levelname:<7} {message} thread={thread}"


def under_journal() -> bool:
    """True when stderr is connected to the journal (systemd sets JOURNAL_STREAM)."""
    stream = os.environ.get("JOURNAL_STREAM")
    if not stream:
        return False
    try:
        dev, ino = (int(x) for x in stream.split(":", 1))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return st.st_dev == dev and st.st_ino == ino


def setup(level: str = "info", stream: TextIO | None = None, journal: bool | None = None) -> logging.Logger:
    """Configure the package logger once; later calls only change the level."""
    logger = logging.getLogger(ROOT)
    logger.setLevel(LEVELS.get(level, logging.INFO))
    logger.propagate = False
    if not logger.handlers:
        to_journal = under_journal() if journal is None else journal
        handler: logging.Handler
        if to_journal and stream is None and os.environ.get("ORCHESTRATORD_JOURNAL", "native") == "native":
            handler = JournalHandler()
        else:
            handler = logging.StreamHandler(stream or sys.stderr)
            handler.setFormatter(LineFormatter(to_journal))
        logger.addHandler(handler)
    return logger


def set_level(level: str) -> None:
    """Apply a new log level at once (config reload)."""
    logging.getLogger(ROOT).setLevel(LEVELS.get(level, logging.INFO))


def get(name: str) -> logging.Logger:
    """A child logger of the package logger."""
    return logging.getLogger(f"{ROOT}.{name}")
