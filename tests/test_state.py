"""Shared state: one lock for every field, and readers that never see a map change under them."""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from orchestratord.events import EventReader
from orchestratord.opencode import Unreachable
from orchestratord.sessions import LOOKUP_TIMEOUT, MISS_SECONDS, Prefetch, SessionDirectory
from orchestratord.state import DaemonState, Shared
from orchestratord.stream import Event


def _reader(shared: Shared, tmp_path: Path) -> EventReader:
    return EventReader(shared=shared, make_client=lambda: None,  # type: ignore[arg-type,return-value]
                       ledger_path=str(tmp_path / "ledger.db"), stream="global", directory=None, read_timeout=5,
                       max_event_bytes=1 << 20, reconnect_max=1, store="default", rules=(),
                       on_trigger=lambda: None, on_own_activity=lambda: None)


def test_the_reconnect_reread_survives_statuses_set_from_other_threads(tmp_path: Path) -> None:
    """The dispatcher and the stall watch set statuses while the reader, reconnected, walks them.

    With the statuses walked outside the lock this fails at once with "dictionary changed
    size during iteration", and the stream connection with it.
    """
    shared = Shared()
    for i in range(2000):
        shared.set_status(f"ses_{i:05d}", "busy")
    reader = _reader(shared, tmp_path)
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        i = 0
        while not stop.is_set():
            sid = f"ses_w{i % 50}"
            shared.set_status(sid, "busy" if (i // 50) % 2 == 0 else None)
            i += 1

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can
    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        for _ in range(300):
            try:
                reader._reread_permissions()
            except RuntimeError as exc:
                errors.append(exc)
                break
    finally:
        stop.set()
        thread.join(5)
        sys.setswitchinterval(interval)
    assert not errors, f"the reader's walk over the statuses broke: {errors[0]}"
    assert shared.activity("ses_00000") is not None, "every busy session starts its quiet count afresh"


def test_fields_are_read_only_from_outside() -> None:
    """A typo or a stray assignment fails instead of making a field nobody reads."""
    shared = Shared()
    with pytest.raises(AttributeError):
        shared.session_id = "ses_x"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        shared.update(session_id="ses_x")  # type: ignore[attr-defined]
    shared.set_session("ses_x")
    assert shared.session_id == "ses_x" and shared.snapshot().session_id == "ses_x"


def test_readers_get_copies() -> None:
    shared = Shared()
    shared.set_status("ses_a", "busy")
    statuses = shared.statuses()
    statuses["ses_b"] = "busy"
    holds: list[Any] = ["a"]
    assert shared.set_holds(holds) and not shared.set_holds(["a"]), "an unchanged hold is no change"
    holds.append("b")
    assert shared.statuses() == {"ses_a": "busy"} and shared.holds == ["a"] and shared.snapshot().holds == ("a",)


def test_server_seen_counts_outages_and_keeps_the_version_while_down() -> None:
    shared = Shared()
    shared.server_seen(True, "1.0")
    shared.server_seen(False, None)
    shared.stream_lost()  # not connected: no loss counted
    shared.set_stream_connected(True)
    shared.stream_lost()
    assert shared.outages() == (1, 1)
    assert shared.server_healthy is False and shared.server_version == "1.0"
    shared.set_state(DaemonState.READY)
    assert shared.status_line().startswith("ready: server down, stream disconnected")


def test_mark_busy_and_activity_use_the_injected_clock() -> None:
    now = [10.0]
    shared = Shared(clock=lambda: now[0])
    assert shared.went_busy_at("ses_a") is None and shared.activity("ses_a") is None
    shared.mark_busy("ses_a")
    now[0] = 12.0
    shared.count_event(1000.0, "ses_a")
    assert shared.went_busy_at("ses_a") == 10.0 and shared.activity("ses_a") == 12.0
    assert shared.events_total == 1 and shared.snapshot().last_event_at == 1000.0


def test_a_session_the_server_cannot_tell_of_is_not_asked_about_at_every_event() -> None:
    now = [0.0]
    asked: list[tuple[str, float | None]] = []
    down = [True]

    class Client:
        def get_session(self, sid: str, timeout: float | None = None) -> dict[str, Any]:
            asked.append((sid, timeout))
            if down[0]:
                raise Unreachable("read timed out")
            return {"id": sid, "title": "worker-1@my-team", "directory": "/srv/p"}

    d = SessionDirectory(clock=lambda: now[0])
    client: Any = Client()
    assert d.lookup("ses_a", client) is None and d.lookup("ses_a", client) is None
    assert asked == [("ses_a", LOOKUP_TIMEOUT)], "one short try, then not again for a while"
    now[0] += MISS_SECONDS
    down[0] = False
    info = d.lookup("ses_a", client)
    assert info is not None and info.label == "worker-1" and len(asked) == 2
    assert d.lookup("ses_a", client) is info and len(asked) == 2, "known now: no more requests"


def test_the_sessions_the_stream_names_are_looked_up_on_a_thread_of_their_own(tmp_path: Path) -> None:
    """The reader names each session it reads of and goes on at once, even with the server
    slow to answer; the title, once needed, comes from that one look-up, made on the
    look-up thread, not asked again on the reading thread."""
    answer = threading.Event()
    asked: list[tuple[str, str]] = []

    class Client:
        def get_session(self, sid: str, timeout: float | None = None) -> dict[str, Any]:
            asked.append((sid, threading.current_thread().name))
            assert answer.wait(10), "the test did not let the server answer"
            return {"id": sid, "title": "worker-1@my-team", "directory": "/srv/p"}

        def close(self) -> None:
            pass

    shared = Shared()
    reader = _reader(shared, tmp_path)
    directory = reader.reactions.sessions
    prefetch = Prefetch(directory, Client())  # type: ignore[arg-type]
    prefetch.start()
    reader.reactions.prefetch = prefetch.name
    try:
        event = Event("evt_1", "session.status", {"sessionID": "ses_a", "status": {"type": "busy"}}, "ses_a", None, "{}")
        reader.reactions.observe(event)  # returns while the server has not answered
        reader.reactions.observe(event)
        assert shared.statuses().get("ses_a") == "busy" and directory.get("ses_a") is None
        answer.set()
        other: Any = Client()
        info = directory.lookup("ses_a", other)  # waits for the look-up under way
        assert info is not None and info.label == "worker-1"
        assert asked == [("ses_a", "session-lookup")], "asked once, on the look-up thread"
    finally:
        answer.set()
        prefetch.stop()
    assert not prefetch._thread.is_alive()
