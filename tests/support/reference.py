"""Where the recorded opencode 1.18.33 streams are, wherever the repository is cloned."""

from __future__ import annotations

import os
from pathlib import Path

VERSION_DIR = "opencode-1.18.33"


def reference_dir() -> Path:
    """$ORCHESTRATORD_REFERENCE, a ``shared/reference`` beside the clone, or /work/shared/reference.

    Returns the first that holds the recordings, else the sibling path (which callers
    find missing and skip or explain).
    """
    candidates = [os.environ.get("ORCHESTRATORD_REFERENCE", ""),
                  str(Path(__file__).resolve().parents[3] / "shared" / "reference"),
                  "/work/shared/reference"]
    for c in candidates:
        if c and (Path(c) / VERSION_DIR).is_dir():
            return Path(c) / VERSION_DIR
    return Path(candidates[1]) / VERSION_DIR
