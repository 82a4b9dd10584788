"""Fixtures shared by the whole suite: the scripted model, a team dir, the real opencode server."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

from tests.support.bed import bed, team  # noqa: F401  (fixtures)
from tests.support.llm import ScriptedModel
from tests.support.server import OpencodeServer


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
def opencode(tmp_path: Path, model: ScriptedModel, teams_dir: Path) -> Iterator[OpencodeServer]:
    server = OpencodeServer(tmp_path / "opencode", model.url, teams_dir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, cmdline) of every live descendant of ``pid``, from /proc."""
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
    out: list[tuple[int, str]] = []
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        try:
            with open(f"/proc/{child}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
            with open(f"/proc/{child}/stat") as fh:
                state = fh.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.append((child, cmd))
        todo.extend(children.get(child, []))
    return out


@pytest.fixture(autouse=True)
def no_stray_processes() -> Iterator[None]:
    """Every test ends with no server, daemon or MCP child of the test run still alive."""
    yield
    stray = [(pid, cmd) for pid, cmd in _descendants(os.getpid())
             if "opencode" in cmd or "orchestratord" in cmd or "teams_server" in cmd]
    assert not stray, f"processes left running: {stray}"
