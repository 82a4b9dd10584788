"""One claude-teams inbox file, read as a stream, and only its new part when that is safe.

claude-teams never trims an inbox: read messages stay, so a long-lived team's lead inbox
holds tens of thousands of messages. A writer appends one item to the JSON array and
rewrites the file in place (truncate and write, same inode), so the bytes before the
closing ``]`` stay as they were. :class:`InboxFile` keeps a little state per file and
reads only the items after the last one it read, when it can show that the part it read
before is unchanged:

- the same inode, and the file longer than the offset where the last item ended;
- a digest of two windows, the first bytes of the file and the bytes that end at that
  offset. A flipped ``read`` flag (``false`` to ``true``) shortens the file by a byte and
  shifts everything after it, so a flip anywhere before the offset moves the second
  window; an edit that keeps every length would go unseen, which is not something a
  claude-teams writer does (the next full read takes it in);
- at the offset itself, the structure: what follows must be ``,`` and a new item, or ``]``.

On any doubt the whole file is read again, streaming: one element at a time, the memory
held bounded by a batch of elements, never by the file. A digest of each batch's
identities (in order) is kept, so a re-read that meets the same messages (only ``read``
flags changed) needs no ledger look-up for them.

A reader takes no lock for long (writers must not wait on it): a shared flock on
``.lock`` when it comes free within a few milliseconds, released before anything is
recorded. While a writer holds it, only the new part is read; a read that would have to
be whole raises :class:`InboxBusy` instead (the file is most likely half rewritten), until
the lock has been held ``LOCK_PATIENCE`` long. After the lock, the
file's size and times are compared after every batch, and a file rewritten while it is
read is read again. What a read could not finish (a half-written file, a change) leaves
the state at the last batch it recorded.

A single element larger than ``max_item_bytes`` is not decoded: it is scanned to its end
(its sender and timestamp noted, its text digested) and handed on as :class:`Oversized`.

Size: the incremental reader (windows, fingerprints, the cursor) and the streaming item
parser rely on each other's invariants, and are kept together.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generator, Iterator, NamedTuple

from .teammsg import message_identity
from .worker import crash_point

DEFAULT_MAX_ITEM_BYTES = 1024 * 1024
CHUNK = 64 * 1024
MAX_CHUNK = 4 * 1024 * 1024
HEAD_BYTES = 256
TAIL_BYTES = 4096
BATCH = 500
LOCK_TRIES = 5
LOCK_PAUSE = 0.01
#: a whole read waits for a writer that holds the lock, but no longer than this (a writer
#: that has died has released it; one that holds it this long is not waited for)
LOCK_PATIENCE = 5.0

#: (bytes wanted, offset) -> bytes: how the scanner reads, from a file or from memory
Pread = Callable[[int, int], bytes]

_WS = re.compile(r"[ \t\n\r]*")
_SEPARATOR = re.compile(r"[ \t\n\r]*,[ \t\n\r]*")
_DECODER = json.JSONDecoder()
_DECODE = _DECODER.raw_decode
#: the C scanner behind raw_decode, without its wrapper: (text, index) -> (value, end)
_SCAN: Callable[[str, int], tuple[Any, int]] = _DECODER.scan_once  # type: ignore[attr-defined]


class InboxError(Exception):
    """The file is not a usable inbox; ``transient`` means it may be mid-rewrite."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class InboxBusy(InboxError):
    """A writer holds the lock and the file cannot be read in part: look again shortly."""

    def __init__(self) -> None:
        super().__init__("a writer is rewriting it (the lock is held)", transient=True)


class _Truncated(InboxError):
    """The file ends too soon: a writer may be rewriting it."""

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=True)


class _Changed(InboxError):
    """The file was rewritten while it was read: what was read may mix two versions."""

    def __init__(self) -> None:
        super().__init__("the file changed while it was read", transient=True)


class _Doubt(Exception):
    """What follows the resume offset is not as it should be: read the whole file."""


@dataclass(frozen=True)
class Oversized:
    """An element over the size limit: what could be learnt of it without decoding it."""

    ident: str
    sender: str | None
    timestamp: str | None
    size: int


class Entry(NamedTuple):
    """One element of the inbox array: a usable message, or why it is not one."""

    position: int  # in the array, from 0
    token: str  # what marks it as known: a message's identity, or a stand-in
    fields: dict[str, Any] | None = None  # from, text, timestamp (strings), maybe summary, read
    problem: str | None = None
    oversized: Oversized | None = None


@dataclass(frozen=True)
class Resume:
    """Where the last read stopped, and what must still be there to go on from it."""

    inode: int
    device: int
    end: int  # just after the last complete element (or after ``[``)
    count: int  # elements before ``end``
    window: bytes  # digest of the head and of the bytes that end at ``end``
    partial: tuple[str, ...]  # tokens of the batch that the next element joins


@dataclass(frozen=True)
class ReadResult:
    incremental: bool
    elements: int  # elements scanned in this read
    skipped: int  # elements handed on that are not messages (oversized ones apart)
    first_skipped: str | None
    signature: tuple[int, int, int]  # (inode, size, mtime_ns) of the version read


Record = Callable[[list[Entry]], None]


def entry_problem(entry: Any) -> str | None:
    """Why an element is not a message, or None."""
    if not isinstance(entry, dict):
        return f"must be an object, not {type(entry).__name__}"
    for key in ("from", "text", "timestamp"):
        if key not in entry:
            return f"has no {key!r}"
        if not isinstance(entry[key], str):
            return f"{key!r} must be a string"
    if not entry["from"]:
        return "'from' is empty"
    return None


class InboxFile:
    """What we know of one inbox file between reads, and the reads themselves."""

    def __init__(self, path: Path, team: str, recipient: str, max_item_bytes: int = DEFAULT_MAX_ITEM_BYTES,
                 lock_path: Path | None = None) -> None:
        self.path = path
        self.team = team
        self.recipient = recipient
        self.max_item_bytes = max_item_bytes
        self.lock_path = lock_path
        self.resume: Resume | None = None
        #: batch number -> digest of the tokens of that batch, once all were recorded
        self.digests: dict[int, bytes] = {}
        self.busy_since: float | None = None  # monotonic: when a whole read first found the lock held

    def read(self, record: Record) -> ReadResult:
        """Read what is new (or everything, on doubt); hand each batch that is not known to ``record``.

        Raises InboxError when the file cannot be used as it stands (``transient`` when
        it may be mid-rewrite), OSError when it cannot be read at all.
        """
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        lock = _SharedLock(self.lock_path)
        try:
            lock.acquire()
            st = os.fstat(fd)
            seen = (st.st_size, st.st_mtime_ns, st.st_ctime_ns)

            def unchanged() -> None:
                now = os.fstat(fd)
                if (now.st_size, now.st_mtime_ns, now.st_ctime_ns) != seen:
                    raise _Changed()
                lock.release()  # what was read is consistent; the ledger writes that follow hold up no writer

            whole_ok = not lock.contended or self._patience_over()
            result = self.scan(lambda n, off: os.pread(fd, n, off), (st.st_ino, st.st_dev, st.st_size),
                               (st.st_ino, st.st_size, st.st_mtime_ns), unchanged, record, whole_ok)
            self.busy_since = None
            return result
        finally:
            lock.release()
            os.close(fd)

    def _patience_over(self) -> bool:
        now = time.monotonic()
        if self.busy_since is None:
            self.busy_since = now
        return now - self.busy_since >= LOCK_PATIENCE

    def scan(self, pread: Pread, where: tuple[int, int, int], signature: tuple[int, int, int],
             unchanged: Callable[[], None], record: Record, whole_ok: bool = True) -> ReadResult:
        """The read itself, on any source of bytes: ``where`` is (inode, device, size).

        ``whole_ok`` False (a writer holds the lock): only the new part may be read; a file
        that needs reading whole is most likely half rewritten, so InboxBusy says to come back.
        """
        inode, device, size = where
        r = self.resume
        if r is not None and r.inode == inode and r.device == device and size > r.end \
                and _window(pread, r.end) == r.window:
            try:
                return self._pass(pread, where, signature, unchanged, record, r)
            except _Doubt:
                pass
        if not whole_ok:
            raise InboxBusy()
        return self._pass(pread, where, signature, unchanged, record, None)

    # -- one pass over the file -------------------------------------------------------

    def _pass(self, pread: Pread, where: tuple[int, int, int], signature: tuple[int, int, int],
              unchanged: Callable[[], None], record: Record, start: Resume | None) -> ReadResult:
        text = _Text(pread, start.end if start else 0)
        if start is None:
            c = text.skip_ws()
            if c is None:
                raise InboxError("file is empty (an empty inbox is [])", transient=True)
            if c != "[":
                raise _not_an_array(text)
            text.pos += 1
            index, tokens, end = 0, [], text.offset(text.pos)
        else:
            index, tokens, end = start.count, list(start.partial), start.end
        fresh: list[Entry] = []
        skipped, first_skipped, scanned = 0, None, 0
        committed = -1  # the element count at the last commit of this pass

        def commit() -> None:
            nonlocal fresh, tokens, skipped, first_skipped, committed
            batch = (index - 1) // BATCH if index else 0
            digest = hashlib.sha256("\0".join(tokens).encode("utf-8", "surrogatepass")).digest()
            window = _window(pread, end)
            unchanged()
            if fresh and (start is not None or self.digests.get(batch) != digest):
                record(fresh)
                for e in fresh:
                    if e.problem is not None:
                        skipped += 1
                        first_skipped = first_skipped or f"message {e.position}: {e.problem}"
            self.digests[batch] = digest
            self.resume = Resume(where[0], where[1], end, index, window, tuple(tokens) if index % BATCH else ())
            if index % BATCH == 0:
                tokens = []
            fresh, committed = [], index

        team, recipient = self.team, self.recipient
        try:
            for _at, stop, value in self._elements(text, pread, after_item=bool(start and start.count)):
                if start is not None and not scanned:
                    crash_point("inbox-mid-read")
                if type(value) is dict and type(sender := value.get("from")) is str and sender \
                        and type(timestamp := value.get("timestamp")) is str and type(body := value.get("text")) is str:
                    entry = Entry(index, message_identity(team, recipient, sender, timestamp, body), value)
                else:
                    entry = self._entry(index, value)
                tokens.append(entry.token)
                fresh.append(entry)
                index, end, scanned = index + 1, stop, scanned + 1
                if index % BATCH == 0:
                    commit()
            if fresh or (start is None and committed != index):
                commit()
            else:
                unchanged()  # nothing new: only the check that this was one version of the file
            if text.skip_ws() is not None:
                raise InboxError(f"data after the array at byte {text.offset(text.pos)}", transient=True)
        except (_Truncated, _Changed):
            raise
        except InboxError:
            if start is not None:
                raise _Doubt() from None  # the whole file gives the verdict
            raise
        return ReadResult(start is not None, scanned, skipped, first_skipped, signature)

    def _entry(self, index: int, value: Any) -> Entry:
        """An element that is not a plain message (those are made in the loop, the hot path)."""
        if isinstance(value, Oversized):
            return Entry(index, "big:" + value.ident, oversized=value)
        problem = entry_problem(value) or "is not a message"
        return Entry(index, f"skip:{index}:{problem}", problem=problem)

    def _elements(self, text: "_Text", pread: Pread, after_item: bool) -> Iterator[tuple[int, int, Any]]:
        """(start, end, value) of each element, up to and past the closing ``]``."""
        while True:
            c = text.skip_ws()
            if c is None:
                raise _Truncated("file ends before its array is closed")
            if c == "]":
                if text.comma:
                    raise InboxError(f"a ',' with no message after it at byte {text.offset(text.pos)}", transient=True)
                break
            if after_item:
                if c != ",":
                    raise InboxError(f"expected ',' or ']' at byte {text.offset(text.pos)}", transient=True)
                text.pos += 1
                text.comma, after_item = True, False
                continue
            text.comma, after_item = False, True
            if text.ascii and (yield from self._whole_ones(text)):
                continue
            at = text.offset(text.pos)
            value, stop = self._element(text, pread, at)
            yield at, stop, value
        text.pos += 1

    def _whole_ones(self, text: "_Text") -> Generator[tuple[int, int, Any], None, bool]:
        """The elements that lie whole in an ASCII buffer, one after another: the common case, kept lean.

        Returns whether it took any; it leaves ``text`` just after the last one.
        """
        buf, base, n, limit = text.buf, text.base, len(text.buf), self.max_item_bytes
        pos, taken = text.pos, False
        while True:
            try:
                value, i = _SCAN(buf, pos)
            except (StopIteration, ValueError, RecursionError):
                return taken  # the careful path says what is wrong, or reads on
            if i >= n or i - pos > limit:
                return taken
            text.pos, taken = i, True
            yield base + pos, base + i, value
            m = _SEPARATOR.match(buf, i)
            if m is None or m.end() >= n:
                return taken
            pos = m.end()

    def _element(self, text: "_Text", pread: Pread, at: int) -> tuple[Any, int]:
        """Decode the element at ``text.pos`` (byte ``at``); an oversized one is only skimmed."""
        want = CHUNK
        while True:
            decoded = False
            try:
                value, i = _DECODE(text.buf, text.pos)
                decoded = True
            except json.JSONDecodeError as exc:
                if not (exc.msg.startswith("Unterminated string") or exc.pos >= len(text.buf) - 6):
                    raise InboxError(f"not valid JSON at byte {text.offset(exc.pos)}: {exc.msg}",
                                     transient=True) from None
            except RecursionError:
                raise InboxError(f"not valid JSON at byte {at}: nested too deeply", transient=True) from None
            if decoded and (i < len(text.buf) or text.eof):  # at the buffer's end a number could go on
                stop = text.offset(i)
                if stop - at > self.max_item_bytes:
                    return self._oversized(text, pread, at)
                text.pos = i
                return value, stop
            if text.next - at > self.max_item_bytes:
                return self._oversized(text, pread, at)
            if not text.more(want) and not decoded:
                raise _Truncated("file ends inside a message")
            want = min(want * 2, MAX_CHUNK)

    def _oversized(self, text: "_Text", pread: Pread, at: int) -> tuple[Oversized, int]:
        stop, big = skim(pread, at, self.team, self.recipient)
        text.restart(stop)
        return big, stop


def _not_an_array(text: "_Text") -> InboxError:
    """What to say of a file that does not start with ``[``."""
    kind = {"{": "object", '"': "string"}.get(text.buf[text.pos])
    if kind is None:
        try:
            value, _ = _DECODE(text.buf, text.pos)
        except (ValueError, RecursionError):
            return InboxError(f"not valid JSON: unexpected {text.buf[text.pos]!r} at byte {text.offset(text.pos)}",
                              transient=True)
        kind = "null" if value is None else "boolean" if isinstance(value, bool) else "number"
    return InboxError(f"must be a JSON array of messages, not a JSON {kind}")


def _window(pread: Pread, end: int) -> bytes:
    """Digest of the file's first bytes and of the bytes that end at ``end``."""
    h = hashlib.sha256(end.to_bytes(8, "big"))
    tail_start = max(0, end - TAIL_BYTES)
    if tail_start:
        h.update(pread(min(HEAD_BYTES, tail_start), 0))
    h.update(b"\0")
    h.update(pread(end - tail_start, tail_start))
    return h.digest()


class _Text:
    """The file from an offset as text, a chunk at a time, with the byte offset of any index."""

    def __init__(self, pread: Pread, offset: int) -> None:
        self.pread = pread
        self.restart(offset)

    def restart(self, offset: int) -> None:
        self.buf = ""
        self.pos = 0
        self.base = offset  # byte offset of buf[0]
        self.next = offset  # byte offset of the next read
        self.eof = False
        self.ascii = True
        self.comma = False  # a ',' was just read: an element must follow
        self._mark = (0, offset)

    def offset(self, i: int) -> int:
        """Byte offset of ``buf[i]``."""
        if self.ascii:
            return self.base + i
        mi, mb = self._mark
        if i < mi:
            mi, mb = 0, self.base
        b = mb + len(self.buf[mi:i].encode("utf-8"))
        self._mark = (i, b)
        return b

    def more(self, want: int = CHUNK) -> bool:
        """Read on; False at the end of the file. What is behind ``pos`` is dropped."""
        if self.eof:
            return False
        data = self.pread(want, self.next)
        if not data:
            self.eof = True
            return False
        cut = len(data) if len(data) < want else _whole_utf8(data)
        try:
            decoded = data[:cut].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InboxError(f"not valid UTF-8 at byte {self.next + exc.start}", transient=True) from None
        start = self.offset(self.pos)
        self.buf = self.buf[self.pos:] + decoded
        self.pos, self.base, self.next = 0, start, self.next + cut
        self.ascii = self.buf.isascii()
        self._mark = (0, start)
        return True

    def skip_ws(self) -> str | None:
        """The next character that is not whitespace (not consumed); None at the end of the file."""
        while True:
            m = _WS.match(self.buf, self.pos)
            self.pos = m.end() if m else self.pos
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.more():
                return None


def _whole_utf8(data: bytes) -> int:
    """Length of ``data`` without a UTF-8 sequence cut at its end."""
    n = len(data)
    for back in range(1, min(4, n) + 1):
        b = data[n - back]
        if b < 0x80:
            return n
        if b >= 0xC0:
            need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            return n if back >= need else n - back
    return n


# -- an element too large to decode ---------------------------------------------------

_IN_STRING = re.compile(rb'["\\]')
_OUTSIDE = re.compile(rb'["{}\[\]:,]')
_SCALAR_END = re.compile(rb"[,\]\s]")
_KEPT = (b"from", b"timestamp", b"text")
SHOWN_BYTES = 200


def skim(pread: Pread, at: int, team: str, recipient: str) -> tuple[int, Oversized]:
    """Find the end of the element at byte ``at`` without holding it, noting what it says of itself.

    Only the string values of the top-level keys ``from``, ``timestamp`` and ``text`` are
    looked at (as raw JSON bytes): the first two are kept in part, all three digested,
    so the same message skimmed again has the same identity whatever its ``read`` flag.
    """
    depth, in_string, escape, role = 0, False, False, ""
    key = bytearray()
    target: bytes | None = None
    digests = {k: hashlib.sha256() for k in _KEPT}
    shown = {k: bytearray() for k in _KEPT[:2]}
    present: set[bytes] = set()
    offset = at
    scalar: bool | None = None

    def take(piece: bytes) -> None:
        if role == "key-string":
            key.extend(piece[:64 - len(key)])
        elif target is not None:
            digests[target].update(piece)
            if target in shown:
                shown[target].extend(piece[:SHOWN_BYTES * 2 - len(shown[target])])

    while True:
        chunk = pread(CHUNK, offset)
        if not chunk:
            raise _Truncated("file ends inside a message")
        if scalar is None:
            scalar = chunk[:1] not in (b"{", b"[", b'"')
        if scalar:
            m = _SCALAR_END.search(chunk)
            if m is not None:
                return offset + m.start(), Oversized(_big_ident(team, recipient, digests, present), None, None,
                                                     offset + m.start() - at)
            offset += len(chunk)
            continue
        i, n = 0, len(chunk)
        while i < n:
            if in_string:
                if escape:
                    take(chunk[i:i + 1])
                    escape, i = False, i + 1
                    continue
                m = _IN_STRING.search(chunk, i)
                if m is None:
                    take(chunk[i:])
                    break
                j = m.start()
                take(chunk[i:j + 1])
                i = j + 1
                if chunk[j] == 0x5C:  # a backslash: the next byte is escaped
                    escape = True
                    continue
                in_string = False
                if depth == 0:
                    return offset + i, Oversized(_big_ident(team, recipient, digests, present), None, None,
                                                 offset + i - at)
                if role == "key-string":
                    role = "after-key"
                elif target is not None:
                    present.add(target)
                    target = None
                continue
            m = _OUTSIDE.search(chunk, i)
            if m is None:
                break
            j = m.start()
            c = chunk[j]
            i = j + 1
            if c == 0x22:  # "
                in_string = True
                if depth == 1 and role == "key":
                    role = "key-string"
                    key.clear()
                elif depth == 1 and role == "value":
                    k = bytes(key[:-1])  # the key as captured ends with its closing quote
                    target = k if k in digests else None
            elif c in (0x7B, 0x5B):  # { [
                depth += 1
                if depth == 1:
                    role = "key" if c == 0x7B else ""
            elif c in (0x7D, 0x5D):  # } ]
                depth -= 1
                if depth == 0:
                    stop = offset + i
                    return stop, Oversized(_big_ident(team, recipient, digests, present),
                                           _shown(shown[b"from"]) if b"from" in present else None,
                                           _shown(shown[b"timestamp"]) if b"timestamp" in present else None,
                                           stop - at)
            elif depth == 1 and c == 0x3A and role == "after-key":  # :
                role = "value"
            elif depth == 1 and c == 0x2C and role:  # ,
                role = "key"
        offset += n


def _big_ident(team: str, recipient: str, digests: dict[bytes, Any], present: set[bytes]) -> str:
    h = hashlib.sha256(f"{team}\0{recipient}\0".encode("utf-8", "surrogatepass"))
    for k in _KEPT:
        h.update(k + (b"=" if k in present else b"-") + digests[k].digest())
    return h.hexdigest()[:32]


def _shown(raw: bytearray) -> str:
    """A string value as raw JSON bytes, decoded as far as that goes, for a log line."""
    body = bytes(raw[:-1]) if raw.endswith(b'"') else bytes(raw)
    try:
        value = json.loads(b'"' + body + b'"')
    except ValueError:
        value = body.decode("utf-8", "replace")
    return value if len(value) <= SHOWN_BYTES else value[:SHOWN_BYTES - 1] + "…"


# -- the lock ---------------------------------------------------------------------------

class _SharedLock:
    """A shared flock on the team's ``.lock``, only if it comes free within a few milliseconds."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.fd: int | None = None
        self.held = False
        self.contended = False  # a writer held it all the tries long

    def acquire(self) -> None:
        if self.path is None:
            return
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return
        for _ in range(LOCK_TRIES):
            try:
                fcntl.flock(self.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                self.held = True
                return
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    return
                time.sleep(LOCK_PAUSE)
        self.contended = True

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            if self.held:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
        self.fd, self.held, self.contended = None, False, False


def parse_inbox_bytes(data: bytes, team: str, recipient: str,
                      max_item_bytes: int = DEFAULT_MAX_ITEM_BYTES) -> list[Entry]:
    """Every element of an inbox held in memory, by the same scanner the files go through."""
    out: list[Entry] = []
    InboxFile(Path("-"), team, recipient, max_item_bytes).scan(
        lambda n, off: data[off:off + n], (0, 0, len(data)), (0, len(data), 0), lambda: None, out.extend)
    return out
