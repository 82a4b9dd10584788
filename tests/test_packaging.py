"""What ships in packaging/ and what `make install` / `make uninstall` do, without a running systemd.

The units themselves run under a real systemd in test_systemd.py; here they are checked
with systemd's offline tools, and the launchd plist with plistlib.
"""

from __future__ import annotations

import plistlib
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import tomli_w

from orchestratord.cli import build_parser
from orchestratord.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SYSTEMD = ROOT / "packaging" / "systemd"
PLIST = ROOT / "packaging" / "launchd" / "org.opencode-orchestrator.orchestratord.plist"
INSTALL_PYTHON = "/usr/bin/python3"  # what make install runs the command with, by default
pytestmark = pytest.mark.xdist_group("make-install")  # make install builds in the checkout: one at a time

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")


def unit_keys(path: Path) -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            keys.setdefault(key, []).append(value)
    return keys


@needs_analyze
@pytest.mark.parametrize("unit", ["opencode-orchestrator.service", "opencode-orchestrator@.service"])
def test_the_orchestrator_units_are_exposure_2_or_lower(unit: Path) -> None:
    out = subprocess.run(["systemd-analyze", "security", "--offline=true", str(SYSTEMD / unit)],
                         capture_output=True, text=True, timeout=60)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out.stdout)
    assert found, out.stdout + out.stderr
    assert float(found.group(1)) <= 2.0, out.stdout


def test_the_main_unit_is_notify_with_a_checked_reload_and_a_watchdog() -> None:
    keys = unit_keys(SYSTEMD / "opencode-orchestrator.service")
    assert keys["Type"] == ["notify"]
    assert keys["ExecReload"][0].endswith("check-config --config /etc/opencode-orchestrator/orchestrator.toml")
    assert keys["ExecReload"][1] == "/bin/kill -HUP $MAINPID"
    assert keys["Restart"] == ["on-failure"] and int(keys["WatchdogSec"][0]) > 0
    assert "AF_UNIX" in keys["RestrictAddressFamilies"][0]
    args = build_parser().parse_args(keys["ExecStart"][0].split()[1:])
    assert (args.command, args.config, args.daemon) == ("run", "/etc/opencode-orchestrator/orchestrator.toml", False)


def test_the_template_differs_from_the_main_unit_only_per_instance() -> None:
    main = (SYSTEMD / "opencode-orchestrator.service").read_text().splitlines()
    template = (SYSTEMD / "opencode-orchestrator@.service").read_text().splitlines()

    def settings(lines: list[str]) -> list[str]:
        return [line for line in lines if line and not line.startswith("#")]

    per_instance = [(a, b) for a, b in zip(settings(main), settings(template), strict=False) if a != b]
    assert len(settings(main)) == len(settings(template))
    for a, b in per_instance:
        assert "%i" in b or a.startswith(("Wants=", "After=")), (a, b)
    assert "StateDirectory=opencode-orchestrator/%i" in template
    assert any("/etc/opencode-orchestrator/%i.toml" in line for line in template)


def test_the_launchd_plist() -> None:
    with open(PLIST, "rb") as fh:
        plist = plistlib.load(fh)
    assert plist["Label"] == PLIST.stem
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}  # restart after a crash, not after a clean stop
    assert 1 <= plist["ThrottleInterval"] <= 60
    program = plist["ProgramArguments"]
    assert Path(program[0]).is_absolute() and program[0].endswith("/orchestratord")
    args = build_parser().parse_args(program[1:])
    assert args.command == "run" and not args.daemon and Path(args.config).is_absolute()
    for key in ("StandardOutPath", "StandardErrorPath"):
        assert Path(plist[key]).is_absolute()
    assert plist["Umask"] == 0o027
    assert plist["UserName"] == "opencode-orchestrator"  # not root


def run_make(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["make", "-s", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=600,
                          env=env)


def installed(dest: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The installed command, with nothing of this test's environment: the package from DESTDIR
    (it looks in PKGLIBDIR once installed for real), its dependencies from the install."""
    return subprocess.run([str(dest / "usr/bin/orchestratord"), *args], capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": f"{dest}/usr/lib/opencode-orchestrator", "PATH": "/usr/bin:/bin"})


def test_make_install_and_uninstall_with_destdir_and_prefix(tmp_path: Path) -> None:
    dest = tmp_path / "root"
    r = run_make("install", f"DESTDIR={dest}", "PREFIX=/usr", "SYSCONFDIR=/etc/opt", "LAUNCHD=no")
    assert r.returncode == 0, r.stdout + r.stderr
    installed_files = {str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()}
    for path in ("usr/bin/orchestratord", "usr/lib/systemd/system/opencode-orchestrator.service",
                 "usr/lib/systemd/system/opencode-orchestrator@.service", "usr/lib/systemd/system/opencode-serve.service",
                 "usr/lib/systemd/user/opencode-orchestrator.service", "usr/lib/sysusers.d/opencode-orchestrator.conf",
                 "usr/lib/tmpfiles.d/opencode-orchestrator.conf", "etc/opt/opencode-orchestrator/orchestrator.toml",
                 "usr/share/doc/opencode-orchestrator/teams-in-home.conf",
                 "usr/share/doc/opencode-orchestrator/README.md",
                 "usr/lib/opencode-orchestrator/orchestratord/cli.py",
                 "usr/lib/opencode-orchestrator/requests/__init__.py"):
        assert path in installed_files, path
    docs = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert docs and all(f"usr/share/doc/opencode-orchestrator/docs/{name}" in installed_files for name in docs), docs
    pages = [(str(unit.relative_to(dest)), url) for unit in dest.glob("usr/lib/systemd/*/*.service")
             for line in unit_keys(unit).get("Documentation", []) for url in line.split()]
    assert len({name for name, _ in pages}) >= 4, pages
    for name, url in pages:  # every Documentation= page is there once installed
        assert url.startswith("file:///") and (dest / url[len("file:///"):]).is_file(), (name, url)
    unit = (dest / "usr/lib/systemd/system/opencode-orchestrator.service").read_text()
    assert "ExecStart=/usr/bin/orchestratord run --config /etc/opt/opencode-orchestrator/orchestrator.toml" in unit
    assert "ExecReload=/usr/bin/orchestratord check-config --config /etc/opt/opencode-orchestrator/orchestrator.toml" in unit
    assert "/usr/local" not in unit and "/etc/opencode-orchestrator/orchestrator.toml" not in unit
    assert "EnvironmentFile=-/etc/opt/opencode-orchestrator/opencode-serve.env" in (
        dest / "usr/lib/systemd/system/opencode-serve.service").read_text()
    assert "d /etc/opt/opencode-orchestrator " in (dest / "usr/lib/tmpfiles.d/opencode-orchestrator.conf").read_text()
    assert (dest / "usr/bin/orchestratord").read_text().startswith("#!/usr/bin/python3")
    config = dest / "etc/opt/opencode-orchestrator/orchestrator.toml"
    load_config(config)  # the example config is valid as installed
    assert not [p for p in (dest / "usr/lib/opencode-orchestrator").iterdir()
                if p.name.split("-")[0] in ("pytest", "hypothesis", "mcp", "prometheus_client", "_pytest")]

    out = installed(dest, "--version")
    assert out.returncode == 0 and out.stdout.startswith("orchestratord "), out.stderr
    here = config.with_name("here.toml")
    (tmp_path / "teams").mkdir()
    here.write_text(config.read_text().replace("/var/lib/opencode-serve/.claude", str(tmp_path / "teams"))
                    .replace("/var/lib/opencode-orchestrator", str(tmp_path / "state")))
    out = installed(dest, "check-config", "--config", str(here))
    assert out.returncode == 0 and ": ok" in out.stdout, out.stderr

    # A second install keeps a config someone edited.
    config.write_text(config.read_text() + "\n# edited here\n")
    r = run_make("install", f"DESTDIR={dest}", "PREFIX=/usr", "SYSCONFDIR=/etc/opt", "LAUNCHD=no")
    assert r.returncode == 0 and "kept the existing" in r.stdout, r.stdout + r.stderr
    assert config.read_text().endswith("# edited here\n")

    ledger = dest / "var/lib/opencode-orchestrator/ledger.sqlite3"
    ledger.parent.mkdir(parents=True)
    ledger.write_text("not really a ledger")
    r = run_make("uninstall", f"DESTDIR={dest}", "PREFIX=/usr", "SYSCONFDIR=/etc/opt", "LAUNCHD=no")
    assert r.returncode == 0, r.stdout + r.stderr
    left = {str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()}
    assert left == {"etc/opt/opencode-orchestrator/orchestrator.toml", "etc/opt/opencode-orchestrator/here.toml",
                    "var/lib/opencode-orchestrator/ledger.sqlite3"}


# What `make install` may run: a shell, make and the tools of its recipe. No node, no npm.
TOOLS = ("make", "sh", "bash", "sed", "install", "chmod", "rm", "printf", "cat", "id", "uname", "mkdir", "touch",
         "env", "cp", "ln", "mv", "ls", "dirname", "basename", "getconf", "test", "[", "true", "false", "chown")


def test_make_install_needs_no_node_and_adds_the_metrics_extra(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    path = str(bin_dir)
    assert shutil.which("node", path=path) is None and shutil.which("npm", path=path) is None
    dest = tmp_path / "root"
    r = run_make("install", f"DESTDIR={dest}", "PREFIX=/usr", "EXTRAS=metrics", "LAUNCHD=no",
                 f"PYTHON={INSTALL_PYTHON}", f"BUILD_VENV={tmp_path / 'venv'}",
                 env={"PATH": path, "HOME": str(Path.home()), "LANG": "C.UTF-8"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "venv" / "pyvenv.cfg").exists()  # the build's own plain virtualenv
    tree = dest / "usr/lib/opencode-orchestrator"
    assert (tree / "prometheus_client").is_dir()
    assert not [p for p in tree.iterdir() if p.name.split("-")[0] in ("pytest", "hypothesis", "mcp", "_pytest")]
    out = installed(dest, "--version")
    assert out.returncode == 0 and out.stdout.startswith("orchestratord "), out.stderr
    imported = subprocess.run([INSTALL_PYTHON, "-s", "-c", "import prometheus_client, orchestratord.metrics as m; "
                               "print(m.available())"], capture_output=True, text=True, timeout=60,
                              env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"})
    assert imported.returncode == 0 and imported.stdout.strip() == "True", imported.stderr


def test_make_install_for_launchd_follows_prefix_and_sysconfdir(tmp_path: Path) -> None:
    dest = tmp_path / "root"
    r = run_make("install", f"DESTDIR={dest}", "PREFIX=/opt/oc", "LAUNCHD=yes", "LAUNCHD_USER=_orchestratord")
    assert r.returncode == 0, r.stdout + r.stderr
    with open(dest / "opt/oc/share/doc/opencode-orchestrator/org.opencode-orchestrator.orchestratord.plist", "rb") as fh:
        plist = plistlib.load(fh)
    assert plist["UserName"] == "_orchestratord"
    assert plist["ProgramArguments"][0] == "/opt/oc/bin/orchestratord"
    assert plist["ProgramArguments"][-1] == "/opt/oc/etc/opencode-orchestrator/orchestrator.toml"
    log = Path(plist["StandardOutPath"])
    assert log.parent == Path("/opt/oc/var/log/opencode-orchestrator") and (dest / str(log.parent).lstrip("/")).is_dir()
    config = dest / "opt/oc/etc/opencode-orchestrator/orchestrator.toml"
    assert load_config(config).ledger.path == "/opt/oc/var/lib/opencode-orchestrator/ledger.sqlite3"
    assert (dest / "opt/oc/var/lib/opencode-orchestrator").is_dir()


def test_init_config_writes_a_valid_config_and_never_overwrites(tmp_path: Path) -> None:
    from orchestratord.cli import main

    path = tmp_path / "etc" / "orchestrator.toml"
    assert main(["init-config", "--config", str(path), "--server-url", "http://127.0.0.1:4100",
                 "--team", "alpha", "--team", "beta", "--teams-dir", "/home/alice/.claude"]) == 0
    cfg = load_config(path)
    assert cfg.server.url == "http://127.0.0.1:4100" and cfg.teams.names == ("alpha", "beta")
    assert cfg.teams.base_dir == "/home/alice/.claude"
    before = path.read_text()
    assert main(["init-config", "--config", str(path), "--server-url", "http://127.0.0.1:9999"]) == 1
    assert path.read_text() == before
    assert main(["init-config", "--config", str(path), "--force", "--ledger", str(tmp_path / "l.sqlite3")]) == 0
    assert load_config(path).ledger.path == str(tmp_path / "l.sqlite3")
    # Without --teams-dir: the teams of the shipped opencode-serve.service, or with --user a person's own.
    assert main(["init-config", "--config", str(tmp_path / "sys.toml")]) == 0
    assert load_config(tmp_path / "sys.toml").teams.base_dir == "/var/lib/opencode-serve/.claude"
    assert main(["init-config", "--user", "--config", str(tmp_path / "user.toml")]) == 0
    assert load_config(tmp_path / "user.toml").teams.base_dir == str(Path.home() / ".claude")
    assert main(["init-config", "--config", str(tmp_path / "bad.toml"), "--server-url", "ftp://x"]) == 1
    assert not (tmp_path / "bad.toml").exists()
    assert sorted(p.name for p in path.parent.iterdir()) == ["orchestrator.toml"]  # no temporary file left


def test_config_show_prints_every_key_with_its_default(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from orchestratord.cli import main

    path = tmp_path / "o.toml"
    path.write_text('[server]\nurl = "http://127.0.0.1:4200"\n')
    assert main(["config", "show", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert 'url = "http://127.0.0.1:4200"' in out and "debounce_seconds = 0.5" in out
    shown = tmp_path / "shown.toml"
    shown.write_text(out)
    assert load_config(shown).server.url == "http://127.0.0.1:4200"  # what it prints is a valid config


def test_config_show_prints_the_safety_rules_in_effect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from orchestratord.cli import main
    from orchestratord.policy import DEFAULT_RULES, build_rules

    path = tmp_path / "o.toml"
    path.write_text('[[safety.rules]]\nname = "fork-bomb"\nenabled = false\n'
                    '[[safety.rules]]\nname = "prod"\npattern = "kubectl delete .*prod"\nseverity = "high"\n')
    assert main(["config", "show", "--config", str(path)]) == 0
    shown = tomllib.loads(capsys.readouterr().out)["safety"]["rules"]
    by_name = {r["name"]: r for r in shown}
    assert [r["name"] for r in shown] == [r.name for r in DEFAULT_RULES] + ["prod"]
    assert by_name["git-discard"]["actions"] == ["escalate", "hold", "tell"] and by_name["fork-bomb"]["enabled"] is False
    assert by_name["prod"]["pattern"] == "kubectl delete .*prod" and by_name["prod"]["severity"] == "high"
    again = tmp_path / "again.toml"
    again.write_text(tomli_w.dumps({"safety": {"rules": shown}}))
    before = build_rules(load_config(path).safety.rules)
    after = build_rules(load_config(again).safety.rules)
    assert [(r.name, r.applies_to, r.severity, r.actions, r.enabled, r.pattern and r.pattern.pattern) for r in before] \
        == [(r.name, r.applies_to, r.severity, r.actions, r.enabled, r.pattern and r.pattern.pattern) for r in after]
