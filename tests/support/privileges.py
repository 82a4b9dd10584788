"""Running a piece of the CLI as an unprivileged user, for tests that run as root.

Root reads and writes everything, so "this user may not read the ledger" or "may not write
its directory" only shows with privileges dropped: :func:`as_nobody` runs ``main(argv)`` in
a forked child as nobody. :func:`open_dir` gives a directory that user can reach.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from orchestratord.cli import main

NOBODY = 65534

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")


def as_nobody(argv: list[str]) -> tuple[int, str, str]:
    """``main(argv)`` in a child process with the privileges of nobody: (exit code, stdout, stderr)."""
    outs = [os.pipe(), os.pipe()]
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery from here on, only os._exit
        code = 99
        try:
            sys.stdout, sys.stderr = (os.fdopen(w, "w") for _, w in outs)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            code = main(argv)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    texts = []
    for _, w in outs:
        os.close(w)
    for r, _ in outs:
        with os.fdopen(r) as fh:
            texts.append(fh.read())
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), texts[0], texts[1]


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory any user can reach (pytest's own are root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="orchestratord-unprivileged-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)
