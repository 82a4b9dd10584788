"""Each worker builds itself from the config sections it declares, and from nothing else.

A reload restarts the workers whose declared sections changed, so a worker that read a
section it does not declare would keep running on the old value of it: building each
one from a config whose other sections refuse to be read proves the declarations true.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from orchestratord import ledgerwatch
from orchestratord.config import Config, load_config
from orchestratord.sessions import SessionDirectory
from orchestratord.state import Shared
from orchestratord.supervisor import SECTIONS, WORKER_SECTIONS, WORKERS, changed_sections
from orchestratord.worker import Deps, Worker


class Unread:
    """A config section no one may read."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        raise AssertionError(f"read {self._name}.{attr}, a section it does not declare")


def deps() -> Deps:
    return Deps(shared=Shared(), sessions=SessionDirectory(), make_client=lambda: None,  # type: ignore[arg-type, return-value]
                ledger_health=ledgerwatch.LedgerHealth(), wake=lambda name: lambda: None, desk=lambda: None,
                on_server_up=lambda: None)


@pytest.mark.parametrize("kind", WORKERS, ids=lambda w: w.name)
def test_a_worker_builds_from_its_own_sections_alone(kind: type[Worker]) -> None:
    cfg = Config()
    unread: dict[str, Any] = {s: Unread(s) for s in SECTIONS if s not in kind.sections}
    fenced = dataclasses.replace(cfg, **unread)
    assert kind.enabled_by(cfg)
    worker = kind.build(fenced, deps())
    assert isinstance(worker, kind) and worker.name == kind.name


def test_every_declared_section_is_a_section_of_the_config() -> None:
    for name, sections in WORKER_SECTIONS.items():
        assert set(sections) <= set(SECTIONS), name
    assert len(WORKER_SECTIONS) == len(WORKERS), "one name per worker"


def test_a_reload_restarts_the_workers_whose_sections_changed(tmp_path: Any) -> None:
    path = tmp_path / "o.toml"
    path.write_text('[teams]\nlead = "team-lead"\n')
    old = load_config(str(path))
    path.write_text('[teams]\nlead = "boss"\n')
    new = load_config(str(path))
    changed = changed_sections(old, new)
    assert changed == {"teams"}
    restarted = {name for name, sections in WORKER_SECTIONS.items() if changed & set(sections)}
    assert restarted == {"events", "dispatch", "inbox", "broker"}, "each one that judges or prompts with the lead"


def test_the_stall_watch_runs_only_when_asked() -> None:
    from orchestratord.stalls import StallWatch

    off = dataclasses.replace(Config(), stalls=dataclasses.replace(Config().stalls, enabled=False))
    assert not StallWatch.enabled_by(off)
