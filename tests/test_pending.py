"""``orchestratord pending`` against the real server: what holds a trigger back, and until when."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

from tests.support.bed import NO_IDLE, TEAM, Bed, script_orchestrator
from tests.support.daemon import ledger_rows, wait_for
from tests.support.team import append_message


def pending(bed: Bed) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "orchestratord", "pending", "--json", "--config", str(bed.config)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_a_trigger_held_by_the_hourly_cap_says_until_when(bed: Bed) -> None:
    bed.write_config(extra=NO_IDLE, max_per_hour=1)
    script_orchestrator(bed.model, reply="one prompt an hour")
    bed.ready_daemon()
    append_message(bed.teams_dir, TEAM, "team-lead", "worker-1", "first, sent at once")
    wait_for(lambda: [r for r in bed.dispatches() if r["state"] == "completed"], 60, "the first prompt answered")
    [[sent_at]] = ledger_rows(bed.ledger, "SELECT sent_at FROM dispatches")
    assert pending(bed)["triggers"] == []

    append_message(bed.teams_dir, TEAM, "team-lead", "worker-2", "second, over the cap")
    seen = wait_for(lambda: (lambda p: p if p["triggers"] and any(h["reason"] == "hourly-cap" for h in p["holds"])
                             else None)(pending(bed)), 30, "the second trigger held by the cap")
    [trigger] = seen["triggers"]
    assert seen["daemon"] == "running" and trigger["teammate"] == "worker-2" and trigger["team"] == TEAM
    assert "hourly-cap" in trigger["held_by"] and "second, over the cap" in trigger["detail"]
    cap = next(h for h in seen["holds"] if h["reason"] == "hourly-cap")
    assert "dispatch.max_per_hour = 1" in cap["detail"]
    # A slot frees an hour after the first prompt went: that moment, as a wall-clock time.
    assert abs(cap["until"] - (sent_at + 3600)) < 5, (cap["until"], sent_at)
    assert cap["until"] > time.time() + 3500
    text = subprocess.run([sys.executable, "-m", "orchestratord", "pending", "--config", str(bed.config)],
                          capture_output=True, text=True, timeout=60).stdout
    assert "1 trigger waiting, held back by:" in text and "hourly-cap until " in text and "worker-2" in text
    assert len(bed.dispatches()) == 1
