"""The safety policy: does a shell command, a file path or a teammate message look dangerous?

Pure functions, no I/O. A command is tokenised the way a shell would (quotes removed,
operators split) so ``rm -rf /``, ``"rm" -fr //``, ``/bin/rm --recursive --force /`` and
``sudo rm -r -f -- /`` are one thing; every position where a known program name appears
is checked, so a command inside ``sudo``, ``xargs``, ``sh -c '…'`` or prose ("I will now
run rm -rf /") is found too.

Each check is a named rule; the config can switch a rule off or add regex rules.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

# What a rule can look at.
COMMAND, PATH, MESSAGE, TOOL = "command", "path", "message", "tool"

OPERATORS = {";", "&&", "||", "|", "&", "|&", "(", ")", "{", "}", "\n", "`", "$(", "<(", ">(", "!"}
WRAPPERS = {"sudo", "doas", "env", "nohup", "time", "command", "exec", "nice", "ionice", "stdbuf", "timeout",
            "xargs", "busybox", "builtin", "chroot", "su", "runuser", "setsid", "strace", "watch"}
SHELLS = {"sh", "bash", "zsh", "ksh", "dash", "fish", "ash", "csh", "tcsh", "python", "python3", "perl", "ruby",
          "node", "php"}
FETCHERS = {"curl", "wget", "fetch", "aria2c", "http", "https"}
NETWORK = FETCHERS | {"nc", "ncat", "netcat", "socat", "scp", "sftp", "rsync", "ssh", "ftp", "telnet", "aws", "gsutil",
                      "rclone", "mail", "sendmail"}

HOME_ROOTS = {"~", "$home", "${home}", "/root", "/home", "/users", "$pwd", "${pwd}", ".", "..", "*", "/*", "~/*",
              "$home/*", "${home}/*", "/home/*", "/users/*", "./*", "../*"}
SYSTEM_DIRS = {"/", "/bin", "/boot", "/dev", "/etc", "/lib", "/lib64", "/opt", "/proc", "/sbin", "/srv", "/sys",
               "/usr", "/var", "/mnt", "/media", "/snap", "/usr/bin", "/usr/lib", "/usr/local", "/var/lib"}


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
    check: Callable[[list[list[str]], str], str | None] | None = field(default=None, compare=False)
    pattern: re.Pattern[str] | None = field(default=None, compare=False)
    enabled: bool = True


# -- tokenising -----------------------------------------------------------------------

def _dequote_fallback(text: str) -> list[str]:
    text = re.sub(r"[\"'`\\]", "", text)
    return re.findall(r"\|\||&&|\$\(|[;|&(){}\n]|[^\s;|&(){}]+", text)


def tokens(text: str) -> list[str]:
    """Shell-like tokens with quotes removed and operators separate."""
    text = text.replace("\\\n", " ")
    lex = shlex.shlex(text, posix=True, punctuation_chars=";&|()<>")
    lex.whitespace_split = True
    lex.commenters = ""
    try:
        out = list(lex)
    except ValueError:  # unbalanced quotes: prose, or an evasion attempt
        out = _dequote_fallback(text)
    # ``$(`` and backticks end up glued to words; split them off.
    result: list[str] = []
    for tok in out:
        for piece in re.split(r"(\$\(|`|<\(|>\()", tok):
            if piece:
                result.append(piece)
    return result


def segments(text: str) -> list[list[str]]:
    """The token lists between shell operators (pipelines, lists, subshells)."""
    segs: list[list[str]] = [[]]
    nested: list[list[str]] = []
    for tok in tokens(text):
        if any(c.isspace() for c in tok.strip()) and tok.strip() != text.strip():
            nested.extend(segments(tok))  # a quoted script: sh -c '…', eval "…", ssh host '…'

        if tok in OPERATORS or set(tok) <= set(";&|()<>") and tok:
            segs.append([tok] if tok in ("|", "|&") else [])
        else:
            segs[-1].append(tok)
    return [s for s in segs if s] + nested


def prog(token: str) -> str:
    """``/usr/bin/rm`` → ``rm``; ``\\rm`` → ``rm``."""
    return os.path.basename(token.lstrip("\\")).lower()


def norm_path(token: str) -> str:
    t = token.strip().lower()
    t = re.sub(r"/+", "/", t)
    if len(t) > 1:
        t = t.rstrip("/") or "/"
    while t.endswith("/."):
        t = t[:-2] or "/"
    return t


def _after(seg: Sequence[str], names: set[str]) -> Iterable[list[str]]:
    """The arguments following every occurrence of one of ``names`` in a segment."""
    for i, tok in enumerate(seg):
        if prog(tok) in names:
            yield list(seg[i + 1:])


def _flags(args: Sequence[str]) -> tuple[set[str], list[str]]:
    """Short flags as letters, long flags whole, and the operands."""
    short: set[str] = set()
    operands: list[str] = []
    done = False
    for a in args:
        if done or not a.startswith("-") or a == "-":
            operands.append(a)
        elif a == "--":
            done = True
        elif a.startswith("--"):
            short.add(a.lower())
        else:
            short.update(a[1:])
    return short, operands


def _dangerous_target(path: str) -> bool:
    p = norm_path(path)
    if p in SYSTEM_DIRS or p in HOME_ROOTS:
        return True
    if p.startswith(("~/", "$home/", "${home}/")) and p.count("/") == 1 and p.endswith(("*", ".*")):
        return True
    return bool(re.fullmatch(r"(/home|/users)/[^/]+(/\*)?", p) or re.fullmatch(r"/[^/]+/\*", p) and
                p[:-2] in SYSTEM_DIRS)


# -- built-in checks: each returns a short description of what it saw, or None ------------

def check_recursive_delete(segs: list[list[str]], text: str) -> str | None:
    for seg in segs:
        for args in _after(seg, {"rm", "unlink", "rmdir"}):
            flags, operands = _flags(args)
            if not ({"r", "R", "--recursive"} & flags or "--no-preserve-root" in flags):
                continue
            for op in operands:
                if _dangerous_target(op):
                    return f"recursive delete of {op}"
        for args in _after(seg, {"find"}):
            low = [a.lower() for a in args]
            filtered = any(a in FIND_FILTERS for a in low)
            if args and _dangerous_target(args[0]) and not filtered and ("-delete" in low or ("-exec" in low and any(
                    prog(a) == "rm" for a in args))):
                return f"find {args[0]} deleting"
    return None


FIND_FILTERS = {"-name", "-iname", "-path", "-ipath", "-regex", "-iregex", "-type", "-mtime", "-mmin", "-newer",
                "-size", "-user", "-empty", "-wholename", "-maxdepth"}


def check_disk_wipe(segs: list[list[str]], text: str) -> str | None:
    for seg in segs:
        for i, tok in enumerate(seg):
            p = prog(tok)
            if p.startswith("mkfs") or p in ("mke2fs", "mkswap", "wipefs", "fdisk", "sfdisk", "parted"):
                if i + 1 < len(seg) or p.startswith("mkfs"):
                    return f"{p} {' '.join(seg[i + 1:i + 3])}".strip()
            if p == "shred":
                return f"shred {' '.join(seg[i + 1:i + 3])}".strip()
            if p == "dd":
                for a in seg[i + 1:]:
                    if a.lower().startswith("of=/dev/") and not a.lower().startswith(("of=/dev/null", "of=/dev/stdout")):
                        return f"dd {a}"
        for tok in seg:
            if re.match(r"^>+/dev/(sd|nvme|hd|vd|xvd|mmcblk|disk)", tok):
                return f"write to {tok}"
    if re.search(r">\s*/dev/(sd[a-z]|nvme\d|hd[a-z]|vd[a-z]|xvd[a-z]|mmcblk\d|disk\d)", text):
        return "write to a block device"
    return None


FORK_BOMB = re.compile(r"(\w+|:)\s*\(\s*\)\s*\{[^}]*\1\s*\|\s*\1\s*&[^}]*\}\s*;?\s*\1")


def check_fork_bomb(segs: list[list[str]], text: str) -> str | None:
    if FORK_BOMB.search(text) or re.search(r":\(\)\s*\{\s*:\|:&\s*\};:", text.replace(" ", "")):
        return "fork bomb"
    if re.search(r"while\s+true.*fork|os\.fork\(\)\s*while|perl\s+-e\s*.?fork\s+while", text):
        return "fork loop"
    return None


SHARED_BRANCHES = re.compile(r"^(\+)?(refs/heads/)?(main|master|trunk|develop|release[/\w.-]*|prod\w*)$", re.I)


def check_force_push(segs: list[list[str]], text: str) -> str | None:
    for seg in segs:
        for i, tok in enumerate(seg):
            if prog(tok) != "git":
                continue
            rest = seg[i + 1:]
            # skip git's own options (-C dir, -c k=v)
            j = 0
            while j < len(rest) and rest[j].startswith("-"):
                j += 2 if rest[j] in ("-C", "-c") else 1
            if j >= len(rest):
                continue
            sub, args = rest[j].lower(), rest[j + 1:]
            flags, operands = _flags(args)
            if sub == "push":
                if {"f", "--force", "--force-with-lease", "--mirror", "--delete", "d"} & flags or any(
                        o.startswith("+") or o.startswith(":") for o in operands):
                    return "git push " + " ".join(args)
            if sub in ("filter-branch", "filter-repo"):
                return f"git {sub}"
            if sub == "reset" and "--hard" in flags and any(re.match(r"^(origin|upstream)/", o) for o in operands):
                return "git reset --hard " + " ".join(operands)
            if sub == "branch" and ({"D"} & flags or "--delete" in flags) and any(
                    SHARED_BRANCHES.match(o) for o in operands):
                return "git branch -D " + " ".join(operands)
            if sub == "update-ref" and "d" in flags:
                return "git update-ref -d"
    return None


SQL = re.compile(r"\b(drop\s+(table|database|schema|keyspace|collection)|truncate\s+(table\s+)?[\w\"`.]+"
                 r"|delete\s+from\s+[\w\"`.]+\s*(;|$)|dropdatabase\s*\(|\.drop\(\s*\))", re.I)


DB_CLIENTS = {"psql", "mysql", "mariadb", "sqlite3", "sqlite", "mongo", "mongosh", "cqlsh", "clickhouse-client",
              "clickhouse", "sqlcmd", "duckdb", "redis-cli", "pg_dump", "pgcli", "mycli", "litecli", "usql", "bq",
              "snowsql", "trino", "spark-sql", "hive", "beeline"}


def check_sql(segs: list[list[str]], text: str) -> str | None:
    # In a shell command the words only count when a database client runs them; a
    # commit message about "drop table handling" is not a DROP TABLE.
    if segs and not any(prog(t) in DB_CLIENTS for seg in segs for t in seg) and not _looks_like_sql(text):
        return None
    m = SQL.search(" ".join(text.split()))
    return m.group(0) if m else None


def _looks_like_sql(text: str) -> bool:
    """A bare SQL script (a tool's query argument), not a shell command."""
    return bool(re.match(r"\s*(begin|drop|truncate|delete|alter|create|insert|update|select|with)\b", text, re.I))


def check_pipe_to_shell(segs: list[list[str]], text: str) -> str | None:
    fetched = False
    for seg in segs:
        if seg[0] in ("|", "|&") and fetched and any(prog(t) in SHELLS for t in seg[1:3]):
            return "download piped to a shell"
        if any(prog(t) in FETCHERS for t in seg):
            fetched = True
        elif seg[0] not in ("|", "|&"):
            fetched = False
    low = " ".join(text.lower().split())
    if re.search(r"\b(sh|bash|zsh|dash|python3?)\s+(-c\s+)?[\"']?(\$\(|<\(|`)\s*(curl|wget)", low):
        return "downloaded script run by a shell"
    if re.search(r"\b(curl|wget)\b[^|;&]*\|\s*(sudo\s+)?(sh|bash|zsh|dash|ksh|python3?|perl)\b", low):
        return "download piped to a shell"
    return None


def check_chmod(segs: list[list[str]], text: str) -> str | None:
    for seg in segs:
        for args in _after(seg, {"chmod", "chown", "chgrp"}):
            flags, operands = _flags(args)
            recursive = bool({"R", "--recursive"} & flags)
            modes = [o for o in operands if re.fullmatch(r"[0-7]{3,4}|[ugoa]*[+=-][rwxXst]+|[\w.-]+:[\w.-]*", o)]
            targets = [o for o in operands if o not in modes]
            if any(_dangerous_target(t) for t in targets) and (recursive or any(m.endswith("777") for m in modes)):
                return "chmod/chown of " + " ".join(targets)
    return None


CREDENTIALS = re.compile(
    r"(~|\$home|\$\{home\}|/home/[^/\s]+|/root)?/?\.ssh/(id_[\w-]+|authorized_keys|config|known_hosts)?"
    r"|(^|[\s/'\"=@<])\.env(\.[\w-]+)?(\s|$|['\"])|\.aws/credentials|\.aws/config|\.config/gcloud|application_default_"
    r"credentials|\.azure/|\.kube/config|\.netrc|\.pgpass|\.docker/config\.json|\.npmrc|\.pypirc|\.git-credentials"
    r"|/etc/shadow|\bgh/hosts\.yml", re.I)
READERS = {"cat", "less", "more", "head", "tail", "base64", "xxd", "od", "strings", "cp", "tar", "zip", "gzip",
           "openssl", "gpg", "printenv", "env"}


def check_credentials(segs: list[list[str]], text: str) -> str | None:
    m = CREDENTIALS.search(text)
    if not m:
        return None
    if not segs:  # a bare file path (a read or write tool): touching it is the finding
        return f"credentials file ({m.group(0).strip()})"
    progs = {prog(t) for seg in segs for t in seg}
    if progs & NETWORK:
        return f"credentials ({m.group(0).strip()}) sent to the network"
    if progs & READERS:
        return f"credentials read ({m.group(0).strip()})"
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


def check_takeover(segs: list[list[str]], text: str) -> str | None:
    flat = " ".join(text.split())
    for rx in TAKEOVER_RE:
        m = rx.search(flat)
        if m:
            return f"takeover attempt: {m.group(0)[:80]}"
    return None


DEFAULT_RULES: tuple[Rule, ...] = (
    Rule("recursive-delete", frozenset({COMMAND, MESSAGE}), check=check_recursive_delete,
         description="recursive delete of /, ~, a home or project root, or a system directory"),
    Rule("disk-wipe", frozenset({COMMAND, MESSAGE}), check=check_disk_wipe,
         description="mkfs, dd to a block device, shred, wipefs"),
    Rule("fork-bomb", frozenset({COMMAND, MESSAGE}), check=check_fork_bomb, description="fork bomb"),
    Rule("force-push", frozenset({COMMAND, MESSAGE}), check=check_force_push,
         description="git push --force, history rewrites, deleting shared branches"),
    Rule("sql-drop", frozenset({COMMAND, TOOL}), check=check_sql,
         description="DROP TABLE/DATABASE, TRUNCATE, unbounded DELETE"),
    Rule("pipe-to-shell", frozenset({COMMAND, MESSAGE}), check=check_pipe_to_shell,
         description="curl/wget output run by a shell"),
    Rule("chmod-root", frozenset({COMMAND, MESSAGE}), check=check_chmod,
         description="recursive chmod/chown of / or a home"),
    Rule("credentials", frozenset({COMMAND, PATH}), check=check_credentials,
         description="reading or sending ~/.ssh, .env, cloud credentials"),
    Rule("lead-takeover", frozenset({MESSAGE}), check=check_takeover, actions=("escalate", "tell"),
         description="a message that tries to take over the lead or disable the orchestrator"),
    # Not a check of any text: the guard compares a send_message call's sender with the
    # teammate whose session made the call (see guard.forged_sender).
    Rule("forged-sender", frozenset(), actions=("escalate", "tell"),
         description="a send_message signed with a name other than the calling teammate's"),
)


def evaluate(text: str, kind: str, rules: Sequence[Rule] = DEFAULT_RULES,
             context: Context | None = None) -> list[Finding]:
    """Every enabled rule for ``kind`` that matches ``text``."""
    if not text or not text.strip():
        return []
    # Paths and tool inputs are data, not shell: checks see them without segments.
    segs = segments(text) if kind in (COMMAND, MESSAGE) else []
    found: list[Finding] = []
    for rule in rules:
        if not rule.enabled or kind not in rule.applies_to:
            continue
        seen: str | None = None
        if rule.check is not None:
            seen = rule.check(segs, text)
        elif rule.pattern is not None:
            m = rule.pattern.search(text)
            seen = m.group(0) if m else None
        if seen:
            found.append(Finding(rule.name, rule.severity, seen[:200]))
    return found


def build_rules(changes: Iterable[object], base: Sequence[Rule] = DEFAULT_RULES) -> tuple[Rule, ...]:
    """The built-in rules with the config's ``[[safety.rules]]`` applied, by name.

    A change to a built-in rule keeps its check unless it gives a pattern (which replaces
    the check); a new name adds a regex rule (case-insensitive). ``enabled = false``
    switches a rule off.
    """
    rules = {r.name: r for r in base}
    for c in changes:
        name = getattr(c, "name")
        pattern = getattr(c, "pattern", None)
        compiled = re.compile(pattern, re.I) if pattern else None
        old = rules.get(name)
        applies = getattr(c, "applies_to", None)
        severity = getattr(c, "severity", None)
        actions = getattr(c, "actions", None)
        if old is None:
            if compiled is None:
                continue
            rules[name] = Rule(name, frozenset(applies or (COMMAND,)), severity=severity or "critical",
                               actions=tuple(actions or ("escalate", "reject", "tell")),
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
