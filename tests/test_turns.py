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
from tests.support.bed import Bed, last_is_tool_result, orchestrator_prompts, script_orchestrator, send_message_args
from tests.support.daemon import ledger_rows, wait_for
from tests.support.llm import Reply, last_user_text

DEFAULTS = {"debounce": DispatchConfig.debounce_seconds, "min_interval": DispatchConfig.min_interval_seconds}
CLOSING_DELAY = 2.0  # a real model's pace between the tool's result and its closing text


def script_turns(bed: Bed, marker: str, report: bool) -> None:
    """On a prompt naming ``marker``: send_message to the lead (if ``report``), then the closing text."""
    def closing(req: dict[str, Any]) -> Reply:
        time.sleep(CLOSING_DELAY)  # the model's own pace, not a wait of the test's
        return Reply.text("done for now")

    if report:
        bed.model.add_rule(lambda r: marker in last_user_text(r) and not last_is_tool_result(r),
                           lambda r: Reply.tool_call("claude-teams_send_message",
                                                     send_message_args(f"report of {last_user_text(r)}")))
        bed.model.add_rule(lambda r: marker in last_user_text(r) and last_is_tool_result(r), closing)
    else:
        bed.model.add_rule(lambda r: marker in last_user_text(r), closing)


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
