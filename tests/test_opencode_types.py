"""The server's answers as the daemon reads them: when a reply is finished, when a session is busy.

From messages recorded on opencode serve 1.18.33 (tests/data): two prompts, each answered
by assistant messages that stop with ``tool-calls`` between tool steps, then ``stop``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from orchestratord.dispatch import outcome
from orchestratord.opencode import Message, SessionStatus, last_finished, messages_of

RECORDED = json.loads((Path(__file__).parent / "data" / "session-messages-1.18.33.json").read_text())


def _prompts() -> list[str]:
    return [m["info"]["id"] for m in RECORDED if m["info"]["role"] == "user"]


def test_recorded_messages_are_read_with_their_parents_and_finishes() -> None:
    messages = messages_of(RECORDED)
    assert len(messages) == len(RECORDED)
    first, second = _prompts()
    replies = [m for m in messages if m.parent_id == second]
    assert [m.finish for m in replies] == ["tool-calls", "tool-calls", "stop"]
    assert [m.finished for m in replies] == [False, False, True], "a step that called tools is not the turn's end"
    assert all(m.completed for m in replies) and all(m.parts for m in replies)
    assert not next(m for m in messages if m.id == first).finished, "a user message is never a finished reply"


def test_a_turn_cut_after_a_tool_step_is_not_finished_anywhere() -> None:
    """Up to the second reply of the second prompt: paused between tool steps."""
    _, second = _prompts()
    upto = [m for m in RECORDED if m["info"]["id"] <= max(m["info"]["id"] for m in RECORDED
                                                       if m["info"].get("parentID") == second
                                                       and m["info"].get("finish") == "tool-calls")]
    assert upto[-1]["info"]["finish"] == "tool-calls"
    assert outcome(upto, second)[0] is False, "the dispatcher keeps following it"
    assert last_finished(upto) is False, "the stall watch and the busy check do not call it done"
    assert outcome(RECORDED, second)[0] is True and last_finished(RECORDED) is True


def test_outcome_of_recorded_replies_has_their_text_and_tool_calls() -> None:
    first, _ = _prompts()
    finished, text, tools, error = outcome(RECORDED, first)
    assert finished and text and error is None
    assert [t["tool"] for t in tools] == ["claude-teams_read_inbox"] and tools[0]["status"] == "completed"


def test_a_failed_reply_is_finished_whatever_its_finish_says() -> None:
    messages = copy.deepcopy(RECORDED)
    last = messages[-1]["info"]
    last["finish"] = "unknown"
    assert not last_finished(messages)
    last["error"] = {"name": "MessageAbortedError", "data": {"message": "aborted"}}
    assert last_finished(messages)
    assert outcome(messages, last["parentID"])[3] == "MessageAbortedError: aborted"


@pytest.mark.parametrize("raw", [None, [], {"parts": []}, {"info": "x"}])
def test_what_is_not_a_message_is_skipped(raw: Any) -> None:
    assert Message.from_api(raw) is None and messages_of([raw]) == [] and not last_finished([raw])


def test_session_status_busy() -> None:
    statuses = {"ses_a": {"type": "busy"}, "ses_b": {"type": "retry", "attempt": 2}, "ses_c": {"type": "idle"},
                "ses_d": {}}
    assert SessionStatus.of(statuses, "ses_a").busy and SessionStatus.of(statuses, "ses_b").busy
    assert not SessionStatus.of(statuses, "ses_c").busy
    assert not SessionStatus.of({}, "ses_a").busy, "idle sessions are absent from the map"
    assert SessionStatus.of(statuses, "ses_d").busy, "listed without a type: taken as busy, the server's default"
    assert SessionStatus.busy_map(statuses) == {"ses_a": "busy", "ses_b": "retry", "ses_d": "busy"}
