"""Fixtures shared by the whole suite: the scripted model, a team dir, the real opencode server.

Function-scoped (a fresh world per test): ``model``, ``teams_dir``, ``opencode``.
Module-scoped (one server for a whole test module; about 3 s to start and about 4 s more
for its first turn, which starts the MCP server): ``shared`` gives a ``SharedBed`` with
``server``, ``model`` and ``teams_dir``; tests on it must use their own markers, sessions
and team names (``shared.team_name()``), and must not stop the server. The model's rules
and queue are reset after every test.

No test may leave an ``opencode`` (or daemon, or MCP server) process behind: checked after
every test (shared servers excepted) and once more at the end of the session.
"""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.support import faults
from tests.support.bed import bed, team  # noqa: F401  (fixtures)
from tests.support.llm import ScriptedModel
from tests.support.server import OpencodeServer

# Process groups of module-scoped servers: alive between tests on purpose.
_SHARED_GROUPS: set[int] = set()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    """Keep each phase's report on the item, so fixtures can tell a failed test at teardown."""
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Cases marked slow run only in the long form of the fault suite (``make faults``)."""
    if faults.LONG:
        return
    skip = pytest.mark.skip(reason="long form only: run it with make faults (ORCHESTRATORD_FAULTS=long)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Figures the suite gathered on the way (reported, never asserted: goals are for make bench)."""
    from tests.support.watch import BROKER_LATENCY

    if BROKER_LATENCY:
        ms = sorted(x * 1000 for x in BROKER_LATENCY)
        p99 = ms[min(len(ms) - 1, int(round(0.99 * (len(ms) - 1))))]
        terminalreporter.write_line(
            f"permission broker, permission.asked to permission.replied as the server sent them: n={len(ms)}, "
            f"p50 {ms[len(ms) // 2]:.1f} ms, p99 {p99:.1f} ms, max {ms[-1]:.1f} ms")


def _failed(request: pytest.FixtureRequest) -> bool:
    node = request.node
    return any(getattr(getattr(node, f"rep_{w}", None), "failed", False) for w in ("setup", "call"))


def _show_log(server: OpencodeServer, why: str) -> None:
    sys.stderr.write(f"\n=== opencode on port {server.port} ({why}) ===\n{server.log_tail(60)}\n")


@pytest.fixture
def model() -> Iterator[ScriptedModel]:
    m = ScriptedModel()
    try:
        yield m
    finally:
        m.close()


@pytest.fixture
def teams_dir(tmp_path: Path) -> Path:
    base = tmp_path / "claude"
    (base / "teams").mkdir(parents=True)
    return base


@pytest.fixture
def opencode(request: pytest.FixtureRequest, tmp_path: Path, model: ScriptedModel,
             teams_dir: Path) -> Iterator[OpencodeServer]:
    server = OpencodeServer(tmp_path / "opencode", model.url, teams_dir)
    server.start()
    try:
        yield server
    finally:
        if _failed(request):
            _show_log(server, f"{request.node.nodeid} failed")
        server.stop()


class SharedBed:
    """One real server, its scripted model and its team dir, shared by a module's tests."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.model = ScriptedModel()
        self.teams_dir = root / "claude"
        (self.teams_dir / "teams").mkdir(parents=True)
        self.server = OpencodeServer(root / "opencode", self.model.url, self.teams_dir)
        self._names = itertools.count(1)

    def team_name(self, stem: str = "team") -> str:
        """A team name no other test on this server uses."""
        return f"{stem}-{next(self._names)}"

    def close(self) -> None:
        try:
            self.server.stop()
        finally:
            self.model.close()


@pytest.fixture(scope="module")
def _shared_bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedBed]:
    shared = SharedBed(tmp_path_factory.mktemp("shared"))
    try:
        shared.server.start()
        assert shared.server.pid is not None
        _SHARED_GROUPS.add(shared.server.pid)
        yield shared
    finally:
        if shared.server.pid is not None:
            _SHARED_GROUPS.discard(shared.server.pid)
        shared.close()


@pytest.fixture
def shared(request: pytest.FixtureRequest, _shared_bed: SharedBed) -> Iterator[SharedBed]:
    """The module's shared server; the model's scripting is reset after the test."""
    if not _shared_bed.server.running:
        pytest.fail("the shared opencode server is not running (a test stopped it?)")
    try:
        yield _shared_bed
    finally:
        if _failed(request):
            _show_log(_shared_bed.server, f"{request.node.nodeid} failed")
        _shared_bed.model.reset()


def _descendants(pid: int) -> list[tuple[int, int, str]]:
    """(pid, process group, cmdline) of every live descendant of ``pid``, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out: list[tuple[int, int, str]] = []
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        try:
            with open(f"/proc/{child}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
            with open(f"/proc/{child}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            out.append((child, int(fields[2]), cmd))
        todo.extend(children.get(child, []))
    return out


def _other_pid_namespace(pid: int) -> bool:
    """A process inside a booted systemd's namespace: that systemd stops it, not the test."""
    try:
        return os.readlink(f"/proc/{pid}/ns/pid") != os.readlink("/proc/self/ns/pid")
    except OSError:
        return False


def _stray(include_shared: bool) -> list[tuple[int, str]]:
    return [(pid, cmd) for pid, pgid, cmd in _descendants(os.getpid())
            if ("opencode" in cmd or "orchestratord" in cmd or "teams_server" in cmd)
            and (include_shared or (pgid not in _SHARED_GROUPS and not _other_pid_namespace(pid)))]


@pytest.fixture(autouse=True)
def no_stray_processes() -> Iterator[None]:
    """Every test ends with no server, daemon or MCP child of its own still alive."""
    yield
    stray = _stray(include_shared=False)
    assert not stray, f"processes left running: {stray}"


@pytest.fixture(scope="session", autouse=True)
def no_stray_processes_at_exit() -> Iterator[None]:
    """And the session ends with none at all, shared servers included."""
    yield
    stray = _stray(include_shared=True)
    assert not stray, f"processes left running at the end of the session: {stray}"


RM_SHIM = """#!/bin/sh
echo "$@" >> "{log}"
exit 0
"""


@pytest.fixture
def asking_server(tmp_path: Path, model: ScriptedModel, teams_dir: Path) -> Iterator[OpencodeServer]:
    """A server that asks before every shell command, with ``rm`` replaced by a recorder."""
    shims = tmp_path / "shims"
    shims.mkdir()
    rm = shims / "rm"
    rm.write_text(RM_SHIM.format(log=tmp_path / "rm-ran.log"))
    rm.chmod(0o755)
    server = OpencodeServer(tmp_path / "opencode", model.url, teams_dir, path_prefix=shims,
                            permission={"bash": "ask", "external_directory": "ask", "edit": "ask"})
    server.start()
    try:
        yield server
    finally:
        server.stop()
