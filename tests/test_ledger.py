"""The ledger: schema, triggers tied to prompts, dedup, state, pruning."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from orchestratord.ledger import (
    COMPLETED,
    FAILED,
    MIGRATIONS,
    PENDING,
    SCHEMA_VERSION,
    SENT,
    Dispatch,
    EventRow,
    Ledger,
    LedgerError,
)
from tests.support.logcapture import caplog  # noqa: F401 - the fixture


def added(trigger_id: int | None) -> int:
    """A trigger that must be new."""
    assert trigger_id is not None
    return trigger_id


def got(led: Ledger, dispatch_id: int) -> Dispatch:
    found = led.get_dispatch(dispatch_id)
    assert found is not None
    return found

def test_schema_version_and_wal(tmp_path: Path) -> None:
    led = Ledger(str(tmp_path / "sub" / "l.db"))
    assert led.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert led.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    led.close()


def test_newer_schema_is_refused_with_a_fix(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(LedgerError, match="upgrade orchestratord"):
        Ledger(str(path))


def old_ledger(path: Path, version: int) -> None:
    """A ledger as an orchestratord of schema ``version`` left it, with one message in it."""
    db = sqlite3.connect(path)
    for script in MIGRATIONS[:version]:
        db.executescript(script)
    db.execute("INSERT INTO messages(ident, team, recipient, sender, sent_at, type, text, first_seen) "
               "VALUES('i1', 't', 'team-lead', 'worker-1', '2026-01-01T00:00:00.000Z', 'message', 'kept', 1.0)")
    db.execute(f"PRAGMA user_version={version}")
    db.commit()
    db.close()


def test_an_upgrade_keeps_a_copy_of_the_old_ledger_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "ledger.sqlite3"
    old_ledger(path, 4)
    led = Ledger(str(path))
    assert led.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    led.close()
    [copy] = list(tmp_path.glob("ledger.sqlite3.v4-backup-*"))
    db = sqlite3.connect(copy)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 4
    assert db.execute("SELECT text FROM messages").fetchall() == [("kept",)]
    db.close()
    [line] = [m for m in caplog.messages if m.startswith("ledger-migrated")]
    assert f"from=4 to={SCHEMA_VERSION} backup={copy}" in line
    Ledger(str(path)).close()  # at the current schema: no second copy, no second line
    assert len(list(tmp_path.glob("*backup*"))) == 1 and len([m for m in caplog.messages if "ledger-migrated" in m]) == 1


def test_no_upgrade_without_its_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ledger.sqlite3"
    old_ledger(path, 3)
    taken = tmp_path / "ledger.sqlite3.v3-backup-x"
    taken.mkdir()  # the copy cannot be written there
    monkeypatch.setattr("orchestratord.ledger.backup_name", lambda p, v: str(taken))
    with pytest.raises(LedgerError, match="nothing was changed"):
        Ledger(str(path))
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 3
    db.close()


def test_corrupt_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(LedgerError, match="ledger.path"):
        Ledger(str(path))


def test_trigger_dedup_and_dispatch_ties_triggers(tmp_path: Path) -> None:
    led = Ledger(str(tmp_path / "l.db"))
    a = added(led.add_trigger("event", "x", dedup="k1"))
    assert a is not None
    assert led.add_trigger("event", "x again", dedup="k1") is None
    b = added(led.add_trigger("event", "y"))
    assert [t.id for t in led.pending_triggers()] == [a, b]
    d = led.create_dispatch("msg_1", "ses_1", "prompt", [a, b])
    assert led.pending_triggers() == [] and [t.id for t in led.triggers_for(d)] == [a, b]
    assert [x.state for x in led.open_dispatches()] == [PENDING]
    led.mark_sent(d)
    assert got(led, d).state == SENT
    led.finish_dispatch(d, COMPLETED, reply_text="ok", tool_calls=[{"tool": "t", "status": "completed"}])
    assert led.open_dispatches() == []
    done = got(led, d)
    assert done.reply_text == "ok" and done.tool_calls == [{"tool": "t", "status": "completed"}]
    assert led.dispatch_totals()["sent_total"] == 1 and led.dispatch_totals()["last_outcome"] == COMPLETED


def test_a_failed_prompt_releases_its_triggers_in_the_same_commit(tmp_path: Path) -> None:
    led = Ledger(str(tmp_path / "l.db"))
    t = added(led.add_trigger("event", "x"))
    d = led.create_dispatch("msg_2", "ses_1", "p", [t])
    led.finish_dispatch(d, FAILED, error="never sent", release=True)
    assert [x.id for x in led.pending_triggers()] == [t]
    assert got(led, d).state == FAILED
    t2 = added(led.add_trigger("event", "y"))
    d2 = led.create_dispatch("msg_3", "ses_1", "p", [t2])
    led.finish_dispatch(d2, FAILED, error="rejected")  # settled: the model saw it
    assert [x.id for x in led.triggers_for(d2)] == [t2] and [x.id for x in led.pending_triggers()] == [t]


def test_a_failed_settle_leaves_the_prompt_open_and_its_triggers_with_it(tmp_path: Path) -> None:
    """The triggers' update fails inside the transaction: the prompt's close is rolled back too."""
    led = Ledger(str(tmp_path / "l.db"))
    t = added(led.add_trigger("event", "x"))
    d = led.create_dispatch("msg_2", "ses_1", "p", [t])
    led.db.execute("CREATE TRIGGER no_release BEFORE UPDATE OF dispatch_id ON triggers "
                   "BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    with pytest.raises(sqlite3.IntegrityError):
        led.finish_dispatch(d, FAILED, error="never sent", release=True)
    assert got(led, d).state == PENDING and [x.id for x in led.triggers_for(d)] == [t]


def test_two_threads_two_connections(tmp_path: Path) -> None:
    path = str(tmp_path / "l.db")
    Ledger(path).close()

    def writer(n: int) -> None:
        led = Ledger(path)
        for i in range(200):
            led.add_events([EventRow(float(i), f"evt_{n}_{i}", "t", None, None, "{}")])
            led.add_trigger("event", f"{n}-{i}", dedup=f"{n}-{i}")
        led.close()

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    led = Ledger(path)
    assert led.db.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 400
    assert led.count_pending_triggers() == 400
    assert led.integrity_ok()


def test_prune_keeps_open_work(tmp_path: Path) -> None:
    led = Ledger(str(tmp_path / "l.db"))
    led.add_events([EventRow(1.0, "old", "t", None, None, "{}"), EventRow(1000.0, "new", "t", None, None, "{}")])
    old_done = added(led.add_trigger("event", "old done", now=1.0))
    d1 = led.create_dispatch("msg_a", "s", "p", [old_done], now=1.0)
    led.finish_dispatch(d1, COMPLETED)
    old_open = added(led.add_trigger("event", "old open", now=1.0))
    d2 = led.create_dispatch("msg_b", "s", "p", [old_open], now=1.0)
    old_pending = added(led.add_trigger("event", "never sent", now=1.0))
    led.prune(before=500.0)
    assert [e["event_id"] for e in led.events()] == ["new"]
    assert led.get_dispatch(d1) is None and led.get_dispatch(d2) is not None
    assert [t.id for t in led.pending_triggers()] == [old_pending]


def test_prune_keeps_every_message_identity(tmp_path: Path) -> None:
    """claude-teams never trims an inbox: an old message's identity must outlive any retention."""
    from orchestratord.ledger import MessageRow
    led = Ledger(str(tmp_path / "l.db"))
    row = MessageRow(ident="abc", team="t", recipient="team-lead", sender="w1", sent_at="2026-01-01T00:00:00Z",
                     type="message", summary="s", text="a long old text")
    [mid] = led.record_messages([row], reported=False, now=1.0)
    led.mark_reported(mid, None, now=1.0)
    led.prune(before=1e9)
    assert led.known_idents(["abc"]) == {"abc"}, "a whole read of the inbox must still know it"
    [m] = led.messages()
    assert (m["text"], m["summary"]) == ("", None), "the text itself is pruned"
    assert led.record_messages([row], reported=False, now=2e9) == [], "so it is not taken for new"


def test_state_and_readonly_view(tmp_path: Path) -> None:
    path = str(tmp_path / "l.db")
    led = Ledger(path)
    led.set_state({"server": {"healthy": True}})
    ro = Ledger(path, readonly=True)
    assert ro.get_state() == {"server": {"healthy": True}}
    with pytest.raises(sqlite3.OperationalError):
        ro.set_meta("x", "y")
    with pytest.raises(LedgerError, match="does not exist"):
        Ledger(str(tmp_path / "missing.db"), readonly=True)


def test_a_turns_report_and_a_push_cover_triggers_without_a_prompt(tmp_path: Path) -> None:
    led = Ledger(str(tmp_path / "l.db"))
    report = added(led.add_trigger("event", "w1 reports", dedup="e1", team="t", teammate="w1", session_id="ses_w1",
                                   ckey="k1", tkey="text-1", now=100.0))
    assert led.turn_report("ses_w1", "t", "w1", since=90.0) == report
    assert led.turn_report("ses_other", "t", "w1", since=90.0) == report  # signed by it, from the inbox
    assert led.turn_report("ses_w2", "t", "w2", since=90.0) is None
    assert led.turn_report("ses_w1", "t", "w1", since=101.0) is None  # an earlier turn's report
    idle = added(led.add_trigger("event", "idle", dedup="e2", covered=f"turn:{report}", now=101.0))
    assert [t.id for t in led.pending_triggers()] == [report] and led.count_pending_triggers() == 1
    # Pushed after its trigger: the pending trigger is covered; before: the new one is born covered.
    assert led.record_push("text-1", "ses_orch", since=0.0, at=102.0) == [report]
    assert led.pending_triggers() == []
    later = added(led.add_trigger("inbox", "w1 again", dedup="i3", ckey="k3", tkey="text-3", now=103.0))
    assert led.record_push("text-4", "ses_orch", since=0.0, at=104.0) == []
    early = added(led.add_trigger("inbox", "w1 pushed", dedup="i4", ckey="k4", tkey="text-4", now=105.0))
    assert [led.trigger_covered(i) for i in (report, idle, later, early)] == [
        "claude-teams", f"turn:{report}", None, "claude-teams"]
    assert [t.id for t in led.pending_triggers()] == [later]
    led.close()
