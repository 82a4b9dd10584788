"""Where the recorded opencode 1.18.33 streams are: tests/data, kept in the repository.

They are facts recorded from the real server (data, not code), so a fresh clone runs
every test that reads them and the fuzzers start from real frames.
"""

from __future__ import annotations

from pathlib import Path

VERSION_DIR = "opencode-1.18.33"
DATA = Path(__file__).resolve().parents[1] / "data"


def reference_dir() -> Path:
    """The directory of the recorded opencode streams."""
    return DATA / VERSION_DIR


def teams_examples_dir() -> Path:
    """The directory of the recorded claude-teams files (a team config, inboxes)."""
    return DATA / "claude-teams"
