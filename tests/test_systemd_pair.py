"""The shipped pair of units, installed as a new user would, under a real systemd 252.

As the README says, and nothing more: ``make install`` (inside the booted systemd, so it
creates the user and the directories and reloads systemd itself; /usr/local there is a
fresh tmpfs), the shipped config with only ``teams.names`` set, and ``systemctl enable
--now opencode-orchestrator``, which starts the shipped ``opencode-serve.service`` too.
That unit runs the pinned opencode of the tests, put where it looks for it, with the
scripted model and the test claude-teams MCP server in its config under its HOME (the
offline switches in its EnvironmentFile=). A teammate's ``send_message`` through that
server's claude-teams then has to reach the daemon, which reads the teams of that server
through the one directory its unit may see.
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import pytest

from tests.support.bed import TEAM, script_orchestrator, script_teammate, send_message_args
from tests.support.daemon import holds, wait_for
from tests.support.llm import ScriptedModel
from tests.support.server import OPENCODE_BIN, TEAMS_SERVER, opencode_config
from tests.support.systemd import BootedSystemd, why_not
from tests.support.team import make_team

ROOT = Path(__file__).resolve().parents[1]
UNIT = "opencode-orchestrator.service"
SERVE = "opencode-serve.service"
CONFIG = "/etc/opencode-orchestrator/orchestrator.toml"
SERVE_HOME = "/var/lib/opencode-serve"
TEAMS = f"{SERVE_HOME}/.claude"
SITE = next(Path(sys.prefix, "lib").glob("python3*/site-packages"), Path(sys.prefix))
T = TypeVar("T")
PORT = 4096  # the shipped unit's and the shipped config's

REASON = why_not()
pytestmark = [pytest.mark.skipif(REASON is not None, reason=f"no systemd to boot: {REASON}"),
              pytest.mark.xdist_group("make-install")]  # make install builds in the checkout: one at a time


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class Pair:
    """The booted systemd with the pair installed and enabled, and the model behind its server."""

    def __init__(self, sd: BootedSystemd, model: ScriptedModel, url: str) -> None:
        self.sd = sd
        self.model = model
        self.url = url

    def orchestratord(self, *args: str) -> str:
        return self.sd.check("/usr/local/bin/orchestratord", *args, "--config", CONFIG)

    def journal(self, *args: str) -> list[dict[str, Any]]:
        return self.sd.journal("-u", UNIT, *args)

    def messages(self, *args: str) -> list[str]:
        return [str(e.get("MESSAGE", "")) for e in self.journal(*args)]

    def main_pid(self) -> int:
        return int(self.sd.show(UNIT, "MainPID")["MainPID"])

    def active(self) -> bool:
        return self.sd.show(UNIT, "ActiveState", "SubState") == {"ActiveState": "active", "SubState": "running"}

    def diagnostics(self) -> str:
        """What the two units said lately, and the lead's inbox: for a failure's message."""
        journal = self.sd.run("journalctl", "-u", UNIT, "-u", SERVE, "-n", "80", "--no-pager", "-o", "short-monotonic")
        inbox = self.sd.path(f"{TEAMS}/teams/{TEAM}/inboxes/team-lead.json")
        return f"journal:\n{journal.stdout}\ninbox: {inbox.read_text()[-800:] if inbox.exists() else '(none)'}"

    def wait(self, predicate: Callable[[], T], timeout: float, what: str) -> T:
        try:
            return wait_for(predicate, timeout, what, interval=0.5)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.diagnostics()}") from None

    def http(self, method: str, path: str, **body: Any) -> Any:
        import requests

        r = requests.request(method, self.url + path, json=body or None, timeout=10)
        r.raise_for_status()
        return r.json() if r.content else None


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    base = tmp_path_factory.getbasetemp()
    model = ScriptedModel()
    sd = BootedSystemd(base)
    try:
        sd.boot()
        sd.check("mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", "/usr/local")
        install = sd.run("make", "-s", "-C", str(ROOT), "install", timeout=600)
        assert install.returncode == 0, install.stdout + install.stderr
        assert "installed; start it with: systemctl enable --now opencode-orchestrator" in install.stdout
        # The pinned opencode where the shipped unit looks for it.
        sd.check("ln", "-s", str(OPENCODE_BIN.resolve()), "/usr/local/bin/opencode")
        # Its config under its HOME: the scripted model, and claude-teams with its default
        # base directory, that HOME's .claude (no CLAUDE_TEAMS_BASE_DIR).
        cfg = opencode_config(model.url, Path(TEAMS))
        cfg["mcp"]["claude-teams"] = {"type": "local", "command": ["/usr/bin/python3", str(TEAMS_SERVER)],
                                      "environment": {"PYTHONPATH": str(SITE)}, "enabled": True}
        home_config = sd.path(f"{SERVE_HOME}/.config/opencode/opencode.json")
        home_config.parent.mkdir(parents=True)
        home_config.write_text(json.dumps(cfg, indent=2))
        sd.path("/etc/opencode-orchestrator/opencode-serve.env").write_text(
            "OPENCODE_DISABLE_LSP_DOWNLOAD=true\nOPENCODE_DISABLE_MODELS_FETCH=true\n"
            "npm_config_offline=true\nnpm_config_update_notifier=false\n")
        # A team the server's claude-teams made earlier, as its user owns it.
        make_team(sd.path(TEAMS), TEAM, members=["worker-1"])
        sd.check("chown", "-R", "opencode-orchestrator:opencode-orchestrator", f"{SERVE_HOME}/.claude",
                 f"{SERVE_HOME}/.config")
        config = sd.path(CONFIG)
        text = config.read_text()
        assert 'names = []' in text
        text = text.replace("names = []", f'names = ["{TEAM}"]', 1)
        url = f"http://127.0.0.1:{PORT}"
        if ROOT.is_relative_to("/tmp"):
            # The unit's PrivateTmp=yes hides a checkout under /tmp, and with it the pinned
            # opencode and the test claude-teams it runs: a test-only drop-in shows it again.
            sd.path(f"/etc/systemd/system/{SERVE}.d").mkdir(parents=True, exist_ok=True)
            sd.path(f"/etc/systemd/system/{SERVE}.d/checkout.conf").write_text(
                f"[Service]\nBindReadOnlyPaths={ROOT}\n")
            sd.check("systemctl", "daemon-reload")
        if not port_free(PORT):  # someone else's server on this machine: the one change beyond the README
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            sd.path(f"/etc/systemd/system/{SERVE}.d").mkdir(parents=True, exist_ok=True)
            sd.path(f"/etc/systemd/system/{SERVE}.d/port.conf").write_text(
                f"[Service]\nExecStart=\nExecStart=/usr/local/bin/opencode serve --hostname 127.0.0.1 --port {port}\n")
            sd.check("systemctl", "daemon-reload")
            text = text.replace(f'url = "http://127.0.0.1:{PORT}"', f'url = "{url}"', 1)
        config.write_text(text)
        sd.check("systemctl", "enable", "--now", UNIT)
        yield Pair(sd, model, url)
    finally:
        sd.poweroff()
        model.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_teammate_message_through_the_servers_claude_teams_reaches_the_daemon_quietly(pair: Pair) -> None:
    sd = pair.sd
    assert pair.active() and sd.show(SERVE, "ActiveState")["ActiveState"] == "active"
    assert sd.show(UNIT, "User")["User"] == "opencode-orchestrator"
    script_orchestrator(pair.model, reply="Read the inbox: worker-1 reports from the pair.")
    script_teammate(pair.model, "PAIR-TASK", [send_message_args("done, through the served claude-teams")])
    wait_for(lambda: sd.show(UNIT, "StatusText")["StatusText"].startswith("ready: server up"), 60,
             "the daemon to see the server up")
    worker = pair.http("POST", "/session", title="worker-1")["id"]
    # Its prompt once the broker has given it its rules: a prompt that races them has its turn
    # restarted, which is the broker's story (test_broker.py), not this one's.
    pair.wait(lambda: [m for m in pair.messages() if m.startswith(f"session-brokered session={worker}")], 30,
              "the broker's rules on the teammate's session")
    pair.http("POST", f"/session/{worker}/prompt_async", parts=[{"type": "text", "text": "PAIR-TASK: report"}])

    def recorded() -> list[dict[str, Any]]:
        return [m for m in json.loads(pair.orchestratord("messages", "--json"))
                if m["text"].startswith("done, through the served claude-teams")]

    [message] = pair.wait(recorded, 90, "the message in the ledger, read from the served inbox")
    assert message["sender"] == "worker-1" and message["recipient"] == "team-lead" and message["team"] == TEAM
    assert any(line.startswith("teammate-message") and "from=worker-1" in line for line in pair.messages())

    def answered() -> list[dict[str, Any]]:
        return [d for d in json.loads(pair.orchestratord("dispatches", "--json")) if d["state"] == "completed"]

    [done] = pair.wait(answered, 90, "the orchestrator's prompt answered")
    assert "worker-1 reports from the pair" in str(done["reply_text"])
    # A minute of normal work, short: no new warning while the daemon goes on for a while.
    def loud() -> list[tuple[Any, Any]]:
        return [(e.get("PRIORITY"), e.get("MESSAGE")) for e in pair.journal("-p", "warning")]

    assert loud() == [], pair.diagnostics()
    holds(lambda: not loud(), 10, "no warning in the journal", interval=1.0)
    assert loud() == []
    assert any(m.startswith(("server-starting", "server-up")) for m in pair.messages())


def test_reload_refuses_what_the_start_would_refuse_and_the_daemon_keeps_running(pair: Pair) -> None:
    sd = pair.sd
    pid = pair.main_pid()
    config = sd.path(CONFIG)
    good = config.read_text()
    broken = {
        "server.password_file": good.replace('# password_file = "/etc/opencode-orchestrator/password"',
                                             'password_file = "/etc/opencode-orchestrator/no-such-password"', 1),
        "teams.base_dir": good.replace(f'base_dir = "{TEAMS}"', 'base_dir = "/var/lib/no-such-teams"', 1),
        "ledger.path": good.replace('path = "/var/lib/opencode-orchestrator/ledger.sqlite3"',
                                    'path = "/usr/share/orchestratord-cannot-write/ledger.sqlite3"', 1),
    }
    try:
        for key, text in broken.items():
            assert text != good, key
            config.write_text(text)
            r = sd.run("systemctl", "reload", UNIT)
            assert r.returncode != 0, key
            errors = [m for m in pair.messages("-p", "err") if f": {key}: " in m]
            assert errors and errors[-1].startswith(f"{CONFIG}:"), (key, errors)
            assert pair.main_pid() == pid and pair.active(), key
    finally:
        config.write_text(good)
    status = json.loads(pair.orchestratord("status", "--json"))
    assert status["state"] in ("ready", "degraded") and status["pid"] == pid


def test_a_good_reload_is_applied(pair: Pair) -> None:
    sd = pair.sd
    pid = pair.main_pid()
    config = sd.path(CONFIG)
    good = config.read_text()
    config.write_text(good.replace("max_per_hour = 60", "max_per_hour = 59", 1))
    try:
        sd.check("systemctl", "reload", UNIT)
        wait_for(lambda: [m for m in pair.messages() if m.startswith("config-reloaded") and "changed=dispatch" in m],
                 15, "config-reloaded changed=dispatch")
        assert "max_per_hour = 59" in pair.orchestratord("config", "show")
    finally:
        config.write_text(good)
    assert pair.main_pid() == pid


def test_a_sigkill_gets_the_daemon_restarted_and_it_reads_on(pair: Pair) -> None:
    sd = pair.sd
    before, pid = int(sd.show(UNIT, "NRestarts")["NRestarts"]), pair.main_pid()
    sd.check("systemctl", "kill", "-s", "KILL", "--kill-whom=main", UNIT)
    wait_for(lambda: int(sd.show(UNIT, "NRestarts")["NRestarts"]) > before and pair.active(), 60,
             "the unit restarted after SIGKILL")
    assert pair.main_pid() != pid
    wait_for(lambda: sd.show(UNIT, "StatusText")["StatusText"].startswith("ready: server up"), 30, "ready again")


def test_stop_is_clean(pair: Pair) -> None:
    sd = pair.sd
    sd.check("systemctl", "stop", UNIT)
    assert sd.show(UNIT, "ActiveState", "Result") == {"ActiveState": "inactive", "Result": "success"}
    assert any(m.startswith("stopped") for m in pair.messages())
    assert sd.show(SERVE, "ActiveState")["ActiveState"] == "active"  # the server is its own unit
