"""One log line per event, ``key=value`` fields, journald priority prefixes under systemd.

Lines look like ``server-down url=http://127.0.0.1:4096 error="connection refused"``.
Under systemd (``JOURNAL_STREAM`` set) each line starts with the sd-daemon priority
prefix (``<4>``) so ``journalctl -p warning`` filters; elsewhere it starts with a
timestamp and the level name.
"""

from __future__ import annotations

import logging
import os
import sys
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


def kv(event: str, /, **fields: Any) -> str:
    """Format an event name and its fields as one line; ``None`` fields are left out."""
    parts = [event]
    for key, value in fields.items():
        if value is None:
            continue
        parts.append(f"{key}={_quote(value)}")
    return " ".join(parts)


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
        handler = logging.StreamHandler(stream or sys.stderr)
        handler.setFormatter(LineFormatter(under_journal() if journal is None else journal))
        logger.addHandler(handler)
    return logger


def set_level(level: str) -> None:
    """Apply a new log level at once (config reload)."""
    logging.getLogger(ROOT).setLevel(LEVELS.get(level, logging.INFO))


def get(name: str) -> logging.Logger:
    """A child logger of the package logger."""
    return logging.getLogger(f"{ROOT}.{name}")
