"""The shipped Prometheus alert rules: valid, and each alert fires when it should (promtool)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "packaging" / "prometheus" / "orchestratord-alerts.yml"
RULE_TESTS = ROOT / "packaging" / "prometheus" / "orchestratord-alerts.test.yml"
NAMES = {"OpencodeServerDown", "OrchestratordStreamDisconnected", "OrchestratordNoEvents", "OrchestratordEscalation",
         "OrchestratordPromptCapReached", "OrchestratordLedgerWriteErrors", "OrchestratordWorkerRestarting"}


def promtool() -> str:
    for candidate in (os.environ.get("PROMTOOL", ""), str(ROOT / "tests" / ".tools" / "promtool"),
                      shutil.which("promtool") or ""):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.skip("promtool not found: `make promtool` fetches it from Debian's prometheus package; "
                "none could be fetched here")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120, cwd=RULES.parent)


def test_rules_are_valid() -> None:
    proc = run("check", "rules", RULES.name)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(NAMES)} rules found" in proc.stdout


def test_every_alert_has_a_unit_test_and_they_pass() -> None:
    tested = {line.split(":", 1)[1].strip() for line in RULE_TESTS.read_text().splitlines()
              if line.strip().startswith("alertname:")}
    assert tested == NAMES
    proc = run("test", "rules", RULE_TESTS.name)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_the_rules_use_only_metrics_the_daemon_exports() -> None:
    pytest.importorskip("prometheus_client")
    from orchestratord import metrics
    metrics.reset_for_tests()
    metrics.enable()
    exported = metrics.exposition().decode()
    metrics.reset_for_tests()
    used = set(re.findall(r"\b(orchestratord_[a-z_]+)", RULES.read_text()))
    missing = {name for name in used if f"# TYPE {name.removesuffix('_total')} " not in exported
               and f"# TYPE {name} " not in exported}
    assert not missing, f"alert rules use metrics the daemon does not export: {sorted(missing)}"
