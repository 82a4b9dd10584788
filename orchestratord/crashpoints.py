"""Test hooks that end the process at a named point, like a power cut.

A module of its own, with no imports from the package, so the ledger (which crashes
inside its transactions) and the workers may both use it without an import cycle.
"""

from __future__ import annotations

import os


def crash_point(name: str) -> None:
    """ORCHESTRATORD_TEST_CRASH=<name> ends the process here at once, with nothing flushed."""
    if os.environ.get("ORCHESTRATORD_TEST_CRASH") == name:
        os._exit(137)
