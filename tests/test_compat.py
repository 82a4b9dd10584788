"""The compatibility smoke: the daemon's main path on the oldest supported opencode and the pinned one.

The whole suite runs against the pinned server (tests/opencode); this short test runs the
demo's flow against each binary of the tested range: a teammate made as claude-teams makes
one (allow-all), the broker's reject of its destructive command, its report to the lead,
and the orchestrator's prompt about it answered.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pytest

from tests.support.bed import NO_IDLE, TEAM, Bed, script_commands, script_orchestrator, send_message_args
from tests.support.daemon import ledger_rows, wait_for
from tests.support.llm import Reply, ScriptedModel, last_user_text
from tests.support.server import COMPAT_BIN, PINNED_BIN, OpencodeServer
from tests.support.team import make_team

ROOT = Path(__file__).resolve().parent
PINNED = json.loads((ROOT / "opencode" / "package.json").read_text())["dependencies"]["opencode-ai"]
VERSIONS = {"1.18.3": COMPAT_BIN, PINNED: PINNED_BIN}


@pytest.fixture(params=list(VERSIONS))
def versioned_bed(request: pytest.FixtureRequest, tmp_path: Path, model: ScriptedModel,
                  teams_dir: Path) -> Iterator[tuple[str, Bed]]:
    make_team(teams_dir, TEAM, members=["worker-1", "worker-2"])
    server = OpencodeServer(tmp_path / "opencode", model.url, teams_dir, binary=VERSIONS[request.param]).start()
    bed = Bed(tmp_path, server, model, teams_dir)
    try:
        yield request.param, bed
    finally:
        bed.close()
        server.stop()


def test_the_demo_flow_and_the_guards_reject(versioned_bed: tuple[str, Bed]) -> None:
    version, bed = versioned_bed
    health = bed.server.http.get(f"{bed.server.url}/global/health", timeout=5).json()
    assert health["version"] == version
    bed.write_config(extra=NO_IDLE)
    script_orchestrator(bed.model, reply="worker-1 is on track")
    d = bed.ready_daemon()
    d.wait_log("stream-connected")
    project = bed.server.project
    script_commands(bed.model, "tidy the workspace", [f"rm -rf {project}"])
    rogue = bed.spawn("worker-2")
    wait_for(lambda: ledger_rows(bed.ledger, "SELECT 1 FROM brokered WHERE session_id = ?", (rogue,)), 30,
             "the broker's rules on worker-2")
    bed.server.prompt_async(rogue, "tidy the workspace")
    wait_for(lambda: ledger_rows(bed.ledger, "SELECT decision, rule FROM permissions WHERE session_id = ?", (rogue,)),
             60, "the broker's answer to worker-2's command")
    assert ledger_rows(bed.ledger, "SELECT decision, rule FROM permissions WHERE session_id = ?", (rogue,)) == [
        ("reject", "recursive-delete")]
    assert (project / "opencode.json").exists(), "the project survives"

    bed.model.add_rule(lambda r: "report in" in last_user_text(r),
                       Reply.tool_call("claude-teams_send_message", send_message_args("parser done, tests pass")))
    mate = bed.spawn("worker-1")
    bed.server.prompt_async(mate, "report in")
    done = wait_for(lambda: [x for x in bed.dispatches() if x["state"] == "completed"
                             and "parser done" in x["prompt"]] or None, 60, "the orchestrator's prompt answered")
    assert "worker-1 is on track" in str(done[0]["reply_text"])
