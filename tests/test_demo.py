"""``make demo`` runs as its README says: the whole story, then nothing left behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_demo_tells_the_whole_story_and_leaves_nothing(tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "tests.support.demo"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    text = out.stdout
    assert out.returncode == 0, text[-3000:] + out.stderr[-3000:]
    story = ["opencode serve is up", " started ", "teammate-message", "prompt-sent", "prompt-done",
             "escalation", "worker-2's inbox now holds", "stopping orchestratord",
             "orchestratord status"]
    missing = [step for step in story if step not in text]
    assert missing == [], f"missing: {missing}\n{text[-3000:]}"
    assert re.search(r"completed", text), "the dispatches table shows completed prompts"
    held = re.search(r"worker-2's inbox now holds (\d+) shutdown_request", text)
    assert held and int(held.group(1)) >= 1, "the orchestrator stopped the rogue teammate"
    assert list(tmp_path.iterdir()) == [], "its temporary directory is gone"
    leftovers = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if str(tmp_path).encode() in cmdline:
            leftovers.append(pid)
    assert leftovers == [], "nothing it started still runs"
