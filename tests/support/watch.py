"""A test's own reader of the server's event stream, timing what the daemon does from outside.

It stamps each event with the monotonic time it arrived, so a test can say how long the
daemon took from a ``permission.asked`` to its ``permission.replied`` as the server saw
them. Figures gathered this way are reported at the end of the run (``BROKER_LATENCY``),
never asserted: speed goals belong to ``make bench``.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any, Callable

import requests

#: seconds from permission.asked to permission.replied, for every request a test timed
BROKER_LATENCY: list[float] = []


class EventWatch:
    """Reads ``/global/event`` on a thread of its own; ``stop()`` ends it."""

    def __init__(self, url: str, auth: tuple[str, str] | None = None) -> None:
        self.url = url.rstrip("/")
        self.events: list[tuple[float, str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._seen = threading.Condition(self._lock)
        self._http = requests.Session()
        if auth:
            self._http.auth = auth
        self._resp: requests.Response | None = None
        self._stop = threading.Event()
        self.connected = threading.Event()
        self._thread = threading.Thread(target=self._run, name="event-watch", daemon=True)
        self._thread.start()
        if not self.connected.wait(15):
            raise AssertionError(f"could not read {self.url}/global/event")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with self._http.get(f"{self.url}/global/event", stream=True, timeout=(5, 30)) as resp:
                    self._resp = resp
                    for line in resp.iter_lines():
                        if self._stop.is_set():
                            return
                        if not line.startswith(b"data:"):
                            continue
                        payload = json.loads(line[5:]).get("payload", {})
                        etype = payload.get("type")
                        if etype == "server.connected":
                            self.connected.set()
                        with self._seen:
                            self.events.append((time.monotonic(), str(etype), payload.get("properties") or {}))
                            self._seen.notify_all()
            except (requests.RequestException, ValueError, AttributeError):
                if self._stop.wait(0.2):
                    return

    def find(self, etype: str, match: Callable[[dict[str, Any]], bool] = lambda p: True) -> list[tuple[float, dict[str, Any]]]:
        with self._lock:
            return [(t, p) for t, e, p in self.events if e == etype and match(p)]

    def wait(self, etype: str, match: Callable[[dict[str, Any]], bool] = lambda p: True,
             timeout: float = 30.0) -> tuple[float, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        with self._seen:
            while True:
                for t, e, p in self.events:
                    if e == etype and match(p):
                        return t, p
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {etype} event within {timeout:g}s")
                self._seen.wait(left)

    def decision_seconds(self, request_id: str, timeout: float = 30.0) -> float:
        """From the server's permission.asked to its permission.replied for ``request_id``; kept for the report."""
        asked, _ = self.wait("permission.asked", lambda p: p.get("id") == request_id, timeout)
        replied, _ = self.wait("permission.replied", lambda p: p.get("requestID") == request_id, timeout)
        BROKER_LATENCY.append(replied - asked)
        return replied - asked

    def stop(self) -> None:
        self._stop.set()
        resp = self._resp
        if resp is not None:
            sock = getattr(getattr(resp.raw, "connection", None), "sock", None)
            try:
                if sock is not None:
                    sock.shutdown(socket.SHUT_RDWR)  # wakes the reading thread; close() alone does not
                resp.close()
            except OSError:
                pass
        self._thread.join(5)
