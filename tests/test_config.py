"""Config parsing and validation: pure logic, plus the shipped example and the CLI."""

from __future__ import annotations

import socket
import subprocess
import sys
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest

from orchestratord.cli import main
from orchestratord.config import (
    DEFAULT_TRIGGERS,
    Config,
    ConfigError,
    dump_config,
    effective_rules,
    load_config,
    locate_keys,
    parse_config,
    summarize,
)
from tests.support.privileges import needs_root, open_dir  # noqa: F401 - open_dir is a fixture

EXAMPLE = Path(__file__).resolve().parent.parent / "etc" / "opencode-orchestrator" / "orchestrator.toml"


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "cfg.toml", "/etc/x")
    return info.value.problems


def test_empty_file_gives_defaults() -> None:
    cfg = parse_config("", "cfg.toml", "/etc/x")
    assert cfg == Config(teams=cfg.teams)  # only base_dir is resolved
    assert cfg.teams.base_dir.endswith(".claude") and not cfg.teams.base_dir.startswith("~")
    assert [r.name for r in cfg.triggers] == ["teammate-message", "teammate-error", "teammate-idle"]


def test_example_config_is_valid_and_documents_every_key() -> None:
    cfg = load_config(EXAMPLE)
    assert cfg.server.url == "http://127.0.0.1:4096"
    text = EXAMPLE.read_text()
    for section, (_cls, checks) in __import__("orchestratord.config", fromlist=["SCHEMA"]).SCHEMA.items():
        for key in checks:
            assert f"{key} =" in text or f"# {key} =" in text, f"{section}.{key} missing from the example"


def test_unknown_keys_are_errors_with_suggestion_and_line() -> None:
    text = "[server]\nurl = \"http://h:1\"\n\n[dispatch]\ndebounce_secs = 1\n\n[bogus]\nx = 1\n"
    found = problems(text)
    assert "cfg.toml:5: dispatch.debounce_secs: unknown key; did you mean 'debounce_seconds'?" in found
    assert any(p.startswith("cfg.toml:7: bogus: unknown key") for p in found)


def test_every_error_is_reported_at_once() -> None:
    text = """
[server]
url = "localhost:4096"
timeout_seconds = -1

[health]
interval_seconds = "fast"

[events]
stream = "both"

[dispatch]
max_per_hour = 0
prompt = "hello {team}"

[log]
level = "loud"
"""
    found = problems(text)
    assert len(found) == 7, found
    assert found[0].startswith("cfg.toml:3: server.url: must be an http:// or https:// URL")
    assert any(p.startswith("cfg.toml:4: server.timeout_seconds: must be greater than 0") for p in found)
    assert any(p.startswith("cfg.toml:7: health.interval_seconds: must be a number of seconds") for p in found)
    assert any(p.startswith("cfg.toml:10: events.stream: must be one of 'global', 'instance'") for p in found)
    assert any(p.startswith("cfg.toml:13: dispatch.max_per_hour: must be at least 1") for p in found)
    assert any("cfg.toml:14: dispatch.prompt: uses unknown placeholder {team}" in p for p in found)
    assert any(p.startswith("cfg.toml:17: log.level:") for p in found)


def test_invalid_toml_names_the_line() -> None:
    found = problems("[server]\nurl = \n")
    assert len(found) == 1 and found[0].startswith("cfg.toml:2: not valid TOML")


def test_fractions_and_paths() -> None:
    cfg = parse_config('[dispatch]\ndebounce_seconds = 0.25\n[ledger]\npath = "state/l.db"\n'
                       '[server]\npassword_file = "~/pw"\n', "c", "/etc/orch")
    assert cfg.dispatch.debounce_seconds == 0.25
    assert cfg.ledger.path == "/etc/orch/state/l.db"
    assert cfg.server.password_file is not None and not cfg.server.password_file.startswith("~")


def test_password_is_not_a_config_key() -> None:
    found = problems('[server]\npassword = "hunter2"\n')
    assert found == ["cfg.toml:2: server.password: unknown key; did you mean 'password_file'?"]


def test_trigger_rules_change_defaults_and_add_new_ones() -> None:
    cfg = parse_config("""
[[triggers]]
name = "teammate-idle"
enabled = false

[[triggers]]
name = "permission"
event = "permission.*"
sessions = "any"
match = { "permission" = ["bash", "edit"], part = { type = "tool" } }
""", "c", "/")
    rules = {r.name: r for r in cfg.triggers}
    assert rules["teammate-idle"].enabled is False
    assert rules["teammate-idle"].event == "session.idle"
    assert rules["teammate-message"] == DEFAULT_TRIGGERS[0]
    assert rules["permission"].match == {"permission": ("bash", "edit"), "part.type": "tool"}
    assert rules["permission"].sessions == "any"


def test_trigger_rule_errors() -> None:
    found = problems("""
[[triggers]]
name = "new-one"

[[triggers]]
event = "x"

[[triggers]]
name = "teammate-error"
sesions = "own"

[[triggers]]
name = "z"
event = "y"
match = { a = { b = [] } }
""")
    assert any(p.startswith("cfg.toml:2: triggers.0: new rule 'new-one' needs an event type") for p in found)
    assert any(p.startswith("cfg.toml:5: triggers.1: needs a name") for p in found)
    assert any(p.startswith("cfg.toml:10: triggers.2.sesions: unknown key; did you mean 'sessions'?") for p in found)
    assert any("triggers.3.match.a.b: must be a string" in p for p in found)


def test_dump_round_trips() -> None:
    cfg = parse_config('[teams]\nnames = ["a", "b"]\n[[triggers]]\nname = "x"\nevent = "session.*"\n', "c", "/")
    again = parse_config(dump_config(cfg), "c", "/")
    # The rules come back spelled out (every built-in one as in effect), the same rules.
    assert replace(again, safety=replace(again.safety, rules=())) == cfg
    assert effective_rules(again.safety.rules) == effective_rules(cfg.safety.rules)
    assert tomllib.loads(dump_config(cfg))["teams"]["names"] == ["a", "b"]


def test_summary_mentions_what_matters() -> None:
    cfg = parse_config('[teams]\nnames = ["alpha"]\n', "c", "/")
    text = summarize(cfg)
    assert "http://127.0.0.1:4096" in text and "alpha" in text and "teammate-message" in text


def test_locate_keys_handles_arrays_and_multiline_strings() -> None:
    where = locate_keys('a = 1\n[dispatch]\nprompt = """\nx = 2\n"""\nmax_per_hour = 3\n[[triggers]]\nname = "n"\n')
    assert where["a"] == 1 and where["dispatch.prompt"] == 3 and where["dispatch.max_per_hour"] == 6
    assert "dispatch.x" not in where and where["triggers.0.name"] == 8


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestratord", *args], capture_output=True, text=True, timeout=60)


def on_this_machine(tmp_path: Path) -> Path:
    """The shipped example, its teams and ledger moved to directories of this test."""
    (tmp_path / "teams").mkdir(exist_ok=True)
    text = EXAMPLE.read_text().replace('base_dir = "/var/lib/opencode-serve/.claude"', f'base_dir = "{tmp_path / "teams"}"')
    text = text.replace('path = "/var/lib/opencode-orchestrator/ledger.sqlite3"', f'path = "{tmp_path / "l.sqlite3"}"')
    config = tmp_path / "example.toml"
    config.write_text(text)
    return config


def test_check_config_cli(tmp_path: Path) -> None:
    ok = run_cli("check-config", "--config", str(on_this_machine(tmp_path)))
    assert ok.returncode == 0 and "ok" in ok.stdout, ok.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[dispatch]\nmax_per_hour = 0\n[server]\nurll = 1\n")
    out = run_cli("check-config", "--config", str(bad))
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert f"{bad}:2: dispatch.max_per_hour: must be at least 1" in lines
    assert f"{bad}:4: server.urll: unknown key; did you mean 'url'?" in lines
    missing = run_cli("check-config", "--config", str(tmp_path / "nope.toml"))
    assert missing.returncode == 1 and "no such file" in missing.stderr


def test_check_config_finds_what_the_start_would_refuse_all_in_one_round(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f"""
[server]
password_file = "{tmp_path / 'no-password'}"
[ledger]
path = "{tmp_path / 'not-a-dir' / 'ledger.sqlite3'}"
[teams]
base_dir = "{tmp_path / 'no-teams'}"
[health]
interval_seconds = 0.1
timeout_seconds = 20
[dispatch]
max_per_hour = 0
""")
    (tmp_path / "not-a-dir").write_text("a file where the ledger's directory should be")
    out = run_cli("check-config", "--config", str(config))
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    keys = [line.split(": ")[1] for line in lines]
    assert sorted(keys) == ["dispatch.max_per_hour", "health.timeout_seconds", "ledger.path", "server.password_file",
                            "teams.base_dir"], lines
    assert any(f"{config}:3: server.password_file: cannot read {tmp_path / 'no-password'}" in line for line in lines)
    assert any(f"{config}:7: teams.base_dir: {tmp_path / 'no-teams'} does not exist" in line for line in lines)
    assert any(f"{config}:5: ledger.path: the directory" in line and "not writable" in line for line in lines)


@needs_root
def test_check_config_checks_as_the_user_that_runs_it(open_dir: Path) -> None:
    from tests.support.privileges import as_nobody

    teams, state = open_dir / "teams", open_dir / "state"
    teams.mkdir()
    state.mkdir()  # root's, as a StateDirectory= looks to any other user
    password = open_dir / "password"
    password.write_text("secret\n")
    password.chmod(0o600)
    config = open_dir / "c.toml"
    config.write_text(f'[server]\npassword_file = "{password}"\n[ledger]\npath = "{state / "l.sqlite3"}"\n'
                      f'[teams]\nbase_dir = "{teams}"\n')
    config.chmod(0o644)
    assert main(["check-config", "--config", str(config)]) == 0  # as root
    code, out, err = as_nobody(["check-config", "--config", str(config)])
    keys = sorted(line.split(": ")[1] for line in err.strip().splitlines())
    assert code == 1 and keys == ["ledger.path", "server.password_file"], err
    teams.chmod(0o700)
    code, out, err = as_nobody(["check-config", "--config", str(config)])
    assert "teams.base_dir: " in err and "not readable by this user" in err


def test_a_metrics_port_in_use_is_an_error_unless_the_running_daemon_holds_it() -> None:
    from orchestratord.preflight import port_problems

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    listen = f"127.0.0.1:{holder.getsockname()[1]}"
    try:
        [(key, problem)] = port_problems(listen, None)
        assert key == "metrics.listen" and "in use" in problem
        assert port_problems(listen, {"pid": 1, "metrics_listen": listen}) == []
        assert port_problems(listen, {"pid": 1, "metrics_listen": "127.0.0.1:1"}) != []
    finally:
        holder.close()
    assert port_problems(listen, None) == []
