"""Slow or stuck, against the real server: the scripted model streams a few words and goes silent."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.support.bed import NO_IDLE, TEAM, Bed, is_orchestrator, orchestrator_prompts, request_text
from tests.support.daemon import Daemon, holds, ledger_rows, wait_for, write_config
from tests.support.llm import Reply, ScriptedModel, last_is_tool_result
from tests.support.server import OpencodeServer
from tests.support.team import append_message, make_team

SLOW_TEXT = ("I am working through the test failures one file at a time, starting with the parser, "
             "and will report back soon with what I found")


def stalls(ledger: Path) -> list[tuple[str, str | None, str]]:
    return [(r[0], r[1], r[2]) for r in ledger_rows(ledger, "SELECT kind, teammate, detail FROM stalls ORDER BY id")]


@pytest.fixture
def release() -> Iterator[threading.Event]:
    ev = threading.Event()
    try:
        yield ev
    finally:
        ev.set()  # let the silent streams end


def quiet_config(seconds: float, extra: str = "") -> str:
    return NO_IDLE + f"\n[stalls]\nteammate_quiet_seconds = {seconds}\n" + extra


def orchestrator_answers(model: ScriptedModel, first: Reply | None = None) -> None:
    """Orchestrator turns read the inbox and answer; the very first one may be scripted."""
    used = threading.Event()

    def start(req: dict[str, Any]) -> Reply:
        if first is not None and not used.is_set():
            used.set()
            return first
        return Reply.tool_call("claude-teams_read_inbox", {"team_name": TEAM, "agent_name": "team-lead"})

    model.add_rule(lambda r: is_orchestrator(r) and not last_is_tool_result(r), start)
    model.add_rule(lambda r: is_orchestrator(r) and last_is_tool_result(r), Reply.text("looked into it"))


def test_a_hung_teammate_is_reported_once_and_a_slow_one_never(bed: Bed, release: threading.Event) -> None:
    # Eight seconds of silence against a word a second: margin for a loaded machine, where the
    # server itself can pause for seconds before a session's first model request.
    bed.write_config(extra=quiet_config(8))
    orchestrator_answers(bed.model)
    bed.model.add_rule(lambda r: "fix the parser" in request_text(r), Reply.stall("Let me look at", release))
    bed.model.add_rule(lambda r: "fix the tests" in request_text(r), Reply.slow(SLOW_TEXT, 1.0))
    d = bed.ready_daemon()
    hung = bed.teammate("worker-1")
    slow = bed.teammate("worker-2")
    bed.server.prompt_async(hung, "fix the parser")
    slow_msg = bed.server.prompt_async(slow, "fix the tests")

    line = d.wait_log(r"teammate-stalled ", timeout=30)[0]
    assert f"session={hung}" in line and "teammate=worker-1" in line
    bed.server.wait_idle(slow, timeout=90, message_id=slow_msg)  # ~24 s of a word a second: slow, not stuck
    holds(lambda: len(d.grep("teammate-stalled ")) == 1, 2.0, "one report per stall")
    assert [(k, t) for k, t, _ in stalls(bed.ledger)] == [("stalled", "worker-1")]

    def stall_prompts() -> list[str]:
        return [request_text(r) for r in orchestrator_prompts(bed.model) if "produced nothing" in request_text(r)]
    [text] = wait_for(stall_prompts, 60, "the orchestrator prompt about the stall")
    assert "worker-1" in text and "worker-2" not in text
    status = d.cli("status")
    assert "stalled: worker-1 has produced nothing" in status


def test_a_hung_orchestrator_turn_is_aborted_and_the_next_trigger_runs(bed: Bed, release: threading.Event) -> None:
    bed.write_config(extra=NO_IDLE + "\n[stalls]\nenabled = false\n", debounce=0.1)
    cfg = bed.config
    cfg.write_text(cfg.read_text().replace("max_per_hour = 1000", "max_per_hour = 1000\nturn_timeout_seconds = 3"))
    orchestrator_answers(bed.model, first=Reply.stall("Reading the", release))
    d = bed.ready_daemon()
    append_message(bed.teams_dir, TEAM, "team-lead", "worker-1", "First question: which branch?")
    line = d.wait_log(r"turn-timeout ", timeout=30)[0]
    assert "aborted=yes" in line
    assert [r["state"] for r in bed.dispatches()] == ["timeout"]
    wait_for(lambda: not bed.server.session_status().get(bed.session_id()), 30, "the session idle after the abort")
    # This server aborts every new turn until the stuck model stream itself ends; a real
    # provider's connection ends or times out, the scripted one ends when released.
    release.set()

    append_message(bed.teams_dir, TEAM, "team-lead", "worker-1", "Second question: may I merge?")
    d.wait_log(r"prompt-done .*outcome=completed", timeout=60)
    dispatches = bed.dispatches()
    # The server may abort a prompt sent while the stuck turn winds down; its trigger then
    # goes into the next prompt.
    assert dispatches[0]["state"] == "timeout" and dispatches[-1]["state"] == "completed"
    assert all(r["state"] == "failed" and "Aborted" in (r["error"] or "") for r in dispatches[1:-1])
    assert len(dispatches) <= 3 and "Second question" in dispatches[-1]["prompt"]
    assert [k for k, _, _ in stalls(bed.ledger)] == ["turn-timeout"]


def test_a_teammate_waiting_on_a_permission_is_waiting_not_stalled(
        tmp_path: Path, asking_server: OpencodeServer, model: ScriptedModel, teams_dir: Path) -> None:
    server = asking_server
    make_team(teams_dir, TEAM, members=["worker-1"])
    ledger = tmp_path / "ledger.sqlite3"
    # A session the broker leaves alone (no teammate title): its request waits for a person.
    cfg = write_config(tmp_path / "orchestrator.toml", server_url=server.url, ledger=ledger, teams_base=teams_dir,
                       extra=quiet_config(6) + '\n[safety]\nbroker_sessions = "teammates"\n')
    d = Daemon(cfg, tmp_path).start()
    try:
        d.wait_log("stream-connected")
        sid = server.create_session("worker-1")["id"]
        model.script_tool_then_text("bash", {"command": "ls -la", "description": "List files"}, "listed",
                                    marker="list the files")
        server.prompt_async(sid, "list the files")
        line = d.wait_log(r"session-waiting ", timeout=30)[0]
        assert f"session={sid}" in line and "on=\"permission bash\"" in line and "teammate=worker-1" in line
        holds(lambda: not d.grep("teammate-stalled") and len(d.grep("session-waiting")) == 1, 4.0,
              "waiting, reported once, never stalled")
        assert [(k, t) for k, t, _ in stalls(ledger)] == [("waiting", "worker-1")]
        assert not ledger_rows(ledger, "SELECT id FROM triggers WHERE kind = 'stall'")
        assert "waiting on permission bash" in d.cli("status")
    finally:
        d.close()


def test_thresholds_changed_by_sighup_apply_without_a_restart(bed: Bed, release: threading.Event) -> None:
    bed.write_config(extra=quiet_config(600))
    orchestrator_answers(bed.model)
    bed.model.add_rule(lambda r: "fix the parser" in request_text(r), Reply.stall("Let me look at", release))
    d = bed.ready_daemon()
    hung = bed.teammate("worker-1")
    bed.server.prompt_async(hung, "fix the parser")
    wait_for(lambda: bed.server.session_status().get(hung), 30, "the teammate busy")
    holds(lambda: not d.grep("teammate-stalled"), 3.0, "no report under a 600 s threshold")
    pid = d.proc.pid if d.proc else None
    bed.write_config(extra=quiet_config(2))
    d.signal(signal.SIGHUP)
    d.wait_log("config-reloaded .*stalls")
    d.wait_log(r"teammate-stalled .*teammate=worker-1", timeout=30)
    assert d.proc is not None and d.proc.pid == pid and d.proc.poll() is None
