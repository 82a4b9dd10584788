"""Whether more of the event stream is already on this machine, asking the kernel seldom.

The reader writes its batch when the stream pauses and holds a group commit while more is
waiting (see :mod:`.eventlog`), so after every chunk it asks whether the next read would
wait. A ``poll`` for each chunk is a system call for each event. Instead the kernel is
asked how many bytes wait on the socket (``FIONREAD``). Until the chunks read since then
add up to that many, each counted with ``CHUNK_FRAMING`` bytes of chunked framing on top,
more is surely waiting, and the kernel is not asked again. In a burst that is one call for
some hundreds of events; on a stream that trickles, one for each event, as before.

The answer errs one way only. Bytes the HTTP layer has buffered already are not counted,
so it can say no while more is in fact here (the batch is written sooner than it need
be), and it never says yes when nothing more has come. That holds while each chunk's size
line and line ends take at most ``CHUNK_FRAMING`` bytes; a server that added longer chunk
extensions (opencode adds none) could be taken for one still sending, and a held batch
would wait for its next chunk. With a content encoding the bytes read are not the bytes
on the wire, and the kernel is asked every time.
"""

from __future__ import annotations

import fcntl
import sys
import termios

import requests

from .stream import FrameGuard

#: the most bytes of chunked framing (the size line, two line ends) counted for each chunk
CHUNK_FRAMING = 64


class Backlog:
    """What waits on one stream's socket, read against the chunks ``guard`` has taken."""

    def __init__(self, fd: int, guard: FrameGuard, every_time: bool = False) -> None:
        self.fd = fd
        self.guard = guard
        self.every_time = every_time  # the bytes read are not the bytes on the wire
        self._buf = bytearray(4)
        self._waiting = 0  # bytes on the socket when the kernel was last asked
        self._taken = guard.taken  # what the guard had taken then
        self._chunks = guard.chunks

    def more(self) -> bool:
        """Whether bytes past those read so far are here already (see the module's docstring)."""
        g = self.guard
        if not self.every_time and \
                g.taken - self._taken + CHUNK_FRAMING * (g.chunks - self._chunks) < self._waiting:
            return True
        try:
            fcntl.ioctl(self.fd, termios.FIONREAD, self._buf)
        except OSError:  # the socket is gone: the next read says so
            self._waiting = 0
            return False
        self._waiting = int.from_bytes(self._buf, sys.byteorder, signed=True)
        self._taken, self._chunks = g.taken, g.chunks
        return self._waiting > 0


def for_response(resp: requests.Response, guard: FrameGuard) -> Backlog | None:
    """The backlog of the socket ``resp`` reads, or None where it cannot be known."""
    sock = getattr(getattr(resp.raw, "connection", None), "sock", None)
    if sock is None or getattr(sock, "pending", None) is not None:
        return None  # no socket, or TLS: bytes may wait inside the TLS layer; write at every pause
    try:
        fd = sock.fileno()
    except (OSError, ValueError):
        return None
    if fd < 0:
        return None
    encoded = resp.headers.get("Content-Encoding", "identity").strip().lower() not in ("", "identity")
    return Backlog(fd, guard, every_time=encoded)
