"""Bad input, fuzzed: frames, events, inbox files, configs and commands never raise past their parser.

Every parser here has one documented way to say no (a counted refusal, ``None``, an
``InboxError``, a ``ConfigError``, an empty list of findings); anything else would take
a worker thread through its error path. And what must come out is stated: the daemon's
own event reader (the frame guard, sseclient-py, ``normalize``) reads a stream split
anywhere as the same events; a corrupt frame costs only itself and is counted; a valid
inbox reads as its messages. Seeds come from the recordings in ``tests/data``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestratord.config import DEFAULT_TRIGGERS, ConfigError, parse_config
from orchestratord.guard import Judge, seen_in_event, seen_in_permission
from orchestratord.inbox import InboxError, parse_inbox
from orchestratord.inboxfile import InboxFile, parse_inbox_bytes
from orchestratord.policy import COMMAND, MESSAGE, PATH, TOOL, Context, build_rules, evaluate
from orchestratord.stream import Event, FrameGuard, head_session, head_sync, normalize, read_data
from orchestratord.triggers import match_all
from tests.support import faults
from tests.support.reference import reference_dir, teams_examples_dir

pytestmark = pytest.mark.faults

# The long form (make faults) tries twenty times as many inputs.
FUZZ = settings(max_examples=faults.runs(100, 2000), deadline=None, suppress_health_check=[HealthCheck.too_slow])
JUDGE = Judge(build_rules(()))
CONTEXT = Context(project="/srv/project", home="/home/dev")


@pytest.fixture(autouse=True)
def _row(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each fuzzed parser is a row of the fault table."""
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None:
        faults.record(faults.CaseResult(
            case=f"fuzz: {request.node.name.removeprefix('test_').replace('_', ' ')}",
            runs=faults.runs(100, 2000), crashes=0 if report.passed else 1,
            notes="inputs generated"))


def _seed_frames() -> list[bytes]:
    path = reference_dir() / "event-stream-prompt-cycle.sse"
    return [f + b"\n\n" for f in path.read_bytes().split(b"\n\n") if f.strip()][:40]


SEEDS = _seed_frames()

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=25)


@dataclass
class Read:
    """What the daemon's event reader made of some bytes: its events and its counted errors."""

    events: list[Event]
    oversized: int = 0
    undecodable: int = 0
    not_json: int = 0
    not_an_event: int = 0

    @property
    def errors(self) -> int:
        return self.oversized + self.undecodable + self.not_json + self.not_an_event

    def summary(self) -> list[tuple[str | None, str]]:
        return [(e.type, e.data) for e in self.events]


def read_all(chunks: list[bytes], max_bytes: int = 4096) -> Read:
    """The daemon's own reading of the stream (``EventReader._consume``): the frame guard,
    sseclient-py, JSON, ``normalize``, each refusal counted; then the trigger rules and
    the guard on every event."""
    guard = FrameGuard(max_bytes)
    out = Read([])
    for data in read_data(guard.frames(chunks)):
        try:
            obj = json.loads(data)
        except ValueError:
            out.not_json += 1
            continue
        event = normalize(obj, data)
        if event is None:
            out.not_an_event += 1
            continue
        match_all(DEFAULT_TRIGGERS, event, "ses_own", lambda sid: None)
        for seen in seen_in_event(event, "ses_own"):
            JUDGE.findings(seen)
        out.events.append(event)
    out.oversized, out.undecodable = guard.oversized, guard.undecodable
    return out


def split_at(blob: bytes, cuts: list[int]) -> list[bytes]:
    """``blob`` in chunks cut at ``cuts`` (positions past its end are ignored)."""
    chunks, at = [], 0
    for c in sorted(set(cuts)):
        if at < c < len(blob):
            chunks.append(blob[at:c])
            at = c
    chunks.append(blob[at:])
    return chunks


WHOLE = read_all([b"".join(SEEDS)], max_bytes=1 << 20)


def expected(picks: list[int]) -> list[tuple[str | None, str]]:
    return [(WHOLE.events[i].type, WHOLE.events[i].data) for i in picks]


def test_the_seed_frames_are_all_events() -> None:
    """The recorded frames the properties start from: every one an event, none refused."""
    assert len(WHOLE.events) == len(SEEDS) and WHOLE.errors == 0


@FUZZ
@given(picks=st.lists(st.integers(0, len(SEEDS) - 1), min_size=1, max_size=12),
       cuts=st.lists(st.integers(min_value=1, max_value=8192), max_size=30),
       newline=st.sampled_from([b"\n", b"\r\n", b"\r"]))
def test_a_stream_split_anywhere_reads_as_the_same_events(picks: list[int], cuts: list[int], newline: bytes) -> None:
    blob = b"".join(SEEDS[i] for i in picks).replace(b"\n", newline)
    whole = read_all([blob], max_bytes=1 << 20)
    split = read_all(split_at(blob, cuts), max_bytes=1 << 20)
    assert split.summary() == whole.summary() == expected(picks)
    assert split.errors == whole.errors == 0


def _corrupt(frame: bytes, how: str, where: int) -> bytes:
    """One frame made unreadable in one way; still a whole frame (ends with a blank line)."""
    data = frame[len(b"data: "):-2]
    if how == "truncated":  # a proper prefix of a JSON object is never JSON
        return b"data: " + data[:where % len(data)] + b"\n\n"
    if how == "utf-8":
        at = where % len(data)
        return b"data: " + data[:at] + b"\xff" + data[at:] + b"\n\n"
    if how == "not-an-event":
        return b"data: " + json.dumps([json.loads(data)]).encode() + b"\n\n"
    return b"data: " + data + b" " * 5000 + b"\n\n"  # oversized


CORRUPTIONS = {"truncated": "not_json", "utf-8": "undecodable", "not-an-event": "not_an_event", "oversized": "oversized"}


@FUZZ
@given(before=st.lists(st.integers(0, len(SEEDS) - 1), max_size=6),
       after=st.lists(st.integers(0, len(SEEDS) - 1), max_size=6),
       bad=st.integers(0, len(SEEDS) - 1), how=st.sampled_from(sorted(CORRUPTIONS)), where=st.integers(0, 1 << 16),
       cuts=st.lists(st.integers(min_value=1, max_value=8192), max_size=20))
def test_a_corrupt_frame_costs_itself_only_and_is_counted(before: list[int], after: list[int], bad: int, how: str,
                                                          where: int, cuts: list[int]) -> None:
    """The frames before it are read, the corrupt frame is counted as its kind of error
    (never skipped unseen), and reading goes on with the frames after it."""
    blob = b"".join(SEEDS[i] for i in before) + _corrupt(SEEDS[bad], how, where) + b"".join(SEEDS[i] for i in after)
    got = read_all(split_at(blob, cuts), max_bytes=1 << 20 if how != "oversized" else 4096)
    assert got.summary() == expected(before + after)
    assert got.errors == 1 and getattr(got, CORRUPTIONS[how]) == 1, got


@FUZZ
@given(picks=st.lists(st.integers(0, len(SEEDS) - 1), min_size=1, max_size=12),
       noise=st.lists(st.binary(max_size=64), max_size=6),
       cuts=st.lists(st.integers(min_value=1, max_value=4096), max_size=20),
       newline=st.sampled_from([b"\n", b"\r\n", b"\r"]))
def test_noise_between_real_frames_leaves_the_frames_around_it(picks: list[int], noise: list[bytes],
                                                               cuts: list[int], newline: bytes) -> None:
    """Arbitrary bytes, ended by a blank line: the real frames before and after still read."""
    half = len(picks) // 2
    blob = (b"".join(SEEDS[i] for i in picks[:half]) + b"".join(noise) + b"\n\n"
            + b"".join(SEEDS[i] for i in picks[half:])).replace(b"\n", newline)
    got = read_all(split_at(blob, cuts), max_bytes=1 << 20).summary()
    assert got[:half] == expected(picks[:half])
    assert got[len(got) - (len(picks) - half):] == expected(picks[half:])


@FUZZ
@given(payload=json_values, etype=st.sampled_from(["message.part.updated", "permission.asked", "session.status",
                                                   "session.error", "session.idle", "message.updated", "x.unknown"]))
def test_events_of_any_shape(payload: Any, etype: str) -> None:
    for obj in ({"payload": {"type": etype, "properties": payload}}, {"type": etype, "properties": payload},
                {"payload": payload}, payload):
        data = json.dumps(obj)
        read_all([f"data: {data}\n\n".encode()], max_bytes=1 << 20)
    if isinstance(payload, dict):
        for seen in seen_in_permission(payload):
            JUDGE.findings(seen)


# Strings that try to pass for the structure around them once they are escaped.
tricky = st.lists(st.sampled_from(['"', "\\", ",", ":", "{", "}", "a", "s", "é", '","type":"', '"payload":{',
                                  ',"properties":{"sessionID":"', '"sessionID":"', '","seq":1,"aggregateID":"',
                                  'message.part.delta', "sync", "\\u0061", "\\\""]), max_size=8).map("".join)


@FUZZ
@given(directory=tricky, project=tricky, eid=tricky, etype=tricky | st.sampled_from(["message.part.delta", "sync"]),
       sid=tricky, seq=st.integers(-3, 2**53), ascii_only=st.booleans(), sync=st.booleans())
def test_the_frame_head_is_the_decoded_value_or_nothing(directory: str, project: str, eid: str, etype: str, sid: str,
                                                         seq: int, ascii_only: bool, sync: bool) -> None:
    """What the reader reads off the start of a frame, to pass it over undecoded, is what the
    full decode gives, whatever quotes and escapes the strings before it hold."""
    inner: dict[str, Any] = {"id": eid, "type": "sync" if sync else etype}
    if sync:
        inner["syncEvent"] = {"id": eid, "type": etype, "seq": seq, "aggregateID": sid, "data": {}}
    else:
        inner["properties"] = {"sessionID": sid, "delta": "x"}
    obj = {"directory": directory, "project": project, "payload": inner}
    frame = b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=ascii_only).encode() + b"\n\n"
    data = next(read_data([frame]))
    event = normalize(json.loads(data), data)
    if event is None:  # an empty type, or a sync without its copy: not an event at all
        assert etype in ("", "sync") and not sync and head_sync(frame) is None
        return
    with_session = head_session(frame)
    assert with_session is None or with_session == (event.type.encode(), event.session_id)
    from_sync = head_sync(frame)
    assert from_sync is None or (event.sync is not None and from_sync == (event.session_id, event.sync["seq"]))
    # And when nothing needs an escape, the head is read: the fast path is taken.
    if all('"' not in v and "\\" not in v and (v.isascii() or not ascii_only) for v in (directory, project, eid, etype, sid)):
        if not sync:
            assert with_session is not None
        elif seq >= 0:
            assert from_sync is not None


@FUZZ
@given(data=st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_inbox_files_of_any_content(data: bytes) -> None:
    try:
        messages, skipped = parse_inbox(data, "t", "team-lead")
    except InboxError:
        return
    assert all(isinstance(s, str) for s in skipped)
    for m in messages:
        assert isinstance(m.identity, str) and isinstance(m.short(), str)


@FUZZ
@given(entries=st.lists(st.dictionaries(st.sampled_from(["from", "text", "timestamp", "summary", "read", "color"]),
                                        json_values, max_size=6), max_size=6))
def test_inbox_entries_with_missing_or_odd_fields(entries: list[dict[str, Any]]) -> None:
    messages, skipped = parse_inbox(json.dumps(entries).encode(), "t", "team-lead")
    assert len(messages) + len(skipped) == len(entries)


message_fields = st.fixed_dictionaries(
    {"from": st.text(min_size=1, max_size=20), "text": st.text(max_size=200),
     "timestamp": st.text(min_size=1, max_size=30)},
    optional={"summary": st.text(max_size=30), "read": st.booleans(), "color": st.sampled_from(["blue", "green"])})
RECORDED_INBOXES = sorted(teams_examples_dir().glob("inbox-*.json"))


def _recorded_messages() -> list[dict[str, Any]]:
    return [m for path in RECORDED_INBOXES for m in json.loads(path.read_text())]


@FUZZ
@given(messages=st.lists(message_fields, max_size=12) | st.just(_recorded_messages()),
       indent=st.sampled_from([None, 0, 2, 4]), ensure_ascii=st.booleans())
def test_a_valid_inbox_parses_to_its_messages(messages: list[dict[str, Any]], indent: int | None,
                                              ensure_ascii: bool) -> None:
    """Any well-formed inbox, in any layout, reads as its messages in order, none skipped."""
    data = json.dumps(messages, indent=indent, ensure_ascii=ensure_ascii).encode()
    entries = parse_inbox_bytes(data, "t", "team-lead", 1 << 20)
    assert [e.problem for e in entries] == [None] * len(messages)
    got = [(e.fields or {}).get(k) for e in entries for k in ("from", "text", "timestamp")]
    assert got == [m[k] for m in messages for k in ("from", "text", "timestamp")]
    assert [e.position for e in entries] == list(range(len(messages)))
    parsed, skipped = parse_inbox(data, "t", "team-lead", 1 << 20)
    assert not skipped and [(m.sender, m.text) for m in parsed] == [(m["from"], m["text"]) for m in messages]


def test_the_recorded_inboxes_are_read_whole() -> None:
    assert RECORDED_INBOXES and len(_recorded_messages()) >= 3


def _inbox_message(i: int, size: int = 0) -> dict[str, Any]:
    return {"from": f"w{i % 3}", "text": f"message {i} " + "x" * size, "timestamp": f"2026-11-24T00:00:{i:05d}Z",
            "read": False}


@FUZZ
@given(ops=st.lists(st.tuples(st.sampled_from(["append", "flip", "cut", "layout", "replace", "big"]),
                              st.integers(0, 10_000)), max_size=12))
def test_inbox_reads_lose_nothing_whatever_the_writers_do(ops: list[tuple[str, int]]) -> None:
    """Whatever the order of appends, flag flips, half-written files, layouts and replacements,
    every element of the file as it stands has been handed on once a read succeeds; with
    appends alone, each exactly once."""
    reader = InboxFile(Path("-"), "t", "team-lead", max_item_bytes=2048)
    messages: list[dict[str, Any]] = []
    inode, indent, again = 1, False, 0
    seen: set[str] = set()

    def dump(items: list[dict[str, Any]]) -> bytes:
        return json.dumps(items, indent=2 if indent else None).encode()

    def read(data: bytes) -> None:
        def record(entries: list[Any]) -> None:
            nonlocal again
            again += sum(e.token in seen for e in entries)
            seen.update(e.token for e in entries)
        reader.scan(lambda n, off: data[off:off + n], (inode, 0, len(data)), (inode, len(data), 0), lambda: None,
                    record)

    read(b"[]")
    for op, n in ops:
        if op == "append":
            messages += [_inbox_message(len(messages) + j) for j in range(n % 40 + 1)]
        elif op == "big":
            messages.append(_inbox_message(len(messages), n))
        elif op == "flip" and messages:
            for m in messages[-(n % len(messages) + 1):]:
                m["read"] = True
        elif op == "cut":
            whole = dump(messages + [_inbox_message(len(messages))])
            with pytest.raises(InboxError) as info:
                read(whole[:n % len(whole)])
            assert info.value.transient
        elif op == "layout":
            indent = not indent
        elif op == "replace":
            inode += 1
        read(dump(messages))
        assert {e.token for e in parse_inbox_bytes(dump(messages), "t", "team-lead", 2048)} <= seen
    if all(op in ("append", "big") for op, _ in ops):
        assert again == 0, "an append-only history hands nothing on twice"


TOML_PIECES = ["[server]\n", "[teams]\n", "[dispatch]\n", "[[triggers]]\n", "[[safety.rules]]\n", "[safety]\n",
               "[metrics]\n", "[stalls]\n", 'url = "http://127.0.0.1:1"\n', "url = 5\n", 'name = "x"\n',
               'pattern = "(("\n', "enabled = false\n", "debounce_seconds = -1\n", "names = [1, 2]\n",
               'listen = "nowhere"\n', "match = { part = { tool = [] } }\n", "= broken\n", "[server\n",
               'prompt = "{nope}"\n', "applies_to = [\"tool\"]\n", "actions = []\n", "teammate_quiet_seconds = 0\n"]


@FUZZ
@given(pieces=st.lists(st.sampled_from(TOML_PIECES), max_size=10), junk=st.text(max_size=30))
def test_config_files_fail_only_with_config_errors(pieces: list[str], junk: str) -> None:
    for text in ("".join(pieces), "".join(pieces) + junk):
        try:
            parse_config(text, "fuzz.toml", "/etc/x")
        except ConfigError as exc:
            assert exc.problems and all(p.startswith("fuzz.toml") for p in exc.problems)


SHELL_PIECES = ["rm", "-rf", "/", "~", "'", '"', "\\", "$(", ")", "`", "|", "&&", ";", "sudo", "sh", "-c", "curl",
                "x | sh", "git", "push", "--force", "main", "dd", "of=/dev/sda", ":(){", ":|:&", "};:", "DROP", "TABLE",
                "\n", "#", "<<EOF", "<<-'X'", "EOF", "<<<", "$'\\x72m'", "{", "}", "(", "${HOME:-", "$((", "python3",
                "-c", "shutil.rmtree('/')", "os.system(\"", "find", "-delete", "-exec", "cd", "..", "*", ".*", "xargs",
                "env", "-S", "bash", "eval", "case", "in", "esac", "f()", "&", "2>&1", ">", "\\\n", "reset", "--hard"]


@FUZZ
@given(text=st.text(max_size=200) | st.lists(st.sampled_from(SHELL_PIECES), max_size=14).map(" ".join)
       | st.lists(st.sampled_from(SHELL_PIECES), max_size=20).map("".join),
       kind=st.sampled_from([COMMAND, MESSAGE, PATH, TOOL]), where=st.sampled_from([None, CONTEXT]))
def test_the_policy_judges_any_text(text: str, kind: str, where: Context | None) -> None:
    for finding in evaluate(text, kind, context=where):
        assert finding.rule and isinstance(finding.what, str)
