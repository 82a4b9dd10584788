"""A TCP proxy on loopback between the daemon and the real server, told what to break.

The daemon's ``server.url`` points at the proxy, so its health probes, its event stream
and its prompts all pass through it. ``set()`` switches the fault:

- ``pass``: bytes go through untouched;
- ``latency``: every chunk from the server is held ``seconds`` before it goes on;
- ``hang``: connections are accepted and then never answered;
- ``cut``: each open connection is cut in the middle of the next chunk the server sends
  (mid-event on the stream); ``now=True`` cuts them all at once;
- ``slice``: the server's bytes go on one byte per write;
- ``truncate``: each response is cut off after ``bytes`` bytes;
- ``status``: requests get ``code`` (500, 502, 503) from the proxy itself;
- ``refuse``: the listening socket is closed, so connections are refused.

Switching to ``hang``, ``truncate``, ``status`` or ``refuse`` drops the open connections, so that
pooled keep-alive connections meet the fault too. ``clear()`` goes back to ``pass``, closing
connections that were left hanging (a server that recovers drops what it had stuck) and
listening again after ``refuse``.

The proxy reads the HTTP requests it relays, enough to see each ``POST
/session/:id/prompt_async``: ``posts`` counts the ones that reached the server per
``messageID``, ``answered`` those the server answered 2xx. opencode merges a second POST
of an ID it already has, so only here is a duplicate POST seen. ``replies`` holds when
each ``POST /permission/:id/reply`` came through (the broker's answer, timed on its way to
the server). ``on_prompt_answered`` is
called with the ID and the status before that answer goes on to the daemon (a test can
kill the server there: after the 204, before the prompt is stored).
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

KINDS = ("pass", "latency", "hang", "cut", "slice", "truncate", "status", "refuse")
REASONS = {500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}
PROMPT_POST = re.compile(rb"POST /session/[^/ ?]+/prompt_async[ ?]")
PERMISSION_REPLY = re.compile(rb"POST /permission/([^/ ?]+)/reply[ ?]")
CONTENT_LENGTH = re.compile(rb"^content-length:\s*(\d+)\s*$", re.I | re.M)
CHUNKED = re.compile(rb"^transfer-encoding:.*chunked", re.I | re.M)


@dataclass(frozen=True)
class Fault:
    kind: str = "pass"
    seconds: float = 0.5  # latency
    bytes: int = 64  # truncate
    code: int = 503  # status
    extra: dict[str, Any] = field(default_factory=dict)


class _Conn:
    """One client connection and, unless it is answered by the proxy, its upstream."""

    def __init__(self, client: socket.socket) -> None:
        self.client = client
        self.upstream: socket.socket | None = None
        self.cut_next = False
        self.closed = threading.Event()
        self.requests = b""  # what the client sent that is not yet a whole request
        self.readable = True  # false once a request is not one the proxy can follow
        self.awaiting: str | None = None  # the messageID of a prompt POST whose answer is due

    def close(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for s in (self.client, self.upstream):
            if s is None:
                continue
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


class FaultProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.fault = Fault()
        self.lock = threading.Lock()
        self.conns: set[_Conn] = set()
        self.accepted = 0
        self.posts: Counter[str] = Counter()
        self.answered: Counter[str] = Counter()
        self.replies: dict[str, float] = {}  # permission request -> monotonic time its reply came through
        self.on_prompt_answered: Callable[[str, int], None] | None = None
        self.listener: socket.socket | None = None
        self.port = 0
        self._stopped = threading.Event()
        self._accept_thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- control ---------------------------------------------------------------------------

    def start(self) -> "FaultProxy":
        self._listen()
        return self

    def set(self, kind: str, now: bool = False, **opts: Any) -> None:
        """Switch to fault ``kind`` (see the module docstring for the options)."""
        if kind not in KINDS:
            raise ValueError(f"unknown fault {kind!r}; one of {', '.join(KINDS)}")
        with self.lock:
            previous = self.fault
            self.fault = Fault(kind, **opts)
            conns = list(self.conns)
        # Connections already open (pooled keep-alive ones included) would dodge a fault
        # meant for every request: they are dropped, so the client reconnects into it.
        if kind in ("hang", "status", "truncate", "refuse") or (kind == "cut" and now):
            for c in conns:
                c.close()
        elif kind == "cut":
            for c in conns:
                c.cut_next = True
        if kind == "refuse":
            self._unlisten()
        elif previous.kind == "refuse":
            self._listen()
        if previous.kind == "hang" and kind != "hang":
            for c in conns:
                if c.upstream is None:
                    c.close()

    def clear(self) -> None:
        self.set("pass")

    def stop(self) -> None:
        self._stopped.set()
        self._unlisten()
        with self.lock:
            conns = list(self.conns)
        for c in conns:
            c.close()
        if self._accept_thread is not None:
            self._accept_thread.join(5)

    # -- listening ---------------------------------------------------------------------------

    def _listen(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        self.port = s.getsockname()[1]
        self.listener = s
        self._accept_thread = threading.Thread(target=self._accept, args=(s,), daemon=True, name="faultproxy")
        self._accept_thread.start()

    def _unlisten(self) -> None:
        s, self.listener = self.listener, None
        if s is not None:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        if self._accept_thread is not None and self._accept_thread is not threading.current_thread():
            self._accept_thread.join(5)

    def _accept(self, listener: socket.socket) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed: refuse or stop
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(client)
            with self.lock:
                self.conns.add(conn)
                self.accepted += 1
                fault = self.fault
            threading.Thread(target=self._serve, args=(conn, fault), daemon=True, name="faultproxy-conn").start()

    # -- one connection ------------------------------------------------------------------------

    def _serve(self, conn: _Conn, fault: Fault) -> None:
        try:
            if fault.kind == "status":
                self._answer(conn, fault.code)
            elif fault.kind == "hang":
                conn.closed.wait()
            else:
                self._relay(conn, fault)
        finally:
            conn.close()
            with self.lock:
                self.conns.discard(conn)

    def _answer(self, conn: _Conn, code: int) -> None:
        """Read the request head, answer ``code`` and close, as a failing gateway would."""
        conn.client.settimeout(5)
        head = b""
        try:
            while b"\r\n\r\n" not in head and len(head) < 65536:
                chunk = conn.client.recv(4096)
                if not chunk:
                    return
                head += chunk
            body = f"fault proxy: {code}\n".encode()
            conn.client.sendall(f"HTTP/1.1 {code} {REASONS.get(code, 'Error')}\r\nContent-Type: text/plain\r\n"
                                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        except OSError:
            pass

    def _relay(self, conn: _Conn, fault: Fault) -> None:
        try:
            conn.upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
        except OSError:
            return  # the server is down: the client sees the connection close
        conn.upstream.settimeout(None)
        conn.upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        up = threading.Thread(target=self._client_to_server, args=(conn,), daemon=True, name="faultproxy-up")
        up.start()
        budget = fault.bytes if fault.kind == "truncate" else None
        while not conn.closed.is_set():
            try:
                chunk = conn.upstream.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            if conn.awaiting is not None:
                self._prompt_answer(conn, chunk)
            current = self.fault
            if current.kind == "latency":
                time.sleep(current.seconds)  # the fault itself: the server is slow
            if conn.cut_next:
                self._send(conn, chunk[: max(1, len(chunk) // 2)], current)
                break
            if budget is not None:
                chunk = chunk[:budget]
                budget -= len(chunk)
            if not self._send(conn, chunk, current) or budget == 0:
                break
        conn.close()
        up.join(5)

    def _send(self, conn: _Conn, data: bytes, fault: Fault) -> bool:
        try:
            if fault.kind == "slice":
                for i in range(len(data)):
                    conn.client.sendall(data[i:i + 1])
            else:
                conn.client.sendall(data)
            return True
        except OSError:
            return False

    def _client_to_server(self, conn: _Conn) -> None:
        assert conn.upstream is not None
        while not conn.closed.is_set():
            try:
                chunk = conn.client.recv(65536)
                if not chunk:
                    break
                if conn.readable:
                    self._read_requests(conn, chunk)
                conn.upstream.sendall(chunk)
            except OSError:
                break
        conn.close()

    # -- reading HTTP: the prompt POSTs ------------------------------------------------------

    def _read_requests(self, conn: _Conn, data: bytes) -> None:
        """Take whole requests off what the client sent; note each prompt POST before it goes on."""
        conn.requests += data
        while True:
            end = conn.requests.find(b"\r\n\r\n")
            if end < 0:
                if len(conn.requests) > 1 << 20:
                    conn.readable, conn.requests = False, b""
                return
            head = conn.requests[:end]
            if CHUNKED.search(head):
                conn.readable, conn.requests = False, b""  # the daemon sends none; not followed
                return
            m = CONTENT_LENGTH.search(head)
            total = end + 4 + (int(m.group(1)) if m else 0)
            if len(conn.requests) < total:
                return
            body, conn.requests = conn.requests[end + 4:total], conn.requests[total:]
            if (reply := PERMISSION_REPLY.match(head)) is not None:
                with self.lock:
                    self.replies.setdefault(reply.group(1).decode(), time.monotonic())
            if PROMPT_POST.match(head):
                try:
                    message_id = str(json.loads(body).get("messageID"))
                except (ValueError, AttributeError):
                    message_id = "?"
                with self.lock:
                    self.posts[message_id] += 1
                conn.awaiting = message_id

    def _prompt_answer(self, conn: _Conn, chunk: bytes) -> None:
        """The first bytes from the server after a prompt POST: its status line."""
        message_id, conn.awaiting = conn.awaiting, None
        m = re.match(rb"HTTP/1\.[01] (\d{3})", chunk)
        if m is None or message_id is None:
            return
        code = int(m.group(1))
        if 200 <= code < 300:
            with self.lock:
                self.answered[message_id] += 1
        hook = self.on_prompt_answered
        if hook is not None:
            hook(message_id, code)

    def duplicate_posts(self, resent: Counter[str] | None = None) -> dict[str, int]:
        """Message IDs the server answered 2xx more often than once (plus the re-sends the
        daemon announced for that ID, ``resent``): the number of extra POSTs of each."""
        resent = resent or Counter()
        with self.lock:
            return {mid: n - 1 - resent[mid] for mid, n in self.answered.items() if n - 1 - resent[mid] > 0}
