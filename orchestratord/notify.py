"""systemd notification (READY, STATUS, RELOADING, STOPPING, WATCHDOG) over sdnotify.

The ``sdnotify`` package swallows every error unless told not to, so it runs with
``debug=True`` here and this wrapper decides: without ``NOTIFY_SOCKET`` everything is a
no-op; a failed send is logged once (not once per watchdog tick), the socket is
reopened on the next send, and the state messages that failed are sent again then, so
systemd never misses READY or STOPPING because of one bad moment.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable

import sdnotify

from . import logs

log = logs.get("notify")


class Notifier:
    """Thread-safe sd_notify sender; a no-op when the service manager gave no socket."""

    def __init__(self, socket_path: str | None = None, factory: Callable[[], sdnotify.SystemdNotifier] | None = None) -> None:
        self.socket_path = socket_path if socket_path is not None else os.environ.get("NOTIFY_SOCKET")
        self._factory = factory or (lambda: sdnotify.SystemdNotifier(debug=True))
        self._client: sdnotify.SystemdNotifier | None = None
        self._lock = threading.Lock()
        self._failing = False
        self._unsent: list[str] = []
        self.sent: list[str] = []  # kept short; tests and `status` read the last few

    @property
    def enabled(self) -> bool:
        return bool(self.socket_path)

    def _send(self, message: str, keep_on_failure: bool) -> bool:
        if not self.enabled:
            return False
        with self._lock:
            pending = self._unsent + [message]
            try:
                if self._client is None:
                    old = os.environ.get("NOTIFY_SOCKET")
                    os.environ["NOTIFY_SOCKET"] = self.socket_path or ""
                    try:
                        self._client = self._factory()
                    finally:
                        if old is None:
                            os.environ.pop("NOTIFY_SOCKET", None)
                        else:
                            os.environ["NOTIFY_SOCKET"] = old
                while pending:
                    self._client.notify(pending[0])
                    self.sent.append(pending.pop(0))
                del self.sent[:-50]
                self._unsent = []
                if self._failing:
                    log.info(logs.kv("notify-recovered", socket=self.socket_path))
                    self._failing = False
                return True
            except Exception as exc:  # the transport failed; keep state messages for later
                self._client = None
                self._unsent = [m for m in pending if keep_on_failure or m != message][-20:]
                if not self._failing:
                    log.error(logs.kv("notify-failed", socket=self.socket_path, message=message.split("\n")[0],
                                      error=str(exc), fix="check NOTIFY_SOCKET and the unit's NotifyAccess="))
                    self._failing = True
                return False

    def ready(self, status: str | None = None) -> bool:
        msg = "READY=1" + (f"\nSTATUS={status}" if status else "")
        return self._send(msg, keep_on_failure=True)

    def reloading(self) -> bool:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self._send(f"RELOADING=1\nMONOTONIC_USEC={usec}", keep_on_failure=True)

    def stopping(self) -> bool:
        return self._send("STOPPING=1", keep_on_failure=True)

    def status(self, text: str) -> bool:
        return self._send(f"STATUS={text}", keep_on_failure=False)

    def watchdog(self) -> bool:
        return self._send("WATCHDOG=1", keep_on_failure=False)


def watchdog_interval(environ: dict[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when off."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2_000_000 if value > 0 else None
