"""``orchestratord run --daemon --pidfile PATH``: detaching for init systems without a supervisor.

The daemon here watches a port where nothing listens: what is tested is the process
(detached, pidfile, umask, working directory, log file, SIGTERM, a second instance),
not the server.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from orchestratord.service import read_pid
from tests.support.daemon import wait_for
from tests.support.server import free_port


def orchestratord(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestratord", *args], capture_output=True, text=True,
                          timeout=30, cwd=cwd)


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def gone(pid: int) -> bool:
    try:
        return proc_status(pid).get("State", "").startswith("Z")
    except FileNotFoundError:
        return True


class Detached:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.config = tmp / "orchestrator.toml"
        self.pidfile = tmp / "run" / "orchestratord.pid"
        self.log = tmp / "orchestratord.log"
        self.pidfile.parent.mkdir()
        self.config.write_text(f'[server]\nurl = "http://127.0.0.1:{free_port()}"\n[ledger]\npath = "ledger.sqlite3"\n'
                               '[teams]\nbase_dir = "claude"\n')
        self.pids: list[int] = []

    def start(self, pidfile: Path | None = None, log: Path | None = None) -> subprocess.CompletedProcess[str]:
        # Relative paths on purpose: the daemon works from / and must have made them absolute.
        r = orchestratord("run", "--daemon", "--pidfile", os.path.relpath(pidfile or self.pidfile, self.tmp),
                          "--log-file", os.path.relpath(log or self.log, self.tmp), "--config", "orchestrator.toml",
                          cwd=self.tmp)
        pid = read_pid(str(pidfile or self.pidfile))
        if r.returncode == 0 and pid:
            self.pids.append(pid)
        return r

    def close(self) -> None:
        for pid in self.pids:  # not our children once detached: stopped by PID, waited for by polling
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
                wait_for(lambda: gone(pid), 10, f"daemon {pid} to go")


@pytest.fixture
def detached(tmp_path: Path) -> Iterator[Detached]:
    d = Detached(tmp_path)
    try:
        yield d
    finally:
        d.close()


def test_it_detaches_with_a_pidfile_a_umask_and_its_log(detached: Detached) -> None:
    r = detached.start()
    assert r.returncode == 0, r.stderr
    pid = read_pid(str(detached.pidfile))
    assert pid and pid != os.getpid()
    status = proc_status(pid)
    assert status["Umask"] == "0027"
    assert int(status["PPid"]) != os.getpid()  # detached: not our child any more
    assert os.getsid(pid) != os.getsid(0)
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    assert os.readlink(f"/proc/{pid}/fd/2") == str(detached.log)  # stderr is the log file
    wait_for(lambda: "started config=" in detached.log.read_text(), 10, "the start in the log file")
    assert (detached.tmp / "ledger.sqlite3").exists()

    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: gone(pid), 10, "the daemon to exit on SIGTERM")
    log = detached.log.read_text()
    assert "stop-requested signal=SIGTERM" in log and "NOTICE  stopped" in log
    assert "Traceback" not in log and "SystemExit" not in log
    assert not detached.pidfile.exists()


def test_a_second_instance_refuses_and_a_stale_pidfile_is_taken_over(detached: Detached) -> None:
    assert detached.start().returncode == 0
    first = read_pid(str(detached.pidfile))
    second = detached.start(log=detached.tmp / "second.log")
    assert second.returncode == 1
    assert f"already running (pid {first} holds {detached.pidfile})" in second.stderr
    assert read_pid(str(detached.pidfile)) == first

    assert first is not None
    os.kill(first, signal.SIGKILL)  # no cleanup: the pidfile stays, but nobody holds its lock
    wait_for(lambda: gone(first), 10, "the first daemon to die")
    assert detached.pidfile.exists()
    third = detached.start()
    assert third.returncode == 0, third.stderr
    assert read_pid(str(detached.pidfile)) not in (None, first)


def test_startup_errors_are_reported_before_detaching(detached: Detached) -> None:
    detached.config.write_text('[server]\nurl = "nope"\n')
    r = detached.start()
    assert r.returncode == 1 and "server.url" in r.stderr
    assert not detached.pidfile.exists()

    r = orchestratord("run", "--daemon", "--config", str(detached.config), cwd=detached.tmp)
    assert r.returncode == 2 and "--pidfile" in r.stderr


def test_a_start_that_fails_after_detaching_is_still_reported(detached: Detached) -> None:
    # The password file is read by the daemon when it starts, after detaching.
    text = detached.config.read_text().replace("[server]\n", f'[server]\npassword_file = "{detached.tmp}/pw"\n')
    detached.config.write_text(text)
    (detached.tmp / "pw").write_text("secret")
    (detached.tmp / "pw").chmod(0)
    if os.access(detached.tmp / "pw", os.R_OK):
        (detached.tmp / "pw").unlink()  # root reads anything: a missing file fails the same way
    r = detached.start()
    assert r.returncode == 1, r.stderr
    assert "password_file" in r.stderr
    assert not detached.pidfile.exists()
