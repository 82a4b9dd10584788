"""Intervals, debounce and rate limits run on the monotonic clock; the wall clock is for stamps.

A static scan keeps it so: every read of the wall clock in ``orchestratord/`` must be on
the allow-list below, each with the reason it is a timestamp for people (or for the
ledger), not a measure of elapsed time. Then the dispatcher's rate limits are driven with
an injected monotonic clock and a wall clock that jumps, with no sleeping.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any, Iterator, cast

import pytest

from orchestratord.dispatch import Dispatcher, seed_sends
from orchestratord.ledger import Dispatch, Ledger
from orchestratord.opencode import OpencodeClient
from orchestratord.state import Shared
from tests.test_dispatch_logic import FakeServer, add_triggers, settings

PACKAGE = Path(__file__).resolve().parent.parent / "orchestratord"

# (file, enclosing function) -> (how many wall-clock reads it may hold, why they are right)
ALLOWED: dict[tuple[str, str], tuple[int, str]] = {
    ("ledger.py", "Ledger.set_state"): (1, "updated_at of the live state, shown by status"),
    ("ledger.py", "Ledger.record_transition"): (1, "when the server went up or down, for people"),
    ("ledger.py", "Ledger.add_trigger"): (1, "a trigger's at, for people and retention"),
    ("ledger.py", "Ledger.create_dispatch"): (1, "a prompt's created_at, for people and retention"),
    ("ledger.py", "Ledger.mark_sent"): (1, "a prompt's sent_at, for people (the cap keeps its own monotonic times)"),
    ("ledger.py", "Ledger.finish_dispatch"): (1, "a prompt's completed_at, for people"),
    ("ledger.py", "Ledger.record_messages"): (1, "a message's first_seen, for people and retention"),
    ("ledger.py", "Ledger.mark_reported"): (1, "a message's reported_at, for people"),
    ("ledger.py", "Ledger._escalation_in_tx"): (1, "an escalation's at, for people and retention"),
    ("ledger.py", "Ledger.set_brokered"): (1, "when a session was given the broker's rules, for people"),
    ("ledger.py", "Ledger.answer_permission"): (1, "when a person (or the timeout) answered, for people"),
    ("ledger.py", "Ledger.permission_replied"): (1, "when an answer reached the server, for people"),
    ("ledger.py", "Ledger.permission_gone"): (1, "when a request was found answered elsewhere, for people"),
    ("broker.py", "Broker.__init__"): (1, "the injected wall clock: ledger stamps, message IDs, and a held "
                                          "request's age across a restart (never later than now)"),
    ("cli.py", "cmd_permissions"): (1, "the age of a held request, from its wall stamp, for people"),
    ("cli.py", "cmd_pending"): (1, "the age of a waiting trigger, from its wall stamp, for people"),
    ("ledger.py", "Ledger.record_oversized"): (1, "an oversized message's first_seen, for people and retention"),
    ("ledger.py", "Ledger.mark_oversized_reported"): (1, "an oversized message's reported_at, for people"),
    ("ledger.py", "Ledger.update_escalation"): (1, "an escalation's handled_at, for people"),
    ("ledger.py", "Ledger.record_stall"): (1, "a finding's at, for people and retention"),
    ("ledger.py", "Ledger.redrive_dispatch"): (1, "the new prompt's created_at, for people"),
    ("supervisor.py", "Supervisor.start"): (1, "started_at in the live state, for people"),
    ("supervisor.py", "Supervisor.shutdown"): (1, "stopped_at in the live state, for people"),
    ("supervisor.py", "Supervisor._prune"): (1, "retention is by the age of wall-clock stamps (how often: monotonic)"),
    ("events.py", "EventReader._hand_over_tally"): (1, "the time of the last event, shown by status"),
    ("events.py", "EventReader._handle"): (1, "an event row's at, for people and retention"),
    ("opencode.py", "new_message_id"): (1, "opencode's message IDs start with the time in ms, as its own do"),
    ("dispatch.py", "Dispatcher.__init__"): (1, "the injected wall clock: ledger stamps and message IDs only"),
    ("stalls.py", "StallWatch.__init__"): (1, "the injected wall clock: ledger stamps only"),
    ("inbox.py", "InboxWatcher.__init__"): (1, "the injected wall clock: ledger stamps only"),
    ("guard.py", "Guard.__init__"): (1, "the injected wall clock: ledger stamps only"),
    ("cli.py", "_when"): (1, "turns a stored stamp into local time for people (reads no clock)"),
    ("logs.py", "LineFormatter.format"): (1, "a log line's local time, for people"),
    ("supervisor.py", "Supervisor._write_state"): (1, "written_at of the live state, read by status in another process"),
    ("cli.py", "ledger_view"): (1, "the age of written_at, a wall stamp written by another process"),
    ("ledgerwatch.py", "LedgerHealth.__init__"): (1, "the injected wall clock: when a failing spell began, for people"),
    ("ledgerwatch.py", "put_back"): (1, "the name given to a file moved aside, for people"),
    ("ledger.py", "backup_name"): (1, "the name of the copy kept before a schema upgrade, for people"),
}

# Attribute chains that read (or hand out) the wall clock.
WALL = {("time", "time"), ("time", "time_ns"), ("time", "localtime"), ("time", "gmtime"), ("time", "ctime"),
        ("datetime", "now"), ("datetime", "utcnow"), ("datetime", "today"), ("date", "today"),
        ("datetime", "fromtimestamp"), ("time", "clock_gettime"), ("time", "clock_gettime_ns")}


def _chain(node: ast.AST) -> tuple[str, ...]:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return tuple(reversed(parts))


def wall_clock_reads(path: Path) -> Iterator[tuple[int, str, str]]:
    """(line, enclosing function, what) for every wall-clock read in one module."""
    tree = ast.parse(path.read_text(), str(path))

    def visit(node: ast.AST, scope: list[str]) -> Iterator[tuple[int, str, str]]:
        for child in ast.iter_child_nodes(node):
            inner = scope
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                inner = scope + [child.name]
            if isinstance(child, ast.ImportFrom) and child.module in ("time", "datetime"):
                for alias in child.names:
                    if alias.name in {w[1] for w in WALL} | {"datetime", "date"}:
                        yield child.lineno, ".".join(scope) or "<module>", f"from {child.module} import {alias.name}"
            if isinstance(child, ast.Attribute):
                chain = _chain(child)
                if len(chain) >= 2 and chain[-2:] in WALL:
                    if chain[-2:] in {("time", "clock_gettime"), ("time", "clock_gettime_ns")}:
                        pass  # judged by its clock argument below
                    else:
                        yield child.lineno, ".".join(scope) or "<module>", ".".join(chain)
            if isinstance(child, ast.Call) and _chain(child.func)[-2:] in {("time", "clock_gettime"),
                                                                            ("time", "clock_gettime_ns")}:
                if not (child.args and _chain(child.args[0])[-1:] in {("CLOCK_MONOTONIC",), ("CLOCK_BOOTTIME",)}):
                    yield child.lineno, ".".join(scope) or "<module>", ast.unparse(child)
            yield from visit(child, inner)

    yield from visit(tree, [])


def test_the_wall_clock_is_read_only_for_timestamps() -> None:
    found: dict[tuple[str, str], list[str]] = {}
    for path in sorted(PACKAGE.glob("*.py")):
        for line, scope, what in wall_clock_reads(path):
            found.setdefault((path.name, scope), []).append(f"{path.name}:{line} {what} (in {scope})")
    problems = []
    for key, uses in sorted(found.items()):
        allowed = ALLOWED.get(key)
        if allowed is None or len(uses) > allowed[0]:
            problems.extend(uses)
    assert not problems, (
        "wall-clock reads outside the allow-list; intervals, timeouts, debounce, backoff and rate limits "
        "must use time.monotonic (or an injected clock); a timestamp for people goes in ALLOWED with "
        "its reason:\n  " + "\n  ".join(problems))
    stale = sorted(f"{f} {scope}" for (f, scope) in ALLOWED if (f, scope) not in found)
    assert not stale, f"allow-list entries that no longer match anything (remove them): {stale}"


def test_the_scan_finds_what_it_must(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import time, datetime as dt\nfrom time import time as now\n\n"
                      "def f():\n    return time.time() - dt.datetime.now().timestamp()\n\n"
                      "class C:\n    def g(self, clock=time.time):\n        return time.clock_gettime(time.CLOCK_REALTIME)\n\n"
                      "def ok():\n    return time.monotonic(), time.clock_gettime_ns(time.CLOCK_MONOTONIC)\n")
    got = [(line, scope) for line, scope, _ in wall_clock_reads(sample)]
    assert got == [(2, "<module>"), (5, "f"), (5, "f"), (8, "C.g"), (9, "C.g")]


# -- the dispatcher's limits while the wall clock jumps ----------------------------------

class Clocks:
    """A monotonic clock the test moves forward, and a wall clock it can move anywhere."""

    def __init__(self) -> None:
        self.mono = 5000.0
        self.wall = 1_800_000_000.0

    def tick(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds


@pytest.fixture
def clocks() -> Clocks:
    return Clocks()


@pytest.fixture
def make(tmp_path: Path, clocks: Clocks) -> Any:
    server = FakeServer()
    path = str(tmp_path / "ledger.db")

    def new(**kw: Any) -> tuple[Dispatcher, FakeServer, str]:
        shared = Shared(server_url="http://x", clock=lambda: clocks.mono)
        shared.server_seen(True, "1.18.33")  # the health watch has probed it
        d = Dispatcher(shared=shared, make_client=lambda: cast(OpencodeClient, server), ledger_path=path,
                       settings=settings(**kw),
                       server_url="http://x", clock=lambda: clocks.mono, wall=lambda: clocks.wall)
        d.setup()
        return d, server, path

    return new


def run_until_sent(d: Dispatcher, server: FakeServer, clocks: Clocks, jumps: tuple[float, ...] = ()) -> float:
    """Step the dispatcher, moving the clocks by the waits it asks for, until it sends.

    Before each step the wall clock takes the next of ``jumps`` (and stays there). Returns
    the monotonic time the prompt went out.
    """
    before = len(server.prompts)
    for step in range(50):
        if step < len(jumps):
            clocks.wall += jumps[step]
        at = clocks.mono
        wait = d.run_once()
        if len(server.prompts) > before:
            return at
        clocks.tick(max(0.0, wait))
    raise AssertionError("no prompt went out")


def send_one(d: Dispatcher, server: FakeServer, path: str, clocks: Clocks) -> float:
    """One trigger, one prompt, its reply: the dispatcher is idle again afterwards. When it went out."""
    add_triggers(path, 1, teammate=f"w{len(server.prompts)}")
    at = run_until_sent(d, server, clocks)
    server.reply(d.session_id or "", server.prompts[-1]["id"], "ok")
    d.run_once()
    assert not Ledger(path).open_dispatches()
    return at


@pytest.mark.parametrize("jump", [-7200.0, +10800.0])
def test_the_hourly_cap_counts_real_time_whatever_the_wall_clock_does(make: Any, clocks: Clocks, jump: float) -> None:
    d, server, path = make(max_per_hour=2, min_interval=0.0, debounce=0.0)
    d.run_once()
    first = send_one(d, server, path, clocks)
    clocks.tick(600)
    send_one(d, server, path, clocks)
    add_triggers(path, 1, teammate="late")
    # Backwards: no extra hour of prompts. Forwards: the hour is not over. Then back again.
    third = run_until_sent(d, server, clocks, jumps=(jump, 0.0, -jump))
    assert len(server.prompts) == 3
    assert third == pytest.approx(first + 3600), "the third prompt waits exactly one real hour after the first"


def test_a_restart_after_the_clock_went_back_does_not_hold_prompts_past_the_hour(make: Any, clocks: Clocks) -> None:
    d, server, path = make(max_per_hour=1, min_interval=30.0, debounce=0.0)
    d.run_once()
    send_one(d, server, path, clocks)
    d.teardown()
    clocks.wall -= 7200  # the clock went back two hours, then the daemon restarted
    clocks.tick(60)
    restarted = clocks.mono
    d2, server, path = make(max_per_hour=1, min_interval=30.0, debounce=0.0)
    add_triggers(path, 1, teammate="after")
    sent = run_until_sent(d2, server, clocks)
    # The send is stamped in the wall clock's future: it counts as made at the restart,
    # not two hours after it.
    assert sent == pytest.approx(restarted + 3600)


def test_seeded_send_times_are_never_in_the_future() -> None:
    def sent(at: float | None) -> Dispatch:
        return Dispatch(1, "msg_x", "ses_x", "completed", 0.0, at, None, "p", None, [], None, 1)

    wall, now = 10_000.0, 50.0
    times = seed_sends([sent(wall + 7000), sent(wall - 100), sent(wall - 4000), sent(None)], now, wall)
    assert times == [now - 100, now], "in the future counts as just sent; older than an hour is dropped"


@pytest.mark.parametrize("jumps", [(-7200.0,), (10800.0,), (-7200.0, 18000.0, -10800.0)])
def test_debounce_and_minimum_interval_ignore_wall_clock_jumps(make: Any, clocks: Clocks,
                                                               jumps: tuple[float, ...]) -> None:
    d, server, path = make(max_per_hour=100, min_interval=30.0, debounce=2.0)
    d.run_once()
    last = send_one(d, server, path, clocks)
    add_triggers(path, 1, teammate="next")
    seen = clocks.mono
    sent = run_until_sent(d, server, clocks, jumps=jumps)
    assert sent == pytest.approx(max(last + 30.0, seen + 2.0))
