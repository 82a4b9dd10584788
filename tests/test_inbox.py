"""Inbox parsing, message identity, and the watcher driven one step at a time."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

import pytest

from orchestratord import inboxfile
from orchestratord.inbox import InboxError, InboxWatcher, parse_inbox
from orchestratord.inboxfile import InboxFile
from orchestratord.ledger import Ledger
from orchestratord.teammsg import TeamMessage, call_ckey, content_key, message_ckey, message_type, without_reminder
from tests.support.daemon import holds, wait_for
from tests.support.logcapture import caplog  # noqa: F401 - the fixture
from tests.support.team import append_message, make_team, read_config, write_config

REMINDER = "\n\n<system_reminder>This message was sent from {0}. Use your send_message tool to respond.</system_reminder>"

TEAM = "my-team"


def msg(sender: str, text: str, ts: str = "2026-11-23T19:40:00.000Z", read: bool = False, **extra: Any) -> dict[str, Any]:
    return {"from": sender, "text": text, "timestamp": ts, "read": read, **extra}


def test_identity_ignores_position_and_read_flag() -> None:
    a = parse_inbox(json.dumps([msg("w1", "hi"), msg("w2", "yo")]).encode(), TEAM, "team-lead")[0]
    b = parse_inbox(json.dumps([msg("w2", "yo", read=True), msg("w1", "hi", read=True)]).encode(), TEAM, "team-lead")[0]
    assert {m.identity for m in a} == {m.identity for m in b}
    assert a[0].identity != parse_inbox(json.dumps([msg("w1", "hi!")]).encode(), TEAM, "team-lead")[0][0].identity


def test_structured_messages_are_typed() -> None:
    text = json.dumps({"type": "shutdown_request", "reason": "Unsafe output; shutting you down."})
    (m,), _ = parse_inbox(json.dumps([msg("team-lead", text)]).encode(), TEAM, "worker-1")
    assert m.type == "shutdown_request"
    assert m.short() == "[shutdown_request] Unsafe output; shutting you down."
    assert message_type("{not json") == "message" and message_type("plain") == "message"


@pytest.mark.parametrize("data,transient", [
    (b"", True), (b"[{\"from\": ", True), (b"{}", False), (b"\"x\"", False),
])
def test_unusable_files(data: bytes, transient: bool) -> None:
    with pytest.raises(InboxError) as info:
        parse_inbox(data, TEAM, "team-lead")
    assert info.value.transient is transient


def test_bad_entries_are_skipped_with_a_note() -> None:
    messages, skipped = parse_inbox(json.dumps([msg("w1", "ok"), {"text": "no sender", "timestamp": "t"}, 7]).encode(),
                                    TEAM, "team-lead")
    assert [m.text for m in messages] == ["ok"]
    assert skipped == ["message 1: has no 'from'", "message 2: must be an object, not int"]


def test_an_oversized_entry_is_skipped_not_the_file() -> None:
    data = json.dumps([msg("w1", "x" * 10_000), msg("w2", "small")]).encode()
    messages, skipped = parse_inbox(data, TEAM, "team-lead", max_message_bytes=4096)
    assert [m.text for m in messages] == ["small"]
    assert len(skipped) == 1 and "over the 4096-byte limit" in skipped[0]


def test_stream_and_file_agree_on_the_content_key() -> None:
    plain = TeamMessage(TEAM, "team-lead", "worker-1", "t", "parser done", None, "message", False)
    assert message_ckey(plain) == call_ckey("claude-teams_send_message", {
        "team_name": TEAM, "type": "message", "recipient": "team-lead", "content": "parser done"})
    text = json.dumps({"type": "shutdown_request", "reason": "stop now", "from": "team-lead"})
    structured = TeamMessage(TEAM, "worker-1", "team-lead", "t", text, None, "shutdown_request", False)
    assert message_ckey(structured) == call_ckey("claude-teams_send_message", {
        "team_name": TEAM, "type": "shutdown_request", "recipient": "worker-1", "content": "stop now"})
    assert content_key(TEAM, "a", "x") != content_key(TEAM, "b", "x")


def test_a_writer_holding_the_lock_is_waited_for_only_so_long(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole read does not block on a writer's lock: it says to come back (InboxBusy), and
    once the lock has been held LOCK_PATIENCE long it reads all the same (a writer stuck with
    the lock must not leave the daemon deaf)."""
    inbox, lock = tmp_path / "team-lead.json", tmp_path / ".lock"
    inbox.write_text(json.dumps([msg("w1", "hi")]))
    lock.touch()
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        got: list[Any] = []
        reader = InboxFile(inbox, TEAM, "team-lead", lock_path=lock)
        with pytest.raises(inboxfile.InboxBusy):
            reader.read(got.extend)
        monkeypatch.setattr(inboxfile, "LOCK_PATIENCE", 0.0)
        reader.read(got.extend)
        assert [e.fields["text"] for e in got] == ["hi"]
    finally:
        os.close(fd)


# -- the watcher, one step at a time --------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class World:
    def __init__(self, tmp: Path, **kw: Any) -> None:
        self.base = tmp / "claude"
        self.inboxes = self.base / "teams" / TEAM / "inboxes"
        self.inboxes.mkdir(parents=True)
        (self.inboxes / ".lock").touch()
        (self.base / "teams" / TEAM / "config.json").write_text(json.dumps({"name": TEAM, "members": []}))
        self.ledger_path = str(tmp / "ledger.db")
        self.clock = Clock()
        self.woken = 0
        self.kw = kw
        self.watcher = self.make()

    def make(self) -> InboxWatcher:
        def wake() -> None:
            self.woken += 1
        w = InboxWatcher(ledger_path=self.ledger_path, base_dir=str(self.base), teams=(), lead="team-lead",
                         watch_members=self.kw.get("watch_members", False), poll_interval=5.0,
                         report_existing=self.kw.get("report_existing", False), on_trigger=wake, notify=False,
                         clock=self.clock, wall=self.clock)
        w.setup()
        return w

    def write(self, name: str, messages: list[dict[str, Any]]) -> None:
        path = self.inboxes / f"{name}.json"
        with open(path, "a+") as fh:  # in place, as the writers do
            fh.seek(0)
            fh.truncate()
            fh.write(json.dumps(messages))
        self.clock.now += 0.01

    def step(self) -> float:
        self.watcher.next_scan = 0.0  # a rescan, as the poll would do
        return self.watcher.run_once()

    def ledger(self) -> Ledger:
        return Ledger(self.ledger_path)


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def test_first_start_records_existing_messages_without_reporting(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    w = World(tmp_path)
    w.watcher.teardown()
    w.write("team-lead", [msg("w1", "old news")])
    w.watcher = w.make()
    w.step()
    rows = w.ledger().messages()
    assert len(rows) == 1 and rows[0]["reported_at"] is not None
    assert w.ledger().pending_triggers() == [] and w.woken == 0
    w.write("team-lead", [msg("w1", "old news"), msg("w1", "fresh", ts="2026-11-23T19:41:00.000Z")])
    w.step()
    assert [t.detail for t in w.ledger().pending_triggers()] == ['message from w1 to team-lead: "fresh"']
    assert w.woken == 1


def test_report_existing_reports_them(tmp_path: Path) -> None:
    w = World(tmp_path, report_existing=True)
    w.write("team-lead", [msg("w1", "old news")])
    w.step()
    assert len(w.ledger().pending_triggers()) == 1


def test_each_message_once_even_when_read_flips(world: World, caplog: pytest.LogCaptureFixture) -> None:
    world.step()  # first start: empty team
    world.write("team-lead", [msg("w1", "a"), msg("w2", "b", ts="x2")])
    world.step()
    world.write("team-lead", [msg("w1", "a", read=True), msg("w2", "b", ts="x2", read=True)])
    world.step()
    world.step()
    reported = [r for r in caplog.messages if r.startswith("teammate-message")]
    assert len(reported) == 2
    assert 'teammate-message team=my-team from=w1 to=team-lead summary=a' in reported[0]
    assert len(world.ledger().pending_triggers()) == 2


def test_half_written_file_is_retried_not_taken_for_empty(world: World) -> None:
    world.step()
    path = world.inboxes / "team-lead.json"
    path.write_text('[{"from": "w1", "text": "hel')
    delay = world.step()
    assert delay <= 0.05 and world.watcher.dirty  # will look again shortly
    assert world.ledger().messages() == []
    path.write_text(json.dumps([msg("w1", "hello")]))
    world.clock.now += 0.05
    world.watcher.run_once()
    assert [m["text"] for m in world.ledger().messages()] == ["hello"]


def test_broken_file_is_logged_once_and_skipped_until_it_changes(world: World, caplog: pytest.LogCaptureFixture) -> None:
    world.step()
    path = world.inboxes / "team-lead.json"
    path.write_text("this is not json")
    for _ in range(3):
        world.step()
        world.clock.now += 0.6
    errors = [r for r in caplog.messages if r.startswith("inbox-unreadable")]
    assert len(errors) == 1 and "not valid JSON" in errors[0] and "fix=" in errors[0]
    world.write("team-lead", [msg("w1", "fixed")])
    world.step()
    assert [m["text"] for m in world.ledger().messages()] == ["fixed"]


def test_members_inboxes_only_when_configured(tmp_path: Path) -> None:
    w = World(tmp_path, watch_members=True)
    w.step()
    w.write("worker-1", [msg("team-lead", "do x")])
    w.write("team-lead", [msg("worker-1", "did x")])
    w.step()
    assert sorted(m["recipient"] for m in w.ledger().messages()) == ["team-lead", "worker-1"]
    assert [t.teammate for t in w.ledger().pending_triggers()] == ["worker-1"], "only the lead's messages trigger"


def test_stream_first_then_file_is_one_trigger(world: World) -> None:
    world.step()
    led = world.ledger()
    ck = content_key(TEAM, "team-lead", "parser done")
    assert led.add_trigger("event", "from the stream", dedup="teammate-message:prt_1:completed", ckey=ck,
                           now=world.clock.now) is not None
    world.write("team-lead", [msg("worker-1", "parser done")])
    world.step()
    assert len(led.pending_triggers()) == 1
    assert led.messages()[0]["trigger_id"] == led.pending_triggers()[0].id
    # ...and the stream's event after the file is also no second trigger.
    assert led.add_trigger("event", "again", dedup="teammate-message:prt_2:completed", ckey=ck,
                           now=world.clock.now) is None


def test_idle_watcher_does_not_read_again_after_its_own_reads(tmp_path: Path) -> None:
    # inotify reports opens and read-only closes too; the watcher's own read of an inbox
    # must not count as a change, or it reads in a loop and burns a core while idle.
    make_team(tmp_path, "t", ["w"])
    w = InboxWatcher(ledger_path=str(tmp_path / "ledger.sqlite3"), base_dir=str(tmp_path), teams=["t"],
                     lead="team-lead", watch_members=False, poll_interval=60, report_existing=False,
                     on_trigger=lambda: None)
    reads: list[Path] = []
    real_read = w._read
    def counted_read(path: Path) -> None:
        reads.append(path)
        real_read(path)

    w._read = counted_read  # type: ignore[method-assign]
    w.start()
    try:
        wait_for(lambda: reads, 10, "the first rescan to read the lead's inbox")
        # Idle: nothing writes, so the reads stop at the first rescan (and one more at most).
        holds(lambda: len(reads) <= 2, 1.0, "no more than two reads of an unchanged inbox")
    finally:
        w.stop()
        w.join(5)


def test_an_oversized_message_is_reported_once_and_the_next_ones_are_read(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    w = World(tmp_path)
    w.watcher.max_message_bytes = 4096
    w.step()
    w.write("team-lead", [msg("w1", "x" * 10_000, ts="2026-11-23T19:40:01.000Z"), msg("w2", "after it")])
    w.step()
    w.step()
    warnings = [r for r in caplog.messages if r.startswith("inbox-message-oversized")]
    assert len(warnings) == 1
    assert "team-lead.json" in warnings[0] and "from=w1" in warnings[0] and "bytes=100" in warnings[0]
    assert "teams.max_message_bytes" in warnings[0]
    assert [t.detail for t in w.ledger().pending_triggers()] == ['message from w2 to team-lead: "after it"']
    w.write("team-lead", [msg("w1", "x" * 10_000, ts="2026-11-23T19:40:01.000Z", read=True),
                          msg("w2", "after it", read=True), msg("w3", "later")])
    w.watcher.teardown()
    w.watcher = w.make()  # a restart: everything is read again, from the start
    w.watcher.max_message_bytes = 4096
    w.step()
    assert len([r for r in caplog.messages if r.startswith("inbox-message-oversized")]) == 1
    assert [t.teammate for t in w.ledger().pending_triggers()] == ["w2", "w3"]
    [row] = w.ledger().db.execute("SELECT sender, sent_at, size FROM oversized_messages").fetchall()
    assert row[0] == "w1" and row[1] == "2026-11-23T19:40:01.000Z" and row[2] > 10_000


def test_an_inbox_of_any_size_is_heard(world: World) -> None:
    many = [msg(f"w{i % 4}", f"progress report {i}: " + "done " * 50, ts=f"t{i}", read=True) for i in range(30_000)]
    world.write("team-lead", many)
    world.step()  # the first start: all of them already there
    assert (world.inboxes / "team-lead.json").stat().st_size > 8 * 1024 * 1024
    world.write("team-lead", many + [msg("w1", "still heard", ts="t-new")])
    world.step()
    assert [t.detail for t in world.ledger().pending_triggers()][-1] == 'message from w1 to team-lead: "still heard"'


def test_the_first_start_waits_for_a_whole_read_and_logs_its_baseline_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    w = World(tmp_path)
    path = w.inboxes / "team-lead.json"
    whole = json.dumps([msg("w1", f"old {i}", ts=f"t{i}") for i in range(1200)])
    path.write_text(whole[: len(whole) // 2])  # caught mid-rewrite
    w.step()
    assert w.ledger().get_meta("inbox.initialized") is None, "a first read cut short is not the baseline yet"
    path.write_text(whole)
    w.clock.now += 0.1
    w.step()
    assert w.ledger().get_meta("inbox.initialized") is not None
    rows = w.ledger().messages(limit=2000)
    assert len(rows) == 1200 and all(r["reported_at"] is not None for r in rows)
    assert w.ledger().pending_triggers() == [] and w.woken == 0
    baseline = [r for r in caplog.messages if r.startswith("inbox-baseline")]
    assert sum(int(r.split("messages=")[1].split()[0]) for r in baseline) == 1200 and len(baseline) <= 2


def test_a_missing_teams_directory_is_named_once_and_watched_when_it_appears(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    base = tmp_path / "nowhere" / ".claude"
    clock = Clock()
    w = InboxWatcher(ledger_path=str(tmp_path / "ledger.db"), base_dir=str(base), teams=(TEAM,), lead="team-lead",
                     watch_members=False, poll_interval=5.0, report_existing=False, on_trigger=lambda: None,
                     notify=True, clock=clock, wall=clock)
    w.setup()
    try:
        for _ in range(4):  # a rescan every poll interval, as the loop makes them
            w.next_scan = 0.0
            w.run_once()
            clock.now += 5.0
        missing = [m for m in caplog.messages if m.startswith("teams-dir-missing")]
        assert len(missing) == 1, caplog.messages
        assert f"path={base}" in missing[0] and "/var/lib/opencode-serve/.claude" in missing[0]
        assert not [m for m in caplog.messages if "max_user_watches" in m]
        make_team(base, TEAM, members=["worker-1"])
        w.next_scan = 0.0
        w.run_once()
        assert w.watching == base / "teams"
        assert [r for r in caplog.records if r.getMessage().startswith("inbox-watching") and r.levelname == "INFO"]
    finally:
        w.teardown()


def test_the_content_key_ignores_the_reminder_and_matches_each_kind_of_call() -> None:
    """What claude-teams stores (the reminder appended, structured texts) keys as the call that sent it."""
    send = "claude-teams_send_message"
    stored = "parser done" + REMINDER.format("worker-1")
    plain = TeamMessage(TEAM, "team-lead", "worker-1", "t", stored, None, "message", False)
    assert message_ckey(plain) == call_ckey(send, {"team_name": TEAM, "type": "message",
                                                        "recipient": "team-lead", "content": "parser done"})
    assert plain.short() == "parser done"
    assert message_ckey(plain) == call_ckey(send, {"team_name": TEAM, "type": "broadcast",
                                                        "content": "parser done", "sender": "worker-1"})
    approved = json.dumps({"type": "shutdown_approved", "requestId": "shutdown-1@worker-1", "from": "worker-1",
                           "timestamp": "t", "paneId": "", "backendType": "opencode", "sessionId": "ses_1"})
    msg = TeamMessage(TEAM, "team-lead", "worker-1", "t", approved, None, "shutdown_approved", False)
    assert message_ckey(msg) == call_ckey(send, {"team_name": TEAM, "type": "shutdown_response",
                                                      "request_id": "shutdown-1@worker-1", "approve": True})
    refused = TeamMessage(TEAM, "team-lead", "worker-1", "t", "still busy", "shutdown_rejected", "message", False)
    assert message_ckey(refused) == call_ckey(send, {"team_name": TEAM, "type": "shutdown_response",
                                                         "request_id": "r", "approve": False,
                                                         "content": "still busy"})
    assert without_reminder("a <system_reminder>x</system_reminder> b") == "a <system_reminder>x</system_reminder> b"


def _watching(tmp: Path, teams: tuple[str, ...] = (), watch_members: bool = False) -> tuple[InboxWatcher, Clock]:
    """A watcher on inotify whose own clock never reaches the next rescan: what it sees, it saw by the watch."""
    clock = Clock()
    w = InboxWatcher(ledger_path=str(tmp / "ledger.db"), base_dir=str(tmp), teams=teams, lead="team-lead",
                     watch_members=watch_members, poll_interval=3600.0, report_existing=False,
                     on_trigger=lambda: None, notify=True, clock=clock, wall=clock)
    w.setup()
    w.run_once()  # the first look
    return w, clock


def _until_logged(w: InboxWatcher, caplog: pytest.LogCaptureFixture, prefix: str) -> list[str]:
    def seen() -> list[str] | None:
        w.run_once()
        return [m for m in caplog.messages if m.startswith(prefix)] or None
    return wait_for(seen, 10, prefix)


def test_a_member_added_by_renaming_config_json_is_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_team(tmp_path, TEAM, members=["worker-1", "worker-2"])
    w, _ = _watching(tmp_path, watch_members=True)
    try:
        assert any(m.startswith("team-watching team=my-team") for m in caplog.messages)
        config = read_config(tmp_path, TEAM)
        config["members"].append({**config["members"][1], "name": "worker-3", "agentId": f"worker-3@{TEAM}"})
        config["members"] = [m for m in config["members"] if m["name"] != "worker-2"]
        write_config(tmp_path, TEAM, config)  # a temporary file renamed over it: a new inode
        [joined] = _until_logged(w, caplog, "team-member-joined")
        assert "member=worker-3" in joined
        [left] = _until_logged(w, caplog, "team-member-left")
        assert "member=worker-2" in left
        # The removed member's inbox stays, and what lands in it is still read.
        append_message(tmp_path, TEAM, "worker-2", "team-lead", "are you there?")
        wait_for(lambda: w.run_once() is not None and [m["text"] for m in w.ledger.messages()  # type: ignore[union-attr]
                                                       if m["recipient"] == "worker-2"] == ["are you there?"],
                 10, "the removed member's new message")
    finally:
        w.teardown()


def test_a_team_made_after_start_is_reported_and_read_when_names_is_empty(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "teams").mkdir()
    w, _ = _watching(tmp_path)
    try:
        root = tmp_path / "teams" / "late-team"
        root.mkdir()
        (root / "config.json").write_text(json.dumps({"name": "late-team", "members": [{"name": "team-lead"}]}))
        [found] = _until_logged(w, caplog, "team-found")
        assert "team=late-team" in found
        append_message(tmp_path, "late-team", "team-lead", "worker-1", "first news")  # makes inboxes/ too
        [news] = _until_logged(w, caplog, "teammate-message")
        assert "team=late-team" in news and [t.team for t in w.ledger.pending_triggers()] == ["late-team"]  # type: ignore[union-attr]
    finally:
        w.teardown()


def test_a_named_team_that_is_not_there_is_reported_once_then_picked_up(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "teams").mkdir()
    w, clock = _watching(tmp_path, teams=("later",))
    try:
        for _ in range(3):
            clock.now += 3600
            w.run_once()
        assert len([m for m in caplog.messages if m.startswith("team-missing")]) == 1
        make_team(tmp_path, "later", members=["worker-1"])
        [found] = _until_logged(w, caplog, "team-found")
        assert "team=later" in found and "worker-1" in found
    finally:
        w.teardown()


def test_a_notice_of_a_file_unchanged_since_it_was_read_reads_nothing(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer notifies several times for one rewrite (truncate, writes, close): the version
    already read is not read again; a changed one is."""
    world.step()
    world.write("team-lead", [msg("w1", "first")])
    world.step()
    reads: list[Path] = []
    real = InboxFile.read

    def counted(self: InboxFile, record: Any) -> Any:
        reads.append(self.path)
        return real(self, record)
    monkeypatch.setattr(InboxFile, "read", counted)
    path = world.inboxes / "team-lead.json"
    world.watcher._changed(path)
    world.watcher.run_once()
    assert reads == [], "the version read last is not read again"
    world.write("team-lead", [msg("w1", "first"), msg("w2", "second")])
    world.watcher._changed(path)
    world.watcher.run_once()
    assert reads == [path] and [m["text"] for m in world.ledger().messages()] == ["second", "first"]
