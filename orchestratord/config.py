"""The TOML config: parsed whole, validated whole, frozen.

Every problem in a file is collected before anything is rejected, so one run of
``orchestratord check-config`` (or one SIGHUP) names every mistake at once, each as
``file:line: key: what is wrong``. Unknown keys are errors: a typo must not fall back
silently to a default. Relative paths are taken relative to the config file.

Size: the schema of every section and key, with its check and its error text, is kept in
one place so that the loader, check-config and the reference page cannot disagree.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import shlex
import shutil
import string
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import tomli_w

DEFAULT_CONFIG_PATH = "/etc/opencode-orchestrator/orchestrator.toml"
#: where the claude-teams of the shipped opencode-serve.service keeps its teams (its HOME is
#: /var/lib/opencode-serve): teams.base_dir of the shipped config and of ``init-config``
SERVE_TEAMS_DIR = "/var/lib/opencode-serve/.claude"
MISSING_TEAMS_FIX = ("set teams.base_dir to where the server's claude-teams keeps its teams: the server's HOME/.claude "
                     "(or the CLAUDE_TEAMS_BASE_DIR of its MCP config); for the shipped opencode-serve.service that "
                     f"is {SERVE_TEAMS_DIR}, and a person's ~/.claude needs the teams-in-home drop-in")

DEFAULT_PROMPT = """\
You are the orchestrator of the agent team(s) {teams}; the team lead is {lead}.
Something happened that needs your attention:
{triggers}

Read the new messages with claude-teams_read_inbox and check what each teammate is doing.
Answer questions, unblock or redirect teammates with claude-teams_send_message, and stop a
teammate that goes off course (a shutdown_request). Do not run destructive commands.
End with a short summary of what you found and what you did."""

PROMPT_FIELDS = ("teams", "lead", "triggers")


class ConfigError(Exception):
    """The config cannot be used; ``problems`` lists every error, one line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class ServerConfig:
    url: str = "http://127.0.0.1:4096"
    username: str = "opencode"
    password_file: str | None = None
    timeout_seconds: float = 10.0


@dataclass(frozen=True)
class LedgerConfig:
    path: str = "/var/lib/opencode-orchestrator/ledger.sqlite3"
    store_events: str = "default"
    retention_days: float = 14.0


@dataclass(frozen=True)
class HealthConfig:
    interval_seconds: float = 2.0
    timeout_seconds: float = 2.0
    startup_grace_seconds: float = 30.0


@dataclass(frozen=True)
class EventsConfig:
    stream: str = "global"
    directory: str | None = None
    read_timeout_seconds: float = 25.0
    max_event_bytes: int = 4 * 1024 * 1024
    reconnect_max_seconds: float = 5.0


@dataclass(frozen=True)
class SessionConfig:
    title: str = "orchestrator"
    id: str | None = None
    agent: str | None = None
    model: str | None = None
    # Appended to the built-in ruleset of the orchestrator session (the last match wins).
    permission: tuple[tuple[str, str, str], ...] = ()


@dataclass(frozen=True)
class TeamsConfig:
    base_dir: str = "~/.claude"
    names: tuple[str, ...] = ()
    lead: str = "team-lead"
    watch_members: bool = False
    poll_interval_seconds: float = 5.0
    report_existing: bool = False
    max_message_bytes: int = 1024 * 1024


@dataclass(frozen=True)
class DispatchConfig:
    prompt: str = DEFAULT_PROMPT
    debounce_seconds: float = 0.5
    min_interval_seconds: float = 5.0
    max_per_hour: int = 60
    sweep_interval_seconds: float = 0.0
    busy_timeout_seconds: float = 120.0
    completion_timeout_seconds: float = 1800.0
    turn_timeout_seconds: float = 300.0
    start_timeout_seconds: float = 30.0


@dataclass(frozen=True)
class StallsConfig:
    enabled: bool = True
    teammate_quiet_seconds: float = 300.0


@dataclass(frozen=True)
class TriggerRule:
    name: str
    event: str
    match: Mapping[str, Any] = field(default_factory=dict)
    sessions: str = "others"
    enabled: bool = True
    description: str = ""


@dataclass(frozen=True)
class SafetyRuleConfig:
    """A ``[[safety.rules]]`` entry: a new regex rule, or a change to a built-in one by name."""

    name: str
    applies_to: tuple[str, ...] | None = None
    pattern: str | None = None
    severity: str | None = None
    actions: tuple[str, ...] | None = None
    enabled: bool = True
    description: str = ""


@dataclass(frozen=True)
class HookConfig:
    """A ``[[safety.hooks]]`` entry: run on every escalation, never waited for."""

    name: str
    command: tuple[str, ...] = ()
    url: str | None = None
    timeout_seconds: float = 10.0
    retries: int = 1


@dataclass(frozen=True)
class SafetyConfig:
    enabled: bool = True
    allow: tuple[str, ...] = ()
    # The permission broker: teammate sessions get rules that make these permissions ask,
    # and the daemon answers every request by policy (see orchestratord/broker.py).
    broker: bool = True
    broker_sessions: str = "others"
    ask: tuple[str, ...] = ("bash",)
    hold_timeout_seconds: float = 600.0
    release_on_stop: bool = False
    rules: tuple[SafetyRuleConfig, ...] = ()
    hooks: tuple[HookConfig, ...] = ()


@dataclass(frozen=True)
class MetricsConfig:
    listen: str | None = None
    textfile: str | None = None
    textfile_interval_seconds: float = 15.0


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"


DEFAULT_TRIGGERS: tuple[TriggerRule, ...] = (
    TriggerRule(name="teammate-message", event="message.part.updated",
                match={"part.type": "tool", "part.tool": "claude-teams_send_message",
                       "part.state.status": "completed"},
                description="a teammate sent a message"),
    TriggerRule(name="teammate-error", event="session.error", description="a teammate's session failed"),
    TriggerRule(name="teammate-idle", event="session.idle", description="a teammate's session went idle"),
)


@dataclass(frozen=True)
class Config:
    server: ServerConfig = ServerConfig()
    ledger: LedgerConfig = LedgerConfig()
    health: HealthConfig = HealthConfig()
    events: EventsConfig = EventsConfig()
    session: SessionConfig = SessionConfig()
    teams: TeamsConfig = TeamsConfig()
    dispatch: DispatchConfig = DispatchConfig()
    triggers: tuple[TriggerRule, ...] = DEFAULT_TRIGGERS
    safety: SafetyConfig = SafetyConfig()
    stalls: StallsConfig = StallsConfig()
    metrics: MetricsConfig = MetricsConfig()
    log: LogConfig = LogConfig()
    source: str = field(default="<defaults>", compare=False)
    #: the first 12 hex digits of the file's SHA-256: which version of the file is in effect
    digest: str = field(default="", compare=False)


# -- value checkers: each returns the converted value or raises ValueError(message) --

Check = Callable[[Any], Any]


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, not {_type(value)}")
    return value


def _nonempty(value: Any) -> str:
    if not _str(value).strip():
        raise ValueError("must not be empty")
    return value


def _opt_str(value: Any) -> str | None:
    return _nonempty(value)


def _seconds(minimum: float = 0.0, strict: bool = True) -> Check:
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"must be a number of seconds (fractions allowed, e.g. 0.5), not {_type(value)}")
        if strict and value <= minimum:
            raise ValueError(f"must be greater than {minimum:g}")
        if not strict and value < minimum:
            raise ValueError(f"must be at least {minimum:g}")
        return float(value)
    return check


def _int(minimum: int) -> Check:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be a whole number, not {_type(value)}")
        if value < minimum:
            raise ValueError(f"must be at least {minimum}")
        return value
    return check


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, not {_type(value)}")
    return value


def _choice(*options: str) -> Check:
    def check(value: Any) -> str:
        if value not in options:
            raise ValueError(f"must be one of {', '.join(repr(o) for o in options)}, not {value!r}")
        return value
    return check


def _url(value: Any) -> str:
    text = _nonempty(value).rstrip("/")
    if not re.match(r"^https?://[^/\s]+", text):
        raise ValueError(f"must be an http:// or https:// URL such as http://127.0.0.1:4096, not {value!r}")
    return text


def _names(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ValueError("must be a list of non-empty strings, e.g. [\"my-team\"]")
    return tuple(value)


def _level(value: Any) -> str:
    return _choice("debug", "info", "notice", "warning", "error")(str(value).lower() if isinstance(value, str) else value)


def _prompt(value: Any) -> str:
    text = _nonempty(value)
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]
    except ValueError as exc:
        raise ValueError(f"is not a valid template ({exc}); write a literal brace as {{{{ or }}}}") from None
    unknown = [n for n in names if n not in PROMPT_FIELDS]
    if unknown:
        raise ValueError(f"uses unknown placeholder {{{unknown[0]}}}; the placeholders are "
                         + ", ".join("{" + f + "}" for f in PROMPT_FIELDS) + " (write a literal brace as {{ or }})")
    return text


def _listen(value: Any) -> str:
    text = _nonempty(value)
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"must be host:port, e.g. \"127.0.0.1:9464\", not {value!r}")
    return text


PERMISSION_ACTIONS = ("allow", "deny", "ask")


def _permission_rules(value: Any) -> tuple[tuple[str, str, str], ...]:
    example = '[{ permission = "bash", pattern = "git status*", action = "allow" }]'
    if not isinstance(value, list):
        raise ValueError(f"must be a list of rules such as {example}")
    out = []
    for i, entry in enumerate(value):
        if not isinstance(entry, dict) or set(entry) - {"permission", "pattern", "action"} or "permission" not in entry:
            raise ValueError(f"entry {i + 1} must be a table with permission, pattern and action, e.g. {example}")
        perm, pattern, action = entry.get("permission"), entry.get("pattern", "*"), entry.get("action")
        if not all(isinstance(v, str) and v for v in (perm, pattern)):
            raise ValueError(f"entry {i + 1}: permission and pattern must be non-empty strings")
        if action not in PERMISSION_ACTIONS:
            raise ValueError(f"entry {i + 1}: action must be one of {', '.join(PERMISSION_ACTIONS)}, not {action!r}")
        out.append((str(perm), str(pattern), str(action)))
    return tuple(out)


def _type(value: Any) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "a table"}.get(type(value), type(value).__name__)


# key -> checker, per section; the dataclass gives the defaults.
SCHEMA: dict[str, tuple[type, dict[str, Check]]] = {
    "server": (ServerConfig, {"url": _url, "username": _nonempty, "password_file": _opt_str,
                              "timeout_seconds": _seconds()}),
    "ledger": (LedgerConfig, {"path": _nonempty, "store_events": _choice("default", "all", "none"),
                              "retention_days": _seconds()}),
    "health": (HealthConfig, {"interval_seconds": _seconds(), "timeout_seconds": _seconds(),
                              "startup_grace_seconds": _seconds(0.0, strict=False)}),
    "events": (EventsConfig, {"stream": _choice("global", "instance"), "directory": _opt_str,
                              "read_timeout_seconds": _seconds(1.0, strict=False),
                              "max_event_bytes": _int(4096), "reconnect_max_seconds": _seconds()}),
    "session": (SessionConfig, {"title": _nonempty, "id": _opt_str, "agent": _opt_str, "model": _opt_str,
                                "permission": _permission_rules}),
    "teams": (TeamsConfig, {"base_dir": _nonempty, "names": _names, "lead": _nonempty, "watch_members": _bool,
                            "poll_interval_seconds": _seconds(), "report_existing": _bool,
                            "max_message_bytes": _int(4096)}),
    "dispatch": (DispatchConfig, {"prompt": _prompt, "debounce_seconds": _seconds(0.0, strict=False),
                                  "min_interval_seconds": _seconds(0.0, strict=False),
                                  "max_per_hour": _int(1), "sweep_interval_seconds": _seconds(0.0, strict=False),
                                  "busy_timeout_seconds": _seconds(), "completion_timeout_seconds": _seconds(),
                                  "turn_timeout_seconds": _seconds(), "start_timeout_seconds": _seconds()}),
    "stalls": (StallsConfig, {"enabled": _bool, "teammate_quiet_seconds": _seconds()}),
    "metrics": (MetricsConfig, {"listen": _listen, "textfile": _opt_str, "textfile_interval_seconds": _seconds()}),
    "log": (LogConfig, {"level": _level}),
}
TRIGGER_KEYS: dict[str, Check] = {
    "name": _nonempty, "event": _nonempty, "sessions": _choice("others", "own", "any"), "enabled": _bool,
    "description": _str,
}
PATH_KEYS = {("ledger", "path"), ("server", "password_file"), ("teams", "base_dir"), ("events", "directory"),
             ("metrics", "textfile")}
TOP_KEYS = (*SCHEMA, "triggers", "safety")

RULE_KINDS = ("command", "path", "message", "tool")
RULE_ACTIONS = ("escalate", "reject", "hold", "tell", "abort")
SEVERITIES = ("critical", "high", "medium", "low")


def _choices(options: tuple[str, ...]) -> Check:
    def check(value: Any) -> tuple[str, ...]:
        if not isinstance(value, list) or not value or not all(v in options for v in value):
            raise ValueError(f"must be a non-empty list of {', '.join(repr(o) for o in options)}")
        return tuple(value)
    return check


def _regex(value: Any) -> str:
    text = _nonempty(value)
    try:
        re.compile(text)
    except re.error as exc:
        raise ValueError(f"is not a valid regular expression: {exc}") from None
    return text


def _command(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        try:
            argv = shlex.split(value)
        except ValueError as exc:
            raise ValueError(f"cannot be split into words: {exc}") from None
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        argv = list(value)
    else:
        raise ValueError('must be a string ("notify-admin --urgent") or a list of strings')
    if not argv or not argv[0]:
        raise ValueError("must not be empty")
    if shutil.which(argv[0]) is None:
        raise ValueError(f"program {argv[0]!r} not found (give an absolute path, or install it)")
    return tuple(argv)


def _permissions(value: Any) -> tuple[str, ...]:
    names = _names(value)
    bad = [n for n in names if not re.fullmatch(r"[A-Za-z0-9_*.-]+", n)]
    if not names or bad:
        raise ValueError("must be a non-empty list of permission names such as [\"bash\", \"edit\", "
                         "\"external_directory\"]" + (f", not {bad[0]!r}" if bad else ""))
    return tuple(dict.fromkeys(names))


SAFETY_KEYS: dict[str, Check] = {"enabled": _bool, "allow": _names, "broker": _bool,
                                 "broker_sessions": _choice("others", "teammates"), "ask": _permissions,
                                 "hold_timeout_seconds": _seconds(), "release_on_stop": _bool}
SAFETY_RULE_KEYS: dict[str, Check] = {
    "name": _nonempty, "applies_to": _choices(RULE_KINDS), "pattern": _regex,
    "severity": _choice(*SEVERITIES), "actions": _choices(RULE_ACTIONS), "enabled": _bool, "description": _str,
}
HOOK_KEYS: dict[str, Check] = {"name": _nonempty, "command": _command, "url": _url,
                               "timeout_seconds": _seconds(), "retries": _int(0)}


# -- line numbers ------------------------------------------------------------------

_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\-\" ]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_\-\"'.]+(?:\s*\.\s*[A-Za-z0-9_\-\"']+)*)\s*=")


def locate_keys(text: str) -> dict[str, int]:
    """Best-effort map from a dotted key path to its line (``triggers.1.event`` for arrays).

    tomllib gives no positions, so this reads the lines itself; it only has to be right
    for the plain layouts people write, and errors fall back to naming the key alone.
    """
    where: dict[str, int] = {}
    prefix = ""
    arrays: dict[str, int] = {}
    in_multiline: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        if in_multiline:
            if line.count(in_multiline) % 2 == 1:
                in_multiline = None
            continue
        header = _HEADER.match(line)
        if header:
            name = header.group(2).replace('"', "").replace(" ", "")
            if header.group(1) == "[[":
                arrays[name] = arrays.get(name, -1) + 1
                prefix = f"{name}.{arrays[name]}"
            else:
                prefix = name
            where.setdefault(prefix, number)
            continue
        key = _KEY.match(line)
        if key:
            name = re.sub(r"\s+", "", key.group(1)).replace('"', "").replace("'", "")
            path = f"{prefix}.{name}" if prefix else name
            where.setdefault(path, number)
            rest = line[key.end():]
            for quote in ('"""', "'''"):
                if rest.count(quote) == 1:
                    in_multiline = quote
    return where


# -- parsing -------------------------------------------------------------------------

class _Problems:
    def __init__(self, source: str, lines: dict[str, int]) -> None:
        self.source = source
        self.lines = lines
        self.items: list[str] = []
        self.bad: set[str] = set()  # the keys with a problem

    def add(self, key: str, message: str) -> None:
        line = self._line(key)
        where = f"{self.source}:{line}" if line else self.source
        self.items.append(f"{where}: {key}: {message}")
        self.bad.add(key)

    def clean(self, *keys: str) -> bool:
        """None of ``keys`` (or the tables that hold them) has a problem of its own: a check across them is fair."""
        return not any(k == b or k.startswith(b + ".") or b.startswith(k + ".") for k in keys for b in self.bad)

    def _line(self, key: str) -> int | None:
        parts = key.split(".")
        while parts:
            found = self.lines.get(".".join(parts))
            if found:
                return found
            parts.pop()
        return None

    def unknown(self, key: str, known: list[str]) -> None:
        leaf = key.rsplit(".", 1)[-1]
        close = difflib.get_close_matches(leaf, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(sorted(known))}"
        self.add(key, f"unknown key{hint}")


def _resolve_path(value: str, base_dir: Path) -> str:
    path = Path(os.path.expanduser(value))
    if not path.is_absolute():
        path = base_dir / path
    return str(path)


def _section(name: str, raw: Any, problems: _Problems, base_dir: Path) -> Any:
    cls, checks = SCHEMA[name]
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.add(name, f"must be a table ([{name}]), not {_type(raw)}")
        return cls()
    values: dict[str, Any] = {}
    for key, value in raw.items():
        check = checks.get(key)
        if check is None:
            problems.unknown(f"{name}.{key}", list(checks))
            continue
        try:
            converted = check(value)
        except ValueError as exc:
            problems.add(f"{name}.{key}", str(exc))
            continue
        if (name, key) in PATH_KEYS and isinstance(converted, str):
            converted = _resolve_path(converted, base_dir)
        values[key] = converted
    if name == "teams" and "base_dir" not in values:
        values["base_dir"] = _resolve_path(TeamsConfig.base_dir, base_dir)
    return cls(**values)


def _match_table(key: str, raw: Any, problems: _Problems) -> dict[str, Any] | None:
    if not isinstance(raw, dict):
        problems.add(key, f"must be a table of dotted event paths to values, not {_type(raw)}")
        return None
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        # ``match = { part = { tool = "x" } }`` and ``match = { "part.tool" = "x" }`` mean the same.
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
            return
        items = value if isinstance(value, list) else [value]
        if not items or not all(isinstance(v, (str, int, float, bool)) for v in items):
            problems.add(f"{key}.{prefix}", "must be a string (glob), number, boolean, or a list of them")
            return
        out[prefix] = tuple(value) if isinstance(value, list) else value

    walk("", raw)
    return out


def _triggers(raw: Any, problems: _Problems) -> tuple[TriggerRule, ...]:
    rules = {r.name: r for r in DEFAULT_TRIGGERS}
    for where, values in _entries("triggers", raw, TRIGGER_KEYS, problems, nested={"match": _match_table},
                                  name_hint=" (a default rule's name to change it, or a new one)"):
        name = values["name"]
        if name in rules:
            rules[name] = replace(rules[name], **values)
        elif "event" not in values:
            problems.add(where, f"new rule {name!r} needs an event type (e.g. event = \"session.error\")")
        else:
            rules[name] = TriggerRule(**values)
    return tuple(rules.values())


Nested = Callable[[str, Any, "_Problems"], Any]


def _entries(key: str, raw: Any, checks: dict[str, Check], problems: _Problems,
             nested: dict[str, Nested] | None = None, name_hint: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Check each named table of an array of tables: (its key, its values) for the usable ones.

    ``nested`` keys have checkers of their own that report problems themselves (and
    return None on error). A name given twice is an error: the second would silently win.
    """
    if raw is None:
        return []
    if not isinstance(raw, list):
        problems.add(key, f"must be an array of tables ([[{key}]])")
        return []
    nested = nested or {}
    out = []
    seen: set[str] = set()
    for index, entry in enumerate(raw):
        where = f"{key}.{index}"
        if not isinstance(entry, dict):
            problems.add(where, "must be a table")
            continue
        values: dict[str, Any] = {}
        ok = True
        for k, v in entry.items():
            if k in nested:
                values[k] = nested[k](f"{where}.{k}", v, problems)
                ok = ok and values[k] is not None
                continue
            check = checks.get(k)
            if check is None:
                problems.unknown(f"{where}.{k}", [*checks, *nested])
                ok = False
                continue
            try:
                values[k] = check(v)
            except ValueError as exc:
                problems.add(f"{where}.{k}", str(exc))
                ok = False
        name = values.get("name")
        if name is None:
            if "name" not in entry:
                problems.add(where, f"needs a name{name_hint}")
            continue
        if name in seen:
            problems.add(f"{where}.name", f"{name!r} is defined twice")
            continue
        seen.add(name)
        if ok:
            out.append((where, values))
    return out


def _safety(raw: Any, problems: _Problems) -> SafetyConfig:
    from .policy import DEFAULT_RULES  # the built-in rule names

    if raw is None:
        return SafetyConfig()
    if not isinstance(raw, dict):
        problems.add("safety", "must be a table ([safety])")
        return SafetyConfig()
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key in ("rules", "hooks"):
            continue
        check = SAFETY_KEYS.get(key)
        if check is None:
            problems.unknown(f"safety.{key}", [*SAFETY_KEYS, "rules", "hooks"])
            continue
        try:
            values[key] = check(value)
        except ValueError as exc:
            problems.add(f"safety.{key}", str(exc))
    builtin = {r.name for r in DEFAULT_RULES}
    rules: list[SafetyRuleConfig] = []
    for where, v in _entries("safety.rules", raw.get("rules"), SAFETY_RULE_KEYS, problems,
                             name_hint=" (a built-in rule's name to change it, or a new one)"):
        if v["name"] not in builtin and "pattern" not in v and v.get("enabled", True):
            problems.add(where, f"new rule {v['name']!r} needs a pattern (a regular expression); the built-in "
                         f"rules are {', '.join(sorted(builtin))}")
            continue
        rules.append(SafetyRuleConfig(**v))
    hooks: list[HookConfig] = []
    for where, v in _entries("safety.hooks", raw.get("hooks"), HOOK_KEYS, problems):
        if "command" not in v and "url" not in v:
            problems.add(where, "needs a command, a url, or both")
            continue
        hooks.append(HookConfig(**v))
    return SafetyConfig(**values, rules=tuple(rules), hooks=tuple(hooks))


#: a check of the config against the machine: (key, problem) pairs, for the keys not already in error
EnvironmentCheck = Callable[[Config, Callable[..., bool]], list[tuple[str, str]]]


def parse_config(text: str, source: str = "<config>", base_dir: str | Path | None = None,
                 environment: EnvironmentCheck | None = None) -> Config:
    """Parse and validate a whole config; raise ConfigError listing every problem.

    ``environment`` adds what only the machine can tell (files, ports); it runs on the
    config as parsed even when some keys are in error, so one run names every problem.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"line (\d+)", str(exc))
        where = f"{source}:{match.group(1)}" if match else source
        raise ConfigError([f"{where}: not valid TOML: {exc}"]) from None
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    problems = _Problems(source, locate_keys(text))
    for key in data:
        if key not in TOP_KEYS:
            problems.unknown(key, list(TOP_KEYS))
    sections = {name: _section(name, data.get(name), problems, base) for name in SCHEMA}
    triggers = _triggers(data.get("triggers"), problems)
    safety = _safety(data.get("safety"), problems)
    cfg = Config(**sections, triggers=triggers, safety=safety, source=source)
    _cross_checks(cfg, problems)
    if environment is not None:
        for key, message in environment(cfg, problems.clean):
            problems.add(key, message)
    if problems.items:
        raise ConfigError(problems.items)
    return cfg


def _cross_checks(cfg: Config, problems: _Problems) -> None:
    """Checks across keys, each only when the keys it compares are valid themselves."""
    if (problems.clean("health.timeout_seconds", "health.interval_seconds")
            and cfg.health.timeout_seconds > max(cfg.health.interval_seconds, 1.0) * 10):
        problems.add("health.timeout_seconds", "is much longer than health.interval_seconds; a hung probe "
                     "would hide an outage (keep it at most ten intervals)")
    if problems.clean("metrics") and (cfg.metrics.listen or cfg.metrics.textfile):
        from .metrics import available
        if not available():
            problems.add("metrics", "needs the prometheus_client library: pip install 'orchestratord[metrics]' "
                         "(or make install EXTRAS=metrics; or remove [metrics])")
    if (problems.clean("events.stream", "events.directory") and cfg.events.stream == "global"
            and cfg.events.directory):
        problems.add("events.directory", "only applies to events.stream = \"instance\"")


def load_config(path: str | os.PathLike[str], environment: EnvironmentCheck | None = None) -> Config:
    """Read and validate the file at ``path``; errors say which file and what to fix."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{p}: no such file; create it (an example ships as "
                           "etc/opencode-orchestrator/orchestrator.toml) or pass --config"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{p}: cannot read: {exc}"]) from None
    cfg = parse_config(text, str(p), p.resolve().parent, environment)
    return replace(cfg, digest=hashlib.sha256(text.encode("utf-8")).hexdigest()[:12])


def dump_config(cfg: Config) -> str:
    """The effective config as TOML (every key, defaults filled in)."""
    out: dict[str, Any] = {}
    for f in fields(cfg):
        if f.name in ("source", "digest", "triggers", "safety"):
            continue
        section = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(getattr(cfg, f.name)).items()
                   if v is not None}
        out[f.name] = section
    out["triggers"] = [
        {k: ({p: (list(x) if isinstance(x, tuple) else x) for p, x in v.items()} if k == "match" else v)
         for k, v in asdict(rule).items() if not (k == "match" and not v)}
        for rule in cfg.triggers
    ]
    out["session"]["permission"] = [{"permission": p, "pattern": pat, "action": a}
                                    for p, pat, a in cfg.session.permission]
    s = cfg.safety
    out["safety"] = {
        "enabled": s.enabled, "allow": list(s.allow), "broker": s.broker, "broker_sessions": s.broker_sessions,
        "ask": list(s.ask), "hold_timeout_seconds": s.hold_timeout_seconds, "release_on_stop": s.release_on_stop,
        "rules": effective_rules(s.rules),
        "hooks": [{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(h).items() if v is not None}
                  for h in s.hooks],
    }
    return tomli_w.dumps(out).replace("[[safety.rules]]", RULES_NOTE + "[[safety.rules]]", 1)


RULES_NOTE = ("# The rules in effect: the built-in ones (their check is code, so they have no pattern) with the "
              "config's changes,\n# then the config's own.\n")


def effective_rules(changes: tuple[SafetyRuleConfig, ...]) -> list[dict[str, Any]]:
    """Every safety rule as it is in effect, as ``[[safety.rules]]`` tables that mean the same again."""
    from .policy import build_rules

    out = []
    for rule in build_rules(changes):
        entry: dict[str, Any] = {"name": rule.name}
        if rule.applies_to:
            entry["applies_to"] = sorted(rule.applies_to)
        if rule.pattern is not None:
            entry["pattern"] = rule.pattern.pattern
        entry.update(severity=rule.severity, actions=list(rule.actions), enabled=rule.enabled,
                     description=rule.description)
        out.append(entry)
    return out


def summarize(cfg: Config) -> str:
    """A few lines for ``check-config``: where it connects, what it watches, what it triggers on."""
    teams = ", ".join(cfg.teams.names) if cfg.teams.names else "(every team)"
    rules = ", ".join(r.name + ("" if r.enabled else " (disabled)") for r in cfg.triggers)
    auth = f"basic auth as {cfg.server.username}" if cfg.server.password_file else "no password file"
    session = cfg.session.id or f"titled {cfg.session.title!r}"
    lines = [
        f"server    {cfg.server.url} ({auth})",
        f"ledger    {cfg.ledger.path} (events: {cfg.ledger.store_events}, kept {cfg.ledger.retention_days:g} days)",
        f"events    {cfg.events.stream} stream; health every {cfg.health.interval_seconds:g}s",
        f"session   {session}",
        f"teams     {teams} under {cfg.teams.base_dir}, lead {cfg.teams.lead}",
        f"dispatch  debounce {cfg.dispatch.debounce_seconds:g}s, at least {cfg.dispatch.min_interval_seconds:g}s "
        f"apart, at most {cfg.dispatch.max_per_hour}/hour, sweep "
        + (f"every {cfg.dispatch.sweep_interval_seconds:g}s" if cfg.dispatch.sweep_interval_seconds else "off"),
        f"triggers  {rules}",
        "safety    " + ("off" if not cfg.safety.enabled else
                         f"{len(cfg.safety.rules)} rule change(s), {len(cfg.safety.hooks)} hook(s), "
                         f"{len(cfg.safety.allow)} allowed pattern(s)"),
        "broker    " + ("off" if not (cfg.safety.enabled and cfg.safety.broker) else
                         f"{', '.join(cfg.safety.ask)} ask in "
                         + ("every session but the orchestrator's" if cfg.safety.broker_sessions == "others"
                            else "sessions titled <name>@<team>")
                         + f"; held requests rejected after {cfg.safety.hold_timeout_seconds:g}s"
                         + ("; released at a clean stop" if cfg.safety.release_on_stop else "")),
        "stalls    " + (f"teammates quiet {cfg.stalls.teammate_quiet_seconds:g}s; " if cfg.stalls.enabled else "off; ")
        + f"orchestrator turn {cfg.dispatch.turn_timeout_seconds:g}s without activity, "
        f"start {cfg.dispatch.start_timeout_seconds:g}s",
        f"log       {cfg.log.level}",
    ]
    return "\n".join(lines)
