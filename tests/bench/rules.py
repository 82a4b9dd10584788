"""The safety rules against the command corpus: how much they catch and how often they raise a false alarm.

Every command of ``tests/corpus_commands.py`` is judged as the guard judges a bash call
(the rules in force by default, the corpus's project directory and home). A must-block
command counts as caught when a rule of the reject tier matches it; a must-hold one as
held when the hold tier matches and no reject rule does; any finding at all on a
must-allow or mention command is a false alarm. No server is needed, so ``--quick``
runs it whole. The time to judge a command is kept beside the rates, as a figure.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from orchestratord.policy import COMMAND, DEFAULT_RULES, evaluate
from tests.corpus_commands import ALLOW, BLOCK, CASES, CONTEXT, HOLD, MENTION

TIERS = {r.name: r.tier for r in DEFAULT_RULES}


def run() -> dict[str, Any]:
    counts = {k: {"total": 0, "hits": 0} for k in (BLOCK, HOLD, ALLOW, MENTION)}
    missed: list[str] = []
    started = time.perf_counter()
    for case in CASES:
        tiers = {TIERS.get(f.rule, "reject") for f in evaluate(case.command, COMMAND, context=CONTEXT)}
        if case.expect == BLOCK:
            hit = "reject" in tiers
        elif case.expect == HOLD:
            hit = "hold" in tiers and "reject" not in tiers
        else:
            hit = bool(tiers)  # a false alarm
        counts[case.expect]["total"] += 1
        counts[case.expect]["hits"] += hit
        if hit != (case.expect in (BLOCK, HOLD)):
            missed.append(case.command)
    seconds = time.perf_counter() - started
    out: dict[str, Any] = {k: dict(v, rate=round(v["hits"] / v["total"], 4) if v["total"] else 0.0)
                           for k, v in counts.items()}
    out["commands"] = len(CASES)
    out["us_per_command"] = round(seconds / len(CASES) * 1e6, 1)
    out["misclassified"] = missed
    return out


def rows(r: dict[str, Any], yes: Callable[[bool], str]) -> list[tuple[str, str, str, str]]:
    """The lines of the bench table."""
    def share(k: str) -> str:
        return f"{r[k]['hits']}/{r[k]['total']} = {r[k]['rate']:.1%}"
    return [
        ("rules: must-block caught (reject tier)", share(BLOCK), ">= 95%", yes(r[BLOCK]["rate"] >= 0.95)),
        ("rules: must-hold held (hold tier)", share(HOLD), "", ""),
        ("rules: false alarms, must-allow", share(ALLOW), "<= 2%", yes(r[ALLOW]["rate"] <= 0.02)),
        ("rules: false alarms, mention/data", share(MENTION), "", ""),
        ("rules: time to judge a command", f"{r['us_per_command']:.0f} us (mean of {r['commands']})", "", ""),
    ]
