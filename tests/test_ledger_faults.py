"""Ledger trouble: a full disk, a read-only filesystem, the file deleted under the daemon, a corrupt file.

The daemon-level cases put the ledger on a small tmpfs mounted under the test's temp
dir (root only; skipped, saying why, otherwise) and run the daemon against the real
server; every mount is undone in the fixture's teardown, after the daemons stop.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from orchestratord import logs
from orchestratord.cli import ledger_view
from orchestratord.eventlog import GROUP_SECONDS, EventLog
from orchestratord.events import EventReader
from orchestratord.inbox import InboxWatcher
from orchestratord.ledger import EventRow, Ledger, LedgerError
from orchestratord.ledgerwatch import AFTER_ERROR, LedgerHealth, fix_for, is_trouble
from orchestratord.state import Shared
from tests.support import faults
from tests.support.bed import NO_IDLE, TEAM, Bed, orchestrator_prompts, request_text, script_orchestrator
from tests.support.daemon import Daemon, holds, ledger_rows, status_json, wait_for, write_config
from tests.support.logcapture import caplog  # noqa: F401 - the fixture
from tests.support.team import append_message, make_team

pytestmark = pytest.mark.faults

FULL = sqlite3.OperationalError("database or disk is full")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def events_named(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r.msg, "event", None) == name]


# -- the failing/recovered tracker ----------------------------------------------------

def test_a_burst_of_failures_is_one_critical_line_and_one_recovery(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    health = LedgerHealth("/var/lib/x/ledger.sqlite3", settle=2.0, clock=clock, wall=clock)
    assert health.failed(FULL, where="inbox") is True
    for _ in range(50):  # every worker, every retry
        clock.now += 0.1
        assert health.failed(FULL, where="events") is False
    failing = events_named(caplog, "ledger-failing")
    assert len(failing) == 1 and failing[0].levelno == logging.CRITICAL
    line = str(failing[0].msg)
    assert "/var/lib/x/ledger.sqlite3" in line and "disk is full" in line and "free space" in line
    assert health.view()["failing"] and health.view()["since"] == 1000.0

    assert health.succeeded() is False, "a write right after a failure does not end the spell"
    clock.now += 2.0
    assert health.succeeded() is True
    assert health.succeeded() is False
    recovered = events_named(caplog, "ledger-recovered")
    assert len(recovered) == 1 and recovered[0].levelno == logs.NOTICE
    view = health.view()
    assert not view["failing"] and view["last"]["until"] == clock.now and view["episodes"] == 1

    clock.now += 10
    assert health.failed(sqlite3.OperationalError("attempt to write a readonly database")) is True
    assert len(events_named(caplog, "ledger-failing")) == 2, "a new spell is a new line"
    assert "writable" in str(events_named(caplog, "ledger-failing")[1].msg)


def test_failures_that_keep_coming_between_good_writes_stay_one_spell(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    health = LedgerHealth("l.db", settle=2.0, clock=clock, wall=clock)
    for _ in range(20):  # a nearly full disk: small writes go through, bigger ones fail
        health.failed(FULL)
        clock.now += 1.0
        health.succeeded()
    assert len(events_named(caplog, "ledger-failing")) == 1
    assert not events_named(caplog, "ledger-recovered")


def test_which_errors_are_ledger_trouble() -> None:
    assert is_trouble(FULL)
    assert is_trouble(sqlite3.OperationalError("attempt to write a readonly database"))
    assert is_trouble(sqlite3.OperationalError("disk I/O error"))
    assert is_trouble(OSError(28, "No space left on device"))
    assert not is_trouble(sqlite3.OperationalError("no such table: x"))
    assert not is_trouble(sqlite3.IntegrityError("UNIQUE constraint failed"))
    assert not is_trouble(ValueError("x"))
    assert "free space" in fix_for(FULL)
    assert "move the ledger file aside" in fix_for(sqlite3.DatabaseError("file is not a database"))
    assert "fsck" in fix_for(f"OperationalError: disk I/O error ({AFTER_ERROR})")
    assert "writable" in fix_for("the filesystem is read-only")


def test_status_calls_a_stale_state_row_failing(tmp_path: Path) -> None:
    st = {"daemon": {"written_at": 100.0}, "ledger": {"failing": False}}
    assert not ledger_view(str(tmp_path / "l.db"), st, running=True, now=110.0)["failing"]
    view = ledger_view(str(tmp_path / "l.db"), st, running=True, now=200.0)
    assert view["failing"] and "not written for 100s" in view["problem"]
    assert not ledger_view(str(tmp_path / "l.db"), st, running=False, now=200.0)["failing"]
    st["ledger"] = {"failing": True, "since": 90.0, "error": "OperationalError: database or disk is full"}
    view = ledger_view(str(tmp_path / "l.db"), st, running=True, now=101.0)
    assert view["failing"] and view["since"] == 90.0 and "free space" in view["fix"]


# -- workers keep what they could not record ---------------------------------------------

def _failing(obj: Any, name: str) -> Callable[[], None]:
    """Make ``obj.name`` fail as on a full disk; returns what puts it back."""
    real = getattr(obj, name)

    def full(*a: Any, **k: Any) -> Any:
        raise FULL
    setattr(obj, name, full)
    return lambda: setattr(obj, name, real)


def _lead_inbox_with_a_message(tmp_path: Path, text: str, woken: list[int]) -> tuple[InboxWatcher, Clock]:
    """A watcher on the lead's inbox, past its first scan, with one new message found."""
    base = tmp_path / "claude"
    make_team(base, TEAM, members=["worker-1"])
    clock = Clock()
    w = InboxWatcher(ledger_path=str(tmp_path / "ledger.db"), base_dir=str(base), teams=(TEAM,), lead="team-lead",
                     watch_members=False, poll_interval=3600.0, report_existing=False,
                     on_trigger=lambda: woken.append(1), notify=False, clock=clock, wall=clock)
    w.setup()
    w.run_once()  # the first scan: nothing there yet
    append_message(base, TEAM, "team-lead", "worker-1", text)
    w._changed(base / "teams" / TEAM / "inboxes" / "team-lead.json")
    return w, clock


def test_inbox_messages_not_recorded_are_read_again(tmp_path: Path) -> None:
    w, _ = _lead_inbox_with_a_message(tmp_path, "written while the disk is full", [])
    try:
        assert w.ledger is not None
        restore = _failing(w.ledger, "record_messages")
        w.run_once()
        assert w.errors == 1
        restore()
        w.run_once()  # no rescan is due: the file must still be marked to read
        rows = w.ledger.messages()
        assert [(r["text"], r["reported_at"] is not None) for r in rows] == [("written while the disk is full", True)]
    finally:
        w.teardown()


def test_a_message_marked_reported_long_after_its_trigger_keeps_the_link(tmp_path: Path) -> None:
    woken: list[int] = []
    w, clock = _lead_inbox_with_a_message(tmp_path, "done with the parser", woken)
    try:
        assert w.ledger is not None
        restore = _failing(w.ledger, "mark_reported")
        w.run_once()  # the trigger is written, marking the message fails, the wake never came
        assert w.errors == 1 and woken == []
        restore()
        clock.now += 3600  # the disk stayed full for an hour
        w.run_once()
        [row] = w.ledger.messages()
        [trigger] = w.ledger.pending_triggers()
        assert row["reported_at"] is not None and row["trigger_id"] == trigger.id
        assert woken, "the dispatcher is told of the waiting trigger"
    finally:
        w.teardown()


def test_events_not_written_are_kept_and_their_seq_is_not_taken_as_saved(tmp_path: Path) -> None:
    """The event log alone, no socket: a failed write keeps its rows and steps the cursor back."""
    log = EventLog(clock=lambda: 0.0)
    ledger = Ledger(str(tmp_path / "ledger.db"))
    log.load(ledger)
    try:
        log.note_seq("ses_a", 5)
        log.add(EventRow(1.0, "e1", "session.idle", "ses_a", None, "{}"))
        log.flush()
        log.note_seq("ses_a", 9)
        log.add(EventRow(2.0, "e2", "session.idle", "ses_a", None, "{}"))
        real = ledger.add_events

        def full(*a: Any, **k: Any) -> None:
            raise FULL
        ledger.add_events = full  # type: ignore[method-assign]
        with pytest.raises(sqlite3.OperationalError):
            log.flush()
        assert [row.event_id for row in log.waiting_rows] == ["e2"], "the row waits for the next flush"
        assert log.last_seq == {"ses_a": 5}, "the catch-up after the reconnect starts where the ledger is"
        ledger.add_events = real  # type: ignore[method-assign]
        log.add(EventRow(3.0, "e3", "session.idle", "ses_a", None, "{}"))
        log.flush()
        assert [e["event_id"] for e in ledger.events()] == ["e3", "e2", "e1"]
        again = EventLog(clock=lambda: 0.0)
        again.load(ledger)
        assert again.last_seq == {"ses_a": 5}, "the cursor the ledger holds is the one written with its rows"
    finally:
        ledger.close()


def test_the_event_log_writes_when_the_stream_pauses_and_batches_while_it_runs(tmp_path: Path) -> None:
    now = [0.0]
    more = [True]
    log = EventLog(clock=lambda: now[0], more_waiting=lambda: more[0])
    ledger = Ledger(str(tmp_path / "ledger.db"))
    log.load(ledger)
    try:
        log.add(EventRow(1.0, "e1", "session.idle", "ses_a", None, "{}"))
        log.drained()
        assert ledger.events() == [] and len(log.waiting_rows) == 1, "more is waiting: keep batching"
        now[0] += 1.0
        log.drained()
        assert [e["event_id"] for e in ledger.events()] == ["e1"], "a batch a second old is written"
        log.add(EventRow(2.0, "e2", "session.idle", "ses_a", None, "{}"))
        more[0] = False
        log.drained()
        assert [e["event_id"] for e in ledger.events()] == ["e2", "e1"], "the stream paused: written at once"
    finally:
        ledger.close()


def test_while_the_stream_runs_ahead_triggers_wait_for_one_group_commit(tmp_path: Path) -> None:
    """With more of the stream already waiting, a trigger's transaction is held open and the
    next ones join it; it commits once the stream pauses or it is GROUP_SECONDS old, and
    what waits on it runs only then. Another connection sees nothing before."""
    now = [0.0]
    more = [True]
    log = EventLog(clock=lambda: now[0], more_waiting=lambda: more[0])
    ledger = Ledger(str(tmp_path / "ledger.db"))
    other = Ledger(str(tmp_path / "ledger.db"))
    log.load(ledger)
    commits: list[str] = []
    ran: list[int] = []
    ledger.db.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)

    def trigger(n: int) -> Callable[[], int | None]:
        def then() -> int | None:
            tid = ledger.add_trigger("error", f"failure {n}", rule="teammate-error")
            ledger.when_committed(lambda: ran.append(n))
            return tid
        return then
    try:
        for n in (1, 2):
            log.note_seq("ses_a", n)
            log.add(EventRow(float(n), f"e{n}", "session.error", "ses_a", None, "{}"))
            assert log.flush(trigger(n)) is not None
            log.drained()
        assert log.holding and commits == [] and ran == []
        assert other.pending_triggers() == [] and other.events() == [], "nothing is seen before the commit"
        log.add(EventRow(3.0, "e3", "message.updated", "ses_a", None, "{}"))
        more[0] = False
        log.drained()
        assert not log.holding and commits == ["COMMIT"] and ran == [1, 2], "the stream paused: one commit"
        assert [t.detail for t in other.pending_triggers()] == ["failure 1", "failure 2"]
        assert [e["event_id"] for e in other.events()] == ["e3", "e2", "e1"]
        assert other.get_meta("sync.last_seq") == json.dumps({"ses_a": 2}) and log.saved_seq == {"ses_a": 2}

        more[0] = True
        log.flush(trigger(3))
        now[0] += GROUP_SECONDS
        log.drained()
        assert not log.holding and len(commits) == 2 and ran == [1, 2, 3], "held no longer than GROUP_SECONDS"

        log.flush(trigger(4))
        log.commit(hold_off=1.0)  # another thread is about to write: nothing is held meanwhile
        assert not log.holding and len(commits) == 3 and ran == [1, 2, 3, 4]
        log.flush(trigger(5))
        assert not log.holding and len(commits) == 4, "committed at once while held off"
        now[0] += 1.0
        log.flush(trigger(6))
        assert log.holding, "held again once that time is over"
    finally:
        ledger.db.set_trace_callback(None)
        other.close()
        ledger.close()


def test_a_group_commit_that_fails_keeps_its_rows_and_runs_nothing_that_waited_on_it(tmp_path: Path) -> None:
    more = [True]
    log = EventLog(clock=lambda: 0.0, more_waiting=lambda: more[0])
    ledger = Ledger(str(tmp_path / "ledger.db"))
    log.load(ledger)
    ran: list[str] = []
    try:
        log.note_seq("ses_a", 4)
        log.save_seq()
        log.note_seq("ses_a", 7)
        log.add(EventRow(1.0, "e1", "session.error", "ses_a", None, "{}"))

        def then() -> None:
            ledger.add_trigger("error", "failure", rule="teammate-error")
            ledger.when_committed(lambda: ran.append("woken"))
        log.flush(then)
        log.add(EventRow(2.0, "e2", "message.updated", "ses_a", None, "{}"))
        real = ledger.add_events

        def full(*a: Any, **k: Any) -> None:
            raise FULL
        ledger.add_events = full  # type: ignore[method-assign]
        more[0] = False
        with pytest.raises(sqlite3.OperationalError):
            log.drained()
        ledger.add_events = real  # type: ignore[method-assign]
        assert not log.holding and ran == [], "a transaction rolled back wakes nobody"
        assert [row.event_id for row in log.waiting_rows] == ["e1", "e2"], "its rows wait for the next flush"
        assert log.last_seq == {"ses_a": 4}, "the catch-up after the reconnect starts where the ledger is"
        assert ledger.pending_triggers() == [] and ledger.events() == []
        log.flush()
        assert [e["event_id"] for e in ledger.events()] == ["e2", "e1"]
    finally:
        ledger.close()


def test_a_trigger_goes_in_with_the_rows_before_it_in_one_commit_or_neither_does(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    counted: list[str] = []
    monkeypatch.setattr("orchestratord.ledger.metrics.trigger", counted.append)
    log = EventLog(clock=lambda: 0.0)
    ledger = Ledger(str(tmp_path / "ledger.db"))
    log.load(ledger)
    commits: list[str] = []
    ledger.db.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
    try:
        log.add(EventRow(1.0, "e1", "message.updated", "ses_a", None, "{}"))

        def refused() -> int | None:
            ledger.add_trigger("message", "from worker-1", rule="teammate-message")
            raise FULL
        with pytest.raises(sqlite3.OperationalError):
            log.flush(refused)
        assert ledger.events() == [] and ledger.pending_triggers() == [] and commits == [], "neither went in"
        assert counted == [], "a trigger rolled back is not counted"
        assert [row.event_id for row in log.waiting_rows] == ["e1"], "the row waits for the next flush"
        tid = log.flush(lambda: ledger.add_trigger("message", "from worker-1", rule="teammate-message"))
        assert [e["event_id"] for e in ledger.events()] == ["e1"] and [t.id for t in ledger.pending_triggers()] == [tid]
        assert commits == ["COMMIT"], "the row and the trigger: one commit"
        assert counted == ["message"], "counted once committed"
        assert log.flush(lambda: 7) == 7 and commits == ["COMMIT"], "nothing to write, nothing committed"
    finally:
        ledger.db.set_trace_callback(None)
        ledger.close()


# -- a damaged file at start -------------------------------------------------------------

def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(8192))


def _not_sqlite(path: Path) -> None:
    path.write_text("# notes, not a database\n" * 50)


def _truncated(path: Path) -> None:
    led = Ledger(str(path))
    for _ in range(2000):
        led.record_transition("test", "x", "y" * 200)
    led.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    led.close()
    os.truncate(path, path.stat().st_size // 2)


def _quiet_config(tmp_path: Path, ledger: Path) -> Path:
    """A daemon that refuses or starts before it ever talks to a server."""
    return write_config(tmp_path / "orchestrator.toml", server_url="http://127.0.0.1:9", ledger=ledger,
                        teams_base=tmp_path)


def starts_and_stops(cfg: Path, tmp_path: Path) -> None:
    d = Daemon(cfg, tmp_path).start()
    try:
        d.wait_log(r"\bstarted\b")
        assert d.stop() == 0
    finally:
        d.close()


@pytest.mark.parametrize("damage", [_garbage, _not_sqlite, _truncated], ids=["garbage", "not-sqlite", "truncated"])
def test_a_damaged_ledger_refuses_the_start_saying_what_to_do(tmp_path: Path, damage: Callable[[Path], None]) -> None:
    ledger = tmp_path / "ledger.sqlite3"
    damage(ledger)
    cfg = _quiet_config(tmp_path, ledger)
    check = subprocess.run([sys.executable, "-m", "orchestratord", "check-config", "--config", str(cfg)],
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 1 and "ledger.path: " in check.stderr and str(ledger) in check.stderr, check.stderr
    assert "move it aside" in check.stderr and "Traceback" not in check.stderr

    d = Daemon(cfg, tmp_path).start()
    try:
        assert d.wait_exit(15) == 1
        refused = d.grep("startup-failed")
        assert len(refused) == 1 and "CRITICAL" in refused[0], d.log()
        assert str(ledger) in refused[0] and "move it aside" in refused[0]
        assert not d.grep("Traceback")
    finally:
        d.close()
    shutil.move(str(ledger), str(ledger) + ".broken")
    starts_and_stops(cfg, tmp_path)
    faults.record(faults.CaseResult(case=f"ledger: damaged at start ({damage.__name__.strip('_')})", runs=1))


def test_wal_and_shm_left_by_a_kill_open_fine(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.sqlite3"
    cfg = _quiet_config(tmp_path, ledger)
    d = Daemon(cfg, tmp_path).start()
    try:
        d.wait_log(r"\bstarted\b")
        wait_for(lambda: ledger_rows(ledger, "SELECT 1 FROM transitions WHERE component='server'"), 15,
                 "a transition row")
        d.kill()
        assert Path(str(ledger) + "-wal").exists() and Path(str(ledger) + "-shm").exists()
        d = Daemon(cfg, tmp_path).start()
        d.wait_log(r"\bstarted\b")
        assert not d.grep("startup-failed")
        assert d.stop() == 0
    finally:
        d.close()


# -- small filesystems ----------------------------------------------------------------

class Mounts:
    """tmpfs and loop-mounted ext4 mounts under the test's temp dir, undone at teardown after the daemons stop."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.mounted: list[Path] = []
        self.images: dict[Path, Path] = {}  # mount point -> its ext4 image
        self.loops: dict[Path, str] = {}  # mount point -> its /dev/loopN

    def tmpfs(self, name: str, size: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        if shutil.which("mount") is None:
            pytest.skip("no mount command")
        where = self.tmp / name
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        self.mounted.append(where)
        return where

    def remount(self, where: Path, mode: str) -> None:
        done = subprocess.run(["mount", "-o", f"remount,{mode}", str(where)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr

    def ext4(self, name: str, size_mib: int = 8) -> Path:
        """A small ext4 in an image file under the temp dir, loop-mounted with errors=remount-ro."""
        if os.geteuid() != 0:
            pytest.skip("loop-mounting an ext4 image needs root")
        for tool in ("mount", "umount", "losetup", "findmnt", "mkfs.ext4", "e2fsck"):
            if shutil.which(tool) is None:
                pytest.skip(f"no {tool} command")
        image = self.tmp / f"{name}.img"
        with open(image, "wb") as fh:
            fh.truncate(size_mib << 20)
        made = subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True, text=True)
        if made.returncode != 0:
            pytest.skip(f"mkfs.ext4 failed: {made.stderr.strip()}")
        where = self.tmp / name
        where.mkdir()
        self.images[where] = image
        self._mount_image(where, skip=True)
        if not self.error_trigger(where).exists():
            pytest.skip(f"{self.error_trigger(where)} missing: this kernel cannot be told to fail a filesystem")
        return where

    def _mount_image(self, where: Path, skip: bool = False) -> None:
        done = subprocess.run(["mount", "-o", "loop,errors=remount-ro", str(self.images[where]), str(where)],
                              capture_output=True, text=True)
        if done.returncode != 0 and skip:
            pytest.skip(f"cannot loop-mount an ext4 image here: {done.stderr.strip()}")
        assert done.returncode == 0, done.stderr
        self.mounted.append(where)
        found = subprocess.run(["findmnt", "-n", "-o", "SOURCE", str(where)], capture_output=True, text=True)
        self.loops[where] = found.stdout.strip()

    def error_trigger(self, where: Path) -> Path:
        return Path("/sys/fs/ext4") / Path(self.loops[where]).name / "trigger_fs_error"

    def fail(self, where: Path) -> None:
        """Report an error on the filesystem, as ext4 does on an I/O error: errors=remount-ro makes it read-only."""
        self.error_trigger(where).write_text("1\n")

    def repair(self, where: Path) -> str:
        """Unmount, fsck the image and mount it again (writable); what e2fsck said."""
        self._unmount(where)
        checked = subprocess.run(["e2fsck", "-fy", str(self.images[where])], capture_output=True, text=True)
        assert checked.returncode in (0, 1), f"e2fsck exited {checked.returncode}: {checked.stdout}{checked.stderr}"
        self._mount_image(where)
        return checked.stdout

    def _unmount(self, where: Path) -> None:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)
        self.mounted.remove(where)
        loop = self.loops.pop(where, "")
        if loop.startswith("/dev/loop"):  # mount -o loop detaches on umount; make sure
            listed = subprocess.run(["losetup", "-n", "-O", "BACK-FILE", loop], capture_output=True, text=True)
            if listed.returncode == 0 and str(self.images[where]) in listed.stdout:
                subprocess.run(["losetup", "-d", loop], capture_output=True)

    def close(self) -> None:
        for where in reversed(list(self.mounted)):
            self._unmount(where)
        for image in self.images.values():
            image.unlink(missing_ok=True)


@pytest.fixture
def mounts(tmp_path: Path) -> Iterator[Mounts]:
    m = Mounts(tmp_path)
    try:
        yield m
    finally:
        m.close()


@pytest.fixture
def ledger_fs(bed: Bed, mounts: Mounts) -> Iterator[Callable[[str], Path]]:
    """Put the bed's ledger on a tmpfs of the given size; the daemons stop before it is unmounted."""
    def put(size: str) -> Path:
        where = mounts.tmpfs("ledger-fs", size)
        bed.ledger = where / "ledger.sqlite3"
        return where
    try:
        yield put
    finally:
        for d in bed.daemons:
            d.stop()


def fill(where: Path) -> Path:
    """Fill the filesystem to the last byte; delete the file to give the space back."""
    filler = where / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def reported(bed: Bed, texts: list[str]) -> list[tuple[str, Any]]:
    marks = ",".join("?" * len(texts))
    return ledger_rows(bed.ledger, f"SELECT text, reported_at FROM messages WHERE text IN ({marks})", tuple(texts))


def test_disk_full_keeps_watching_and_every_message_is_reported_once_after(bed: Bed, ledger_fs: Callable[[str], Path]) -> None:
    where = ledger_fs("24m")
    bed.write_config(extra=NO_IDLE)
    script_orchestrator(bed.model)
    d = bed.ready_daemon()
    runs = faults.runs(1, 5)
    written: list[str] = []
    for run in range(runs):
        filler = fill(where)
        texts = [f"FULL-{run}-{i}: written while the ledger's disk is full" for i in range(3)]
        for text in texts:
            append_message(bed.teams_dir, TEAM, "team-lead", "worker-1", text, summary=text[:20])
        written += texts
        d.wait_log("ledger-failing", count=run + 1, timeout=30)
        line = d.grep("ledger-failing")[run]
        assert "CRITICAL" in line and str(bed.ledger) in line and "free space" in line
        wait_for(lambda: "ledger failing" in " ".join(d.notify.fields()), 15, "STATUS= saying the ledger fails")
        st = status_json(bed.config)
        assert st["state"] != "stopped" and st["ledger"]["failing"], st["ledger"]
        holds(lambda: len(d.grep("ledger-failing")) == run + 1 and d.proc is not None and d.proc.poll() is None,
              3, "one critical line for the whole spell, and the daemon up")
        assert not reported(bed, texts), "nothing could be recorded on a full disk"
        filler.unlink()
        d.wait_log("ledger-recovered", count=run + 1, timeout=30)
        wait_for(lambda: len([r for r in reported(bed, texts) if r[1]]) == len(texts), 30,
                 "every message written during the trouble reported")
    markers = [t.split(":")[0] + ":" for t in written]  # the summary, which the prompt quotes
    wait_for(lambda: all(any(m in request_text(p) for p in orchestrator_prompts(bed.model)) for m in markers), 60,
             "the orchestrator told about every message")
    rows = reported(bed, written)
    assert sorted(r[0] for r in rows) == sorted(written) and all(r[1] for r in rows)
    for text in written:
        assert len(d.grep(f"teammate-message .*{text[:12]}")) == 1, f"{text} reported more than once"
    assert len(d.grep("ledger-failing")) == runs and len(d.grep("ledger-recovered")) == runs
    wait_for(lambda: not status_json(bed.config)["ledger"]["failing"], 15, "status saying the ledger is fine again")
    assert d.proc is not None and d.proc.poll() is None
    faults.record(faults.CaseResult(case="ledger: disk full", runs=runs, written=len(written),
                                    reported=len([r for r in rows if r[1]]), crashes=0))


@pytest.fixture
def ext4_ledger(bed: Bed, mounts: Mounts) -> Iterator[Path]:
    """The bed's ledger on a loop-mounted ext4 that can be failed; the daemons stop before it is unmounted."""
    where = mounts.ext4("ledger-fs")
    bed.ledger = where / "ledger.sqlite3"
    try:
        yield where
    finally:
        for d in bed.daemons:
            d.stop()


def read_only(where: Path) -> bool:
    try:
        (where / "probe").write_text("x")
    except OSError:
        return True
    (where / "probe").unlink()
    return False


def test_a_filesystem_turned_read_only_keeps_watching_and_nothing_is_lost(bed: Bed, mounts: Mounts,
                                                                         ext4_ledger: Path) -> None:
    where = ext4_ledger
    bed.write_config(extra=NO_IDLE)
    script_orchestrator(bed.model)
    runs = faults.runs(1, 3)
    daemons: list[Daemon] = []
    before_spell: list[str] = []
    written: list[str] = []
    for run in range(runs):
        d = bed.ready_daemon()
        daemons.append(d)
        before = f"ROFS-{run}-before: written while the ledger's filesystem is fine"
        append_message(bed.teams_dir, TEAM, "team-lead", "worker-1", before, summary=before[:20])
        wait_for(lambda: [r for r in reported(bed, [before]) if r[1]], 30, "the first message reported")
        before_spell.append(before)

        mounts.fail(where)
        wait_for(lambda: read_only(where), 10, "the kernel to make the filesystem read-only")
        texts = [f"ROFS-{run}-{i}: written while the ledger's filesystem is read-only" for i in range(3)]
        for text in texts:
            append_message(bed.teams_dir, TEAM, "team-lead", "worker-1", text, summary=text[:20])
        written += texts
        line = d.wait_log("ledger-failing", timeout=30)[0]
        assert "CRITICAL" in line and str(bed.ledger) in line and "after an error" in line and "fsck" in line, line
        wait_for(lambda: "ledger failing" in " ".join(d.notify.fields()), 15, "STATUS= saying the ledger fails")
        st = status_json(bed.config)
        assert st["state"] != "stopped" and st["ledger"]["failing"], st["ledger"]
        assert "after an error" in st["ledger"]["problem"] and "fsck" in st["ledger"]["fix"], st["ledger"]
        holds(lambda: len(d.grep("ledger-failing")) == 1 and d.proc is not None and d.proc.poll() is None,
              3, "one critical line for the whole spell, and the daemon up")
        assert not d.grep(rf"teammate-message .*ROFS-{run}-\d"), "nothing written during the spell can be recorded"

        assert d.stop() == 0, d.log()[-30:]
        assert not d.grep("Traceback"), "\n".join(d.log())
        mounts.repair(where)

    d = bed.ready_daemon()
    daemons.append(d)
    wait_for(lambda: len([r for r in reported(bed, written) if r[1]]) == len(written), 30,
             "every message written while the filesystem was read-only reported")
    rows = reported(bed, before_spell + written)
    assert sorted(r[0] for r in rows) == sorted(before_spell + written) and all(r[1] for r in rows)
    for text in before_spell + written:  # reported, not skipped as old, and not twice
        times = sum(len(x.grep(f"teammate-message .*{text[:12]}")) for x in daemons)
        assert times == 1, f"{text!r} reported {times} times"
    markers = [t.split(":")[0] + ":" for t in written]
    wait_for(lambda: all(any(m in request_text(p) for p in orchestrator_prompts(bed.model)) for m in markers), 60,
             "the orchestrator told about every message")
    db = sqlite3.connect(f"file:{bed.ledger}?mode=ro", uri=True)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        db.close()
    assert d.proc is not None and d.proc.poll() is None
    faults.record(faults.CaseResult(case="ledger: filesystem turned read-only while running", runs=runs,
                                    written=len(written), reported=len([r for r in rows if r[0] in written and r[1]]),
                                    crashes=0))


@pytest.mark.parametrize("names", [("",), ("", "-wal", "-shm")], ids=["file", "file-wal-shm"])
def test_a_ledger_deleted_under_the_daemon_is_restored_with_its_history(bed: Bed, names: tuple[str, ...]) -> None:
    bed.write_config(extra=NO_IDLE)
    script_orchestrator(bed.model)
    d = bed.ready_daemon()
    runs = faults.runs(1, 3)
    written: list[str] = []
    for run in range(runs):
        before = f"DEL-{run}-before: written before the ledger was deleted"
        append_message(bed.teams_dir, TEAM, "team-lead", "worker-1", before)
        wait_for(lambda: reported(bed, [before]) and reported(bed, [before])[0][1], 30, "the first message reported")
        for suffix in names:
            os.unlink(str(bed.ledger) + suffix)
        after = f"DEL-{run}-after: written after the ledger was deleted"
        append_message(bed.teams_dir, TEAM, "team-lead", "worker-1", after)
        written += [before, after]
        line = d.wait_log("ledger-missing", count=run + 1)[run]
        assert "CRITICAL" in line and str(bed.ledger) in line
        d.wait_log("ledger-restored", count=run + 1)
        wait_for(lambda: len([r for r in reported(bed, written) if r[1]]) == len(written), 30,
                 "both messages reported in the restored ledger")
    assert d.proc is not None and d.proc.poll() is None
    assert d.stop() == 0
    # The real proof: a new start sees everything, the history included.
    rows = reported(bed, written)
    assert sorted(r[0] for r in rows) == sorted(written)
    for text in written:
        assert len(d.grep(f"teammate-message .*{text[:10]}")) == 1
    d2 = bed.daemon()
    d2.notify.wait("READY=1")
    # Proof that the new start has read the inbox: a message written now is reported. It is
    # in the same file as the old ones, so by then they were read, and must not be reported.
    sentinel = "DEL-sentinel: written after the restart"
    append_message(bed.teams_dir, TEAM, "team-lead", "worker-1", sentinel)
    d2.wait_log("teammate-message .*DEL-sentinel", timeout=30)
    again = [line for line in d2.grep("teammate-message") if "DEL-sentinel" not in line]
    assert not again, f"reported a second time after the restart: {again}"
    faults.record(faults.CaseResult(case=f"ledger: deleted under the daemon ({'+'.join(n or 'db' for n in names)})",
                                    runs=runs, written=len(written), reported=len(rows), crashes=0))


def test_a_read_only_ledger_directory_refuses_the_start(tmp_path: Path, mounts: Mounts) -> None:
    where = mounts.tmpfs("ro", "4m")
    ledger = where / "ledger.sqlite3"
    cfg = _quiet_config(tmp_path, ledger)
    starts_and_stops(cfg, tmp_path)
    mounts.remount(where, "ro")
    for present in (True, False):
        if not present:
            mounts.remount(where, "rw")
            ledger.unlink()
            mounts.remount(where, "ro")
        d = Daemon(cfg, tmp_path).start()
        try:
            assert d.wait_exit(15) == 1
            refused = d.grep("startup-failed")
            assert len(refused) == 1 and "CRITICAL" in refused[0], d.log()
            assert str(where) in refused[0] and "not writable" in refused[0] and "ledger.path" in refused[0]
        finally:
            d.close()
    faults.record(faults.CaseResult(case="ledger: read-only directory at start", runs=2))


def test_json_status_shows_the_ledger(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.sqlite3"
    led = Ledger(str(ledger))
    led.set_state({"daemon": {"pid": os.getpid(), "state": "ready", "written_at": 0.0},
                   "ledger": {"failing": True, "since": 5.0, "error": "OperationalError: database or disk is full"}})
    led.close()
    out = subprocess.run([sys.executable, "-m", "orchestratord", "status", "--config",
                          str(_quiet_config(tmp_path, ledger))], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    line = [x for x in out.stdout.splitlines() if x.startswith("ledger")]
    assert line and "FAILING" in line[0] and "free space" in line[0], out.stdout
    data = json.loads(subprocess.run([sys.executable, "-m", "orchestratord", "status", "--json", "--config",
                                      str(tmp_path / "orchestrator.toml")], capture_output=True, text=True,
                                     timeout=30).stdout)
    assert data["ledger"]["failing"] and data["ledger"]["path"] == str(ledger)


def test_ledger_error_is_raised_for_a_directory_that_cannot_be_made(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(LedgerError, match="ledger.path"):
        Ledger(str(tmp_path / "file" / "ledger.sqlite3"))


def test_a_stream_that_cannot_be_recorded_is_not_reported_as_connected(tmp_path: Path) -> None:
    """The reader connects and reads, but its writes fail: the stream must not look watched."""
    frames = [b'data: {"type":"server.connected","properties":{}}\n\n',
              b'data: {"type":"session.idle","properties":{"sessionID":"ses_a"}}\n\n']

    class Resp:
        raw = None

        def iter_content(self, size: int) -> Any:
            return iter(frames)

        def close(self) -> None:
            pass

    class Client:
        def open_stream(self, path: str, read_timeout: float) -> Resp:
            return Resp()

        def session_status(self) -> dict[str, Any]:
            return {}

        def permissions(self) -> list[Any]:
            return []

        def sync_history(self, seqs: Any) -> list[Any]:
            return []

    shared = Shared()
    health = LedgerHealth(str(tmp_path / "ledger.db"))
    r = EventReader(shared=shared, make_client=Client, ledger_path=str(tmp_path / "ledger.db"),  # type: ignore[arg-type]
                    stream="global", directory=None, read_timeout=5, max_event_bytes=1 << 20, reconnect_max=1,
                    store="default", rules=(), on_trigger=lambda: None, on_own_activity=lambda: None,
                    ledger_health=health)
    r.client = Client()  # type: ignore[assignment]
    r.ledger = Ledger(str(tmp_path / "ledger.db"))
    r.eventlog.load(r.ledger)  # what setup() does, with the client above instead of a real one
    r.reactions.bind(r.ledger, r.client)  # type: ignore[arg-type]

    def full(*a: Any, **k: Any) -> None:
        raise FULL
    try:
        r.ledger.record_transition = full  # type: ignore[method-assign]
        r.ledger.add_events = full  # type: ignore[method-assign]
        with pytest.raises(sqlite3.OperationalError):
            r.step()
        assert shared.events_total == 1, "the events were read: a failed history note did not end the connection"
        assert shared.stream_connected is False, "a stream whose events cannot be recorded is not watched"
        assert health.current is not None, "and the ledger's trouble is on record"
    finally:
        r.ledger.close()


def test_the_mount_under_the_ledger_is_the_deepest_one_on_its_device(tmp_path: Path) -> None:
    """Under ProtectSystem=strict, / is a read-only view of the device the state directory is on."""
    from orchestratord.ledgerwatch import _mount_of
    table = tmp_path / "mountinfo"
    table.write_text(
        "22 1 8:1 / / ro,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro\n"
        "23 22 0:5 / /proc rw,nosuid - proc proc rw\n"
        "40 22 8:1 /var/lib/opencode-orchestrator /var/lib/opencode-orchestrator rw,relatime - ext4 /dev/sda1 rw\n"
        "41 22 8:1 /home /home ro,relatime - ext4 /dev/sda1 rw\n"
        "50 22 7:0 / /mnt/my\\040ledger rw,relatime - ext4 /dev/loop0 rw,emergency_ro\n")
    source, options, super_options = _mount_of("/var/lib/opencode-orchestrator", "8:1", str(table)) or ("", set(), set())
    assert source == "/dev/sda1" and "rw" in options, "the writable state directory, not the read-only /"
    _, options, _ = _mount_of("/var/lib/opencode-orchestrator-old", "8:1", str(table)) or ("", set(), set())
    assert "ro" in options, "a sibling whose name starts the same is under /"
    _, options, _ = _mount_of("/home/me/.claude", "8:1", str(table)) or ("", set(), set())
    assert "ro" in options
    _, _, super_options = _mount_of("/mnt/my ledger", "7:0", str(table)) or ("", set(), set())
    assert "emergency_ro" in super_options
    assert _mount_of("/srv", "9:9", str(table)) is None


# -- the supervisor's side, one pass at a time ----------------------------------------------

class StubWorker:
    """What the supervisor asks of a worker, counted; ``holds`` keeps it alive after stop."""

    def __init__(self, name: str, holds: bool = False) -> None:
        self.name, self.holds, self.wakes, self.stopping = name, holds, 0, False

    def wake(self) -> None:
        self.wakes += 1

    def stop(self) -> None:
        self.stopping = True

    def join(self, timeout: float) -> bool:
        return not self.holds

    def alive(self) -> bool:
        return self.holds or not self.stopping

    def fresh(self, now: float | None = None) -> bool:
        return True


def supervisor_on(tmp_path: Path, clock: Clock) -> Any:
    from orchestratord.config import load_config
    from orchestratord.supervisor import Supervisor
    cfg = load_config(write_config(tmp_path / "c.toml", server_url="http://127.0.0.1:9", ledger=tmp_path / "l.db",
                                   teams_base=tmp_path / "teams"))
    sup = Supervisor(cfg, str(tmp_path / "c.toml"), clock=clock)
    sup.ledger = Ledger(cfg.ledger.path)
    return sup


def test_workers_are_woken_once_when_writes_go_through_again_not_at_every_probe(tmp_path: Path) -> None:
    clock = Clock()
    sup = supervisor_on(tmp_path, clock)
    w = StubWorker("events")
    sup.workers = {"events": w}
    try:
        sup.ledger_health.failed(FULL, where="events")
        for _ in range(5):  # writes go through, but a worker's keep failing now and then
            clock.now += 1.0
            sup._write_state(now=clock.now)
            sup.ledger_health.failed(FULL, where="events")
        assert w.wakes == 1, "a reconnect a second while the spell lasts would flood the log"
        clock.now += 60.0
        sup._write_state(now=clock.now)
        assert not sup.ledger_health.failing and w.wakes == 2, "and once more when the spell ends"
    finally:
        sup.ledger.close()


def test_a_deleted_ledger_waits_for_every_worker_to_let_go_before_it_is_restored(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    sup = supervisor_on(tmp_path, clock)
    stuck = StubWorker("dispatch", holds=True)
    sup.workers = {"dispatch": stuck}
    started: list[str] = []
    sup._start_worker = started.append  # type: ignore[method-assign]
    try:
        sup.ledger.record_transition("test", "kept")
        os.unlink(sup.cfg.ledger.path)
        for _ in range(3):
            sup._check_ledger_file()
        assert not os.path.exists(sup.cfg.ledger.path) and started == [], "not copied while the old file is held"
        assert len(events_named(caplog, "ledger-missing")) == 1, "said once, not at every pass"
        stuck.holds = False
        sup._check_ledger_file()
        assert started == ["dispatch"] and os.path.exists(sup.cfg.ledger.path)
        assert [t["state"] for t in Ledger(sup.cfg.ledger.path).transitions()] == ["kept"]
    finally:
        if sup.ledger is not None:
            sup.ledger.close()


def test_a_ledger_that_cannot_be_looked_at_is_not_taken_for_deleted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    sup = supervisor_on(tmp_path, clock)
    import orchestratord.ledgerwatch as lw

    def eio(path: str) -> None:
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(lw, "identity", eio)
    started: list[str] = []
    sup._start_worker = started.append  # type: ignore[method-assign]
    try:
        sup._check_ledger_file()  # used to end the main thread
        assert started == [] and sup.ledger is not None and not sup.stop_requested
    finally:
        sup.ledger.close()
