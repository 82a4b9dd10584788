"""Config parsing and validation: pure logic, plus the shipped example and the CLI."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from orchestratord.config import (DEFAULT_TRIGGERS, Config, ConfigError, dump_config, load_config, locate_keys,
                                  parse_config, summarize)

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
    for section, (cls, checks) in __import__("orchestratord.config", fromlist=["SCHEMA"]).SCHEMA.items():
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
    assert not cfg.server.password_file.startswith("~")


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
    assert again == cfg
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


def test_check_config_cli(tmp_path: Path) -> None:
    ok = run_cli("check-config", "--config", str(EXAMPLE))
    assert ok.returncode == 0 and "ok" in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[dispatch]\nmax_per_hour = 0\n[server]\nurll = 1\n")
    out = run_cli("check-config", "--config", str(bad))
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert f"{bad}:2: dispatch.max_per_hour: must be at least 1" in lines
    assert f"{bad}:4: server.urll: unknown key; did you mean 'url'?" in lines
    missing = run_cli("check-config", "--config", str(tmp_path / "nope.toml"))
    assert missing.returncode == 1 and "no such file" in missing.stderr
