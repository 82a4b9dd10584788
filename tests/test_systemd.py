"""The shipped unit files under a real systemd 252, against a real ``opencode serve``.

One systemd is booted for the module (see ``tests/support/systemd.py``). Into it go the
files ``make install DESTDIR=…`` produced, as a package would put them: /usr/local from
the install is bind-mounted over /usr/local inside, the sysusers and tmpfiles snippets
are applied with systemd's own tools, and the shipped teams-in-home drop-in runs the
service as "alice", whose ~/.claude is the test server's team directory. One more
drop-in is the test's own: the watchdog and restart delay are short. (The shipped pair of
units, as a new user installs them, is in test_systemd_pair.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest

from orchestratord.teammsg import without_reminder
from tests.support.bed import TEAM, script_orchestrator, script_teammate, send_message_args
from tests.support.daemon import wait_for, write_config
from tests.support.systemd import BootedSystemd, why_not
from tests.support.team import append_message, make_team

ROOT = Path(__file__).resolve().parents[1]
UNIT = "opencode-orchestrator.service"
CONFIG = "/etc/opencode-orchestrator/orchestrator.toml"
LEDGER = "/var/lib/opencode-orchestrator/ledger.sqlite3"
DROPINS = f"/etc/systemd/system/{UNIT}.d"
HOME_DROPIN = "/usr/local/share/doc/opencode-orchestrator/teams-in-home.conf"

REASON = why_not()
pytestmark = [pytest.mark.skipif(REASON is not None, reason=f"no systemd to boot: {REASON}"),
              pytest.mark.xdist_group("make-install")]  # make install builds in the checkout: one at a time


class Machine:
    """The booted systemd with the service installed, and the shared server it watches."""

    def __init__(self, sd: BootedSystemd, shared: Any, teams_dir: Path) -> None:
        self.sd = sd
        self.shared = shared
        self.teams_dir = teams_dir

    def orchestratord(self, *args: str) -> str:
        return self.sd.check("/usr/local/bin/orchestratord", *args, "--config", CONFIG)

    def write_config(self, extra: str = "") -> None:
        write_config(self.sd.path(CONFIG), server_url=self.shared.server.url,
                     ledger=Path(LEDGER), teams_base=Path("/home/alice/.claude"), extra=extra)

    def dropin(self, name: str, text: str | None) -> None:
        """Add (or with None remove) a drop-in of the test's, and reload systemd."""
        path = self.sd.path(f"{DROPINS}/{name}")
        if text is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(text)
        self.sd.check("systemctl", "daemon-reload")

    def main_pid(self) -> int:
        return int(self.sd.show(UNIT, "MainPID")["MainPID"])

    def restarts(self) -> int:
        return int(self.sd.show(UNIT, "NRestarts")["NRestarts"])

    def unit_messages(self, *args: str) -> list[str]:
        return self.sd.messages("-u", UNIT, *args)

    def wait_active(self, timeout: float = 30.0) -> None:
        wait_for(lambda: self.sd.show(UNIT, "ActiveState", "SubState") == {"ActiveState": "active", "SubState": "running"},
                 timeout, f"{UNIT} active (running)")


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory, _shared_bed: Any) -> Iterator[Machine]:
    base = tmp_path_factory.getbasetemp()
    dest = tmp_path_factory.mktemp("destdir")
    install = subprocess.run(["make", "-s", "-C", str(ROOT), "install", f"DESTDIR={dest}", "PREFIX=/usr/local"],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stdout + install.stderr

    teams_dir: Path = _shared_bed.teams_dir
    make_team(teams_dir, TEAM, members=["worker-1", "worker-2"])
    marker = Path(f"/tmp/orchestratord-systemd-marker-{os.getpid()}")
    marker.write_text("must survive the boot\n")
    sd = BootedSystemd(base)
    try:
        sd.boot()
        sd.check("mount", "--bind", f"{dest}/usr/local", "/usr/local")
        # The server is the test's own, outside; the shipped opencode-serve.service would
        # look for /usr/local/bin/opencode.
        sd.check("systemctl", "mask", "--runtime", "opencode-serve.service")
        sd.check("systemd-sysusers", "/usr/local/lib/sysusers.d/opencode-orchestrator.conf")
        sd.check("systemd-tmpfiles", "--create", "/usr/local/lib/tmpfiles.d/opencode-orchestrator.conf")
        # A person whose home holds the team directory, as claude-teams keeps it.
        sd.check("useradd", "--create-home", "--user-group", "alice")
        sd.check("mkdir", "/home/alice/.claude")
        sd.check("mount", "--bind", str(teams_dir), "/home/alice/.claude")
        m = Machine(sd, _shared_bed, teams_dir)
        m.write_config()
        sd.path(DROPINS).mkdir(parents=True)
        m.dropin("test.conf", "[Service]\nWatchdogSec=3\nRestartSec=1\n")
        # As documented: the shipped drop-in, for alice's team directory.
        m.dropin("teams-in-home.conf", sd.path(HOME_DROPIN).read_text())
        yield m
    finally:
        sd.poweroff()
        assert marker.read_text() == "must survive the boot\n", "the booted systemd touched the real /tmp"
        marker.unlink()


def test_the_unit_is_active_only_once_ready_with_the_status_line(machine: Machine) -> None:
    sd = machine.sd
    # Without the home drop-in: the base unit as shipped, as its own unprivileged user.
    sd.check("systemctl", "stop", UNIT)
    machine.dropin("teams-in-home.conf", None)
    sd.check("systemctl", "start", UNIT)  # Type=notify: returns once READY=1 arrived
    props = sd.show(UNIT, "ActiveState", "SubState", "Type", "StatusText", "User", "MainPID")
    assert (props["ActiveState"], props["SubState"], props["Type"]) == ("active", "running", "notify")
    assert props["User"] == "opencode-orchestrator"
    assert props["StatusText"].startswith("ready: server "), props
    # STATUS= follows the daemon: the server is seen up and the stream connected.
    wait_for(lambda: sd.show(UNIT, "StatusText")["StatusText"].startswith("ready: server up")
             and "stream connected" in sd.show(UNIT, "StatusText")["StatusText"], 15, "STATUS= with the server up")
    uid = sd.check("stat", "-c", "%u", f"/proc/{props['MainPID']}")
    assert uid.strip() != "0"
    status = sd.run("systemctl", "status", "--no-pager", UNIT).stdout
    assert 'Status: "ready: server up' in status, status
    sd.check("systemctl", "stop", UNIT)

    # A daemon that cannot reach READY (its ledger directory is read-only to it) never
    # makes the unit active: the start fails.
    ledger_ro = Path("/usr/share/orchestratord-cannot-write/ledger.sqlite3")
    write_config(sd.path(CONFIG), server_url=machine.shared.server.url, ledger=ledger_ro,
                 teams_base=Path("/home/alice/.claude"))
    failed = sd.run("systemctl", "start", UNIT)
    assert failed.returncode != 0
    props = sd.show(UNIT, "ActiveState", "SubState", "Result")
    assert props["ActiveState"] != "active" and props["Result"] == "exit-code", props
    assert any("startup-failed" in line for line in machine.unit_messages())
    sd.check("systemctl", "stop", UNIT)  # no more restarts

    # Back to alice and her team directory.
    machine.dropin("teams-in-home.conf", sd.path(HOME_DROPIN).read_text())
    machine.write_config()
    sd.check("systemctl", "start", UNIT)
    assert sd.show(UNIT, "User", "ActiveState") == {"User": "alice", "ActiveState": "active"}


def test_the_hardened_unit_reaches_the_server_writes_its_ledger_and_reads_the_team(machine: Machine) -> None:
    sd, model, server = machine.sd, machine.shared.model, machine.shared.server
    sd.check("systemctl", "start", UNIT)
    script_orchestrator(model, reply="Read the inbox under systemd: worker-1 is done.")
    script_teammate(model, "SYSTEMD-TASK", [send_message_args("done under systemd")])
    worker = server.create_session("worker-1")["id"]
    # Prompted once the broker's rules are on it: a prompt that races them has its turn restarted,
    # which on a server this fresh can cost the next turns too (test_broker.py tells that story).
    wait_for(lambda: any(m.startswith(f"session-brokered session={worker}") for m in machine.unit_messages()), 30,
             "the broker's rules on the teammate's session")
    server.prompt_async(worker, "SYSTEMD-TASK: report to the lead")

    def completed() -> list[dict[str, Any]]:
        rows = json.loads(machine.orchestratord("dispatches", "--json"))
        return [r for r in rows if r.get("state") == "completed"]

    rows = wait_for(completed, 60, "a completed prompt in the ledger")
    assert "worker-1 is done" in str(rows[0]["reply_text"])
    st = json.loads(machine.orchestratord("status", "--json"))
    assert st["server"]["healthy"] is True and st["stream"]["connected"] is True
    assert any(without_reminder(m["text"]) == "done under systemd"
               for m in json.loads(machine.orchestratord("messages", "--json")))
    owners = sd.check("stat", "-c", "%U", "/var/lib/opencode-orchestrator", LEDGER).split()
    assert owners == ["alice", "alice"], "StateDirectory= belongs to the unit's user"
    props = sd.show(UNIT, "ProtectSystem", "ProtectHome", "PrivateUsers", "NoNewPrivileges", "RestrictAddressFamilies")
    assert props["ProtectSystem"] == "strict" and props["ProtectHome"] == "tmpfs" and props["NoNewPrivileges"] == "yes"


def test_reload_rejects_a_broken_config_visibly_and_applies_a_good_one(machine: Machine) -> None:
    sd = machine.sd
    sd.check("systemctl", "start", UNIT)
    pid = machine.main_pid()
    config = sd.path(CONFIG)
    good = config.read_text()
    config.write_text(good.replace("max_per_hour = 1000", "max_per_hour = 0"))
    r = sd.run("systemctl", "reload", UNIT)
    assert r.returncode != 0
    assert "failed" in r.stderr
    errors = [line for line in machine.unit_messages("-p", "err") if "dispatch.max_per_hour" in line]
    assert errors and errors[-1].startswith(f"{CONFIG}:"), errors
    assert machine.main_pid() == pid and sd.show(UNIT, "ActiveState")["ActiveState"] == "active"
    status = sd.run("systemctl", "status", "--no-pager", "-n", "20", UNIT).stdout
    assert "dispatch.max_per_hour: must be at least 1" in status

    config.write_text(good.replace("max_per_hour = 1000", "max_per_hour = 999"))
    sd.check("systemctl", "reload", UNIT)
    wait_for(lambda: [m for m in machine.unit_messages() if m.startswith("config-reloaded") and "changed=dispatch" in m],
             15, "config-reloaded changed=dispatch in the journal")
    assert machine.main_pid() == pid
    dump = machine.orchestratord("config", "show")
    assert "max_per_hour = 999" in dump


def test_the_journal_filters_by_priority(machine: Machine) -> None:
    sd = machine.sd
    sd.check("systemctl", "start", UNIT)
    wait_for(lambda: any(m.startswith("stream-connected") for m in machine.unit_messages()), 15, "stream-connected")
    config = sd.path(CONFIG)
    good = config.read_text()
    config.write_text(good + "\n[nonsense]\n")  # an error line to find
    try:
        assert sd.run("systemctl", "reload", UNIT).returncode != 0
    finally:
        config.write_text(good)
    warnings = sd.journal("-u", UNIT, "-p", "warning")
    everything = sd.journal("-u", UNIT)
    assert any("nonsense: unknown key" in str(e["MESSAGE"]) for e in warnings)
    assert all(int(e["PRIORITY"]) <= 4 for e in warnings)
    info = {str(e["MESSAGE"]) for e in everything if e.get("PRIORITY") == "6" and e.get("_PID") != "1"}
    assert any(m.startswith("stream-connected") for m in info), "the daemon's info lines are in the journal"
    assert not {str(e["MESSAGE"]) for e in warnings} & info


def test_journal_field_queries_find_the_daemon_events(machine: Machine) -> None:
    """The `journalctl ORCH_EVENT=…` queries of docs/operating.md: native journal entries with fields of their own."""
    sd = machine.sd
    sd.check("systemctl", "restart", UNIT)
    wait_for(lambda: any(m.startswith("stream-connected") for m in machine.unit_messages()), 15, "stream-connected")
    connected = sd.journal("-u", UNIT, "ORCH_EVENT=stream-connected")
    assert connected and all(e["ORCH_EVENT"] == "stream-connected" and e["SYSLOG_IDENTIFIER"] == "orchestratord"
                             for e in connected)
    assert all(e.get("ORCH_PATH") == "/global/event" for e in connected)
    config = sd.path(CONFIG)
    good = config.read_text()
    config.write_text(good + "\n[nonsense]\n")
    try:
        # Straight to the daemon (systemctl reload would stop at check-config).
        sd.check("systemctl", "kill", "-s", "HUP", "--kill-whom=main", UNIT)
        rejected = wait_for(lambda: [e for e in sd.journal("-u", UNIT, "ORCH_EVENT=config-rejected")
                                     if "nonsense" in str(e.get("ORCH_PROBLEM", ""))], 15, "config-rejected")
    finally:
        config.write_text(good)
    assert all(e["PRIORITY"] == "3" for e in rejected)


def test_a_hung_worker_gets_the_service_restarted_by_the_watchdog(machine: Machine) -> None:
    sd = machine.sd
    machine.dropin("hang.conf", "[Service]\nEnvironment=ORCHESTRATORD_TEST_HANG=health\n")
    try:
        sd.check("systemctl", "restart", UNIT)
        before = machine.restarts()
        wait_for(lambda: machine.restarts() > before, 40, "NRestarts to go up after the watchdog fired")
        assert any("Watchdog timeout" in m for m in sd.messages("-u", UNIT, "_PID=1")), "systemd's own reason"
        assert any(m.startswith("worker-hung worker=health") for m in machine.unit_messages())
    finally:
        machine.dropin("hang.conf", None)
    sd.check("systemctl", "restart", UNIT)
    machine.wait_active()


def test_a_crash_gets_the_service_restarted(machine: Machine) -> None:
    sd = machine.sd
    machine.dropin("crash.conf", "[Service]\nEnvironment=ORCHESTRATORD_TEST_CRASH=after-record\n")
    try:
        sd.check("systemctl", "restart", UNIT)
        machine.wait_active()
        before, pid = machine.restarts(), machine.main_pid()
        append_message(machine.teams_dir, TEAM, "team-lead", "worker-2", "this one crashes the daemon")
        wait_for(lambda: machine.restarts() > before, 30, "NRestarts to go up after the crash")
        machine.wait_active()
        assert machine.main_pid() != pid
        assert any("status=137" in m for m in sd.messages("-u", UNIT, "_PID=1"))
    finally:
        machine.dropin("crash.conf", None)


def test_stop_is_clean(machine: Machine) -> None:
    sd = machine.sd
    sd.check("systemctl", "restart", UNIT)
    machine.wait_active()
    sd.check("systemctl", "log-level", "debug")  # so PID 1 logs each notification it gets
    earlier = len(sd.messages("-u", UNIT, "_PID=1"))
    try:
        sd.check("systemctl", "stop", UNIT)
    finally:
        sd.check("systemctl", "log-level", "info")
    assert sd.show(UNIT, "ActiveState", "Result") == {"ActiveState": "inactive", "Result": "success"}
    pid1 = sd.messages("-u", UNIT, "_PID=1")[earlier:]
    assert any("STOPPING=1" in m for m in pid1), "systemd got STOPPING=1"
    assert any("Main process exited, code=exited, status=0/SUCCESS" in m for m in pid1)
    # Stopped by its own exit, not by systemd's stop timeout (how long it took is no assertion).
    assert not [m for m in pid1 if "SIGKILL" in m or "timed out" in m or "Killing process" in m]
    assert any(m.startswith("stopped") for m in machine.unit_messages())
