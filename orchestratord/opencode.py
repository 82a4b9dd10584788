"""The one HTTP client for ``opencode serve``: auth, timeouts, typed errors, typed answers.

Every request the daemon makes to the server goes through :class:`OpencodeClient`, so
auth (HTTP basic, the event stream included), timeouts and the mapping of failures to
a few exception types live in one place. What the daemon decides on in an answer (is
this reply finished, is this session busy) is defined once, here: :class:`Message` and
:class:`SessionStatus`.
"""

from __future__ import annotations

import os
import secrets
import string
import time
from dataclasses import dataclass
from typing import Any, Iterator

import requests

from . import __version__

USER_AGENT = f"orchestratord/{__version__}"
_BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase


class OpencodeError(Exception):
    """Any failure talking to the server."""


class Unreachable(OpencodeError):
    """Connection refused, reset or timed out: the server is down or not answering."""


class TimedOut(Unreachable):
    """No answer within the timeout: the server may be gone, or only busy."""


class AuthError(OpencodeError):
    """401/403: the credentials are missing or wrong."""


class NotFound(OpencodeError):
    """404 for a session, message or permission."""


class ServerError(OpencodeError):
    """Any other non-2xx answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


AUTH_HINT = ("set server.username and server.password_file (or LoadCredential=opencode-password) to the server's "
             "OPENCODE_SERVER_PASSWORD")


def new_message_id(clock_ms: float | None = None) -> str:
    """A fresh ``msg_`` ID in opencode's shape: 12 hex digits of time plus 14 random base62.

    Unique forever (time in ms, a random counter nibble and 14 random characters), so a
    prompt re-sent after a crash can carry the same ID and a new prompt never reuses one.
    """
    ms = int(clock_ms if clock_ms is not None else time.time() * 1000)
    value = (ms * 0x1000 + secrets.randbelow(0x1000)) & 0xFFFFFFFFFFFF
    tail = "".join(secrets.choice(_BASE62) for _ in range(14))
    return f"msg_{value:012x}{tail}"


@dataclass(frozen=True)
class Health:
    healthy: bool
    version: str | None


#: a reply that ended with one of these is a turn paused between steps (tool calls), not its end
PAUSED_FINISHES = ("tool-calls", "unknown")
#: the ``GET /session/status`` types of a session that is running a turn
BUSY_TYPES = ("busy", "retry")


@dataclass(frozen=True)
class SessionStatus:
    """One session's entry in ``GET /session/status`` (idle sessions are absent from it)."""

    type: str

    @property
    def busy(self) -> bool:
        return self.type in BUSY_TYPES

    @classmethod
    def of(cls, statuses: dict[str, Any], session_id: str) -> "SessionStatus":
        """The status of ``session_id`` in the map; absent means idle."""
        entry = statuses.get(session_id)
        if entry is None:
            return cls("idle")
        return cls(entry["type"] if isinstance(entry, dict) and isinstance(entry.get("type"), str) else "busy")

    @classmethod
    def busy_map(cls, statuses: dict[str, Any]) -> dict[str, str]:
        """sessionID -> type, of the sessions the map says are running a turn."""
        listed = {sid: cls.of(statuses, sid) for sid in statuses}
        return {sid: st.type for sid, st in listed.items() if st.busy}


@dataclass(frozen=True)
class Message:
    """One message of ``GET /session/:id/message``, typed where the daemon decides on it."""

    id: str | None
    role: str | None
    parent_id: str | None
    completed: bool  # ``time.completed`` is set
    finish: str | None
    error: str | None  # "Name: message" of ``info.error``
    parts: tuple[dict[str, Any], ...]

    @classmethod
    def from_api(cls, raw: Any) -> "Message | None":
        """None for anything without an ``info`` object."""
        info = raw.get("info") if isinstance(raw, dict) else None
        if not isinstance(info, dict):
            return None
        times = info.get("time")
        err = info.get("error")
        error = None
        if isinstance(err, dict):
            data = err.get("data")
            text = data.get("message", "") if isinstance(data, dict) else ""
            error = f"{err.get('name', 'error')}: {text}".strip(": ")
        parts = raw.get("parts")
        return cls(id=_str(info.get("id")), role=_str(info.get("role")), parent_id=_str(info.get("parentID")),
                   completed=isinstance(times, dict) and bool(times.get("completed")),
                   finish=_str(info.get("finish")), error=error,
                   parts=tuple(p for p in parts if isinstance(p, dict)) if isinstance(parts, list) else ())

    @property
    def finished(self) -> bool:
        """An assistant reply whose turn is over: completed, and not paused between tool steps.

        A reply that failed is over whatever its finish says. One prompt can give several
        replies (one per step): only the last one's ``finished`` says the turn ended.
        """
        return (self.role == "assistant" and self.completed
                and (self.finish not in PAUSED_FINISHES or self.error is not None))


def messages_of(raw: list[Any]) -> list[Message]:
    """The messages of a ``GET /session/:id/message`` answer, skipping what is not one."""
    return [m for m in map(Message.from_api, raw) if m is not None]


def last_finished(raw: list[Any]) -> bool:
    """Whether the newest message is an assistant reply whose turn is over."""
    found = messages_of(raw[-1:])
    return bool(found) and found[0].finished


#: the opencode serve generations whose API this daemon speaks (2.x moved it under /api/…
#: and changed the event envelope; /global/health still answers there, with a version)
SUPPORTED_MAJORS = (1,)
SUPPORTED_RANGE = "1.x (tested: 1.18.3 to 1.18.33)"


def unsupported(version: str | None) -> bool:
    """Whether ``version`` names a generation this daemon cannot drive. An absent or
    unreadable version is given the benefit of the doubt: the routes themselves will tell."""
    head = (version or "").strip().lstrip("v").split(".", 1)[0]
    return head.isdigit() and int(head) not in SUPPORTED_MAJORS


def read_password(password_file: str | None, environ: dict[str, str] | None = None) -> str | None:
    """The server password from ``password_file`` or systemd's ``$CREDENTIALS_DIRECTORY``.

    Raises ``OSError`` with the path when a named file cannot be read.
    """
    env = os.environ if environ is None else environ
    if password_file:
        with open(password_file, encoding="utf-8") as fh:
            return fh.read().strip("\r\n")
    creds = env.get("CREDENTIALS_DIRECTORY")
    if creds:
        path = os.path.join(creds, "opencode-password")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as fh:
                return fh.read().strip("\r\n")
    return None


class OpencodeClient:
    """Thin typed wrapper over the routes the daemon uses; one per thread."""

    def __init__(self, base_url: str, username: str = "opencode", password: str | None = None,
                 timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.http = requests.Session()
        self.http.headers["User-Agent"] = USER_AGENT
        if password is not None:
            self.http.auth = (username, password)

    def close(self) -> None:
        self.http.close()

    # -- plumbing --------------------------------------------------------------

    def _request(self, method: str, path: str, *, timeout: float | tuple[float, float] | None = None,
                 **kwargs: Any) -> requests.Response:
        url = self.base_url + path
        try:
            resp = self.http.request(method, url, timeout=timeout or self.timeout, **kwargs)
        except (requests.ConnectionError, requests.Timeout) as exc:
            kind = TimedOut if isinstance(exc, requests.Timeout) else Unreachable
            raise kind(f"{method} {path}: {_short(exc)}") from exc
        except requests.RequestException as exc:
            raise OpencodeError(f"{method} {path}: {_short(exc)}") from exc
        if resp.status_code in (401, 403):
            raise AuthError(f"{method} {path}: HTTP {resp.status_code}; {AUTH_HINT}")
        if resp.status_code == 404:
            raise NotFound(f"{method} {path}: not found")
        if resp.status_code >= 400:
            raise ServerError(resp.status_code, f"{method} {path}: HTTP {resp.status_code} {resp.text[:200]}")
        return resp

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        resp = self._request(method, path, **kwargs)
        if not resp.content:
            return None
        try:
            return resp.json()
        except ValueError as exc:
            raise ServerError(resp.status_code, f"{method} {path}: answer is not JSON") from exc

    # -- routes ----------------------------------------------------------------

    def health(self, timeout: float | None = None) -> Health:
        data = self._json("GET", "/global/health", timeout=timeout)
        if not isinstance(data, dict):
            raise ServerError(200, "GET /global/health: answer is not an object")
        return Health(bool(data.get("healthy")), data.get("version"))

    def create_session(self, title: str, permission: list[dict[str, str]] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"title": title}
        if permission:
            body["permission"] = permission
        return self._json("POST", "/session", json=body)

    def set_session_permission(self, session_id: str, permission: list[dict[str, str]]) -> dict[str, Any]:
        return self._json("PATCH", f"/session/{session_id}", json={"permission": permission})

    def list_sessions(self) -> list[dict[str, Any]]:
        data = self._json("GET", "/session")
        return [s for s in data if isinstance(s, dict)] if isinstance(data, list) else []

    def get_session(self, session_id: str, timeout: float | None = None) -> dict[str, Any]:
        return self._json("GET", f"/session/{session_id}", timeout=timeout)

    def session_status(self) -> dict[str, Any]:
        data = self._json("GET", "/session/status")
        return data if isinstance(data, dict) else {}

    def prompt_async(self, session_id: str, text: str, message_id: str,
                     agent: str | None = None, model: str | None = None) -> None:
        body: dict[str, Any] = {"messageID": message_id, "parts": [{"type": "text", "text": text}]}
        if agent:
            body["agent"] = agent
        if model and "/" in model:
            provider, _, model_id = model.partition("/")
            body["model"] = {"providerID": provider, "modelID": model_id}
        self._request("POST", f"/session/{session_id}/prompt_async", json=body)

    def prompt_parts(self, session_id: str, parts: list[dict[str, Any]], message_id: str,
                     agent: str | None = None, model: dict[str, Any] | None = None) -> None:
        """A prompt of given parts, with the agent and model as a message records them."""
        body: dict[str, Any] = {"messageID": message_id, "parts": parts}
        if agent:
            body["agent"] = agent
        if model and isinstance(model.get("providerID"), str) and isinstance(model.get("modelID"), str):
            body["model"] = {"providerID": model["providerID"], "modelID": model["modelID"]}
        self._request("POST", f"/session/{session_id}/prompt_async", json=body)

    def get_message(self, session_id: str, message_id: str) -> dict[str, Any]:
        return self._json("GET", f"/session/{session_id}/message/{message_id}")

    def messages(self, session_id: str, limit: int | None = None) -> list[dict[str, Any]]:
        params = {"limit": limit} if limit else None
        data = self._json("GET", f"/session/{session_id}/message", params=params)
        return data if isinstance(data, list) else []

    def permissions(self) -> list[dict[str, Any]]:
        data = self._json("GET", "/permission")
        return data if isinstance(data, list) else []

    def reply_permission(self, request_id: str, reply: str, message: str | None = None) -> None:
        body: dict[str, Any] = {"reply": reply}
        if message:
            body["message"] = message
        self._request("POST", f"/permission/{request_id}/reply", json=body)

    def abort(self, session_id: str) -> None:
        self._request("POST", f"/session/{session_id}/abort")

    def mcp_status(self, timeout: float | None = None) -> dict[str, Any]:
        """The MCP servers and their state; the server answers once it has finished connecting them."""
        data = self._json("GET", "/mcp", timeout=timeout)
        return data if isinstance(data, dict) else {}

    def sync_history(self, last_seq: dict[str, int]) -> list[dict[str, Any]]:
        data = self._json("POST", "/sync/history", json=last_seq)
        return data if isinstance(data, list) else []

    def open_stream(self, path: str, read_timeout: float, connect_timeout: float | None = None) -> requests.Response:
        """Open an SSE stream; the caller iterates ``iter_content`` and closes it.

        The response headers must come within the ordinary request timeout: a server that
        is still starting can accept the connection and say nothing, and waiting the whole
        stream read timeout for it would delay the reconnect by that much. Once the
        headers are in, the socket gets the (longer) stream read timeout.
        """
        first = min(read_timeout, connect_timeout or self.timeout)
        resp = self._request("GET", path, stream=True, timeout=(connect_timeout or self.timeout, first),
                             headers={"Accept": "text/event-stream"})
        sock = getattr(getattr(resp.raw, "connection", None), "sock", None)
        if sock is not None:
            sock.settimeout(read_timeout)
        return resp


def iter_chunks(resp: requests.Response, size: int = 65536) -> Iterator[bytes]:
    """The stream's bytes in large reads; small reads make a large event take seconds."""
    return resp.iter_content(size)


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _short(exc: BaseException) -> str:
    text = str(exc)
    if "Connection refused" in text:
        return "connection refused"
    if "Read timed out" in text:
        return "read timed out"
    return text[:200]
