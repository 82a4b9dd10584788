"""The stream's backlog: never "more is here" when the next read would wait, and few kernel calls in a burst.

A real socket pair carries HTTP chunked framing; the reading side takes it apart as
urllib3 does (size line, data, line end, one chunk at a time from a buffered reader), and
the frame guard counts what it is handed. After every chunk, what the backlog says is
checked against what is truly there: bytes in the reader's buffer or on the socket.
"""

from __future__ import annotations

import fcntl
import io
import random
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from orchestratord import backlog
from orchestratord.backlog import Backlog
from orchestratord.config import DEFAULT_TRIGGERS
from orchestratord.events import EventReader
from orchestratord.ledger import Ledger
from orchestratord.opencode import OpencodeClient
from orchestratord.state import Shared
from orchestratord.stream import FrameGuard
from tests.bench.replay import ReplayServer


def _frame(n: int, size: int) -> bytes:
    body = b'data: {"payload":{"type":"message.part.delta","properties":{"i":%d,"d":"' % n
    return body + b"x" * max(0, size - len(body) - 6) + b'"}}}\n\n'


def _chunked(frames: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(f), f) for f in frames)


def _chunks(fh: io.BufferedReader) -> Iterator[bytes]:
    """Chunk payloads, read off ``fh`` the way urllib3 reads a chunked body."""
    while True:
        line = fh.readline()
        size = int(line.split(b";")[0], 16)
        if size == 0:
            return
        data = fh.read(size)
        assert fh.read(2) == b"\r\n"
        yield data


def _really_more(fh: io.BufferedReader, sock: socket.socket) -> bool:
    """Bytes in the buffered reader, or on the socket: the next read would not wait."""
    sock.setblocking(False)  # so that an empty buffer's peek comes back empty instead of waiting
    try:
        return bool(fh.peek(1))
    finally:
        sock.setblocking(True)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    try:
        yield a, b
    finally:
        a.close()
        b.close()


@pytest.fixture
def asks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Each FIONREAD the backlog makes."""
    made: list[int] = []
    real = fcntl.ioctl

    def counted(fd: int, request: int, arg: Any = 0, *rest: Any) -> Any:
        made.append(request)
        return real(fd, request, arg, *rest)
    monkeypatch.setattr(backlog.fcntl, "ioctl", counted)
    return made


def test_nothing_sent_is_nothing_waiting(pair: tuple[socket.socket, socket.socket], asks: list[int]) -> None:
    a, b = pair
    assert not Backlog(b.fileno(), FrameGuard(1 << 20)).more()
    a.sendall(b"x")
    assert Backlog(b.fileno(), FrameGuard(1 << 20)).more()
    assert len(asks) == 2


# The reader's buffer hides bytes from the kernel's count, which only errs on the safe side;
# a small one leaves the count of each chunk's framing to decide.
BUFFERS = [io.DEFAULT_BUFFER_SIZE, 16]


@pytest.mark.parametrize("buffering", BUFFERS)
@pytest.mark.parametrize("seed", range(4))
def test_a_burst_read_chunk_by_chunk_is_never_taken_for_more_than_is_there(
        pair: tuple[socket.socket, socket.socket], asks: list[int], seed: int, buffering: int) -> None:
    rng = random.Random(seed)
    a, b = pair
    frames = [_frame(i, rng.choice([40, 300, 331, 700, 5000, 70000])) for i in range(400)]
    wire = _chunked(frames) + b"0\r\n\r\n"
    sender = threading.Thread(target=a.sendall, args=(wire,))
    sender.start()
    guard = FrameGuard(1 << 20)
    fh = b.makefile("rb", buffering=buffering)
    assert isinstance(fh, io.BufferedReader)
    seen = 0
    try:
        waiting = Backlog(b.fileno(), guard)
        said_more = 0
        for _frame_read in guard.frames(_chunks(fh)):
            seen += 1
            if waiting.more():
                said_more += 1
                assert _really_more(fh, b), f"chunk {seen}: said more is here, and nothing is"
    finally:
        sender.join(10)
        fh.close()
    assert seen == len(frames)
    assert said_more  # the burst was seen as one
    assert len(asks) < len(frames), "asked the kernel after every chunk"


@pytest.mark.parametrize("buffering", BUFFERS)
@pytest.mark.parametrize("size", [40, 331, 3000])
def test_the_last_chunk_of_a_burst_is_followed_by_a_no(pair: tuple[socket.socket, socket.socket], buffering: int,
                                                       size: int) -> None:
    """Once what was sent is read, the answer is no at once: the batch is written then."""
    a, b = pair
    frames = [_frame(i, size) for i in range(50)]
    a.sendall(_chunked(frames))
    guard = FrameGuard(1 << 20)
    fh = b.makefile("rb", buffering=buffering)
    assert isinstance(fh, io.BufferedReader)
    try:
        waiting = Backlog(b.fileno(), guard)
        answers = []
        reads = _chunks(fh)
        for _ in guard.frames(reads):
            answers.append(waiting.more())
            if len(answers) == len(frames):
                break
    finally:
        fh.close()
    assert answers[-1] is False


def test_an_encoded_stream_asks_the_kernel_every_time(pair: tuple[socket.socket, socket.socket],
                                                        asks: list[int]) -> None:
    a, b = pair
    a.sendall(b"y" * 10000)
    guard = FrameGuard(1 << 20)
    waiting = Backlog(b.fileno(), guard, every_time=True)
    for _ in range(5):
        assert waiting.more()
    assert len(asks) == 5


def test_a_closed_socket_is_not_more(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    waiting = Backlog(b.fileno(), FrameGuard(1 << 20))
    b.close()
    assert not waiting.more()


def test_a_burst_read_through_the_reader_commits_its_triggers_before_the_server_sends_again(
        tmp_path: Path) -> None:
    """The whole path: a server sends a burst (a failed session every 200th frame, the
    last one too) and then nothing, with the connection open. The reader holds the triggers'
    commit while more of the burst waits; once it is read, the backlog must say so, or the
    commit would be held across a read that waits for the server's next event."""
    # Comments between the events: tiny frames, whose chunked framing is a third of the
    # bytes on the wire, far more than the reading side's buffer could make up for.
    frames = [b'data: {"payload":{"type":"session.error","properties":{"sessionID":"ses_%d","error":{}}}}\n\n' % i
              if i % 200 == 199 else b": %d\n\n" % i for i in range(4000)]
    burst = tmp_path / "burst"
    burst.write_bytes(_chunked(frames))
    rule = type(DEFAULT_TRIGGERS[0])(name="failed", event="session.error")
    with ReplayServer(heartbeat_seconds=3600) as server:
        reader = EventReader(shared=Shared(server_url=server.url), make_client=lambda: OpencodeClient(server.url),
                             ledger_path=str(tmp_path / "ledger.db"), stream="global", directory=None,
                             read_timeout=3600, max_event_bytes=1 << 20, reconnect_max=1, store="default",
                             rules=(rule,), on_trigger=lambda: None, on_own_activity=lambda: None)
        reader.setup()
        other = Ledger(str(tmp_path / "ledger.db"))
        thread = threading.Thread(target=reader.step, name="reader")
        try:
            server.feed.put(burst)
            thread.start()
            deadline = time.monotonic() + 60
            while len(other.pending_triggers()) < 20 and time.monotonic() < deadline and thread.is_alive():
                time.sleep(0.01)
            committed, holding = len(other.pending_triggers()), reader.eventlog.holding
            sent = server.sent_files
        finally:
            server.feed.put(None)
            thread.join(30)
            reader.teardown()
            other.close()
    assert sent == 1, "the burst went out, and nothing after it"
    assert committed == 20, "every trigger of the burst committed while the server sent nothing more"
    assert not holding
