"""The dispatcher, one step at a time, with an injected clock and a fake server."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, cast

import pytest

from orchestratord.dispatch import Dispatcher, DispatchSettings, outcome, render_prompt
from orchestratord.ledger import COMPLETED, PENDING, SENT, TIMEOUT, Ledger
from orchestratord.opencode import NotFound, OpencodeClient, Unreachable
from orchestratord.state import Shared


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class FakeServer:
    """Just enough of opencode's API for the dispatcher."""

    def __init__(self) -> None:
        self.sessions = {"ses_existing"}
        self.prompts: list[dict[str, Any]] = []
        self.status: dict[str, Any] = {}
        self.messages_by_session: dict[str, list[dict[str, Any]]] = {}
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise Unreachable("connection refused")

    def create_session(self, title: str, permission: Any = None) -> dict[str, Any]:
        self._check()
        self.created = getattr(self, "created", 0) + 1
        sid = f"ses_new{self.created}"
        self.sessions.add(sid)
        self.permission = permission
        return {"id": sid, "title": title, "permission": permission}

    def get_session(self, sid: str, timeout: float | None = None) -> dict[str, Any]:
        self._check()
        if sid not in self.sessions:
            raise NotFound(sid)
        return {"id": sid, "permission": getattr(self, "permission", None)}

    def set_session_permission(self, sid: str, permission: Any) -> dict[str, Any]:
        self.permission = permission
        self.patched = getattr(self, "patched", 0) + 1
        return {"id": sid, "permission": permission}

    def session_status(self) -> dict[str, Any]:
        self._check()
        return dict(self.status)

    def prompt_async(self, sid: str, text: str, message_id: str, agent: Any = None, model: Any = None) -> None:
        self._check()
        if sid not in self.sessions:
            raise NotFound(sid)
        self.prompts.append({"session": sid, "text": text, "id": message_id})
        self.messages_by_session.setdefault(sid, []).append({"info": {"id": message_id, "role": "user"}, "parts": []})

    def get_message(self, sid: str, mid: str) -> dict[str, Any]:
        self._check()
        for m in self.messages_by_session.get(sid, []):
            if m["info"]["id"] == mid:
                return m
        raise NotFound(mid)

    def messages(self, sid: str, limit: int | None = None) -> list[dict[str, Any]]:
        self._check()
        if sid not in self.sessions:
            raise NotFound(sid)
        return self.messages_by_session.get(sid, [])[-(limit or 1000):]

    def reply(self, sid: str, parent: str, text: str, finish: str = "stop", error: str | None = None) -> None:
        info: dict[str, Any] = {"id": f"msg_r{len(self.messages_by_session[sid])}", "role": "assistant",
                                "parentID": parent, "time": {"created": 1, "completed": 2}, "finish": finish}
        if error:
            info["error"] = {"name": error, "data": {"message": "Aborted"}}
        self.messages_by_session[sid].append({
            "info": info,
            "parts": [{"type": "tool", "tool": "claude-teams_read_inbox",
                       "state": {"status": "completed", "input": {}, "output": "[]"}},
                      {"type": "text", "text": text}]})

    def abort(self, sid: str) -> None:
        self._check()
        self.aborted = getattr(self, "aborted", []) + [sid]

    def start(self, sid: str, parent: str) -> None:
        """The model started answering: an unfinished assistant message."""
        self.messages_by_session[sid].append({
            "info": {"id": f"msg_s{len(self.messages_by_session[sid])}", "role": "assistant", "parentID": parent,
                     "time": {"created": 1}}, "parts": []})

    def close(self) -> None:
        pass


def settings(**kw: Any) -> DispatchSettings:
    base: dict[str, Any] = dict(prompt="Teams {teams}, lead {lead}.\n{triggers}", debounce=0.5, min_interval=5.0, max_per_hour=3,
                sweep_interval=0.0, busy_timeout=60.0, completion_timeout=120.0, session_title="orchestrator",
                session_id=None, agent=None, model=None, teams=("my-team",), teams_base_dir="/x", lead="team-lead")
    base.update(kw)
    return DispatchSettings(**base)


Rig = tuple[Clock, FakeServer, Shared, str, Callable[..., Dispatcher]]


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    clock = Clock()
    server = FakeServer()
    shared = Shared(server_url="http://x", clock=clock)
    shared.server_seen(True, "1.18.33")  # the health watch has probed it
    shared.set_stream_connected(True)
    path = str(tmp_path / "ledger.db")

    def make(**kw: Any) -> Dispatcher:
        d = Dispatcher(shared=shared, make_client=lambda: cast(OpencodeClient, server), ledger_path=path, settings=settings(**kw),
                       server_url="http://x", clock=clock, wall=lambda: clock.t)
        d.setup()
        return d

    return clock, server, shared, path, make


def add_triggers(path: str, n: int, teammate: str = "worker-1") -> None:
    led = Ledger(path)
    for i in range(n):
        led.add_trigger("event", f"thing {i}", rule="teammate-message", teammate=teammate, dedup=f"{teammate}-{i}-{id(led)}")
    led.close()


def one_prompt(rig: Any, **kw: Any) -> tuple[Dispatcher, dict[str, Any]]:
    """A dispatcher that has sent one prompt for one trigger."""
    clock, server, shared, path, make = rig
    d = make(**kw)
    add_triggers(path, 1)
    d.run_once()
    d.run_once()
    [p] = server.prompts
    return d, p


def test_no_trigger_no_prompt(rig: Rig) -> None:
    clock, server, shared, path, make = rig
    d = make()
    for _ in range(10):
        clock.t += d.run_once()
    assert server.prompts == []
    assert d.session_id is not None and server.permission  # created once, with the ruleset


def test_burst_is_one_prompt_after_the_quiet_period(rig: Rig) -> None:
    clock, server, shared, path, make = rig
    d = make()
    add_triggers(path, 10)
    wait = d.run_once()
    assert server.prompts == [] and 0 < wait <= 0.5
    clock.t += wait
    d.run_once()
    assert len(server.prompts) == 1
    text = server.prompts[0]["text"]
    assert "teammate worker-1" in text and text.count("thing ") == 10 and "my-team" in text


def test_busy_session_waits_then_one_prompt(rig: Rig) -> None:
    clock, server, shared, path, make = rig
    d = make()
    d.run_once()
    assert d.session_id is not None
    server.status = {d.session_id: {"type": "busy"}}
    add_triggers(path, 10)
    for _ in range(5):
        clock.t += max(d.run_once(), 0.1)
    assert server.prompts == []
    server.status = {}
    clock.t += d.run_once()
    d.run_once()
    assert len(server.prompts) == 1


def test_follow_records_outcome_then_next_prompt_respects_min_interval(rig: Rig) -> None:
    clock, server, shared, path, make = rig
    d = make()
    add_triggers(path, 1)
    clock.t += d.run_once()
    d.run_once()
    [p] = server.prompts
    server.reply(p["session"], p["id"], "step one", finish="tool-calls")
    d.run_once()
    assert Ledger(path).open_dispatches()[0].state == SENT  # tool-calls is not the end
    server.reply(p["session"], p["id"], "all quiet")
    d.run_once()
    [done] = Ledger(path).dispatches()
    assert done.state == COMPLETED and "all quiet" in (done.reply_text or "")
    assert [c["tool"] for c in done.tool_calls] == ["claude-teams_read_inbox", "claude-teams_read_inbox"]
    add_triggers(path, 1, teammate="worker-2")
    clock.t += 1.0
    clock.t += d.run_once()  # the quiet period first
    wait = d.run_once()
    assert len(server.prompts) == 1 and 3.4 < wait <= 3.5
    clock.t += wait
    d.run_once()
    assert len(server.prompts) == 2


def test_hourly_cap(rig: Rig) -> None:
    clock, server, shared, path, make = rig
    d = make(min_interval=0.0, debounce=0.0)
    for i in range(5):
        add_triggers(path, 1, teammate=f"w{i}")
        d.run_once()
        p = server.prompts[-1]
        server.reply(p["session"], p["id"], "ok")
        d.run_once()
    assert len(server.prompts) == 3
    clock.t += 3600
    d.run_once()
    assert len(server.prompts) == 4


def test_crash_after_post_is_not_sent_again(rig: Rig) -> None:
    clock, server, shared, path, make = rig
    d = make()
    d.run_once()
    led = Ledger(path)
    t = led.add_trigger("event", "x")
    assert t is not None and d.session_id is not None
    led.create_dispatch("msg_landed", d.session_id, "p", [t])
    server.messages_by_session.setdefault(d.session_id, []).append({"info": {"id": "msg_landed", "role": "user"}})
    fresh = make()
    fresh.run_once()
    assert server.prompts == [] and led.open_dispatches()[0].state == SENT


def test_crash_before_post_is_sent_with_the_same_id(rig: Rig) -> None:
    clock, server, shared, path, make = rig
    d = make()
    d.run_once()
    led = Ledger(path)
    t = led.add_trigger("event", "x")
    assert t is not None and d.session_id is not None
    led.create_dispatch("msg_lost", d.session_id, "p", [t])
    fresh = make()
    fresh.run_once()
    assert [p["id"] for p in server.prompts] == ["msg_lost"]


def test_unreachable_post_stays_pending_and_is_looked_up(rig: Rig) -> None:
    clock, server, shared, path, make = rig
    d = make(debounce=0.0)
    d.run_once()
    add_triggers(path, 1)
    real = server.prompt_async

    def fail(*a: Any, **k: Any) -> None:
        raise Unreachable("reset")

    server.prompt_async = fail  # type: ignore[method-assign]
    d.run_once()
    assert Ledger(path).open_dispatches()[0].state == PENDING
    server.prompt_async = real  # type: ignore[method-assign]
    d.run_once()
    assert len(server.prompts) == 1 and Ledger(path).open_dispatches()[0].state == SENT


def test_deleted_session_is_recreated_and_triggers_kept(rig: Rig) -> None:
    clock, server, shared, path, make = rig
    d = make(debounce=0.0)
    d.run_once()
    first = d.session_id
    server.sessions.discard(first)
    add_triggers(path, 2)
    d.run_once()  # POST 404: triggers go back to the queue
    d.run_once()  # new session
    d.run_once()
    assert d.session_id != first and len(server.prompts) == 1
    assert server.prompts[0]["session"] == d.session_id and server.prompts[0]["text"].count("thing") == 2


def test_completion_timeout(rig: Rig) -> None:
    clock, server, shared, path, make = rig
    d, p = one_prompt(rig, debounce=0.0, completion_timeout=10.0)
    server.start(p["session"], p["id"])
    clock.t += 5
    shared.touch(p["session"])  # active, but past the overall limit
    clock.t += 6
    d.run_once()
    assert Ledger(path).dispatches()[0].state == TIMEOUT
    assert getattr(server, "aborted", []) == []


def test_a_silent_turn_is_aborted_and_an_active_one_left_alone(rig: Rig) -> None:
    clock, server, shared, path, make = rig
    d, p = one_prompt(rig, debounce=0.0, min_interval=0.0, turn_timeout=30.0, completion_timeout=1000.0)
    server.start(p["session"], p["id"])
    for _ in range(10):  # slow but active: an event every 20 s for 200 s
        clock.t += 20
        shared.touch(p["session"])
        d.run_once()
    assert Ledger(path).open_dispatches() and getattr(server, "aborted", []) == []
    clock.t += 31  # then silence
    d.run_once()
    [done] = Ledger(path).dispatches()
    assert done.state == TIMEOUT and "no activity" in (done.error or "") and server.aborted == [p["session"]]
    assert [r["kind"] for r in Ledger(path).stalls()] == ["turn-timeout"]
    add_triggers(path, 1, teammate="worker-2")
    clock.t += d.run_once()  # a moment for the server to wind the aborted turn down
    d.run_once()
    assert len(server.prompts) == 2, "the next trigger gets a fresh prompt"


def test_a_turn_is_not_called_silent_while_the_stream_is_down(rig: Rig) -> None:
    clock, server, shared, path, make = rig
    d, p = one_prompt(rig, debounce=0.0, min_interval=0.0, turn_timeout=30.0, completion_timeout=1000.0)
    server.start(p["session"], p["id"])
    shared.set_stream_connected(False)  # e.g. the reader cannot write the ledger: no events are read
    clock.t += 120
    d.run_once()
    assert Ledger(path).open_dispatches() and getattr(server, "aborted", []) == []
    shared.set_stream_connected(True)
    shared.touch(p["session"])  # the reconnect starts the count afresh
    clock.t += 31
    d.run_once()
    assert server.aborted == [p["session"]]


def test_a_prompt_caught_by_the_abort_of_a_stuck_turn_is_requeued(rig: Rig) -> None:
    clock, server, shared, path, make = rig
    d, p = one_prompt(rig, debounce=0.0, min_interval=0.0, turn_timeout=30.0)
    server.start(p["session"], p["id"])
    clock.t += 31
    d.run_once()
    assert server.aborted == [p["session"]]
    add_triggers(path, 1, teammate="worker-2")
    wait = d.run_once()
    assert len(server.prompts) == 1 and 0 < wait <= 1.5, "the server gets a moment to wind the turn down"
    clock.t += wait
    d.run_once()
    [_, second] = server.prompts
    server.reply(second["session"], second["id"], "", error="MessageAbortedError")
    d.run_once()
    led = Ledger(path)
    assert led.dispatches()[0].state == "failed" and led.count_pending_triggers() == 1
    clock.t += 2
    assert d.run_once() > 0 and len(server.prompts) == 2, "caught again: it waits longer each time"
    clock.t += 2
    d.run_once()
    assert len(server.prompts) == 3 and "worker-2" in server.prompts[2]["text"]


def test_a_prompt_that_never_runs_is_sent_again_once_then_escalated(rig: Rig) -> None:
    clock, server, shared, path, make = rig
    d, first = one_prompt(rig, debounce=0.0, min_interval=0.0, start_timeout=30.0)
    clock.t += 20
    d.run_once()
    assert len(server.prompts) == 1, "still within the start timeout"
    clock.t += 11
    d.run_once()
    assert len(server.prompts) == 2
    second = server.prompts[1]
    assert second["id"] != first["id"] and f"supersedes {first['id']}" in second["text"]
    assert "worker-1" in second["text"]
    led = Ledger(path)
    old, new = led.dispatches()[1], led.dispatches()[0]
    assert old.state == "failed" and "superseded" in (old.error or "") and led.supersedes(new.id) == old.id
    assert [t.dispatch_id for t in led.triggers_for(new.id)] == [new.id]
    clock.t += 31
    d.run_once()
    assert len(server.prompts) == 2, "never a third time"
    [esc] = led.escalations()
    assert esc.rule == "prompt-never-ran" and esc.severity == "critical"
    assert led.count_pending_triggers() == 1, "its trigger goes back to the queue"


def test_a_prompt_that_starts_is_not_resent(rig: Rig) -> None:
    clock, server, shared, path, make = rig
    d, p = one_prompt(rig, debounce=0.0, start_timeout=30.0)
    shared.mark_busy(p["session"])  # the busy event came
    clock.t += 60
    shared.touch(p["session"])
    d.run_once()
    assert len(server.prompts) == 1 and Ledger(path).open_dispatches()


def test_sweep_only_when_configured(rig: Rig) -> None:
    clock, server, shared, path, make = rig
    d = make(sweep_interval=30.0, debounce=0.0)
    d.run_once()
    clock.t += 31
    d.run_once()
    d.run_once()
    assert len(server.prompts) == 1 and "periodic check" in server.prompts[0]["text"]


def test_render_and_outcome_helpers() -> None:
    text = render_prompt("{teams}|{lead}|{triggers}", [], (), "/base", "lead")
    assert text == "every team under /base|lead|- (periodic check)"
    assert outcome([], "msg_x")[0] is False


def test_an_escalation_skips_the_quiet_period_and_the_min_interval(rig: Rig) -> None:
    clock, server, shared, path, make = rig
    d = make(debounce=5.0, min_interval=60.0)
    add_triggers(path, 1)
    clock.t += d.run_once()
    d.run_once()
    [p] = server.prompts
    server.reply(p["session"], p["id"], "ok")
    d.run_once()
    add_triggers(path, 1, teammate="worker-2")
    assert d.run_once() > 0 and len(server.prompts) == 1, "an ordinary trigger waits"
    led = Ledger(path)
    led.add_trigger("escalation", "SAFETY ESCALATION: worker-3 ran rm -rf /", rule="safety:recursive-delete",
                    teammate="worker-3", dedup="escalation:1")
    led.close()
    d.run_once()
    assert len(server.prompts) == 2, "the escalation goes out at once, with what was waiting"
    lines = server.prompts[1]["text"].splitlines()
    assert "[safety:recursive-delete]" in lines[1] and "worker-3" in lines[1]
    assert any("teammate worker-2" in ln for ln in lines[2:])


def test_the_session_ruleset_is_restated_when_the_config_widens_it(rig: Rig) -> None:
    clock, server, shared, path, make = rig
    d = make()
    d.run_once()
    assert server.permission[0] == {"permission": "bash", "pattern": "*", "action": "deny"}
    d2 = make(permission=(("bash", "git status*", "allow"),))
    d2.run_once()
    assert getattr(server, "patched", 0) == 1 and server.created == 1
    assert server.permission[-1] == {"permission": "bash", "pattern": "git status*", "action": "allow"}
    make(permission=(("bash", "git status*", "allow"),)).run_once()
    assert server.patched == 1, "unchanged rules are left alone"


# -- a server outage while a prompt is in flight -------------------------------------------

def outage(shared: Shared) -> None:
    """What a server restart does: the health watch sees it down and up again, the stream ends."""
    shared.server_seen(False, None)
    shared.set_stream_connected(True)
    shared.stream_lost()
    shared.server_seen(True, None)


def test_a_health_probe_that_timed_out_while_the_stream_went_on_is_no_outage(rig: Rig) -> None:
    clock, server, shared, path, make = rig
    d, p = one_prompt(rig, debounce=0.0, min_interval=0.0)
    shared.server_seen(False, None)  # the probe timed out; the stream stayed
    shared.server_seen(True, None)
    d.run_once()
    d.run_once()
    assert len(server.prompts) == 1, "a prompt slow to start is not sent a second time"
    server.reply(p["session"], p["id"], "done")
    d.run_once()
    assert Ledger(path).dispatches()[0].state == "completed"


def test_a_prompt_the_restarted_server_lost_is_sent_again_under_the_same_id(rig: Rig) -> None:
    clock, server, shared, path, make = rig
    d, p = one_prompt(rig, debounce=0.0, min_interval=0.0)
    server.messages_by_session[p["session"]].clear()  # the old process died before storing it
    outage(shared)
    d.run_once()
    assert [q["id"] for q in server.prompts] == [p["id"], p["id"]]
    [row] = Ledger(path).dispatches()
    assert row.state == "sent" and row.message_id == p["id"]


def test_a_turn_that_died_with_the_server_is_sent_again_under_a_new_id(rig: Rig) -> None:
    clock, server, shared, path, make = rig
    d, p = one_prompt(rig, debounce=0.0, min_interval=0.0)
    server.start(p["session"], p["id"])  # it had begun, and did not finish
    outage(shared)
    d.run_once()
    assert len(server.prompts) == 2
    second = server.prompts[1]
    assert second["id"] != p["id"] and f"handled {p['id']}" in second["text"] and "worker-1" in second["text"]
    led = Ledger(path)
    new, old = led.dispatches()[0], led.dispatches()[1]
    assert old.state == "failed" and "outage" in (old.error or "") and led.supersedes(new.id) == old.id
    assert not led.escalations(), "an outage is not the model's fault"
    server.reply(p["session"], second["id"], "done")
    d.run_once()
    assert Ledger(path).dispatches()[0].state == "completed"


def test_a_turn_still_running_after_a_network_outage_is_left_alone(rig: Rig) -> None:
    clock, server, shared, path, make = rig
    d, p = one_prompt(rig, debounce=0.0, min_interval=0.0)
    server.start(p["session"], p["id"])
    server.status[p["session"]] = {"type": "busy"}
    outage(shared)
    d.run_once()
    d.run_once()
    assert len(server.prompts) == 1
    server.reply(p["session"], p["id"], "finished after all")
    del server.status[p["session"]]
    d.run_once()
    [row] = Ledger(path).dispatches()
    assert row.state == "completed"


def test_an_outage_that_begins_as_the_post_returns_is_not_missed(rig: Rig) -> None:
    clock, server, shared, path, make = rig
    d = make(debounce=0.0, min_interval=0.0, start_timeout=30.0)
    accept = server.prompt_async

    def accept_then_die(sid: str, text: str, message_id: str, **kw: Any) -> None:
        accept(sid, text, message_id, **kw)
        server.messages_by_session[sid].clear()  # answered 204, then killed before storing it
        outage(shared)  # and the health watch saw it before the dispatcher went on

    server.prompt_async = accept_then_die  # type: ignore[method-assign, assignment]
    add_triggers(path, 1)
    for _ in range(3):
        if server.prompts:
            break
        d.run_once()
    server.prompt_async = accept  # type: ignore[method-assign]
    d.run_once()
    [first, again] = server.prompts
    assert again["id"] == first["id"], "sent again under the same ID at once, not after start_timeout"
    assert not Ledger(path).escalations()


def test_an_outage_whose_look_up_fails_is_looked_at_again(rig: Rig) -> None:
    clock, server, shared, path, make = rig
    d, p = one_prompt(rig, debounce=0.0, min_interval=0.0)
    server.messages_by_session[p["session"]].clear()
    outage(shared)
    look_up = server.get_message

    def flapping(sid: str, mid: str) -> dict[str, Any]:
        server.get_message = look_up  # type: ignore[method-assign]
        raise Unreachable("connection refused")  # the server went away again mid-look-up

    server.get_message = flapping  # type: ignore[method-assign]
    d.run_once()
    assert len(server.prompts) == 1
    d.run_once()
    assert [q["id"] for q in server.prompts] == [p["id"], p["id"]]


def answer_and_add(rig: Any, d: Dispatcher, teammate: str, later: float) -> None:
    """The last prompt answered, then a new trigger ``later`` seconds on, and a step."""
    clock, server, _, path, _ = rig
    p = server.prompts[-1]
    server.reply(p["session"], p["id"], "ok")
    d.run_once()
    add_triggers(path, 1, teammate=teammate)
    clock.t += later
    d.run_once()


def test_the_dispatcher_says_what_holds_the_triggers_back_and_until_when(rig: Rig) -> None:
    clock, server, shared, path, make = rig
    d = make(min_interval=10.0, debounce=0.5, max_per_hour=2)
    add_triggers(path, 1)
    d.run_once()
    [hold] = shared.holds
    assert hold.reason == "debounce" and hold.until == pytest.approx(clock.t + 0.5)
    clock.t += 0.5
    d.run_once()
    first_sent = sent_at = clock.t
    assert shared.holds == [] and len(server.prompts) == 1
    d.run_once()
    assert [h.reason for h in shared.holds] == ["prompt-in-flight"]
    answer_and_add(rig, d, "worker-2", 1.0)
    assert [h.reason for h in shared.holds] == ["debounce", "min-interval"]
    assert shared.holds[1].until == pytest.approx(sent_at + 10.0)
    clock.t += 10.0
    d.run_once()
    answer_and_add(rig, d, "worker-3", 20.0)
    debounce, cap = shared.holds  # a trigger just seen has its quiet period too
    assert (debounce.reason, cap.reason) == ("debounce", "hourly-cap") and "dispatch.max_per_hour = 2" in cap.detail
    assert cap.until == pytest.approx(first_sent + 3600)
    assert d.session_id is not None
    server.status = {d.session_id: {"type": "busy"}}
    clock.t += 3600
    shared.touch(d.session_id)  # busy, and active
    d.run_once()
    assert [h.reason for h in shared.holds] == ["session-busy"]
    shared.server_seen(False, None)
    d.run_once()
    assert [h.reason for h in shared.holds] == ["server-down"]
    shared.server_seen(True, None)
    server.status = {}
    d.run_once()
    assert [h.reason for h in shared.holds] in (["prompt-in-flight"], [])
    assert len(server.prompts) == 3


def test_a_busy_session_paused_between_tool_steps_is_not_taken_for_a_lying_status(rig: Rig) -> None:
    """Busy and quiet past busy_timeout: the last reply stopped for tool calls, so the turn goes on."""
    clock, server, shared, path, make = rig
    d, p = one_prompt(rig, debounce=0.0)
    server.reply(p["session"], p["id"], "ok")
    d.run_once()
    add_triggers(path, 1, teammate="worker-2")
    server.status = {p["session"]: {"type": "busy"}}
    server.prompt_async(p["session"], "the lead's own turn", "msg_own")  # a turn of its own, mid tool steps
    server.reply(p["session"], "msg_own", "reading", finish="tool-calls")
    clock.t += 61.0  # past busy_timeout (60 s) with no event of the session
    d.run_once()
    assert [h.reason for h in shared.holds] == ["session-busy"] and len(server.prompts) == 2
    assert [r["kind"] for r in Ledger(path).stalls()] == [], "a paused turn is no status that lies"
    server.messages_by_session[p["session"]][-1]["info"]["finish"] = "stop"  # now it is over, yet still "busy"
    clock.t += 1.0
    d.run_once()
    assert len(server.prompts) == 3, "a finished reply under a busy status: the prompt goes anyway"
