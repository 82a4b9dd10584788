"""A misbehaving stand-in for opencode serve, for failure cases the real one won't produce.

It answers the few routes the daemon uses and lets a test decide what the health route
returns and what the event stream sends: scripted frames (malformed, oversized, split),
nothing at all after accepting the connection, or the end of the stream right after its
first event.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class JsonHandler(BaseHTTPRequestHandler):
    """HTTP/1.1, quiet, with a JSON answer helper: the base of the stand-in servers."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def _json(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class FakeOpencode:
    def __init__(self) -> None:
        self.health_status = 200
        self.version = "1.18.33"  # what /global/health reports
        self.session_post_status = 200  # 405 as opencode 2.x answers POST /session (its API is under /api)
        self.require_auth: str | None = None  # "Basic ..." header value when set
        self.stream_mode = "frames"  # "frames" | "silent" | "no-headers" | "drop" (connected, then closed)
        self.heartbeat_every: float | None = None
        self.frames: "queue.Queue[bytes | None]" = queue.Queue()
        self.requests: list[tuple[str, str]] = []
        self.stream_connects = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        fake = self

        class Handler(JsonHandler):
            def _authorized(self) -> bool:
                if fake.require_auth and self.headers.get("Authorization") != fake.require_auth:
                    self._json(401, {"error": "unauthorized"})
                    return False
                return True

            def do_GET(self) -> None:  # noqa: N802
                with fake._lock:
                    fake.requests.append(("GET", self.path))
                if not self._authorized():
                    return
                if self.path == "/global/health":
                    if fake.health_status == 200:
                        self._json(200, {"healthy": True, "version": fake.version})
                    else:
                        self._json(fake.health_status, {"error": "boom"})
                elif self.path.startswith("/global/event") or self.path.startswith("/event"):
                    self._stream()
                elif self.path == "/session/status":
                    self._json(200, {})
                elif self.path.startswith("/session/"):
                    self._json(200, {"id": self.path.split("/")[2], "title": "x"})
                elif self.path == "/permission":
                    self._json(200, [])
                else:
                    self._json(404, {"error": "not found"})

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                with fake._lock:
                    fake.requests.append(("POST", self.path))
                if not self._authorized():
                    return
                if self.path == "/session" and fake.session_post_status != 200:
                    self._json(fake.session_post_status, {"error": "method not allowed"})
                elif self.path == "/session":
                    self._json(200, {"id": "ses_fake000000000000000000000", "title": "orchestrator"})
                elif self.path == "/sync/history":
                    self._json(200, [])
                else:
                    self.send_response(204)
                    self.send_header("Content-Length", "0")
                    self.end_headers()

            def _stream(self) -> None:
                with fake._lock:
                    fake.stream_connects += 1
                while fake.stream_mode == "no-headers" and not fake._stop.is_set():
                    fake._stop.wait(0.05)  # a server still starting: accepts, says nothing
                if fake._stop.is_set():
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                try:
                    if fake.stream_mode == "silent":
                        fake._stop.wait()
                        return
                    self._chunk(b'data: {"payload":{"id":"evt_0","type":"server.connected","properties":{}}}\n\n')
                    last = time.monotonic()
                    while fake.stream_mode != "drop" and not fake._stop.is_set():
                        try:
                            item = fake.frames.get(timeout=0.2)
                        except queue.Empty:
                            if fake.heartbeat_every and time.monotonic() - last >= fake.heartbeat_every:
                                last = time.monotonic()
                                self._chunk(b'data: {"payload":{"type":"server.heartbeat","properties":{}}}\n\n')
                            continue
                        if item is None:  # close this stream
                            break
                        self._chunk(item)
                    self.wfile.write(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _chunk(self, data: bytes) -> None:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> "FakeOpencode":
        self.thread.start()
        return self

    def send(self, data: bytes) -> None:
        self.frames.put(data)

    def send_event(self, event: dict[str, Any]) -> None:
        self.send(b"data: " + json.dumps({"directory": "/srv", "payload": event}).encode() + b"\n\n")

    def stop(self) -> None:
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
