"""Every command of the corpus gets its class: blocked by the named rule, held, or let through."""

from __future__ import annotations

from collections import Counter

from orchestratord.policy import COMMAND, DEFAULT_RULES, Finding, evaluate
from tests.corpus_commands import ALLOW, BLOCK, CASES, CONTEXT, HOLD, MENTION, Case

TIERS = {r.name: r.tier for r in DEFAULT_RULES}


def verdict(case: Case, found: list[Finding]) -> str | None:
    """What is wrong with ``found`` for ``case``; None when it is right."""
    rules = [f.rule for f in found]
    critical = [r for r in rules if TIERS.get(r) == "reject"]
    if case.expect == BLOCK:
        return None if case.rule in critical else f"expected {case.rule} (reject tier)"
    if case.expect == HOLD:
        if critical:
            return "expected held, not refused"
        return None if case.rule in rules else "expected held by git-discard"
    return None if not rules else "expected nothing to match"


def test_the_corpus_is_large_and_covers_every_class() -> None:
    counts = Counter(c.expect for c in CASES)
    assert len(CASES) >= 300
    assert all(counts[k] >= 40 for k in (BLOCK, HOLD, ALLOW, MENTION)), counts
    assert len({c.command for c in CASES}) == len(CASES), "a command is listed twice"
    assert {c.rule for c in CASES if c.expect == BLOCK} == {r.name for r in DEFAULT_RULES if r.tier == "reject"
                                                            and COMMAND in r.applies_to}


def test_every_command_is_classified_as_the_corpus_says() -> None:
    wrong = []
    for case in CASES:
        found = evaluate(case.command, COMMAND, context=CONTEXT)
        problem = verdict(case, found)
        if problem:
            got = ", ".join(f"{f.rule}: {f.what}" for f in found) or "nothing"
            wrong.append(f"[{case.expect}/{case.topic}] {case.command!r}: {problem}; got {got}")
    assert not wrong, f"{len(wrong)} of {len(CASES)} misclassified:\n" + "\n".join(wrong)


def test_a_mention_is_judged_when_piped_into_a_shell() -> None:
    for case in CASES:
        if case.expect == MENTION and case.command.startswith("echo '") and case.command.count("'") == 2:
            piped = case.command + " | sh"
            assert evaluate(piped, COMMAND, context=CONTEXT), f"{piped!r} runs what it echoes"


def test_allowed_commands_stay_allowed_without_a_context() -> None:
    """The guard may know no project directory: everyday commands still pass (except bare globs)."""
    noisy = [c.command for c in CASES if c.expect == ALLOW and "*" not in c.command and "cd " not in c.command
             and evaluate(c.command, COMMAND)]
    assert not noisy
