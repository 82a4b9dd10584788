"""A scripted OpenAI-compatible chat-completions server for opencode to talk to.

Tests decide what "the model" answers: text, one or more tool calls, a slow stream, an
HTTP 500, or a hang until released. Replies are chosen by rules on the request (so
several sessions can be scripted at once) or taken from a FIFO queue; title-generation
requests are answered on their own. Every request body is kept for assertions.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Union

MODEL_ID = "scripted-model"


@dataclass
class Reply:
    """One answer of the model."""

    kind: str  # text | tools | error | hang | stall
    content: str = ""
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    delay: float = 0.0  # between chunks
    status: int = 500
    until: threading.Event | None = None
    then: "Reply | None" = None  # what a hang answers once released

    @staticmethod
    def text(content: str, delay: float = 0.0) -> "Reply":
        return Reply("text", content=content, delay=delay)

    @staticmethod
    def tool_call(name: str, args: dict[str, Any]) -> "Reply":
        return Reply("tools", calls=[(name, args)])

    @staticmethod
    def tool_calls(calls: list[tuple[str, dict[str, Any]]]) -> "Reply":
        return Reply("tools", calls=list(calls))

    @staticmethod
    def slow(text: str, delay: float) -> "Reply":
        return Reply("text", content=text, delay=delay)

    @staticmethod
    def error(status: int = 500, message: str = "scripted failure") -> "Reply":
        return Reply("error", status=status, content=message)

    @staticmethod
    def stall(start: str, until: threading.Event) -> "Reply":
        """Stream the words of ``start``, then go silent (connection open) until ``until`` is set."""
        return Reply("stall", content=start, until=until)

    @staticmethod
    def hang(until: threading.Event, then: "Reply | None" = None) -> "Reply":
        """Answer nothing until ``until`` is set, then ``then`` (default: text "released")."""
        return Reply("hang", until=until, then=then)

Answer = Union[Reply, Callable[[dict[str, Any]], Reply]]
Predicate = Callable[[dict[str, Any]], bool]


def flat_text(req: dict[str, Any]) -> str:
    """All message content of a request as one string."""
    parts: list[str] = []
    for m in req.get("messages", []):
        content = m.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(c.get("text", "") for c in content if isinstance(c, dict))
    return "\n".join(parts)


def last_user_text(req: dict[str, Any]) -> str:
    """The text of the request's last user message (``flat_text`` sees the whole history)."""
    for m in reversed(req.get("messages", [])):
        if m.get("role") == "user":
            content = m.get("content")
            if isinstance(content, list):
                return "\n".join(c.get("text", "") for c in content if isinstance(c, dict))
            return str(content or "")
    return ""


def last_is_tool_result(req: dict[str, Any]) -> bool:
    """True for opencode's follow-up call that carries a tool's result."""
    msgs = req.get("messages") or []
    return bool(msgs) and msgs[-1].get("role") == "tool"


def is_title_request(req: dict[str, Any]) -> bool:
    """opencode asks for a session title with a system prompt of its own and no tools."""
    system = " ".join(str(m.get("content", "")) for m in req.get("messages", []) if m.get("role") == "system")
    return "title" in system.lower() and not req.get("tools")


class ScriptedModel:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.queue: list[Reply] = []
        self.rules: list[tuple[Predicate, Answer]] = []
        self.default = Reply.text("ok")
        self._lock = threading.Lock()
        self._seen = threading.Condition(self._lock)
        self._ids = itertools.count(1)
        self._release = threading.Event()  # set on close: frees every hang
        handler = self._handler()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), name="scripted-model",
                                        daemon=True)
        self._thread.start()

    # -- scripting ----------------------------------------------------------------

    def enqueue(self, *replies: Reply) -> None:
        with self._lock:
            self.queue.extend(replies)

    def add_rule(self, predicate: Predicate, answer: Answer, first: bool = False) -> None:
        """First matching rule wins; rules are tried before the queue. ``first`` puts it before the others."""
        with self._lock:
            if first:
                self.rules.insert(0, (predicate, answer))
            else:
                self.rules.append((predicate, answer))

    def script(self, marker: str, first: Answer, then: Answer) -> None:
        """For requests mentioning ``marker``: answer ``first``; once a tool result is back, ``then``.

        The usual two-step turn: a tool call, then (opencode calls the model again with the
        tool's result as the last message) the closing text.
        """
        self.add_rule(lambda r: marker in flat_text(r) and not last_is_tool_result(r), first)
        self.add_rule(lambda r: marker in flat_text(r) and last_is_tool_result(r), then)

    def script_tool_then_text(self, name: str, args: dict[str, Any], text: str = "done",
                              marker: str | None = None) -> None:
        """A tool call, then ``text`` once its result is back.

        With ``marker``: by rule, for requests mentioning it (several sessions at once).
        Without: the two replies go on the FIFO queue, for the next turn of any session.
        """
        if marker is None:
            self.enqueue(Reply.tool_call(name, args), Reply.text(text))
        else:
            self.script(marker, Reply.tool_call(name, args), Reply.text(text))

    def reset(self) -> None:
        """Forget rules, queue and default answer (not the requests seen): for a shared model."""
        with self._lock:
            self.rules.clear()
            self.queue.clear()
            self.default = Reply.text("ok")

    def chat_requests(self) -> list[dict[str, Any]]:
        """Requests other than title generation."""
        with self._lock:
            return [r for r in self.requests if not is_title_request(r)]

    def wait_for_request(self, predicate: Predicate, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._seen:
            while True:
                for r in self.requests:
                    if predicate(r):
                        return r
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"the model got no matching request within {timeout:g}s "
                                         f"({len(self.requests)} requests)")
                self._seen.wait(left)

    def _choose(self, req: dict[str, Any]) -> Reply:
        with self._seen:
            self.requests.append(req)
            self._seen.notify_all()
            if is_title_request(req):
                return Reply.text("Scripted session")
            for predicate, answer in self.rules:  # noqa: B007 - the rule that hits is answered below
                try:
                    hit = predicate(req)
                except Exception:  # a sloppy predicate must not kill the server
                    hit = False
                if hit:
                    break
            else:
                answer = self.queue.pop(0) if self.queue else self.default
                return answer  # type: ignore[return-value]
        return answer(req) if callable(answer) else answer

    def close(self) -> None:
        self._release.set()
        self.server.shutdown()
        self.server.server_close()

    # -- HTTP -----------------------------------------------------------------------

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        model = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if self.path.rstrip("/").endswith("/models"):
                    self._json(200, {"object": "list", "data": [{"id": MODEL_ID, "object": "model", "owned_by": "tests"}]})
                else:
                    self._json(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                try:
                    req = json.loads(self.rfile.read(length) or b"{}")
                except ValueError:
                    self._json(400, {"error": {"message": "bad json"}})
                    return
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._json(404, {"error": {"message": "not found"}})
                    return
                reply = model._choose(req)
                if reply.kind == "hang":
                    assert reply.until is not None
                    while not reply.until.wait(0.1):
                        if model._release.is_set():
                            break
                    if model._release.is_set():
                        self.close_connection = True
                        return
                    reply = reply.then or Reply.text("released")
                if reply.kind == "error":
                    self._json(reply.status, {"error": {"message": reply.content, "type": "server_error"}})
                    return
                if req.get("stream"):
                    self._stream(reply)
                else:
                    self._json(200, model._completion(reply))

            def _json(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _stream(self, reply: Reply) -> None:
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("cache-control", "no-cache")
                self.send_header("connection", "close")
                self.end_headers()
                self.close_connection = True
                try:
                    chunks = model._chunks(reply)
                    if reply.kind == "stall":
                        chunks = chunks[:-1]  # never the finishing chunk
                    for chunk in chunks:
                        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                        self.wfile.flush()
                        if reply.delay:
                            time.sleep(reply.delay)
                    if reply.kind == "stall":
                        assert reply.until is not None
                        while not reply.until.wait(0.1) and not model._release.is_set():
                            pass
                        return
                    self.wfile.write(b"data: [DONE]\n\n")
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass

        return Handler

    def _completion(self, reply: Reply) -> dict[str, Any]:
        cid = f"chatcmpl-{next(self._ids)}"
        message: dict[str, Any] = {"role": "assistant", "content": reply.content or None}
        finish = "stop"
        if reply.kind == "tools":
            message["tool_calls"] = [{"id": f"call_{cid}_{i}", "type": "function",
                                      "function": {"name": n, "arguments": json.dumps(a)}}
                                     for i, (n, a) in enumerate(reply.calls)]
            finish = "tool_calls"
        return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": MODEL_ID,
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}

    def _chunks(self, reply: Reply) -> list[dict[str, Any]]:
        cid = f"chatcmpl-{next(self._ids)}"

        def chunk(delta: dict[str, Any], finish: str | None = None, usage: bool = False) -> dict[str, Any]:
            c: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
                                 "model": MODEL_ID, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            if usage:
                c["usage"] = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
            return c

        out = [chunk({"role": "assistant", "content": ""})]
        if reply.kind == "tools":
            for i, (name, args) in enumerate(reply.calls):
                out.append(chunk({"tool_calls": [{"index": i, "id": f"call_{cid}_{i}", "type": "function",
                                                  "function": {"name": name, "arguments": ""}}]}))
                out.append(chunk({"tool_calls": [{"index": i, "function": {"arguments": json.dumps(args)}}]}))
            out.append(chunk({}, "tool_calls", usage=True))
        else:
            words = reply.content.split(" ")
            for i, w in enumerate(words):
                out.append(chunk({"content": w if i == 0 else " " + w}))
            out.append(chunk({}, "stop", usage=True))
        return out
