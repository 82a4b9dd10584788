"""The commands that read the ledger, on ledgers they cannot read: one line with its fix, exit 1, no traceback.

Every command that reads the ledger, against every way a ledger can be unusable to it:
not SQLite, empty, unreadable (a directory in its place, and a file the user may not
read, with privileges dropped in a child process since the tests run as root), and of a
schema newer than this version. With ``--json`` the error is a JSON object on stdout.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Callable

import pytest

from orchestratord.cli import main
from orchestratord.ledger import SCHEMA_VERSION
from tests.support.privileges import as_nobody, needs_root, open_dir  # noqa: F401 - open_dir is a fixture

COMMANDS = [["status"], ["events"], ["messages"], ["escalations"], ["dispatches"], ["permissions"],
            ["permissions", "--all"]]


def damaged(path: Path) -> None:
    path.write_bytes(b"this is not a SQLite database, only some text in its place\n" * 100)


def empty(path: Path) -> None:
    path.write_bytes(b"")


def directory(path: Path) -> None:
    path.mkdir()


def newer(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE state (key TEXT PRIMARY KEY, value TEXT, updated_at REAL)")
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.commit()
    db.close()


CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "damaged": (damaged, "move it aside"),
    "empty": (empty, "start the daemon"),
    "a directory in its place": (directory, "point ledger.path at the file"),
    "newer schema": (newer, "upgrade orchestratord"),
}


def setup_ledger(tmp_path: Path, make: Callable[[Path], None]) -> Path:
    ledger = tmp_path / "state" / "ledger.sqlite3"
    ledger.parent.mkdir()
    make(ledger)
    config = tmp_path / "orchestrator.toml"
    config.write_text(f'[ledger]\npath = "{ledger}"\n[teams]\nbase_dir = "{tmp_path}"\n')
    return config


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_an_unusable_ledger_is_one_line_with_its_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     command: list[str], case: str) -> None:
    make, fix = CASES[case]
    config = setup_ledger(tmp_path, make)
    assert main([*command, "--config", str(config)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1, err
    assert err.startswith("error: ledger ") and f"fix: " in err and fix in err, err

    assert main([*command, "--json", "--config", str(config)]) == 1
    out, err = capsys.readouterr()
    answer = json.loads(out)
    assert err == "" and set(answer) == {"error", "fix"} and fix in answer["fix"], answer


@needs_root
@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_a_ledger_the_user_may_not_read_is_not_called_missing(open_dir: Path, command: list[str]) -> None:
    tmp_path = open_dir
    config = setup_ledger(tmp_path, newer)
    config.chmod(0o644)
    ledger = tmp_path / "state" / "ledger.sqlite3"
    ledger.chmod(0o600)  # the file itself
    code, out, err = as_nobody([*command, "--config", str(config)])
    assert code == 1 and len(err.splitlines()) == 1 and "not readable by this user" in err, (code, out, err)
    assert "does not exist" not in err and "sudo -u opencode-orchestrator" in err
    ledger.parent.chmod(0o700)  # a directory above it, as StateDirectoryMode=0750 is to others
    code, out, err = as_nobody([*command, "--json", "--config", str(config)])
    answer = json.loads(out)
    assert code == 1 and "permission denied on a directory above it" in answer["error"], answer
    assert "does not exist" not in answer["error"]
