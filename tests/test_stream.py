"""The wire format: frame splitting, guards and normalisation, on recorded streams."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import sseclient
from hypothesis import given
from hypothesis import strategies as st

from orchestratord.config import DEFAULT_TRIGGERS
from orchestratord.events import TALLY_SECONDS, EventReader
from orchestratord.ledger import Ledger
from orchestratord.state import Shared
from orchestratord.stream import HIGH_VOLUME, FrameGuard, from_sync, head_session, head_sync, normalize, read_data
from orchestratord.triggers import RuleSet, match_all
from tests.support.reference import reference_dir

REF = reference_dir()


def parse(chunks: list[bytes], max_bytes: int = 1 << 20) -> tuple[list[str], FrameGuard]:
    guard = FrameGuard(max_bytes)
    data = list(read_data(guard.frames(chunks)))
    return data, guard


def recorded(name: str) -> bytes:
    return (REF / name).read_bytes()


@pytest.mark.parametrize("name", ["event-stream-prompt-cycle.sse", "global-event-stream-with-sync.sse"])
@pytest.mark.parametrize("size", [1, 7, 4096, 65536])
def test_recorded_stream_same_events_whatever_the_chunking(name: str, size: int) -> None:
    raw = recorded(name)
    expected = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]
    chunks = [raw[i:i + size] for i in range(0, len(raw), size)]
    got, guard = parse(chunks)
    assert got == expected
    assert guard.oversized == guard.undecodable == 0
    for data in got:
        assert normalize(json.loads(data), data) is not None


@pytest.mark.parametrize("sep", [b"\n", b"\r\n", b"\r"])
def test_line_endings(sep: bytes) -> None:
    frames = [b'data: {"type":"a","properties":{}}', b'data: {"type":"b","properties":{}}']
    raw = b"".join(f + sep + sep for f in frames)
    for size in (1, 2, 3, len(raw)):
        got, _ = parse([raw[i:i + size] for i in range(0, len(raw), size)])
        assert [json.loads(d)["type"] for d in got] == ["a", "b"]


def test_oversized_frame_is_skipped_and_counted_and_the_next_one_survives() -> None:
    big = b"data: " + b"x" * 5000 + b"\n\n"
    ok = b'data: {"type":"after"}\n\n'
    got, guard = parse([big[:3000], big[3000:] + ok], max_bytes=1024)
    assert got == ['{"type":"after"}']
    assert guard.oversized == 1


def test_oversized_frame_in_one_chunk() -> None:
    got, guard = parse([b"data: " + b"y" * 3000 + b'\n\ndata: {"type":"z"}\n\n'], max_bytes=1024)
    assert got == ['{"type":"z"}'] and guard.oversized == 1


def test_invalid_utf8_frame_is_dropped_not_fatal() -> None:
    got, guard = parse([b'data: {"type":"\xff\xfe"}\n\ndata: {"type":"ok"}\n\n'])
    assert got == ['{"type":"ok"}'] and guard.undecodable == 1


def test_chunks_of_one_whole_frame_each_read_as_the_same_bytes_in_other_cuts() -> None:
    """opencode sends each event in a chunk of its own, and the guard takes such a chunk
    as it is: what it yields, refuses and counts must not differ from other cuttings."""
    at_limit = b'data: {"type":"y","p":"' + b"y" * 999 + b'"}'  # 1,024 bytes: the most let through
    assert len(at_limit) == 1024
    frames = [b'data: {"type":"a"}\n\n', b"\n\n", b'data: {"type":"\xff"}\n\n', b"data: " + b"x" * 1030 + b"\n\n",
              at_limit + b"\n\n", b'data: {"type":"b"}\n\n', b"\n", b"\n", b'data: {"type":"c"}\n\n']
    raw = b"".join(frames)
    whole, guard = parse(frames, max_bytes=1024)
    assert [json.loads(d)["type"] for d in whole] == ["a", "y", "b", "c"]
    assert (guard.oversized, guard.undecodable) == (1, 1)
    for newline in (b"\n", b"\r\n", b"\r"):
        ended = raw.replace(b"\n", newline)
        for size in (1, 5, 700, len(ended)):
            got, g = parse([ended[i:i + size] for i in range(0, len(ended), size)], max_bytes=1024)
            assert (got, g.oversized, g.undecodable) == (whole, 1, 1), (newline, size)
    # after an oversized frame cut over two chunks, a chunk of one frame ends the skipped one
    got, guard = parse([b"data: " + b"z" * 2000, b'\ndata: {"type":"its last line"}\n\n', b'data: {"type":"d"}\n\n'],
                       max_bytes=1024)
    assert [json.loads(d)["type"] for d in got] == ["d"] and guard.oversized == 1


def test_drained_callback_runs_between_reads() -> None:
    calls: list[int] = []
    guard = FrameGuard(1 << 20, on_drained=lambda: calls.append(1))
    list(guard.frames([b'data: {"type":"a"}\n\n', b'data: {"type":"b"}\n\n']))
    assert len(calls) == 2


def test_normalize_global_envelope_and_session() -> None:
    obj = {"directory": "/srv", "payload": {"id": "evt_1", "type": "message.part.updated",
                                            "properties": {"part": {"sessionID": "ses_a", "type": "tool"}}}}
    ev = normalize(obj, json.dumps(obj))
    assert ev is not None
    assert (ev.id, ev.type, ev.session_id, ev.directory) == ("evt_1", "message.part.updated", "ses_a", "/srv")


def test_normalize_instance_event_and_unknown_type() -> None:
    ev = normalize({"id": "evt_2", "type": "something.new", "properties": {"sessionID": "ses_b"}}, "")
    assert ev is not None and ev.type == "something.new" and ev.session_id == "ses_b"


@pytest.mark.parametrize("bad", [None, 3, [], {}, {"type": ""}, {"payload": {"type": 5}}, {"type": "sync"}])
def test_normalize_rejects_non_events(bad: object) -> None:
    assert normalize(bad, "") is None


def test_sync_event_and_history_record() -> None:
    sync = {"id": "evt_9", "type": "message.updated.1", "seq": 4, "aggregateID": "ses_c",
            "data": {"sessionID": "ses_c", "info": {"id": "msg_1"}}}
    ev = normalize({"payload": {"type": "sync", "syncEvent": sync, "id": "evt_9"}}, "")
    assert ev is not None and ev.type == "sync" and ev.session_id == "ses_c" and ev.sync == sync
    plain = from_sync(sync)
    assert plain is not None and plain.type == "message.updated" and plain.session_id == "ses_c"


def test_invalid_utf8_in_a_last_frame_ended_by_a_lone_cr_is_skipped() -> None:
    """Found by fuzzing: the last frame of CR-only input skipped the UTF-8 check and broke the parser."""
    frame = b'data: {"id":"evt_1","type":"server.connected","properties":{}}'
    data, guard = parse([b"\x80" + frame + b"\r\r"])
    assert data == [] and guard.undecodable == 1
    data, guard = parse([frame + b"\r\r"])
    assert len(data) == 1 and guard.undecodable == 0


_LINES = st.lists(st.one_of(
    st.builds(lambda f, v: f"{f}:{v}", st.sampled_from(["data", "event", "id", "retry", "", "other"]),
              st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\r\n"), max_size=12)),
    st.sampled_from(["data", ": comment", " ", "\t", "data:", "data: "]),
), max_size=6)


@given(frames=st.lists(_LINES, max_size=5), size=st.integers(1, 64))
def test_the_frame_guard_in_front_of_sseclient_changes_nothing_it_reads(frames: list[list[str]], size: int) -> None:
    """Whatever the chunking, sseclient-py reads the same events through the guard as
    straight off the bytes: the guard only cuts, it never alters or drops a valid frame."""
    raw = "".join("\n".join(lines) + "\n\n" for lines in frames).encode()
    chunks = [raw[i:i + size] for i in range(0, len(raw), size)]
    ours = list(read_data(FrameGuard(1 << 20).frames(chunks)))
    theirs = [e.data for e in sseclient.SSEClient(iter(chunks)).events()]
    assert ours == theirs


def _recorded_frames(name: str) -> list[bytes]:
    return [f + b"\n\n" for f in recorded(name).split(b"\n\n") if f.strip()]


@pytest.mark.parametrize("name", ["global-event-stream.sse", "global-event-stream-with-sync.sse"])
def test_head_agrees_with_the_full_decode(name: str) -> None:
    seen = syncs = 0
    for frame in _recorded_frames(name):
        data = next(read_data([frame]))
        event = normalize(json.loads(data), data)
        assert event is not None
        with_session = head_session(frame)
        assert with_session is None or with_session == (event.type.encode(), event.session_id)
        if event.type in HIGH_VOLUME:
            assert with_session is not None
            seen += 1
        sync = head_sync(frame)
        if event.type == "sync":
            assert event.sync is not None and sync == (event.session_id, event.sync["seq"])
            syncs += 1
        else:
            assert sync is None
    assert seen
    assert syncs or "sync" not in name


def test_head_leaves_unusual_frames_to_the_full_decode() -> None:
    props = b'"properties":{"sessionID":"ses_1","delta":"x"}'
    assert head_session(b'data: {"payload":{"type":"message.part.delta",' + props + b'}}\n\n') == (
        b"message.part.delta", "ses_1")
    assert head_session(b'data: {"payload":{"type":"message.part.delta","properties":{"delta":"x"}}}\n\n') is None
    assert head_session(b'data: {"type":"message.part.delta",' + props + b',"payload":{"type":"x"}}\n\n') is None
    assert head_session(b'data: {"directory":"a\\"b","payload":{"type":"message.part.delta",' + props + b'}}\n\n') is None
    assert head_session(b'data: {"payload":{"type":"message.part.d\\u0065lta",' + props + b'}}\n\n') is None
    assert head_session(b'data: {"payload":{"type":"message.part.delta","properties":{"sessionID":"a\\"b"}}}\n\n') is None
    assert head_session(b'data: {"payload":{"id":"x\\",\\"type\\":\\"y","type":"message.part.delta",' + props + b'}}\n\n') is None
    assert head_session(b'event: x\ndata: {"payload":{"type":"message.part.delta",' + props + b'}}\n\n') is None


def test_a_sync_head_is_read_only_when_plain() -> None:
    def frame(payload_type: bytes, head: bytes) -> bytes:
        return b'data: {"directory":"/p","payload":{"type":"%s","syncEvent":{%s,"data":{}}}}\n\n' % (payload_type, head)
    plain = b'"id":"evt_1","type":"message.updated.1","seq":%s,"aggregateID":"%s"'
    assert head_sync(frame(b"sync", plain % (b"12", b"ses_a"))) == ("ses_a", 12)
    assert head_sync(frame(b"sync", plain % (b"1.0", b"ses_a"))) is None
    assert head_sync(frame(b"sync", plain % (b"-1", b"ses_a"))) is None
    assert head_sync(frame(b"sync", plain % (b"3", b"ses_\\u0061"))) is None
    assert head_sync(frame(b"other", plain % (b"3", b"ses_a"))) is None
    assert head_sync(frame(b"sync", b'"id":"evt_1","seq":3,"type":"x","aggregateID":"ses_a"')) is None


def test_sync_copies_not_stored_move_the_cursor_without_a_decode(tmp_path: Path) -> None:
    """With the default store a sync copy's seq is read off its frame, and the cursor the
    ledger holds moves on with it; with store = "all" the copy is decoded and kept."""
    def sync(seq: int) -> bytes:
        return (b'data: {"directory":"/p","payload":{"type":"sync","syncEvent":{"id":"evt_%d","type":"session.updated.1",'
                b'"seq":%d,"aggregateID":"ses_a","data":{"sessionID":"ses_a"}}}}\n\n' % (seq, seq))
    decoded: list[str] = []
    for store in ("default", "all"):
        r = _failure_reader(tmp_path / store, [False])
        r.store = store
        one_event = r._one_event

        def counted(data: str, store: str = store, one_event: Callable[[str], None] = one_event) -> None:
            decoded.append(store)
            one_event(data)
        r._one_event = counted  # type: ignore[method-assign]
        chunks = [sync(4), sync(5) + sync(7)]

        class Resp:
            def iter_content(self, size: int) -> Iterator[bytes]:
                return iter(chunks)
        assert r.ledger is not None
        r._consume(Resp())  # type: ignore[arg-type]
        r.eventlog.flush()
        r.eventlog.save_seq()
        r.ledger.close()
        assert r.eventlog.last_seq == {"ses_a": 7}
        again = Ledger(str(tmp_path / store / "ledger.db"))
        try:
            assert again.get_meta("sync.last_seq") == json.dumps({"ses_a": 7})
            stored = again.db.execute("SELECT COUNT(*) FROM events WHERE type = 'sync'").fetchone()[0]
        finally:
            again.close()
        assert stored == (3 if store == "all" else 0)
    assert decoded == ["all"] * 3


def test_a_head_with_an_escape_in_its_session_is_decoded_in_full(tmp_path: Path) -> None:
    """The head is read up to the next quote; a session written with an escape is read by
    the full decode, so the delta counts for the session it names and the seq goes to it."""
    delta = b'data: {"payload":{"type":"message.part.delta","properties":{"sessionID":"ses_\\u0061","delta":"x"}}}\n\n'
    sync = (b'data: {"payload":{"type":"sync","syncEvent":{"id":"evt_1","type":"session.updated.1","seq":9,'
            b'"aggregateID":"ses_\\u0062","data":{}}}}\n\n')
    assert head_session(delta) is None and head_sync(sync) is None
    r = _failure_reader(tmp_path, [True])
    decoded: list[str] = []
    one_event = r._one_event

    def counted(data: str) -> None:
        decoded.append(data)
        one_event(data)
    r._one_event = counted  # type: ignore[method-assign]
    _consume_all(r, iter([delta, sync]))
    assert len(decoded) == 2
    assert r.shared.activity("ses_a") is not None and r.shared.activity("ses_\\u0061") is None
    assert r.eventlog.last_seq == {"ses_b": 9}


@pytest.mark.parametrize("name", ["global-event-stream.sse", "event-stream-prompt-cycle.sse"])
def test_rule_set_matches_what_match_all_matches(name: str) -> None:
    rules = (*DEFAULT_TRIGGERS, *[type(DEFAULT_TRIGGERS[0])(name=f"glob-{g}", event=g) for g in ("session.*", "*", "x")])
    ruleset = RuleSet(rules)
    for frame in _recorded_frames(name):
        data = next(read_data([frame]))
        event = normalize(json.loads(data), data)
        assert event is not None
        for own in (None, event.session_id):
            assert ruleset.match(event, own) == match_all(rules, event, own)


def test_deltas_are_counted_in_tallies_that_reach_the_shared_state_within_moments(tmp_path: Path) -> None:
    """Deltas are counted without a lock round each: a tally goes over once it is
    TALLY_SECONDS old, when the stream pauses, before any decoded event, and at the end."""
    now = [100.0]
    more = [True]

    class Backlog:
        def more(self) -> bool:
            return more[0]
    shared = Shared(clock=lambda: now[0])

    def delta(sid: str) -> bytes:
        return b'data: {"payload":{"type":"message.part.delta","properties":{"sessionID":"%s","delta":"x"}}}\n\n' % (
            sid.encode())

    seen: list[tuple[int, float | None]] = []

    def chunks() -> Iterator[bytes]:
        yield delta("ses_a")
        yield delta("ses_b")
        seen.append((shared.events_total, shared.activity("ses_a")))  # a moment: still tallied here
        now[0] += 2 * TALLY_SECONDS
        yield delta("ses_a")
        seen.append((shared.events_total, shared.activity("ses_b")))  # handed over at that pause
        yield delta("ses_c")
        yield b'data: {"payload":{"type":"server.heartbeat","properties":{}}}\n\n'
        seen.append((shared.events_total, shared.activity("ses_c")))  # handed over before the heartbeat
        yield delta("ses_d")
        more[0] = False  # nothing more has come: the stream pauses here
        yield delta("ses_d")
        seen.append((shared.events_total, shared.activity("ses_d")))  # handed over as it pauses
        more[0] = True

    class Resp:
        def iter_content(self, size: int) -> Iterator[bytes]:
            return chunks()

    r = EventReader(shared=shared, make_client=lambda: None,  # type: ignore[arg-type,return-value]
                    ledger_path=str(tmp_path / "ledger.db"), stream="global", directory=None, read_timeout=5,
                    max_event_bytes=1 << 20, reconnect_max=1, store="default", rules=(), on_trigger=lambda: None,
                    on_own_activity=lambda: None, clock=lambda: now[0])
    r.ledger = Ledger(str(tmp_path / "ledger.db"))
    r.eventlog.load(r.ledger)
    r._waiting = Backlog()  # type: ignore[assignment]
    try:
        r._consume(Resp())  # type: ignore[arg-type]
    finally:
        r.ledger.close()
    assert seen == [(0, None), (3, 100.1), (5, 100.1), (7, 100.1)]
    assert shared.events_total == 7 and shared.activity("ses_a") == 100.1



def _failure_reader(tmp_path: Path, more: list[bool], on_trigger: Callable[[], None] = lambda: None,
                    desk: Any = None) -> EventReader:
    """A reader whose one trigger rule is any session.error, its ledger open, on a socket
    that says more is waiting while ``more[0]``."""
    class Backlog:
        def more(self) -> bool:
            return more[0]

    rule = type(DEFAULT_TRIGGERS[0])(name="failed", event="session.error")
    r = EventReader(shared=Shared(), make_client=lambda: None,  # type: ignore[arg-type,return-value]
                    ledger_path=str(tmp_path / "ledger.db"), stream="global", directory=None, read_timeout=5,
                    max_event_bytes=1 << 20, reconnect_max=1, store="default", rules=(rule,),
                    on_trigger=on_trigger, on_own_activity=lambda: None, desk=lambda: desk)
    r.ledger = Ledger(str(tmp_path / "ledger.db"))
    r.eventlog.load(r.ledger)
    r.reactions.bind(r.ledger, None)  # type: ignore[arg-type]
    r._waiting = Backlog()  # type: ignore[assignment]
    return r


def _consume_all(r: EventReader, chunks: Iterator[bytes]) -> None:
    class Resp:
        def iter_content(self, size: int) -> Iterator[bytes]:
            return chunks

    assert r.ledger is not None
    try:
        r._consume(Resp())  # type: ignore[arg-type]
    finally:
        r.ledger.close()


def _failed(sid: str) -> bytes:
    return b'data: {"payload":{"type":"session.error","properties":{"sessionID":"%s","error":{}}}}\n\n' % sid.encode()


def test_the_dispatcher_is_woken_for_a_trigger_only_once_it_is_committed(tmp_path: Path) -> None:
    """The reader under load: triggers of events read back to back share one commit, and
    the dispatcher (which reads them on its own connection) is woken after it, never before."""
    more = [True]
    woken: list[int] = []
    other = Ledger(str(tmp_path / "ledger.db"))
    seen: list[tuple[int, int]] = []

    def chunks() -> Iterator[bytes]:
        yield _failed("ses_a")
        yield _failed("ses_b")
        seen.append((len(woken), len(other.pending_triggers())))
        more[0] = False  # the stream pauses after this one
        yield b'data: {"payload":{"type":"server.heartbeat","properties":{}}}\n\n'
        seen.append((len(woken), len(other.pending_triggers())))

    r = _failure_reader(tmp_path, more, on_trigger=lambda: woken.append(len(other.pending_triggers())))
    try:
        _consume_all(r, chunks())
    finally:
        other.close()
    assert seen == [(0, 0), (2, 2)], "held while more was waiting, committed and woken as the stream paused"
    assert woken == [2, 2], "each wake-up finds its trigger committed"


def test_a_permission_request_commits_what_is_held_before_the_broker_sees_it(tmp_path: Path) -> None:
    """The broker writes its decision before it replies: a trigger commit held open for the
    events around the request would make it wait, so the request ends the hold."""
    more = [True]
    other = Ledger(str(tmp_path / "ledger.db"))
    seen: list[tuple[bool, int]] = []

    class Desk:
        def asked(self, request: dict[str, Any]) -> None:
            seen.append((r.eventlog.holding, len(other.pending_triggers())))

        def session_seen(self, info: Any) -> None: ...

        def asks(self, session_id: str, permission: str) -> bool:
            return False

    def chunks() -> Iterator[bytes]:
        yield _failed("ses_a")
        seen.append((r.eventlog.holding, len(other.pending_triggers())))
        yield (b'data: {"payload":{"type":"permission.asked","properties":{"id":"per_1","sessionID":"ses_b",'
               b'"permission":"bash","patterns":["ls"]}}}\n\n')
        yield _failed("ses_c")
        seen.append((r.eventlog.holding, len(other.pending_triggers())))
        more[0] = False

    r = _failure_reader(tmp_path, more, desk=Desk())
    try:
        _consume_all(r, chunks())
    finally:
        other.close()
    assert seen == [(True, 0), (False, 1), (False, 2)], \
        "held, committed as the request reached the broker, and not held again just after"
