"""Trigger rules: matching on type, fields and session, and what a match says."""

from __future__ import annotations

from orchestratord.config import DEFAULT_TRIGGERS
from orchestratord.config import TriggerRule as R
from orchestratord.sessions import SessionInfo
from orchestratord.stream import Event
from orchestratord.triggers import match_all, rule_matches

SEND = DEFAULT_TRIGGERS[0]


def tool_event(status: str = "completed", session: str = "ses_worker", tool: str = "claude-teams_send_message") -> Event:
    props = {"sessionID": session, "part": {
        "id": "prt_1", "sessionID": session, "type": "tool", "tool": tool,
        "state": {"status": status, "input": {"team_name": "my-team", "recipient": "team-lead",
                                              "content": "done with task 1", "summary": "done"}}}}
    return Event("evt_1", "message.part.updated", props, session, None, "")


def test_completed_send_message_from_a_teammate_matches() -> None:
    assert rule_matches(SEND, tool_event(), own_session="ses_orch")


def test_running_call_tool_other_than_send_and_own_session_do_not_match() -> None:
    assert not rule_matches(SEND, tool_event(status="running"), "ses_orch")
    assert not rule_matches(SEND, tool_event(tool="claude-teams_read_inbox"), "ses_orch")
    assert not rule_matches(SEND, tool_event(session="ses_orch"), "ses_orch")


def test_sessions_own_and_any() -> None:
    own = R("own", "session.idle", sessions="own")
    anyr = R("any", "session.idle", sessions="any")
    ev = Event("evt_2", "session.idle", {"sessionID": "ses_orch"}, "ses_orch", None, "")
    assert rule_matches(own, ev, "ses_orch") and rule_matches(anyr, ev, "ses_orch")
    assert not rule_matches(own, ev, "ses_other")


def test_globs_lists_bools_and_disabled() -> None:
    ev = Event("e", "session.error", {"sessionID": "s", "error": {"name": "APIError", "retry": False}}, "s", None, "")
    assert rule_matches(R("a", "session.*", {"error.name": "API*"}), ev, None)
    assert rule_matches(R("b", "session.error", {"error.name": ["Other", "APIError"]}), ev, None)
    assert rule_matches(R("c", "session.error", {"error.retry": False}), ev, None)
    assert not rule_matches(R("d", "session.error", {"error.retry": 0}), ev, None)
    assert not rule_matches(R("e", "session.error", {"error.missing": "*"}), ev, None)
    assert not rule_matches(R("f", "session.error", enabled=False), ev, None)


def test_match_names_the_teammate_and_dedups_on_the_part() -> None:
    [m] = match_all([SEND], tool_event(), "ses_orch", session_of=lambda sid: SessionInfo(sid, title="worker-1"))
    assert m.teammate == "worker-1" and m.team == "my-team"
    assert "worker-1" in m.detail and "to team-lead" in m.detail and '"done"' in m.detail
    assert m.dedup == "teammate-message:prt_1:completed"
    [again] = match_all([SEND], tool_event(), "ses_orch")
    assert again.dedup == m.dedup


def test_a_teammate_is_named_by_its_session_title_not_by_what_it_claims() -> None:
    ev = tool_event()
    ev.properties["part"]["state"]["input"]["sender"] = "team-lead"  # signed as the lead
    [m] = match_all([SEND], ev, "ses_orch", session_of=lambda sid: SessionInfo(sid, title="worker-2@my-team"))
    assert (m.teammate, m.team) == ("worker-2", "my-team")
    assert "worker-2@my-team" in m.detail


def test_session_error_detail_carries_the_error() -> None:
    rule = R("teammate-error", "session.error", description="a teammate session failed")
    ev = Event("evt_3", "session.error", {"sessionID": "s", "error": {"name": "APIError", "data": {"message": "boom"}}},
               "s", None, "")
    [m] = match_all([rule], ev, None)
    assert "APIError: boom" in m.detail and m.dedup == "teammate-error:evt_3"
