"""The inbox reader's own logic: what it reads again, what it hands on, what it refuses.

Driven on files in a temporary directory, one read at a time, with no sleeping. Every
layout a writer may use is tried: claude-teams' one-line ``json.dumps``, the test
server's ``indent=2``, compact separators, and raw UTF-8 instead of ``\\u`` escapes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import pytest

from orchestratord.inboxfile import BATCH, CHUNK, Entry, InboxError, InboxFile, message_identity
from orchestratord.teammsg import TeamMessage

TEAM, LEAD = "my-team", "team-lead"
REMINDER = "\n\n<system_reminder>This message was sent from {0}. Use your send_message tool to respond.</system_reminder>"

LAYOUTS: dict[str, Callable[[Any], str]] = {
    "one-line": json.dumps,
    "indent-2": lambda doc: json.dumps(doc, indent=2),
    "compact": lambda doc: json.dumps(doc, separators=(",", ":")),
    "raw-utf8": lambda doc: json.dumps(doc, ensure_ascii=False),
}


def message(i: int, read: bool = False, text: str | None = None, sender: str | None = None) -> dict[str, Any]:
    who = sender or f"worker-{i % 3 + 1}"
    return {"from": who, "text": (text if text is not None else f"report {i}: café ✓ done") + REMINDER.format(who),
            "summary": f"report {i}", "timestamp": f"2026-11-23T19:{i // 60 % 60:02d}:{i % 60:02d}.{i % 1000:03d}Z",
            "color": "blue", "read": read}


class Inbox:
    """One inbox file, rewritten in place as the writers do, and a reader on it."""

    def __init__(self, tmp: Path, layout: str = "one-line", limit: int = 1024 * 1024) -> None:
        self.path = tmp / f"{LEAD}.json"
        self.dump = LAYOUTS[layout]
        self.reader = InboxFile(self.path, TEAM, LEAD, max_item_bytes=limit)
        self.messages: list[dict[str, Any]] = []

    def write(self, text: str | bytes | None = None) -> None:
        data = text if text is not None else self.dump(self.messages)
        with open(self.path, "ab+") as fh:  # same inode: truncate and write
            fh.seek(0)
            fh.truncate()
            fh.write(data.encode() if isinstance(data, str) else data)

    def append(self, *items: dict[str, Any]) -> None:
        self.messages.extend(items)
        self.write()

    def read(self) -> tuple[list[list[Entry]], bool]:
        """The batches handed on, and whether the read went on from where the last one stopped."""
        batches: list[list[Entry]] = []
        result = self.reader.read(batches.append)
        return batches, result.incremental


def texts(batches: list[list[Entry]]) -> list[str]:
    return [e.fields["text"].split("\n\n")[0] for b in batches for e in b if e.fields]


@pytest.fixture(params=sorted(LAYOUTS))
def inbox(request: pytest.FixtureRequest, tmp_path: Path) -> Inbox:
    return Inbox(tmp_path, request.param)


def test_an_append_is_read_alone(inbox: Inbox) -> None:
    inbox.append(*(message(i) for i in range(3)))
    batches, incremental = inbox.read()
    assert not incremental and texts(batches) == [f"report {i}: café ✓ done" for i in range(3)]
    inbox.append(message(3))
    batches, incremental = inbox.read()
    assert incremental and [e.position for b in batches for e in b] == [3]
    assert texts(batches) == ["report 3: café ✓ done"]
    assert inbox.read() == ([], True), "nothing new, nothing handed on"


def test_an_append_to_a_long_inbox_reads_a_few_kilobytes(tmp_path: Path) -> None:
    box = Inbox(tmp_path)
    box.append(*(message(i, read=True) for i in range(3000)))
    box.read()
    size = box.path.stat().st_size
    box.append(message(3000))
    read = [0]
    data = box.path.read_bytes()

    def pread(n: int, offset: int) -> bytes:
        piece = data[offset:offset + n]
        read[0] += len(piece)
        return piece

    st = box.path.stat()
    got: list[Entry] = []
    result = box.reader.scan(pread, (st.st_ino, st.st_dev, st.st_size), (st.st_ino, st.st_size, st.st_mtime_ns),
                             lambda: None, got.extend)
    assert result.incremental and [e.position for e in got] == [3000]
    assert size > 800_000 and read[0] < 16 * 1024, f"read {read[0]} bytes of {st.st_size}"


def test_a_flipped_read_flag_is_a_full_read_that_hands_on_nothing_known(inbox: Inbox) -> None:
    inbox.append(*(message(i) for i in range(2 * BATCH + 10)))
    assert sum(len(b) for b in inbox.read()[0]) == 2 * BATCH + 10
    for m in inbox.messages[-5:]:
        m["read"] = True  # read_inbox: the newest first
    inbox.write()
    batches, incremental = inbox.read()
    assert not incremental and batches == [], "same messages in the same batches: no look-up"
    inbox.messages[0]["read"] = True
    inbox.append(message(2 * BATCH + 10))
    batches, incremental = inbox.read()
    assert not incremental
    assert [(b[0].position, len(b)) for b in batches] == [(2 * BATCH, 11)], "only the batch that changed"


def test_a_file_cut_short_mid_write_is_retried_and_read_once(inbox: Inbox) -> None:
    inbox.append(message(0), message(1))
    inbox.read()
    whole = inbox.dump(inbox.messages + [message(2)])
    for cut in (len(whole) - 1, len(whole) - 40, 10, 0):
        inbox.write(whole[:cut])
        with pytest.raises(InboxError) as info:
            inbox.read()
        assert info.value.transient, f"cut at {cut}: {info.value}"
    inbox.messages.append(message(2))
    inbox.write()
    batches, incremental = inbox.read()
    assert incremental and texts(batches) == ["report 2: café ✓ done"], "the failed reads moved nothing"
    assert inbox.read() == ([], True)


def test_a_half_written_new_item_after_the_resume_point_waits(tmp_path: Path) -> None:
    box = Inbox(tmp_path)
    box.append(message(0))
    box.read()
    whole = box.dump(box.messages + [message(1)])
    box.write(whole[:-30])
    with pytest.raises(InboxError, match="ends"):
        box.read()
    box.append(message(1))
    batches, incremental = box.read()
    assert incremental and texts(batches) == ["report 1: café ✓ done"]


@pytest.mark.parametrize("count", [4, 13, 14, 40])  # the windows overlap, touch, or lie apart
def test_a_rewrite_with_another_prefix_is_read_whole(inbox: Inbox, count: int) -> None:
    inbox.append(*(message(i) for i in range(count)))
    inbox.read()
    inbox.messages[0] = message(0, text="report 9: café ✓ done")  # same length: only the head window sees it
    inbox.write()
    batches, incremental = inbox.read()
    assert not incremental and "report 9: café ✓ done" in texts(batches)
    inbox.messages[:2] = [message(50, text="a different first message, longer than before")]
    inbox.append(message(51))
    batches, incremental = inbox.read()
    assert not incremental and "a different first message, longer than before" in texts(batches)


def test_a_replaced_file_is_read_whole(tmp_path: Path) -> None:
    box = Inbox(tmp_path)
    box.append(message(0), message(1))
    box.read()
    other = tmp_path / "new.json"
    other.write_text(json.dumps([message(0), message(1), message(2)]))
    other.replace(box.path)  # a new inode with the same prefix
    batches, incremental = box.read()
    assert not incremental and len(texts(batches)) == 3


def test_an_oversized_item_is_skimmed_and_the_next_ones_read(inbox: Inbox) -> None:
    inbox.reader.max_item_bytes = 8192
    tricky = 'quotes " and \\ backslashes, } braces ] and {"json": [1, 2]} ' * 400
    inbox.append(message(0), message(1, text=tricky, sender="worker-9"), message(2))
    batches, _ = inbox.read()
    big = [e.oversized for b in batches for e in b if e.oversized]
    assert texts(batches) == ["report 0: café ✓ done", "report 2: café ✓ done"]
    assert len(big) == 1 and big[0].sender == "worker-9" and big[0].timestamp == message(1)["timestamp"]
    alone = len(inbox.dump(inbox.messages[1]).encode())  # indented deeper inside the array with indent=2
    assert big[0].size == alone or inbox.dump is LAYOUTS["indent-2"] and alone < big[0].size < alone + 200
    inbox.messages[1]["read"] = True  # the flip moves it and changes its size: still the same message
    inbox.append(message(3))
    batches, _ = inbox.read()
    again = [e.oversized for b in batches for e in b if e.oversized]
    assert [o.ident for o in again] == [big[0].ident] and again[0].size == big[0].size - 1
    inbox.append(message(4, text=tricky))  # found by the incremental read this time
    batches, incremental = inbox.read()
    assert incremental and [e.oversized is not None for b in batches for e in b] == [True]


def test_an_item_over_the_limit_is_never_held_whole(tmp_path: Path) -> None:
    box = Inbox(tmp_path, limit=4096)
    box.append(message(0, text="x" * (20 * CHUNK)), message(1))
    seen: list[int] = []
    data = box.path.read_bytes()
    st = box.path.stat()

    def pread(n: int, offset: int) -> bytes:
        seen.append(n)
        return data[offset:offset + n]

    box.reader.scan(pread, (st.st_ino, st.st_dev, st.st_size),
                    (st.st_ino, st.st_size, st.st_mtime_ns), lambda: None, lambda entries: None)
    assert max(seen) <= CHUNK, "read in chunks, whatever the item's size"


def test_large_items_and_characters_across_chunk_boundaries(tmp_path: Path) -> None:
    box = Inbox(tmp_path, "raw-utf8")
    box.append(message(0, text="é" * (CHUNK + 1)), message(1, text="✓" * (CHUNK // 3 + 7)), message(2))
    batches, _ = box.read()
    assert [len(t) for t in texts(batches)] == [CHUNK + 1, CHUNK // 3 + 7, len("report 2: café ✓ done")]
    box.append(message(3))
    batches, incremental = box.read()
    assert incremental and texts(batches) == ["report 3: café ✓ done"]


def test_garbage_after_the_array(inbox: Inbox) -> None:
    inbox.append(message(0), message(1))
    good = inbox.dump(inbox.messages)
    inbox.write(good + "\n]junk")
    handed: list[list[Entry]] = []
    with pytest.raises(InboxError, match="data after the array") as info:
        inbox.reader.read(handed.append)
    assert info.value.transient
    assert texts(handed) == ["report 0: café ✓ done", "report 1: café ✓ done"], "what is readable is handed on"
    inbox.append(message(2))
    batches, _ = inbox.read()
    assert "report 2: café ✓ done" in texts(batches)


@pytest.mark.parametrize("data, transient", [(b"", True), (b" \n", True), (b"[", True), (b"{}", False),
                                             (b"true", False), (b"tru", True), (b"this is not json", True),
                                             (b"[1 2]", True), (b"[1,]", True), (b"\xff[]", True)])
def test_unusable_files(tmp_path: Path, data: bytes, transient: bool) -> None:
    box = Inbox(tmp_path)
    box.write(data)
    with pytest.raises(InboxError) as info:
        box.read()
    assert info.value.transient is transient, str(info.value)


def test_an_empty_array_then_its_first_message(inbox: Inbox) -> None:
    inbox.write("[]")
    assert inbox.read() == ([], False)
    inbox.append(message(0))
    batches, incremental = inbox.read()
    assert incremental and texts(batches) == ["report 0: café ✓ done"]


def test_a_rewrite_during_a_read_keeps_what_was_recorded_and_goes_on_from_there(tmp_path: Path) -> None:
    box = Inbox(tmp_path)
    box.append(*(message(i) for i in range(2 * BATCH + 3)))
    data = box.path.read_bytes()
    st = box.path.stat()
    calls = [0]

    def unchanged() -> None:
        calls[0] += 1
        if calls[0] == 2:
            raise InboxError("the file changed while it was read", transient=True)

    handed: list[list[Entry]] = []
    with pytest.raises(InboxError, match="changed"):
        box.reader.scan(lambda n, off: data[off:off + n], (st.st_ino, st.st_dev, st.st_size),
                        (st.st_ino, st.st_size, st.st_mtime_ns), unchanged, handed.append)
    assert [len(b) for b in handed] == [BATCH]
    box.append(message(2 * BATCH + 3))  # the change was an append: the read goes on after the first batch
    batches, incremental = box.read()
    assert incremental and [e.position for b in batches for e in b][0] == BATCH
    assert [e.position for b in batches for e in b][-1] == 2 * BATCH + 3


def test_entries_that_are_not_messages_are_handed_on_with_why(tmp_path: Path) -> None:
    box = Inbox(tmp_path)
    box.write(json.dumps([message(0), {"text": "no sender", "timestamp": "t"}, 7, {"from": "", "text": "", "timestamp": ""}]))
    [batch], _ = box.read()
    assert [e.problem for e in batch] == [None, "has no 'from'", "must be an object, not int", "'from' is empty"]


def test_identity_is_the_one_the_ledger_already_holds() -> None:
    # The identities recorded by earlier versions must still match: same fields, same hash.
    h = hashlib.sha256()
    for part in (TEAM, LEAD, "worker-1", "2026-11-23T19:40:00.000Z", "hello"):
        h.update(part.encode("utf-8", "surrogatepass") + b"\0")
    assert message_identity(TEAM, LEAD, "worker-1", "2026-11-23T19:40:00.000Z", "hello") == h.hexdigest()[:32]
    m = TeamMessage(TEAM, LEAD, "worker-1", "2026-11-23T19:40:00.000Z", "hello", None, "message", True)
    assert m.identity == h.hexdigest()[:32]


def test_while_a_writer_holds_the_lock_only_the_new_part_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole read under a writer's lock would meet the file half rewritten: it waits for the
    lock (up to LOCK_PATIENCE); an append, checked part by part, is read at once."""
    import fcntl

    from orchestratord import inboxfile
    monkeypatch.setattr(inboxfile, "LOCK_PAUSE", 0.0)
    lock = tmp_path / ".lock"
    lock.touch()
    box = Inbox(tmp_path)
    box.reader = InboxFile(box.path, TEAM, LEAD, lock_path=lock)
    box.append(*(message(i) for i in range(3)))
    assert texts(box.read()[0]) == [f"report {i}: café ✓ done" for i in range(3)]
    with open(lock, "rb") as writer:
        fcntl.flock(writer, fcntl.LOCK_EX)
        box.append(message(3))
        batches, incremental = box.read()
        assert incremental and texts(batches) == ["report 3: café ✓ done"], "an append is read under the lock"
        box.write(json.dumps([message(i) for i in range(4)])[: 200])  # the writer halfway through its rewrite
        with pytest.raises(inboxfile.InboxBusy):
            box.read()
        monkeypatch.setattr(inboxfile, "LOCK_PATIENCE", 0.0)
        with pytest.raises(InboxError):  # past its patience the reader goes ahead, and finds the file half written
            box.read()
    box.messages[1]["read"] = True
    box.write()
    batches, incremental = box.read()
    assert not incremental and texts(batches) == [], "the lock free: read whole, nothing new"
