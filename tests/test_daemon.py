"""The daemon against the real ``opencode serve``, a scripted model and the test claude-teams server.

Each test starts ``orchestratord run`` as a child process with a test NOTIFY_SOCKET and
watches what it says (log lines, notify messages) and what it records (the ledger), and
what the model was asked (the scripted model's request log).
"""

from __future__ import annotations

import json
import signal
import threading

import requests

from orchestratord.teammsg import without_reminder
from tests.support.bed import (
    NO_IDLE,
    TEAM,
    Bed,
    is_orchestrator,
    orchestrator_prompts,
    request_text,
    script_orchestrator,
    script_teammate,
    send_message_args,
)
from tests.support.daemon import holds, ledger_rows, status_json, wait_for
from tests.support.llm import Reply, last_user_text
from tests.support.team import append_message

# -- start, session, stop ------------------------------------------------------------

def test_ready_creates_the_session_once_and_reuses_it(bed: Bed) -> None:
    d = bed.daemon()
    d.notify.wait("READY=1")
    d.wait_log("session-created")
    sid = bed.session_id()
    d.notify.wait("STATUS=")
    assert d.stop() == 0
    assert "STOPPING=1" in d.notify.fields()

    d2 = bed.daemon()
    d2.notify.wait("READY=1")
    d2.wait_log(rf"\bsession session={sid}")
    assert not d2.grep("session-created"), "a second start must reuse the session"
    listed = requests.get(f"{bed.server.url}/session", timeout=10).json()
    assert [s["id"] for s in listed if s.get("title") == "orchestrator"] == [sid]
    info = requests.get(f"{bed.server.url}/session/{sid}", timeout=10).json()
    assert info["title"] == "orchestrator"


def test_sigterm_exits_zero_promptly_with_stopping(bed: Bed) -> None:
    d = bed.daemon()
    d.notify.wait("READY=1")
    d.wait_log("stream-connected")
    d.signal(signal.SIGTERM)
    assert d.wait_exit(10) == 0
    stopping = d.notify.wait("STOPPING=1")
    assert stopping > d.notify.wait("READY=1")
    assert d.grep(r"\bstopped\b")


def test_deleted_session_is_recreated(bed: Bed) -> None:
    d = bed.daemon()
    d.wait_log("session-created")
    sid = bed.session_id()
    d.stop()
    assert requests.delete(f"{bed.server.url}/session/{sid}", timeout=10).ok
    d2 = bed.daemon()
    d2.wait_log("session-missing")
    d2.wait_log("session-created")
    assert bed.session_id() != sid


# -- triggers to prompts -------------------------------------------------------------

def test_teammate_message_gives_exactly_one_prompt_with_its_outcome(bed: Bed) -> None:
    bed.write_config(extra=NO_IDLE)
    script_orchestrator(bed.model, reply="Read the inbox: worker-1 finished the parser.")
    script_teammate(bed.model, "TASK-A", [send_message_args("parser done")])
    d = bed.daemon()
    d.notify.wait("READY=1")
    bed.session_id()
    worker = bed.teammate("worker-1")
    bed.server.prompt_async(worker, "TASK-A: write the parser, then report to the lead")

    d.wait_log("prompt-done", timeout=60)
    rows = bed.dispatches()
    assert len(rows) == 1
    row = rows[0]
    assert row["state"] == "completed"
    assert "worker-1" in row["prompt"] and TEAM in row["prompt"]
    calls = json.loads(row["tool_calls"])
    assert [(c["tool"], c["status"]) for c in calls] == [("claude-teams_read_inbox", "completed")]
    assert "worker-1 finished the parser" in row["reply_text"]

    prompts = orchestrator_prompts(bed.model)
    assert len(prompts) == 1 and "worker-1" in request_text(prompts[0])

    st = status_json(bed.config)
    assert st["dispatch"]["sent_total"] == 1
    assert st["dispatch"]["last_outcome"] == "completed"
    assert st["session"]["id"] == bed.session_id()
    assert st["server"]["healthy"] is True and st["stream"]["connected"] is True
    assert "worker-1 finished the parser" in (st["last_dispatch"] or {}).get("reply_text", "")

    # The message is on disk where the lead reads it, and nothing else is pending.
    inbox = json.loads((bed.teams_dir / "teams" / TEAM / "inboxes" / "team-lead.json").read_text())
    assert [without_reminder(m["text"]) for m in inbox] == ["parser done"]
    assert st["dispatch"]["pending_triggers"] == 0


def test_a_burst_gives_one_prompt_and_triggers_while_busy_give_one_more(bed: Bed) -> None:
    bed.write_config(extra=NO_IDLE, debounce=1.0)
    hold = threading.Event()
    script_orchestrator(bed.model, hold=hold)
    script_teammate(bed.model, "BURST-1", [send_message_args(f"step {i}") for i in range(10)])
    script_teammate(bed.model, "BURST-2", [send_message_args(f"more {i}", sender="worker-2") for i in range(10)])
    d = bed.daemon()
    d.notify.wait("READY=1")
    bed.session_id()

    worker = bed.teammate("worker-1")
    bed.server.prompt_async(worker, "BURST-1: report ten steps")
    d.wait_log("prompt-sent", timeout=60)
    first = bed.dispatches()
    assert len(first) == 1
    assert len(ledger_rows(bed.ledger, "SELECT id FROM triggers WHERE dispatch_id = ?", (first[0]["id"],))) == 10

    # The orchestrator turn is held (the model hangs); ten more arrive meanwhile.
    bed.model.wait_for_request(lambda r: is_orchestrator(r), timeout=30)
    worker2 = bed.teammate("worker-2")
    bed.server.prompt_async(worker2, "BURST-2: report ten more")
    wait_for(lambda: len(ledger_rows(bed.ledger, "SELECT id FROM triggers WHERE dispatch_id IS NULL")) == 10,
             60, "ten triggers queued while busy")
    assert len(bed.dispatches()) == 1, "nothing may be sent while the session is busy"

    hold.set()
    d.wait_log("prompt-done", count=2, timeout=90)
    rows = bed.dispatches()
    assert len(rows) == 2
    assert len(ledger_rows(bed.ledger, "SELECT id FROM triggers WHERE dispatch_id = ?", (rows[1]["id"],))) == 10
    assert "worker-2" in rows[1]["prompt"]
    assert len(orchestrator_prompts(bed.model)) == 2


def test_no_trigger_no_prompt_for_a_minute(bed: Bed) -> None:
    d = bed.daemon()
    d.notify.wait("READY=1")
    d.wait_log("stream-connected")
    bed.session_id()
    seen = len(bed.model.requests)

    def quiet() -> bool:
        return not bed.dispatches() and len(bed.model.requests) == seen and d.proc is not None and d.proc.poll() is None

    holds(quiet, 60, "no prompt, no model request, daemon running")
    assert not d.grep("prompt-sent")


# -- outages and reloads -------------------------------------------------------------

def test_server_restart_is_logged_and_the_daemon_keeps_working(bed: Bed) -> None:
    bed.write_config(extra=NO_IDLE)
    script_orchestrator(bed.model, reply="after restart")
    script_teammate(bed.model, "AFTER-RESTART", [send_message_args("back again")])
    d = bed.daemon()
    d.notify.wait("READY=1")
    d.wait_log("stream-connected")
    sid = bed.session_id()
    last_event = ledger_rows(bed.ledger, "SELECT COALESCE(MAX(id), 0) FROM events")[0][0]

    ups, connects = len(d.grep(r"\bserver-up ")), len(d.grep(r"\bstream-connected "))
    bed.server.kill()
    d.wait_server_down(timeout=20)
    bed.server.start()
    d.wait_log(r"\bserver-up ", count=ups + 1, timeout=60)
    d.wait_log(r"\bstream-connected ", count=connects + 1, timeout=30)

    worker = bed.teammate("worker-1")
    bed.server.prompt_async(worker, "AFTER-RESTART: report")
    d.wait_log("prompt-done", timeout=60)
    assert bed.session_id() == sid
    assert [r["state"] for r in bed.dispatches()] == ["completed"]
    # The new stream's events are recorded: those of the session made after the restart.
    after = ledger_rows(bed.ledger, "SELECT COUNT(*) FROM events WHERE id > ? AND session_id = ?", (last_event, worker))
    assert after[0][0] > 0, "no event of the new teammate session recorded after the restart"
    transitions = [r[0] for r in ledger_rows(bed.ledger, "SELECT state FROM transitions WHERE component = 'server' ORDER BY id")]
    assert transitions[-3:] == ["up", "down", "up"]


def test_sighup_keeps_the_old_config_on_error_and_applies_a_valid_one(bed: Bed) -> None:
    bed.write_config(extra=NO_IDLE)
    d = bed.daemon()
    d.notify.wait("READY=1")
    d.wait_log("stream-connected")
    good = bed.config.read_text()

    bed.config.write_text(good.replace("debounce_seconds =", "debounce_secs =")
                          + '\n[bogus]\nx = 1\n')
    d.signal(signal.SIGHUP)
    d.wait_log("config-reload-failed")
    rejected = d.grep("config-rejected")
    assert any("dispatch.debounce_secs" in line and "debounce_seconds" in line for line in rejected)
    assert any("bogus" in line for line in rejected)
    assert d.proc is not None and d.proc.poll() is None

    # A valid change: a new prompt template, used by the very next prompt.
    bed.config.write_text(good.replace("[dispatch]\n", '[dispatch]\nprompt = "RELOADED {teams}: {triggers}"\n'))
    mark = len(d.notify.fields())
    d.signal(signal.SIGHUP)
    reloading = d.notify.wait("RELOADING=1", after=mark)
    assert d.notify.fields()[reloading + 1].startswith("MONOTONIC_USEC=") or any(
        f.startswith("MONOTONIC_USEC=") for f in d.notify.fields()[mark:])
    assert d.notify.wait("READY=1", after=reloading) > reloading
    d.wait_log("config-reloaded")

    bed.model.add_rule(lambda r: "RELOADED" in request_text(r), Reply.text("ack"))
    script_teammate(bed.model, "POST-RELOAD", [send_message_args("hello")])
    worker = bed.teammate("worker-1")
    bed.server.prompt_async(worker, "POST-RELOAD: report")
    d.wait_log("prompt-done", timeout=60)
    assert bed.dispatches()[0]["prompt"].startswith("RELOADED my-team: ")


def test_a_rejected_reload_keeps_the_old_config_in_effect(bed: Bed) -> None:
    """Not only the log line: the old prompt drives the next trigger, and status keeps its digest."""
    bed.write_config(extra=NO_IDLE)
    good = bed.config.read_text().replace("[dispatch]\n", '[dispatch]\nprompt = "OLD-PROMPT {teams}: {triggers}"\n')
    bed.config.write_text(good)
    kept = bed.tmp / "kept.toml"  # the good file, for `status` while the one in place is broken
    kept.write_text(good)
    bed.model.add_rule(lambda r: "-PROMPT my-team" in request_text(r), Reply.text("ack"))
    d = bed.ready_daemon()
    digest = status_json(kept)["config"]["digest"]
    assert digest

    # A new prompt, and one bad value: the whole file is refused.
    bed.config.write_text(good.replace("OLD-PROMPT", "NEW-PROMPT").replace("debounce_seconds =", "debounce_seconds = -1 #"))
    d.signal(signal.SIGHUP)
    d.wait_log("config-reload-failed")
    assert status_json(kept)["config"]["digest"] == digest, "status shows another config than the one in effect"

    append_message(bed.teams_dir, TEAM, "team-lead", "worker-1", "AFTER-REJECTED-RELOAD: status")
    d.wait_log("prompt-done", timeout=60)
    [row] = bed.dispatches()
    assert row["prompt"].startswith("OLD-PROMPT my-team: "), row["prompt"]
    prompts = [text for r in bed.model.requests if "-PROMPT my-team" in (text := last_user_text(r))]
    assert prompts and all(p.startswith("OLD-PROMPT my-team: ") for p in prompts), prompts
    assert status_json(kept)["config"]["digest"] == digest


def test_a_hung_worker_stops_the_watchdog(bed: Bed) -> None:
    d = bed.daemon(env={"WATCHDOG_USEC": "1000000", "ORCHESTRATORD_TEST_HANG": "health"})
    d.notify.wait("READY=1")
    d.notify.wait("WATCHDOG=1")
    d.wait_log("worker-hung", timeout=30)
    count = d.notify.fields().count("WATCHDOG=1")
    # Pings were due every 0.5 s; once the hang is seen, none may follow.
    holds(lambda: d.notify.fields().count("WATCHDOG=1") == count, 3, "no WATCHDOG=1 after the hang")
    assert d.proc is not None and d.proc.poll() is None
