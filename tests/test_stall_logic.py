"""The stall detector one step at a time, on an injected clock."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from orchestratord.opencode import OpencodeClient, last_finished
from orchestratord.stalls import StallWatch
from orchestratord.state import Shared


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class FakeClient:
    def __init__(self) -> None:
        self.last: dict[str, list[dict[str, Any]]] = {}

    def messages(self, sid: str, limit: int | None = None) -> list[dict[str, Any]]:
        return self.last.get(sid, [])

    def get_session(self, sid: str, timeout: float | None = None) -> dict[str, Any]:
        return {"id": sid, "title": {"ses_a": "worker-1", "ses_b": "worker-2"}.get(sid, "")}

    def close(self) -> None:
        pass


def rig(tmp_path: Path) -> tuple[Clock, Shared, FakeClient, StallWatch, list[int]]:
    clock, client, woke = Clock(), FakeClient(), []
    shared = Shared(server_url="http://x", clock=clock)
    shared.server_seen(True, None)
    shared.set_stream_connected(True)
    shared.set_session("ses_orch")
    w = StallWatch(shared=shared, make_client=lambda: cast(OpencodeClient, client), ledger_path=str(tmp_path / "l.db"),
                   quiet=60.0,
                   on_trigger=lambda: woke.append(1), clock=clock, wall=lambda: 1_700_000_000.0 + clock.t)
    w.setup()
    return clock, shared, client, w, woke


def kinds(w: StallWatch) -> list[str]:
    assert w.ledger is not None
    return [r["kind"] for r in reversed(w.ledger.stalls())]


def test_quiet_busy_session_is_stalled_once_per_silence(tmp_path: Path) -> None:
    clock, shared, client, w, woke = rig(tmp_path)
    shared.set_status("ses_a", "busy")
    shared.set_status("ses_orch", "busy")  # the orchestrator's own turn is the dispatcher's business
    clock.t += 59
    w.run_once()
    assert kinds(w) == []
    clock.t += 2
    w.run_once()
    clock.t += 300
    w.run_once()
    assert kinds(w) == ["stalled"] and woke == [1]
    assert w.ledger is not None
    [t] = w.ledger.pending_triggers()
    assert t.kind == "stall" and t.teammate == "worker-1" and "produced nothing for 61 seconds" in t.detail
    shared.touch("ses_a")  # it moved: a later silence is a new stall
    w.run_once()
    clock.t += 61
    w.run_once()
    assert kinds(w) == ["stalled", "stalled"] and len(woke) == 2


def test_activity_keeps_a_slow_session_from_stalling(tmp_path: Path) -> None:
    clock, shared, client, w, woke = rig(tmp_path)
    shared.set_status("ses_b", "busy")
    for _ in range(20):
        clock.t += 50
        shared.touch("ses_b")
        w.run_once()
    assert kinds(w) == [] and woke == []


def test_waiting_and_lying_statuses_are_not_stalls(tmp_path: Path) -> None:
    clock, shared, client, w, woke = rig(tmp_path)
    shared.set_status("ses_a", "busy")
    shared.set_waiting("ses_a", "permission bash")
    shared.set_status("ses_b", "busy")
    client.last["ses_b"] = [{"info": {"role": "assistant", "time": {"created": 1, "completed": 2}, "finish": "stop"}}]
    clock.t += 61
    w.run_once()
    clock.t += 61
    w.run_once()
    assert sorted(kinds(w)) == ["status-mismatch", "waiting"] and woke == []
    shared.set_status("ses_a", None)  # answered and done: the spell is over
    w.run_once()
    assert "ses_a" not in w.reported


def test_no_judgement_without_the_stream(tmp_path: Path) -> None:
    clock, shared, client, w, woke = rig(tmp_path)
    shared.set_status("ses_a", "busy")
    shared.set_stream_connected(False)
    clock.t += 600
    w.run_once()
    assert kinds(w) == []


def test_last_finished() -> None:
    assert not last_finished([])
    assert not last_finished([{"info": {"role": "user"}}])
    assert not last_finished([{"info": {"role": "assistant", "time": {"created": 1}}}])
    assert not last_finished([{"info": {"role": "assistant", "time": {"completed": 2}, "finish": "tool-calls"}}])
    assert last_finished([{"info": {"role": "assistant", "time": {"completed": 2}, "finish": "stop"}}])
