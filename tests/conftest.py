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
import random
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.support import faults
from tests.support.bed import bed, proxy, team  # noqa: F401  (fixtures)
from tests.support.llm import ScriptedModel
from tests.support.server import OpencodeServer

# Process groups of module-scoped servers: alive between tests on purpose.
_SHARED_GROUPS: set[int] = set()


# One seed for every random choice of the run (the rng fixture, Hypothesis, the random
# module); ORCHESTRATORD_SEED=N repeats a run's choices. It is printed at the start and with
# every failure.
SEED = int(os.environ.get("ORCHESTRATORD_SEED") or random.SystemRandom().randrange(1, 2**31))
os.environ["ORCHESTRATORD_SEED"] = str(SEED)  # the pytest-xdist workers, started after this, take it too


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Seed the random module and Hypothesis (unless --hypothesis-seed was given) with SEED."""
    random.seed(SEED)
    if hasattr(config.option, "hypothesis_seed") and config.option.hypothesis_seed is None:
        config.option.hypothesis_seed = str(SEED)


def pytest_report_header(config: pytest.Config) -> str:
    return f"random choices seeded: ORCHESTRATORD_SEED={SEED}"


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> random.Random:
    """The test's random generator: from SEED and the test's ID, so one test replays alone too."""
    return random.Random(f"{SEED}:{request.node.nodeid}")


# Under CI=true a skip is a failure unless ORCHESTRATORD_ALLOW_SKIP names the test: a
# missing tool or capability must not pass for green. The allowances used are listed at
# the end of the run.
CI = os.environ.get("CI", "").lower() == "true"
ALLOW_SKIP = [n for n in os.environ.get("ORCHESTRATORD_ALLOW_SKIP", "").replace(",", " ").split() if n]
_ALLOWED_SKIPS: list[tuple[str, str]] = []


def skip_allowed(nodeid: str, allow: list[str]) -> bool:
    """A test is allowed to skip when an entry is its node ID, its name, or a prefix of its ID."""
    name = nodeid.rsplit("::", 1)[-1]
    bare = name.split("[", 1)[0]
    return any(a in (nodeid, name, bare) or nodeid.startswith(a) for a in allow)


def _skip_reason(rep: pytest.TestReport) -> str:
    longrepr = rep.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    """Keep each phase's report on the item, so fixtures can tell a failed test at teardown;
    under CI=true, turn a skip that no allowance names into a failure that says why."""
    outcome: Any = yield
    rep = outcome.get_result()
    if CI and rep.skipped and not hasattr(rep, "wasxfail"):
        reason = _skip_reason(rep)
        if skip_allowed(item.nodeid, ALLOW_SKIP):
            _ALLOWED_SKIPS.append((item.nodeid, reason))
        else:
            rep.outcome = "failed"
            rep.longrepr = (f"skipped under CI=true: {reason}\n"
                            f"install what it needs, or allow it: ORCHESTRATORD_ALLOW_SKIP={item.nodeid}")
    if rep.failed:
        rep.sections.append(("seed", f"ORCHESTRATORD_SEED={SEED} repeats this run's random choices"))
    setattr(item, f"rep_{rep.when}", rep)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Cases marked slow (the 30-minute soak) run only in the long form (``make faults``):
    left out of the default run, not skipped, so a skip always means something is missing."""
    if faults.LONG:
        return
    slow = [item for item in items if "slow" in item.keywords]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if "slow" not in item.keywords]


def pytest_sessionfinish(session: pytest.Session) -> None:
    """On a pytest-xdist worker: hand the figures below to the process that prints them."""
    out = getattr(session.config, "workeroutput", None)
    if out is not None:
        from tests.support.watch import BROKER_LATENCY

        out["allowed_skips"] = [list(skip) for skip in _ALLOWED_SKIPS]
        out["broker_latency"] = list(BROKER_LATENCY)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """A pytest-xdist worker finished: gather its figures."""
    from tests.support.watch import BROKER_LATENCY

    out = getattr(node, "workeroutput", {})
    _ALLOWED_SKIPS.extend((str(nodeid), str(reason)) for nodeid, reason in out.get("allowed_skips", []))
    BROKER_LATENCY.extend(float(x) for x in out.get("broker_latency", []))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Figures the suite gathered on the way (reported, never asserted: goals are for make bench),
    and the skips an ORCHESTRATORD_ALLOW_SKIP allowance let through."""
    from tests.support.watch import BROKER_LATENCY

    if CI:
        terminalreporter.write_line(
            f"skips allowed by ORCHESTRATORD_ALLOW_SKIP: {len(_ALLOWED_SKIPS)}"
            + "".join(f"\n  {nodeid}: {reason}" for nodeid, reason in _ALLOWED_SKIPS))
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
