"""The safety policy: does a shell command, a file path or a teammate message look dangerous?

Pure functions, no I/O. A command is read the way the shell reads it (:mod:`.commands`,
:mod:`.shell`): quoting, wrappers (``sudo``, ``env``, ``xargs``, ``timeout`` …), ``sh -c``,
heredocs fed to a shell and ``$(…)`` do not hide what runs, and the words a command only
carries as data (``echo``, ``grep``, a commit message, a heredoc fed to ``cat``) are not
taken for commands. A message is prose: a command quoted anywhere in it counts.

Each check is a named rule in one of three tiers: ``reject`` (a permission request it
matches is refused), ``hold`` (a person must decide; the request is left open) or
``escalate`` only. The config can switch a rule off, change it, or add regex rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from . import gitrules, shell
from .code import code_of
from .commands import (
    COMMAND,
    FETCHERS,
    INTERPRETERS,
    MESSAGE,
    PATH,
    SHELLS,
    TOOL,
    Call,
    Programs,
    Reading,
    options,
    read_command,
    read_prose,
    shell_script,
)
from .deletes import SCRATCH, SYSTEM_TOPS, SYSTEM_TREES, check_recursive_delete, is_home

__all__ = ["COMMAND", "MESSAGE", "PATH", "TOOL", "Context", "Finding", "Rule", "DEFAULT_RULES", "evaluate",
           "build_rules"]

NETWORK = FETCHERS | {"nc", "ncat", "netcat", "socat", "scp", "sftp", "rsync", "ssh", "ftp", "telnet", "aws", "gsutil",
                      "rclone", "mail", "sendmail"}


@dataclass(frozen=True)
class Context:
    """Where a command runs: what the guard knows of the session."""

    project: str | None = None  # the session's working directory (absolute)
    home: str | None = None  # the home directory of the server's user, if known


@dataclass(frozen=True)
class Finding:
    rule: str
    severity: str
    what: str  # the piece of input that matched, shortened


@dataclass(frozen=True)
class Rule:
    """A named check. Built-in rules carry a function; config rules carry a regex."""

    name: str
    applies_to: frozenset[str]
    severity: str = "critical"
    actions: tuple[str, ...] = ("escalate", "reject", "tell")
    description: str = ""
    check: Callable[[Reading], str | None] | None = field(default=None, compare=False)
    pattern: re.Pattern[str] | None = field(default=None, compare=False)
    enabled: bool = True

    @property
    def tier(self) -> str:
        """``reject``, ``hold`` or ``escalate``: what becomes of a permission request it matches."""
        return "reject" if "reject" in self.actions else "hold" if "hold" in self.actions else "escalate"


# -- built-in checks: each returns a short description of what it saw, or None ------------

DISK_TOOLS = Programs(r"mkfs(\.\w+)?|mke2fs|mkswap|wipefs|fdisk|sfdisk|cfdisk|gdisk|sgdisk|parted|blkdiscard|shred|dd")
_SAFE_DEVICES = re.compile(r"/dev/(null|zero|full|stdout|stderr|stdin|fd/|tty|pts/|random|urandom|shm/)")


def _device(path: str) -> bool:
    return path.startswith("/dev/") and not _SAFE_DEVICES.match(path)


def check_disk_wipe(r: Reading) -> str | None:
    for call in r.calls(DISK_TOOLS):
        flags, operands = options(call.args)
        if call.prog == "dd":
            target = next((a for a in call.args if a.startswith("of=") and _device(a[3:])), None)
            if target:
                return f"dd {target}"
        elif call.prog in ("fdisk", "sfdisk", "cfdisk", "gdisk", "sgdisk", "parted") and (
                {"l", "p", "--list", "--print"} & flags or "print" in operands or not operands):
            continue  # listing partitions
        elif operands or call.prog.startswith("mkfs"):
            return f"{call.prog} {' '.join(call.args[:3])}".strip()
    for call in r.exact:
        for op, target in call.redirects:
            if op in (">", ">>", ">|", "&>", "&>>", "<>") and _device(target):
                return f"write to {target}"
    for text in r.loose:
        if re.search(r">\s*/dev/(sd[a-z]|nvme\d|hd[a-z]|vd[a-z]|xvd[a-z]|mmcblk\d|disk\d)", text):
            return "write to a block device"
    return None


FORK_BOMB = re.compile(r"(\w+|:)\s*\(\s*\)\s*\{[^}]*\1\s*\|\s*\1\s*&[^}]*\}\s*;?\s*\1")
FORK_LOOP = re.compile(r"\bwhile\b.{0,40}?\bfork\b|\bfork\b[^\n;]{0,12}\bwhile\b", re.S)


def check_fork_bomb(r: Reading) -> str | None:
    selves: dict[str, list[Call]] = {}
    for call in r.exact:  # a function that runs itself twice at once, in a pipe or in the background
        if call.function and call.prog == call.function.lower():
            selves.setdefault(call.function, []).append(call)
    if any(len(calls) >= 2 and any(c.background or c.upstream for c in calls) for calls in selves.values()):
        return "fork bomb"
    for call in r.calls(INTERPRETERS):
        given = code_of(call.prog, call.args, call.stdin)
        if given and FORK_LOOP.search(given[1]):
            return "fork loop"
    for text in r.loose:
        if FORK_BOMB.search(text) or re.search(r":\(\)\s*\{\s*:\|:&\s*\};:", text.replace(" ", "")):
            return "fork bomb"
        if re.search(r"while\s+true.*fork|os\.fork\(\)\s*while|perl\s+-e\s*.?fork\s+while", text):
            return "fork loop"
    return None


SQL = re.compile(r"\b(drop\s+(table|database|schema|keyspace|collection)|truncate\s+(table\s+)?[\w\"`.]+"
                 r"|delete\s+from\s+[\w\"`.]+\s*(;|$)|dropdatabase\s*\(|\.drop\(\s*\)|flush(all|db)\b)", re.I)
DB_CLIENTS = {"psql", "mysql", "mariadb", "sqlite3", "sqlite", "mongo", "mongosh", "cqlsh", "clickhouse-client",
              "clickhouse", "sqlcmd", "duckdb", "redis-cli", "pg_dump", "pgcli", "mycli", "litecli", "usql", "bq",
              "snowsql", "trino", "spark-sql", "hive", "beeline"}


def check_sql(r: Reading) -> str | None:
    if r.kind != COMMAND:  # a tool's query argument: the text is the SQL
        return _sql_in(r.text)
    for call in r.calls({"dropdb"}):
        return f"dropdb {' '.join(call.args)}".strip()
    # In a command the words only count when a database client runs them; a commit
    # message about "drop table handling" is not a DROP TABLE.
    for call in r.calls(DB_CLIENTS):
        for text in (*call.args, call.stdin or ""):
            if found := _sql_in(text):
                return found
    for text in r.loose:
        if _looks_like_sql(text):
            return _sql_in(text)
    return None


def _sql_in(text: str) -> str | None:
    m = SQL.search(" ".join(text.split()))
    return m.group(0) if m else None


def _looks_like_sql(text: str) -> bool:
    """A bare SQL script, not a shell command."""
    return bool(re.match(r"\s*(begin|drop|truncate|delete|alter|create|insert|update|select|with)\b", text, re.I))


RUNNERS = {"source", ".", "eval"}
FETCH_SUB = re.compile(r"\s*(<\(|\$\(|`)\s*(sudo\s+)?(" + "|".join(sorted(FETCHERS)) + r")\b")


def check_pipe_to_shell(r: Reading) -> str | None:
    for call in r.exact:
        if not (call.prog in SHELLS or call.prog in RUNNERS or call.prog in INTERPRETERS):
            continue
        if any(FETCH_SUB.match(a) for a in call.args):
            return "downloaded script run by a shell"
        if _runs_stdin(call) and _fetched(call.upstream):
            return "download piped to a shell"
    for text in r.loose:
        low = " ".join(text.lower().split())
        if re.search(r"\b(sh|bash|zsh|dash|python3?)\s+(-c\s+)?[\"']?(\$\(|<\(|`)\s*(curl|wget)", low):
            return "downloaded script run by a shell"
        if re.search(r"\b(curl|wget)\b[^|;&]*\|\s*(sudo\s+)?(sh|bash|zsh|dash|ksh|python3?|perl)\b", low):
            return "download piped to a shell"
    return None


def _runs_stdin(call: Call) -> bool:
    """Whether what is piped into ``call`` is the program it runs (not data for a script)."""
    marker = "\x00piped\x00"
    probe = Call(call.prog, call.args, stdin=marker)
    if call.prog in SHELLS:
        return shell_script(probe) == marker
    given = code_of(call.prog, call.args, marker)
    return given is not None and given[1] == marker


def _fetched(up: Call | None) -> bool:
    for _ in range(16):
        if up is None:
            return False
        if up.prog in FETCHERS:
            return True
        up = up.upstream
    return False


MODE = re.compile(r"[0-7]{3,4}|[ugoa]*[+=-][rwxXst]+(,[ugoa]*[+=-][rwxXst]+)*|[\w.$-]+:[\w.$-]*|[\w.$-]+")
CHMOD_DIRS = {*SYSTEM_TREES, *(set(SYSTEM_TOPS) - set(SCRATCH)), "/usr/local", "/usr/bin", "/usr/lib", "/var/lib"}


def check_chmod(r: Reading) -> str | None:
    for call in r.calls({"chmod", "chown", "chgrp"}):
        flags, operands = options(call.args)
        recursive = bool({"R", "--recursive"} & flags)
        if not operands:
            continue
        mode, targets = operands[0], operands[1:]
        if not (recursive or mode.endswith("777") or mode in ("000", "0000")) or not MODE.fullmatch(mode):
            continue
        for t in targets:
            path = shell.expand_path(t, call.cwd, r.home_dir) if call.cwd else _loose_path(t)
            if path is not None:
                base = path[:-2] if path.endswith("/*") else path
                if base in ("/", "") or is_home(base, r.home) or base in CHMOD_DIRS:
                    return f"{call.prog} of {' '.join(targets)}"
    return None


def _loose_path(word: str) -> str | None:
    if word in (".", "..", "*", "./*"):
        return "/"  # where it runs is not known: the cautious reading
    return shell.expand_path(word, None, "~")


CREDENTIALS = re.compile(
    r"(~|\$home|\$\{home\}|/home/[^/\s]+|/root)?/?\.ssh(/(?!id_[\w-]+\.pub\b)(id_[\w-]+|authorized_keys|config"
    r"|known_hosts)?|$|(?=[\s'\"]))|(^|[\s/'\"=@<])\.env(?!\.(example|sample|template|dist|defaults)\b)(\.[\w-]+)?(\s|$|['\"])"
    r"|\.aws/credentials|\.aws/config|\.config/gcloud|application_default_credentials|\.azure/|\.kube/config|\.netrc"
    r"|\.pgpass|\.docker/config\.json|\.npmrc|\.pypirc|\.git-credentials|/etc/shadow|\bgh/hosts\.yml", re.I)
READERS = {"cat", "less", "more", "head", "tail", "base64", "xxd", "od", "strings", "cp", "tar", "zip", "gzip",
           "openssl", "gpg", "printenv", "env"}
KEY_OPTIONS = {"ssh": "-i", "scp": "-i", "sftp": "-i"}  # a key used to log in is not sent


def check_credentials(r: Reading) -> str | None:
    if r.kind == PATH:  # a bare file path (a read or write tool): touching it is the finding
        m = CREDENTIALS.search(r.text)
        return f"credentials file ({m.group(0).strip()})" if m else None
    sent = any(True for _ in r.calls(NETWORK))
    for call in r.calls(READERS | NETWORK):
        args = list(call.args[:-1] if call.prog == "cp" else call.args)
        key = KEY_OPTIONS.get(call.prog)
        words = [a for i, a in enumerate(args) if not (key and i and args[i - 1] == key)]
        words += [target for op, target in call.redirects if op in ("<", "<>")]
        for word in words:
            if m := CREDENTIALS.search(word):
                return f"credentials ({m.group(0).strip()}) {'sent to the network' if sent else 'read'}"
    return None


TAKEOVER = [
    r"\b(ignore|disregard|forget|override)\b.{0,40}\b(previous|prior|above|earlier|all|your|the)\b.{0,20}"
    r"\b(instructions?|rules|guidelines|prompts?|directives)\b",
    r"\byou are no longer\b|\bfrom now on,? you (are|will|must)\b|\bnew (system )?instructions\b",
    r"\b(disable|stop|kill|shut ?down|turn off|bypass|pause|remove)\b.{0,30}\b(the )?"
    r"(orchestrator|orchestratord|guard|safety|supervisor|watchdog|monitor(ing)?)\b",
    r"\b(approve|accept|allow|grant)\b.{0,20}\b(everything|all (requests|permissions|commands|tools)|every "
    r"(request|permission|command))\b",
    r"\bauto-?approve\b|\bdangerously-?skip-?permissions\b|\byolo mode\b",
    r"\b(act|speak|respond) as (the )?(team[- ]?lead|lead|admin|system|root)\b",
    r"\bi am (now )?(the )?(team[- ]?lead|lead|your (admin|operator|user))\b",
]
TAKEOVER_RE = [re.compile(p, re.I | re.S) for p in TAKEOVER]


def check_takeover(r: Reading) -> str | None:
    flat = " ".join(r.text.split())
    for rx in TAKEOVER_RE:
        m = rx.search(flat)
        if m:
            return f"takeover attempt: {m.group(0)[:80]}"
    return None


# A held request is told to the orchestrator too: the teammate waits, and it should know.
HOLD_ACTIONS = ("escalate", "hold", "tell")

DEFAULT_RULES: tuple[Rule, ...] = (
    Rule("recursive-delete", frozenset({COMMAND, MESSAGE}), check=check_recursive_delete,
         description="recursive delete of /, a home (or its keys and documents), the project, its .git or a "
                     "directory above it, everything in one of those, . or .., or anything under a system directory; "
                     "also by find, rsync --delete, mv to /dev/null and interpreter code"),
    Rule("disk-wipe", frozenset({COMMAND, MESSAGE}), check=check_disk_wipe,
         description="mkfs, dd or a redirection to a block device, shred, wipefs, partitioning"),
    Rule("fork-bomb", frozenset({COMMAND, MESSAGE}), check=check_fork_bomb, description="fork bomb"),
    Rule("force-push", frozenset({COMMAND, MESSAGE}), check=gitrules.check_force_push,
         description="force push or branch deletion on a shared or unnamed branch, history rewrites, "
                     "reset --hard to a remote branch, update-ref -d"),
    Rule("git-discard", frozenset({COMMAND}), severity="medium", actions=HOLD_ACTIONS, check=gitrules.check_git_discard,
         description="git commands that drop uncommitted or unpushed work: reset --hard, clean -f, checkout/restore ., "
                     "stash drop/clear, branch -D, reflog expire, force-pushing a branch of one's own"),
    Rule("sql-drop", frozenset({COMMAND, TOOL}), check=check_sql,
         description="DROP TABLE/DATABASE, TRUNCATE, unbounded DELETE, FLUSHALL, dropdb"),
    Rule("pipe-to-shell", frozenset({COMMAND, MESSAGE}), check=check_pipe_to_shell,
         description="curl/wget output run by a shell"),
    Rule("chmod-root", frozenset({COMMAND, MESSAGE}), check=check_chmod,
         description="recursive, 777 or 000 chmod/chown of /, a home or a system directory"),
    Rule("credentials", frozenset({COMMAND, PATH}), check=check_credentials,
         description="reading or sending ~/.ssh, .env, cloud credentials"),
    Rule("lead-takeover", frozenset({MESSAGE}), check=check_takeover, actions=("escalate", "tell"),
         description="a message that tries to take over the lead or disable the orchestrator"),
    # Not a check of any text: the guard compares a send_message call's sender with the
    # teammate whose session made the call (see guard.forged_sender).
    Rule("forged-sender", frozenset(), actions=("escalate", "tell"),
         description="a send_message signed with a name other than the calling teammate's"),
)


def read(text: str, kind: str, context: Context) -> Reading:
    """``text`` read once for every rule: a command as the shell reads it, a message as prose."""
    if kind == COMMAND:
        return read_command(text, context.project, context.home)
    if kind == MESSAGE:
        return read_prose(text)
    return Reading(text, kind)  # paths and tool inputs are data, not shell


def evaluate(text: str, kind: str, rules: Sequence[Rule] = DEFAULT_RULES,
             context: Context | None = None) -> list[Finding]:
    """Every enabled rule for ``kind`` that matches ``text``; ``context`` says where a command runs."""
    if not text or not text.strip():
        return []
    reading: Reading | None = None
    found: list[Finding] = []
    for rule in rules:
        if not rule.enabled or kind not in rule.applies_to:
            continue
        seen: str | None = None
        if rule.check is not None:
            reading = reading or read(text, kind, context or Context())
            seen = rule.check(reading)
        elif rule.pattern is not None:
            m = rule.pattern.search(text)
            seen = m.group(0) if m else None
        if seen:
            found.append(Finding(rule.name, rule.severity, seen[:200]))
    return found


def build_rules(changes: Iterable[Any], base: Sequence[Rule] = DEFAULT_RULES) -> tuple[Rule, ...]:
    """The built-in rules with the config's ``[[safety.rules]]`` applied, by name.

    A change to a built-in rule keeps its check unless it gives a pattern (which replaces
    the check); a new name adds a regex rule (case-insensitive), critical unless its
    actions make it a hold rule. ``enabled = false`` switches a rule off.
    """
    rules = {r.name: r for r in base}
    for c in changes:
        name = c.name
        pattern = getattr(c, "pattern", None)
        compiled = re.compile(pattern, re.I) if pattern else None
        old = rules.get(name)
        applies = getattr(c, "applies_to", None)
        severity = getattr(c, "severity", None)
        actions = getattr(c, "actions", None)
        if old is None:
            if compiled is None:
                continue
            acts = tuple(actions or ("escalate", "reject", "tell"))
            held = "hold" in acts and "reject" not in acts
            rules[name] = Rule(name, frozenset(applies or (COMMAND,)), severity=severity or (
                "medium" if held else "critical"), actions=acts,
                description=getattr(c, "description", "") or f"pattern {pattern}",
                pattern=compiled, enabled=getattr(c, "enabled", True))
            continue
        rules[name] = Rule(
            name, frozenset(applies) if applies else old.applies_to, severity=severity or old.severity,
            actions=tuple(actions) if actions else old.actions,
            description=getattr(c, "description", "") or old.description,
            check=None if compiled is not None else old.check, pattern=compiled or old.pattern,
            enabled=getattr(c, "enabled", True))
    return tuple(rules.values())
