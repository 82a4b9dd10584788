"""Under CI=true a skip fails unless ORCHESTRATORD_ALLOW_SKIP names it: how names match."""

from __future__ import annotations

from tests.conftest import skip_allowed

ID = "tests/test_alerts.py::test_rules_pass_promtool[default]"


def test_an_allowance_names_a_test_by_id_name_bare_name_or_file() -> None:
    for entry in (ID, "test_rules_pass_promtool[default]", "test_rules_pass_promtool", "tests/test_alerts.py"):
        assert skip_allowed(ID, [entry]), entry


def test_no_allowance_or_another_one_allows_nothing() -> None:
    assert not skip_allowed(ID, [])
    assert not skip_allowed(ID, ["test_rules", "promtool", "tests/test_systemd.py"])
