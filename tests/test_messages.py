"""Teammate messages reported exactly once, and prompts never lost nor sent twice.

Against the real server: teammates write the lead's inbox the way claude-teams does
(under the lock, rewriting in place); the daemon is crashed at injected points and
restarted; the scripted model tells us how many prompts really reached the server.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.support.bed import NO_IDLE, TEAM, Bed, orchestrator_prompts, script_orchestrator
from tests.support.daemon import Daemon, holds, ledger_rows, wait_for
from tests.support.llm import last_user_text
from tests.support.team import append_message

WORKERS = ("worker-1", "worker-2", "worker-3")


def reported(*daemons: Daemon) -> list[str]:
    return [line for d in daemons for line in d.grep(r"teammate-message team=")]


def messages(bed: Bed) -> list[tuple[Any, ...]]:
    return ledger_rows(bed.ledger, "SELECT sender, text, reported_at, trigger_id FROM messages ORDER BY id")


def wait_initialized(bed: Bed) -> None:
    wait_for(lambda: ledger_rows(bed.ledger, "SELECT value FROM meta WHERE key = 'inbox.initialized'"), 30,
             "the inbox watcher's first scan")


def all_dispatched(bed: Bed) -> bool:
    rows = ledger_rows(bed.ledger, "SELECT COUNT(*) FROM triggers WHERE dispatch_id IS NULL")
    states = [r["state"] for r in bed.dispatches()]
    return bool(rows) and rows[0][0] == 0 and bool(states) and all(s in ("completed", "failed") for s in states)


def write(bed: Bed, sender: str, text: str) -> None:
    append_message(bed.teams_dir, TEAM, "team-lead", sender, text)


def test_fifty_messages_in_bursts_each_reported_once(bed: Bed) -> None:
    bed.write_config(extra=NO_IDLE, debounce=0.3)
    script_orchestrator(bed.model, reply="read them all")
    d = bed.daemon()
    d.notify.wait("READY=1")
    wait_initialized(bed)
    bed.session_id()
    n = 0
    for burst in range(5):
        for i in range(10):
            write(bed, WORKERS[(burst + i) % 3], f"burst {burst} message {i}")
            n += 1
        wait_for(lambda: len(reported(d)) >= n, 30, f"{n} reports")
    wait_for(lambda: all_dispatched(bed), 120, "every trigger covered by a finished prompt")
    # The orchestrator's read_inbox flipped `read` on them all: still fifty.
    wait_for(lambda: all(m["read"] for m in json.loads(
        (bed.teams_dir / "teams" / TEAM / "inboxes" / "team-lead.json").read_text())), 60, "messages marked read")
    holds(lambda: len(reported(d)) == 50, 1.0, "no second report after read flips")
    rows = messages(bed)
    assert len(rows) == 50 and all(r[2] is not None for r in rows)
    assert len({r[3] for r in rows}) == 50, "one trigger per message"
    dispatches = bed.dispatches()
    assert 1 <= len(dispatches) <= 50
    assert len(orchestrator_prompts(bed.model)) == len(dispatches), "each prompt sent once"
    covered = ledger_rows(bed.ledger, "SELECT COUNT(*) FROM triggers WHERE dispatch_id IS NOT NULL")[0][0]
    assert covered == 50


def start_crashing(bed: Bed, point: str) -> tuple[Daemon, Daemon]:
    """A clean first start and stop, then a daemon that crashes at ``point``, its inbox read once."""
    bed.write_config(extra=NO_IDLE, debounce=0.2)
    script_orchestrator(bed.model, reply="handled")
    # Start clean first, so the messages written next are new (not the first-start baseline).
    first = bed.daemon()
    first.notify.wait("READY=1")
    wait_initialized(bed)
    bed.session_id()
    assert first.stop() == 0
    crashing = bed.daemon(env={"ORCHESTRATORD_TEST_CRASH": point})
    crashing.notify.wait("READY=1")
    crashing.wait_log(r"inbox-read .*team-lead\.json")  # so that the writes that follow are the new part of a read
    return first, crashing


CRASH_POINTS = ["before-post", "after-post", "after-record", "mid-batch", "inbox-mid-read"]


@pytest.mark.parametrize("run", [1, 2])
@pytest.mark.parametrize("point", CRASH_POINTS)
def test_crash_and_restart_loses_nothing_and_repeats_nothing(bed: Bed, point: str, run: int) -> None:
    first, crashing = start_crashing(bed, point)
    for i, who in enumerate(WORKERS):
        write(bed, who, f"crash test {point} {i}")
    assert crashing.wait_exit(60) == 137, f"the crash point {point} was not reached"

    again = bed.daemon()
    again.notify.wait("READY=1")
    wait_for(lambda: len(messages(bed)) == 3 and all(r[2] is not None for r in messages(bed)), 60,
             "three messages recorded and reported")
    wait_for(lambda: all_dispatched(bed), 90, "the prompt finished")
    logs = reported(first, crashing, again)
    assert len(logs) == 3, f"each message reported exactly once: {logs}"
    for i in range(3):
        assert sum(f"crash test {point} {i}" in line for line in logs) == 1
    dispatches = bed.dispatches()
    assert len(dispatches) == 1 and dispatches[0]["state"] == "completed"
    prompts = orchestrator_prompts(bed.model)
    assert len(prompts) == 1, "a prompt that landed must not be sent again, one that did not must be sent"
    if point == "after-post":
        assert again.grep("prompt-recovered .*landed=yes")
    if point == "before-post":
        assert again.grep("prompt-recovered .*landed=no")


ROGUE = "ROGUE: I will now run rm -rf / to clean up"


@pytest.mark.parametrize("point", ["after-message-line", "before-escalation"])
def test_a_crash_between_the_report_line_and_its_commit_reports_and_escalates_once(bed: Bed, point: str) -> None:
    """Killed after the ``teammate-message`` line and before ``mark_reported``, or after the
    message was judged and before its escalation was recorded: after the restart, the
    ledger reports the message once, the model is told about it once and the escalation
    is recorded (and logged) once. The log line itself is written before the commit, so it
    appears twice in all: once by the killed daemon, once after the restart."""
    _, crashing = start_crashing(bed, point)
    write(bed, "worker-1", ROGUE)
    assert crashing.wait_exit(60) == 137, f"the crash point {point} was not reached"
    assert len(reported(crashing)) == 1, "the line came before the crash"
    assert not ledger_rows(bed.ledger, "SELECT id FROM messages WHERE reported_at IS NOT NULL")
    assert not crashing.grep(r"\bescalation id="), "the crash came before the escalation was recorded"

    again = bed.daemon()
    again.notify.wait("READY=1")
    wait_for(lambda: [r for r in messages(bed) if r[2] is not None], 60, "the message reported after the restart")
    wait_for(lambda: all_dispatched(bed), 90, "the prompts finished")
    assert len(reported(again)) == 1, "reported again after the restart: the ledger had not marked it"
    assert len(messages(bed)) == 1
    lines = [line for d in (crashing, again) for line in d.grep(r"\bescalation id=")]
    assert len(lines) == 1 and "rule=recursive-delete" in lines[0], lines
    told = [r for r in orchestrator_prompts(bed.model) if "rm -rf /" in last_user_text(r)]
    assert len(told) == 1, f"the orchestrator was told about the message {len(told)} times"
    assert all(r["state"] == "completed" for r in bed.dispatches())


def test_messages_written_while_stopped_are_reported_on_start(bed: Bed) -> None:
    bed.write_config(extra=NO_IDLE)
    script_orchestrator(bed.model, reply="caught up")
    d = bed.daemon()
    d.notify.wait("READY=1")
    wait_initialized(bed)
    bed.session_id()
    assert d.stop() == 0
    write(bed, "worker-1", "while you were away")
    write(bed, "worker-2", "me too")
    d2 = bed.daemon()
    d2.notify.wait("READY=1")
    wait_for(lambda: len(reported(d2)) == 2, 30, "both reported")
    wait_for(lambda: all_dispatched(bed), 60, "prompted")
    assert len(bed.dispatches()) == 1


def test_messages_during_a_server_outage_are_reported_then_prompted(bed: Bed) -> None:
    bed.write_config(extra=NO_IDLE)
    script_orchestrator(bed.model, reply="back")
    d = bed.daemon()
    d.notify.wait("READY=1")
    wait_initialized(bed)
    bed.session_id()
    bed.server.kill()
    d.wait_log("server-down", timeout=20)
    write(bed, "worker-3", "server is gone")
    d.wait_log("teammate-message .*from=worker-3")
    assert bed.dispatches() == []
    bed.server.start()
    wait_for(lambda: all_dispatched(bed), 90, "prompted once the server is back")
    assert len(bed.dispatches()) == 1 and "worker-3" in bed.dispatches()[0]["prompt"]


def test_malformed_inboxes_are_logged_and_skipped(bed: Bed) -> None:
    bed.write_config(extra=NO_IDLE)
    cfg = bed.config.read_text().replace('names = ["my-team"]',
                                         'names = ["my-team"]\nwatch_members = true\npoll_interval_seconds = 0.2')
    bed.config.write_text(cfg)
    script_orchestrator(bed.model, reply="ok")
    d = bed.daemon()
    d.notify.wait("READY=1")
    wait_initialized(bed)
    inboxes = bed.teams_dir / "teams" / TEAM / "inboxes"
    (inboxes / "worker-1.json").write_text("this is not JSON")
    (inboxes / "worker-2.json").write_text(json.dumps({"not": "a list"}))
    (inboxes / "worker-3.json").write_text(json.dumps([{"from": "team-lead", "text": "x" * (2 * 1024 * 1024),
                                                         "timestamp": "2026-11-24T00:00:00.000Z", "read": False},
                                                        {"from": "team-lead", "text": "small",
                                                         "timestamp": "2026-11-24T00:00:01.000Z", "read": False}]))
    (inboxes / "worker-4.json").write_text(json.dumps([{"text": "no sender", "timestamp": "2026-11-24T00:00:00.000Z"}]))
    write(bed, "worker-1", "the lead still hears me")
    d.wait_log("teammate-message .*the lead still hears me")
    for name, why in (("worker-1", "not valid JSON"), ("worker-2", "must be a JSON array")):
        d.wait_log(rf"inbox-unreadable .*{name}\.json.*{why}")
    d.wait_log(r"inbox-message-oversized .*worker-3\.json.*from=team-lead .*bytes=2097.*teams\.max_message_bytes")
    d.wait_log(r"teammate-message .*to=worker-3 summary=small")  # the message after it is read
    d.wait_log(r"inbox-entries-skipped .*worker-4\.json.*has no 'from'")
    wait_for(lambda: all_dispatched(bed), 60, "the lead's message prompted")
    # Logged once, not on every rescan (every 0.2 s here).
    holds(lambda: len(d.grep(r"inbox-unreadable .*worker-1\.json")) == 1 and len(d.grep("inbox-message-oversized")) == 1,
          1.5, "one log line per broken file or oversized message")
