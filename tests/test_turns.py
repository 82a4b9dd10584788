"""One orchestrator prompt per teammate turn, against the real server.

A teammate's turn that ends in a ``send_message`` to the lead and then goes idle is one
piece of news: the message (seen on the stream and in the inbox, one trigger) is it, and
the idle that follows is recorded as covered by it. A turn that ends without a report is
news of its own, worded as such.
"""

from __future__ import annotations

import time
from typing import Any

from orchestratord.config import DispatchConfig
from tests.support.bed import (
    TEAM,
    Bed,
    is_orchestrator,
    last_is_tool_result,
    orchestrator_prompts,
    request_text,
    script_orchestrator,
    send_message_args,
    tool_results,
)
from tests.support.daemon import ledger_rows, wait_for
from tests.support.llm import Reply, last_user_text
from tests.support.team import append_message, read_inbox


def user_texts(messages: list[dict[str, Any]]) -> list[str]:
    return ["".join(p.get("text", "") for p in m["parts"] if p.get("type") == "text")
            for m in messages if m["info"].get("role") == "user"]

DEFAULTS: dict[str, Any] = {"debounce": DispatchConfig.debounce_seconds, "min_interval": DispatchConfig.min_interval_seconds}
CLOSING_DELAY = 2.0  # a real model's pace between the tool's result and its closing text


def script_turns(bed: Bed, marker: str, report: bool) -> None:
    """On a prompt naming ``marker``: send_message to the lead (if ``report``), then the closing text."""
    def closing(req: dict[str, Any]) -> Reply:
        time.sleep(CLOSING_DELAY)  # the model's own pace, not a wait of the test's
        return Reply.text("done for now")

    def mine(req: dict[str, Any]) -> bool:
        return marker in last_user_text(req) and not is_orchestrator(req)

    if report:
        bed.model.add_rule(lambda r: mine(r) and not last_is_tool_result(r),
                           lambda r: Reply.tool_call("claude-teams_send_message",
                                                     send_message_args(f"report of {last_user_text(r)}")))
        bed.model.add_rule(lambda r: mine(r) and last_is_tool_result(r), closing)
    else:
        bed.model.add_rule(mine, closing)


def idle_triggers(bed: Bed) -> list[tuple[Any, ...]]:
    return ledger_rows(bed.ledger, "SELECT id, covered, dispatch_id, detail FROM triggers "
                                   "WHERE event_type = 'session.idle' ORDER BY id")


def nothing_pending(bed: Bed) -> bool:
    pending = ledger_rows(bed.ledger, "SELECT COUNT(*) FROM triggers WHERE dispatch_id IS NULL AND covered IS NULL")
    return pending[0][0] == 0 and all(d["state"] in ("completed", "failed") for d in bed.dispatches())


def start(bed: Bed, marker: str, report: bool) -> None:
    """The daemon at its default dispatch settings, the orchestrator and the teammate scripted."""
    bed.write_config(**DEFAULTS)
    bed.warm()
    script_orchestrator(bed.model, reply="noted")
    script_turns(bed, marker, report=report)
    bed.ready_daemon()


def test_six_turns_that_report_then_idle_cost_six_prompts(bed: Bed) -> None:
    start(bed, "TURN-", report=True)
    mate = bed.spawn("worker-1")
    # Steady turns: a first prompt racing the broker's rules has its turn restarted, and the
    # restart's own idle can land after the turn's report (a case of its own, in test_broker).
    wait_for(lambda: len(bed.server.session(mate).get("permission") or []) > 1, 30, "the broker's rules on the session")
    for turn in range(1, 7):
        bed.server.prompt_async(mate, f"TURN-{turn}")
        wait_for(lambda: len(idle_triggers(bed)) == turn and len(bed.dispatches()) == turn, 60,
                 f"turn {turn}: its idle recorded and its prompt made")
    wait_for(lambda: nothing_pending(bed), 60, "every prompt finished")
    idles = idle_triggers(bed)
    assert [(covered or "").startswith("turn:") for _, covered, _, _ in idles] == [True] * 6, idles
    assert all(dispatch is None for _, _, dispatch, _ in idles)
    prompts = orchestrator_prompts(bed.model)
    assert len(prompts) == len(bed.dispatches()) == 6
    for turn, d in enumerate(bed.dispatches(), 1):
        assert f"report of TURN-{turn}" in d["prompt"] and "went idle" not in d["prompt"], d["prompt"]


def test_a_turn_without_a_report_is_one_prompt_that_says_so(bed: Bed) -> None:
    start(bed, "QUIET-TURN", report=False)
    mate = bed.spawn("worker-1", "QUIET-TURN")
    wait_for(lambda: len(bed.dispatches()) == 1 and nothing_pending(bed), 60, "the prompt for the silent stop")
    [(_, covered, dispatch, detail)] = idle_triggers(bed)
    assert covered is None and dispatch == bed.dispatches()[0]["id"]
    assert "worker-1 stopped without reporting" in bed.dispatches()[0]["prompt"]
    assert len(orchestrator_prompts(bed.model)) == 1
    assert mate in detail


def test_a_message_claude_teams_pushed_into_the_orchestrator_session_is_not_prompted_again(bed: Bed) -> None:
    """The orchestrator session is the lead's (it called team_create while it was the one
    busy session): claude-teams posts a teammate's message into it, and the daemon sees
    that message there and sends no prompt of its own for it."""
    bed.write_config(**DEFAULTS)
    bed.warm()
    script_turns(bed, "REPORT-NOW", report=True)

    def first_turn(req: dict[str, Any]) -> Reply:
        if tool_results(req) == 0:
            return Reply.tool_call("claude-teams_team_create", {"team_name": "lead-probe"})
        return Reply.text("the team is set up")

    bed.model.add_rule(lambda r: is_orchestrator(r) and "kick-off" in request_text(r)
                       and "REPORT-NOW" not in request_text(r), first_turn)
    script_orchestrator(bed.model, reply="noted")
    bed.ready_daemon()
    own = bed.session_id()
    append_message(bed.teams_dir, TEAM, "team-lead", "worker-1", "kick-off")
    wait_for(lambda: len(bed.dispatches()) == 1 and nothing_pending(bed), 60, "the first prompt, which made the team")
    mate = bed.spawn("worker-1")
    wait_for(lambda: ledger_rows(bed.ledger, "SELECT 1 FROM brokered WHERE session_id = ?", (mate,)), 30,
             "the broker's rules on the teammate (so its turn is not restarted)")
    bed.server.prompt_async(mate, "REPORT-NOW")

    def pushed() -> list[str]:
        return [t for t in user_texts(bed.server.messages(own)) if "report of REPORT-NOW" in t]

    wait_for(lambda: pushed() and len(idle_triggers(bed)) == 1, 60, "the push and the teammate's idle")
    wait_for(lambda: nothing_pending(bed) and not bed.server.session_status().get(own), 60, "the pushed turn's end")
    [(covered,)] = ledger_rows(bed.ledger, "SELECT covered FROM triggers WHERE rule = 'teammate-message' "
                                           "AND detail LIKE '%REPORT-NOW%'")
    assert covered == "claude-teams"
    assert len(pushed()) == 1, "the message reached the orchestrator once"
    assert len(read_inbox(bed.teams_dir, TEAM, "team-lead")) == 2  # kick-off and the report
    assert len(bed.dispatches()) == 1
