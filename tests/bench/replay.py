"""A stand-in for opencode serve that replays recorded events as fast as the client reads.

The event stream is chunked, one event per chunk, as opencode's is. It sends
``server.connected`` and then each queued file (events already in chunked framing, see
:mod:`.corpus`) with ``socket.sendfile``: the kernel copies it and the server's thread
holds no GIL meanwhile, so it takes nothing from a reader in the same process. ``None``
in the queue ends the stream. The few other routes the daemon uses answer like an idle server; prompts
are accepted and answered at once as completed turns.
"""

from __future__ import annotations

import json
import queue
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.support.fakeserver import JsonHandler

from .corpus import chunk

CONNECTED = b'data: {"payload":{"id":"evt_000000000000bench000000000","type":"server.connected","properties":{}}}\n\n'
HEARTBEAT = b'data: {"payload":{"id":"evt_000000000000bench000000001","type":"server.heartbeat","properties":{}}}\n\n'
SESSION = "ses_bench0000000000000000000000"
_MESSAGES = re.compile(r"^/session/([^/]+)/message$")


class ReplayServer:
    def __init__(self, heartbeat_seconds: float = 10.0) -> None:
        self.heartbeat_seconds = heartbeat_seconds  # a heartbeat after this long with nothing queued
        self.feed: "queue.Queue[Path | None]" = queue.Queue()
        self.sent_files = 0  # files fully handed to the kernel
        self.prompts: dict[str, list[str]] = {}  # session -> messageIDs posted
        self.stream_connects = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.1,), name="replay", daemon=True)

    def __enter__(self) -> "ReplayServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        self.feed.put(None)
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        replay = self

        class Handler(JsonHandler):
            def do_GET(self) -> None:  # noqa: N802
                path = self.path.split("?", 1)[0]
                if path == "/global/health":
                    self._json(200, {"healthy": True, "version": "replay"})
                elif path in ("/global/event", "/event"):
                    self._stream()
                elif path == "/session/status":
                    self._json(200, {})
                elif path == "/permission":
                    self._json(200, [])
                elif (m := _MESSAGES.match(path)) is not None:
                    with replay._lock:
                        posted = list(replay.prompts.get(m.group(1), []))
                    now = int(time.time() * 1000)
                    self._json(200, [{"info": {"id": f"msg_reply{i}", "role": "assistant", "parentID": mid,
                                               "time": {"created": now, "completed": now}, "finish": "stop"},
                                      "parts": [{"type": "text", "text": "ok"}]} for i, mid in enumerate(posted)])
                elif path.startswith("/session/"):
                    self._json(200, {"id": path.split("/")[2], "title": "teammate"})
                else:
                    self._json(404, {"error": "not found"})

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                path = self.path.split("?", 1)[0]
                if path == "/session":
                    self._json(200, {"id": SESSION, "title": "orchestrator"})
                elif path == "/sync/history":
                    self._json(200, [])
                elif path.endswith("/prompt_async"):
                    mid = json.loads(body or b"{}").get("messageID", "")
                    with replay._lock:
                        replay.prompts.setdefault(path.split("/")[2], []).append(mid)
                    self.send_response(204)
                    self.end_headers()
                else:
                    self._json(404, {"error": "not found"})

            def _stream(self) -> None:
                with replay._lock:
                    replay.stream_connects += 1
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                self.close_connection = True
                try:
                    self.wfile.write(chunk(CONNECTED))
                    self.wfile.flush()
                    while not replay._stop.is_set():
                        try:
                            item = replay.feed.get(timeout=replay.heartbeat_seconds)
                        except queue.Empty:
                            self.wfile.write(chunk(HEARTBEAT))
                            self.wfile.flush()
                            continue
                        if item is None:
                            self.wfile.write(b"0\r\n\r\n")
                            self.wfile.flush()
                            break
                        with open(item, "rb") as fh:
                            self.request.sendfile(fh)
                        with replay._lock:
                            replay.sent_files += 1
                except (BrokenPipeError, ConnectionResetError):
                    pass

        return Handler
