"""The server's event stream on the wire: frames, events, and their normalised form.

Pure functions and small classes with no I/O, shared by the event reader and the
tests. :class:`FrameGuard` cuts the byte stream into whole frames so that one oversized
frame or one with invalid UTF-8 is dropped and counted instead of taking the parser (and
every frame after it) down; :func:`read_data` reads the frames' data with sseclient-py;
:func:`head_session` reads the event type and session off the start of a frame, and
:func:`head_sync` a sync copy's session and seq, so the reader can pass over high-volume
events and sync copies it has no other use for without decoding them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from sseclient import SSEClient

from .jsonvalues import as_dict

HIGH_VOLUME = frozenset({"message.part.delta"})

# The start of a frame as the server writes it: an optional global envelope (string
# fields, then ``payload``), an optional string ``id``, then ``type``; then, when
# ``properties`` follows with ``sessionID`` first, the session (group 2), or, for a
# ``sync`` event whose ``syncEvent`` starts as opencode writes it, its ``seq`` (group 3)
# and its session, ``aggregateID`` (group 4). A ``seq`` that is not a plain integer does
# not match, and the frame is then decoded in full.
#
# A string is read up to the next quote (``[^"]``: the matcher's fastest loop, twice as
# fast as one that also stops at a backslash). In valid JSON a string holds a quote only
# escaped. A skipped string read up to an escaped quote would next need a comma, a quote
# not escaped, which can only be the string's closing one, and a key's letters, which JSON
# never writes straight after a closing quote: such a frame does not match. A group that
# ends at an escaped quote, or holds any escape, is not the decoded value: a type with one
# equals no plain type, and a session with a backslash in it is not used (:func:`plain`).
HEAD = re.compile(rb'data: \{(?:"(?:directory|project)":"[^"]*+",)*+"payload":\{(?:"id":"[^"]*+",)?+'
                  rb'"type":"([^"]*+)"(?:,"properties":\{"sessionID":"([^"]*+)"'
                  rb'|,"syncEvent":\{"id":"[^"]*+","type":"[^"]*+","seq":(\d++),"aggregateID":"([^"]*+)")?+')
# (Possessive quantifiers: nothing here ever needs a step back, and without them the
# matcher keeps the states to take one: a third of the time of each match.)


def plain(value: bytes) -> bool:
    """Whether a string :data:`HEAD` took is its decoded value as it stands (no escape in it)."""
    return b"\\" not in value


@dataclass(slots=True)
class Event:
    """One server event, unwrapped from the global envelope."""

    id: str | None
    type: str
    properties: dict[str, Any]
    session_id: str | None
    directory: str | None
    data: str  # the frame's JSON text, kept for the ledger
    sync: dict[str, Any] | None = None  # the durable copy (`sync` events on /global/event)


def session_of(props: dict[str, Any]) -> str | None:
    """The session an event is about, wherever this event type keeps it."""
    sid = props.get("sessionID")
    if isinstance(sid, str):
        return sid
    for key in ("info", "part"):
        inner = props.get(key)
        if isinstance(inner, dict):
            sid = inner.get("sessionID")
            if isinstance(sid, str):
                return sid
    return None


def normalize(obj: Any, data: str) -> Event | None:
    """An :class:`Event` from a decoded frame of either stream, or None if it is not one."""
    if not isinstance(obj, dict):
        return None
    directory = None
    if "payload" in obj and isinstance(obj["payload"], dict):
        directory = obj.get("directory") if isinstance(obj.get("directory"), str) else None
        obj = obj["payload"]
    etype = obj.get("type")
    if not isinstance(etype, str) or not etype:
        return None
    props = obj.get("properties")
    if etype == "sync":
        sync = obj.get("syncEvent")
        if not isinstance(sync, dict):
            return None
        sdata = as_dict(sync.get("data"))
        sid = sync.get("aggregateID") if isinstance(sync.get("aggregateID"), str) else session_of(sdata)
        return Event(obj.get("id") if isinstance(obj.get("id"), str) else None, "sync", sdata, sid, directory, data, sync)
    if not isinstance(props, dict):
        props = {}
    eid = obj.get("id") if isinstance(obj.get("id"), str) else None
    return Event(eid, etype, props, session_of(props), directory, data)


def from_sync(sync: dict[str, Any]) -> Event | None:
    """The plain event a stored sync record stands for (``message.updated.1`` -> ``message.updated``)."""
    stype = sync.get("type")
    data = sync.get("data")
    if not isinstance(stype, str) or not isinstance(data, dict):
        return None
    etype = re.sub(r"\.\d+$", "", stype)
    sid = sync.get("aggregateID") if isinstance(sync.get("aggregateID"), str) else session_of(data)
    return Event(sync.get("id") if isinstance(sync.get("id"), str) else None, etype, data, sid, None,
                 json.dumps(sync, separators=(",", ":")), sync)


def head_session(frame: bytes) -> tuple[bytes, str] | None:
    """(type, session) named at the start of a ``/global/event`` frame, when both are plain there.

    For the frames opencode writes (JSON without duplicate keys) these are the type and
    session :func:`normalize` finds (``properties.sessionID`` comes first); anything else
    is left to the full decode.
    """
    m = HEAD.match(frame)
    if m is None or m.group(2) is None or not plain(m.group(2)) or not plain(m.group(1)):
        return None
    return m.group(1), m.group(2).decode()


def head_sync(frame: bytes) -> tuple[str, int] | None:
    """(session, seq) of a ``sync`` frame of ``/global/event``, read off its start when plain there.

    These are what :func:`normalize` gives as the event's ``session_id`` and
    ``sync["seq"]``, all the reader needs of a sync copy it does not store.
    """
    m = HEAD.match(frame)
    if m is None or m.group(3) is None or m.group(1) != b"sync" or not plain(m.group(4)):
        return None
    return m.group(4).decode(), int(m.group(3))


def read_data(frames: Iterable[bytes]) -> Iterator[str]:
    """The ``data`` of each event in ``frames`` (whole frames from :meth:`FrameGuard.frames`),
    read by sseclient-py: ``data`` lines joined with newlines, comments and other fields
    ignored, events without data dropped. An event is handed on as soon as its frame is in:
    a frame from the guard ends with its blank line, so sseclient-py never waits for more.
    """
    for event in SSEClient(iter(frames)).events():
        yield event.data


class FrameGuard:
    """Splits SSE bytes into whole frames, dropping oversized and undecodable ones.

    ``on_drained`` is called each time the bytes read so far are used up, just before
    the next (possibly blocking) read: the reader flushes its batch there.
    """

    def __init__(self, max_bytes: int, on_drained: Callable[[], None] | None = None) -> None:
        self.max_bytes = max_bytes
        self.on_drained = on_drained
        self.oversized = 0
        self.undecodable = 0
        self.taken = 0  # bytes and chunks read so far (what :class:`~.backlog.Backlog` counts)
        self.chunks = 0

    def frames(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        buf = b""
        skipping = False
        max_bytes = self.max_bytes
        drained = self.on_drained or (lambda: None)
        for chunk in chunks:
            self.taken += len(chunk)
            self.chunks += 1
            if not chunk:
                continue
            if b"\r" in chunk or buf.endswith(b"\r"):
                chunk = buf + chunk
                buf = b""
                held = chunk.endswith(b"\r")  # maybe the first half of CRLF
                if held:
                    chunk = chunk[:-1]
                chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
                if held:
                    chunk += b"\r"
                pieces = chunk.split(b"\n\n")
            elif not buf and chunk.endswith(b"\n\n") and chunk.find(b"\n\n") == len(chunk) - 2:  # one frame
                if skipping:
                    skipping = False
                elif (len(chunk) <= max_bytes and chunk.isascii()) or self._usable(chunk[:-2]):
                    yield chunk
                drained()
                continue
            else:
                pieces = (buf + chunk).split(b"\n\n") if buf else chunk.split(b"\n\n")
            buf = pieces.pop()
            for piece in pieces:
                if skipping:
                    skipping = False
                    continue
                if (len(piece) <= max_bytes and piece.isascii()) or self._usable(piece):
                    yield piece + b"\n\n"
            if len(buf) > max_bytes + 2:  # a frame at the limit and the start of the blank line after it
                if not skipping:
                    self.oversized += 1
                skipping = True
                buf = b""
            drained()
        if buf.endswith(b"\n\r") and not skipping:  # a lone CR ended the last frame
            piece = buf[:-2]
            if self._usable(piece):
                yield piece + b"\n\n"

    def _usable(self, piece: bytes) -> bool:
        """Not over the size cap and valid UTF-8 (counted when not)."""
        if len(piece) > self.max_bytes:
            self.oversized += 1
            return False
        if not piece.isascii():
            try:
                piece.decode("utf-8")
            except UnicodeDecodeError:
                self.undecodable += 1
                return False
        return True
