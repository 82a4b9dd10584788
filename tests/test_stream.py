"""The wire format: frame splitting, guards and normalisation, on recorded streams."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import sseclient

from orchestratord.stream import FrameGuard, from_sync, normalize


def _reference_dir() -> Path:
    """Recorded streams of opencode 1.18.33: $ORCHESTRATORD_REFERENCE, a sibling ``shared/``, or /work/shared."""
    candidates = [os.environ.get("ORCHESTRATORD_REFERENCE", ""),
                  str(Path(__file__).resolve().parents[2] / "shared" / "reference"),
                  "/work/shared/reference"]
    for c in candidates:
        if c and (Path(c) / "opencode-1.18.33").is_dir():
            return Path(c) / "opencode-1.18.33"
    return Path(candidates[1]) / "opencode-1.18.33"


REF = _reference_dir()


def parse(chunks: list[bytes], max_bytes: int = 1 << 20) -> tuple[list[str], FrameGuard]:
    guard = FrameGuard(max_bytes)
    data = [e.data for e in sseclient.SSEClient(guard.frames(chunks)).events()]
    return data, guard


def recorded(name: str) -> bytes:
    path = REF / name
    if not path.exists():
        pytest.skip(f"reference stream {path} not present")
    return path.read_bytes()


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
