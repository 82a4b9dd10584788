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
from orchestratord.ledger import SCHEMA_VERSION, Ledger
from tests.support.privileges import as_nobody, needs_root, open_dir  # noqa: F401 - open_dir is a fixture

COPY = "{copy}"  # where ledger backup and vacuum write, filled in per test
COMMANDS = [["status"], ["pending"], ["events"], ["messages"], ["escalations"], ["dispatches"], ["permissions"],
            ["permissions", "--all"], ["ledger", "check"], ["ledger", "backup", COPY], ["ledger", "vacuum", COPY]]


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
    command = [str(tmp_path / "copy.sqlite3") if word == COPY else word for word in command]
    assert main([*command, "--config", str(config)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1, err
    assert err.startswith("error: ledger ") and "fix: " in err and fix in err, err

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
    command = [str(tmp_path / "copy.sqlite3") if word == COPY else word for word in command]
    code, out, err = as_nobody([*command, "--config", str(config)])
    assert code == 1 and len(err.splitlines()) == 1 and "not readable by this user" in err, (code, out, err)
    assert "does not exist" not in err and "sudo -u opencode-orchestrator" in err
    ledger.parent.chmod(0o700)  # a directory above it, as StateDirectoryMode=0750 is to others
    code, out, err = as_nobody([*command, "--json", "--config", str(config)])
    answer = json.loads(out)
    assert code == 1 and "permission denied on a directory above it" in answer["error"], answer
    assert "does not exist" not in answer["error"]


# -- check, backup, vacuum on a ledger in use ------------------------------------------------

def busy_ledger(tmp_path: Path) -> tuple[Path, Ledger]:
    """A config and its ledger, open for writing as the daemon holds it, with rows in it."""
    config = setup_ledger(tmp_path, lambda path: None)
    writer = Ledger(str(tmp_path / "state" / "ledger.sqlite3"))
    for i in range(2000):
        writer.add_trigger("event", f"trigger {i} " + "x" * 200)
    return config, writer


def test_check_backup_and_vacuum_while_the_ledger_is_written(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    config, writer = busy_ledger(tmp_path)
    try:
        assert main(["ledger", "check", "--config", str(config)]) == 0
        assert "ok (schema" in capsys.readouterr().out
        backup = tmp_path / "backup.sqlite3"
        assert main(["ledger", "backup", str(backup), "--config", str(config)]) == 0
        writer.db.execute("DELETE FROM triggers WHERE id > 10")  # the daemon goes on writing meanwhile
        vacuumed = tmp_path / "vacuumed.sqlite3"
        assert main(["ledger", "vacuum", str(vacuumed), "--json", "--config", str(config)]) == 0
        done = json.loads(capsys.readouterr().out.splitlines()[-1])
        assert done["copy"] == str(vacuumed) and done["bytes"] < backup.stat().st_size
        copies = [sqlite3.connect(p) for p in (backup, vacuumed)]
        assert [c.execute("SELECT COUNT(*) FROM triggers").fetchone()[0] for c in copies] == [2000, 10]
        assert all(c.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION for c in copies)
        for c in copies:
            c.close()
        assert main(["ledger", "backup", str(backup), "--config", str(config)]) == 1  # never over a file
        assert "exists" in capsys.readouterr().err
    finally:
        writer.close()


def test_check_finds_a_damaged_page(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config, writer = busy_ledger(tmp_path)
    writer.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    writer.close()
    path = tmp_path / "state" / "ledger.sqlite3"
    data = bytearray(path.read_bytes())
    page = 4096
    data[page * 20:page * 21] = b"\xa5" * page  # one page of the triggers in the middle, garbage
    path.write_bytes(bytes(data))
    assert main(["ledger", "check", "--json", "--config", str(config)]) == 1
    answer = json.loads(capsys.readouterr().out)
    # Found by the check's listing, or by SQLite refusing to read the page at all: damaged either way.
    assert "damaged" in answer["error"] and "move" in answer["fix"], answer
