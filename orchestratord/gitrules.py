"""Git commands that lose work, in two tiers: refused (force-push) and held for a person (git-discard).

What others share is refused: a force push or branch deletion on a shared branch (or on
a branch the command does not name), history rewrites, ``reset --hard`` to a remote
branch, ``update-ref -d``. What loses only the session's own uncommitted or unpushed
work is held: ``reset --hard``, ``clean -f``, ``checkout .``/``restore .``, dropping
stashes, force-deleting a branch, expiring the reflog, force-pushing a branch of one's
own. Reading state never matches: status, diff, log, a plain push, ``clean -n``,
``restore`` of one file, ``branch -d`` of a merged branch.
"""

from __future__ import annotations

import re
from typing import Callable, Iterator, Sequence

from .commands import Reading, options

REJECT, HOLD = "reject", "hold"
SHARED = re.compile(r"(refs/heads/)?(main|master|trunk|develop|development|staging|stable|production|prod[\w.-]*"
                    r"|release([/_.-][\w./-]*)?)", re.I)
REMOTE_REF = re.compile(r"(origin|upstream)/.+|@\{(u|upstream|push)\}|.*@\{(u|upstream|push)\}")
GLOBAL_TAKES = {"-C", "-c", "--git-dir", "--work-tree", "--namespace", "--exec-path", "--super-prefix",
                "--config-env", "--list-cmds"}
EVERYTHING = {".", "./", "*", ":/", ":/*", ":(top)", ":(top).", ":(top)*", ":/.", "-A"}

Verdict = tuple[str, str]  # (tier, what was seen)


def verdicts(r: Reading) -> Iterator[Verdict]:
    for call in r.calls({"git"}):
        v = judge(call.args)
        if v is not None:
            yield v


def check_force_push(r: Reading) -> str | None:
    return next((what for tier, what in verdicts(r) if tier == REJECT), None)


def check_git_discard(r: Reading) -> str | None:
    return next((what for tier, what in verdicts(r) if tier == HOLD), None)


def judge(args: Sequence[str]) -> Verdict | None:
    """The tier of one git command line (its arguments after ``git``), or None when it loses nothing."""
    i = 0
    while i < len(args) and args[i].startswith("-"):
        if args[i] in ("--help", "-h", "--version"):
            return None
        i += 2 if args[i] in GLOBAL_TAKES else 1
    if i >= len(args):
        return None
    sub, rest = args[i], list(args[i + 1:])
    flags, operands = options(rest)
    if "--help" in flags or "h" in flags and sub != "branch":
        return None
    check = SUBCOMMANDS.get(sub)
    return check(flags, operands, f"git {sub} {' '.join(rest)}".strip()) if check else None


def _push(flags: set[str], operands: list[str], what: str) -> Verdict | None:
    force = bool({"f", "--force", "--force-with-lease", "--force-if-includes"} & flags)
    delete = bool({"d", "--delete"} & flags)
    specs = operands[1:]
    marked = [s for s in specs if s.startswith(("+", ":"))]
    if "--mirror" in flags:
        return REJECT, what
    if not (force or delete or marked):
        return None
    targets = specs if force or delete else marked
    if not targets or {"--all", "--branches", "--tags"} & flags:
        return REJECT, what  # which branch is rewritten is not said: the current one may be shared
    for spec in targets:
        dst = spec.lstrip("+")
        dst = dst.split(":", 1)[1] if ":" in dst else dst
        if dst in ("", "HEAD", "@") or SHARED.fullmatch(dst):
            return REJECT, what
    return HOLD, what


def _reset(flags: set[str], operands: list[str], what: str) -> Verdict | None:
    if "--hard" not in flags:
        return None
    return (REJECT if any(REMOTE_REF.fullmatch(o) for o in operands) else HOLD), what


def _clean(flags: set[str], operands: list[str], what: str) -> Verdict | None:
    if {"f", "--force"} & flags and not {"n", "--dry-run"} & flags:
        return HOLD, what
    return None


def _checkout(flags: set[str], operands: list[str], what: str) -> Verdict | None:
    if {"b", "B", "--orphan"} & flags:
        return None
    if {"f", "--force"} & flags or EVERYTHING & set(operands):
        return HOLD, what
    return None


def _restore(flags: set[str], operands: list[str], what: str) -> Verdict | None:
    worktree = bool({"W", "--worktree"} & flags) or not {"S", "--staged"} & flags
    return (HOLD, what) if worktree and EVERYTHING & set(operands) else None


def _switch(flags: set[str], operands: list[str], what: str) -> Verdict | None:
    return (HOLD, what) if {"f", "--force", "--discard-changes"} & flags else None


def _stash(flags: set[str], operands: list[str], what: str) -> Verdict | None:
    return (HOLD, what) if operands[:1] in (["drop"], ["clear"]) else None


def _branch(flags: set[str], operands: list[str], what: str) -> Verdict | None:
    if ({"D"} & flags or "--delete" in flags) and any(SHARED.fullmatch(o) for o in operands):
        return REJECT, what
    forced = "D" in flags or ({"d", "--delete"} & flags and {"f", "--force"} & flags)
    return (HOLD, what) if forced else None


def _reflog(flags: set[str], operands: list[str], what: str) -> Verdict | None:
    return (HOLD, what) if operands[:1] in (["expire"], ["delete"]) else None


def _update_ref(flags: set[str], operands: list[str], what: str) -> Verdict | None:
    return (REJECT, what) if {"d", "--delete"} & flags else None


def _rewrite(flags: set[str], operands: list[str], what: str) -> Verdict | None:
    return REJECT, what


SUBCOMMANDS: dict[str, Callable[[set[str], list[str], str], Verdict | None]] = {
    "push": _push, "reset": _reset, "clean": _clean, "checkout": _checkout, "restore": _restore, "switch": _switch,
    "stash": _stash, "branch": _branch, "reflog": _reflog, "update-ref": _update_ref, "filter-branch": _rewrite,
    "filter-repo": _rewrite,
}
