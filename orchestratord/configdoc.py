"""What each config key means, and the reference page built from that and the schema.

:mod:`.config` says which keys exist, their defaults and how each is checked; this module
only says what they are for. The page (``orchestratord config reference``, written to
docs/configuration.md by ``make docs``) takes every key, type and default from the
schema and the dataclasses, so it cannot list a key that does not exist or a default
that is not the code's; a test fails when docs/configuration.md differs from it.

Size: it is mostly the text that describes each key.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import tomli_w

from .config import (
    DEFAULT_CONFIG_PATH,
    DEFAULT_TRIGGERS,
    HOOK_KEYS,
    PATH_KEYS,
    SAFETY_KEYS,
    SAFETY_RULE_KEYS,
    SCHEMA,
    TRIGGER_KEYS,
    HookConfig,
    SafetyConfig,
    SafetyRuleConfig,
    TriggerRule,
)

# "section.key" -> what it is for; an array of tables has an entry of its own ("triggers").
DESCRIPTIONS: dict[str, str] = {
    "server.url": "Base URL of the `opencode serve` to watch (`http://` or `https://`).",
    "server.username": "User name for HTTP basic auth; used only when a password is found.",
    "server.password_file": (
        "File holding the server's password (its `OPENCODE_SERVER_PASSWORD`). Unset: the systemd credential "
        "`opencode-password` (`$CREDENTIALS_DIRECTORY/opencode-password`, from `LoadCredential=`) if there is "
        "one, else no auth. The password itself is never a config key."),
    "server.timeout_seconds": "Timeout of one ordinary HTTP request to the server.",

    "ledger.path": (
        "The SQLite ledger shared by the daemon's threads and read by `orchestratord status` and the other "
        "listing commands. Its directory must be writable: SQLite writes `-wal` and `-shm` files beside it."),
    "ledger.store_events": (
        "Which server events are recorded: `default` (all but the high-volume `message.part.delta`, and not "
        "the durable `sync` copies), `all`, or `none`. Teammate messages, triggers, prompts, escalations and "
        "state transitions are kept whatever this says."),
    "ledger.retention_days": (
        "Rows older than this are pruned once an hour, except open work; message identities and handled "
        "escalations are kept 30 days longer."),

    "health.interval_seconds": "How often `GET /global/health` is probed.",
    "health.timeout_seconds": (
        "Timeout of one probe; a server that was up and lets a probe time out is probed again at once, "
        "and counts as down when that one fails too. At most ten intervals, or a hung probe would hide "
        "an outage."),
    "health.startup_grace_seconds": (
        "For this long after the daemon starts, a server that has not yet been up is taken to be starting "
        "(both units start together at boot): its failed probes and stream connects are logged at notice "
        "(`server-starting`), and only once this has run out with the server still down is `server-down` a "
        "warning. 0 makes every failure a warning at once."),

    "events.stream": (
        "`global` reads `/global/event` (every project on the server; after a reconnect the reader catches up "
        "from the sequence numbers it kept); `instance` reads `/event`, the events of one directory."),
    "events.directory": (
        "With `stream = \"instance\"` only: the project directory whose events to read, sent as the "
        "`?directory=` query parameter. Unset: the server's own directory."),
    "events.read_timeout_seconds": (
        "The server sends a heartbeat every 10 s; no byte for this long and the stream is taken for dead and "
        "reconnected. At least 1."),
    "events.max_event_bytes": "An event larger than this is skipped (and logged) instead of being buffered. "
                              "At least 4096.",
    "events.reconnect_max_seconds": "Cap of the jittered, growing wait between reconnects.",

    "session.title": (
        "Title of the orchestrator session the daemon creates once, remembers in the ledger per server URL "
        "and reuses; it is created again if it was deleted on the server."),
    "session.id": "Use this existing session instead of creating one; it is used as it is (its permission "
                  "rules are not changed).",
    "session.agent": "The agent that answers the prompts. Unset: the server's default agent.",
    "session.model": "The model for the prompts, as `provider/model` (a value without a `/` is not sent). "
                     "Unset: the server's default model.",
    "session.permission": (
        "Rules appended to the ruleset of the session the daemon creates, which denies `bash`, `edit` and "
        "`webfetch` and allows the `claude-teams_*` tools; the last matching rule wins. Each is a table "
        "`{ permission, pattern, action }`: `pattern` is a glob (default `\"*\"`), `action` is `allow`, "
        "`deny` or `ask`. A reused session gets the whole ruleset again when this changes."),

    "teams.base_dir": (
        "Where claude-teams keeps `teams/<team>/config.json` and the inboxes: the `.claude` in the HOME of the "
        "server it runs under (or its `CLAUDE_TEAMS_BASE_DIR`). The default, `~/.claude`, is that of the user the "
        "daemon runs as, right for a person running both by hand or as `systemctl --user` services; the shipped "
        "config and `init-config` set `/var/lib/opencode-serve/.claude`, that of the shipped "
        "`opencode-serve.service`, which the daemon's unit may read. `check-config` fails when it does not exist."),
    "teams.names": "The teams looked after, named in the prompt. Empty: every team under `teams.base_dir`.",
    "teams.lead": "The lead's agent name: each new message in its inbox is a trigger.",
    "teams.watch_members": (
        "Also read, record and report every member's inbox, not only the lead's; only the lead's messages "
        "are triggers."),
    "teams.poll_interval_seconds": (
        "Stat rescan of the inboxes, the safety net behind inotify (and the only means on filesystems "
        "without change notification, such as NFS)."),
    "teams.max_message_bytes": (
        "One inbox message larger than this is not decoded: it is recorded as oversized (sender, timestamp, "
        "size) and reported once, and the messages after it are read as usual. An inbox file itself has no size "
        "limit."),
    "teams.report_existing": (
        "On the very first start, report the messages already in the inboxes as new; by default they are "
        "recorded as seen, without a report or a prompt."),

    "dispatch.prompt": (
        "The prompt template. Placeholders: `{teams}`, `{lead}` and `{triggers}` (one line per thing that "
        "happened); write a literal brace as `{{` or `}}`."),
    "dispatch.debounce_seconds": (
        "Quiet period after the newest trigger before a prompt goes out, so that triggers close together make "
        "one prompt; a steady trickle still goes out after four quiet periods (at least 2 s). Escalations "
        "skip it."),
    "dispatch.min_interval_seconds": "Minimum time between two prompts. Escalations skip it.",
    "dispatch.max_per_hour": (
        "Cap on prompts in any rolling hour, counted across restarts; triggers beyond it wait in the ledger, "
        "none is dropped."),
    "dispatch.sweep_interval_seconds": (
        "Send a check-in prompt when nothing has been sent for this long, trigger or not; `0` turns it off."),
    "dispatch.busy_timeout_seconds": (
        "The session says busy but has had no activity for this long: if its last reply is complete, the "
        "status is wrong; that is logged once (`status-mismatch`) and the prompt is sent anyway."),
    "dispatch.completion_timeout_seconds": (
        "Stop following a prompt that has not finished after this long, active or not; it is recorded as "
        "`timeout`."),
    "dispatch.turn_timeout_seconds": (
        "An orchestrator turn with no activity (no event of its session) for this long is aborted and "
        "recorded as `timeout`; what is pending goes into the next prompt. A slow turn that still streams is "
        "left alone."),
    "dispatch.start_timeout_seconds": (
        "A prompt the server accepted but did not start within this long is sent once more under a new "
        "message ID, saying which prompt it supersedes (`prompt-never-ran`); if that one does not start "
        "either, it is escalated and its triggers go back to the queue."),

    "stalls.enabled": "The stall detector for teammate sessions (a thread of its own).",
    "stalls.teammate_quiet_seconds": (
        "A busy teammate session with no event of its own for this long is stalled: logged, recorded and made "
        "a trigger, once per silence. One waiting on a permission request or a question is reported as "
        "waiting instead, without a prompt."),

    "metrics.listen": "`host:port` to serve Prometheus metrics on over HTTP (needs the `metrics` extra).",
    "metrics.textfile": (
        "Write the metrics to this file for node_exporter's textfile collector (to a temporary file, then "
        "renamed: never read half-written); needs no listening socket, but the `metrics` extra all the same."),
    "metrics.textfile_interval_seconds": "How often that file is rewritten.",

    "log.level": "`debug`, `info`, `notice`, `warning` or `error`.",

    "triggers": (
        "Trigger rules: which server events wake the dispatcher. An entry with the name of a default rule "
        "changes that rule (only the keys it gives); any other name adds a rule."),
    "triggers.name": "The rule's name; a default rule's name changes that rule.",
    "triggers.event": "Glob on the event type (`session.*`); a new rule needs one.",
    "triggers.match": (
        "Dotted paths into the event's properties and the values they must have: a value, a glob, or a list "
        "of alternatives; `{ \"part.tool\" = \"x\" }` and `{ part = { tool = \"x\" } }` mean the same."),
    "triggers.sessions": (
        "Whose events count: `others` (any session but the orchestrator's own), `own` (only its own) or "
        "`any`."),
    "triggers.enabled": "`false` switches the rule off.",
    "triggers.description": "How the prompt words what happened.",

    "safety.enabled": "The safety guard: judging, escalations and their actions.",
    "safety.allow": (
        "Globs on the whole text judged (a command, a path, a message), with runs of spaces squeezed to one; "
        "what matches one is never escalated or rejected."),

    "safety.broker": (
        "The permission broker: each session it looks after gets rules appended that make the permissions "
        "in `safety.ask` ask first, and the daemon answers every such request itself: a critical rule rejects "
        "it, a hold rule holds it for a person (`orchestratord allow`/`deny`), anything else is approved once. "
        "`false` leaves sessions as they are; destructive requests are still rejected."),
    "safety.broker_sessions": (
        "Which sessions the broker looks after: `others` (every session but the orchestrator's own) or "
        "`teammates` (only sessions titled `<name>@<team>`, as claude-teams names its teammates, of a team in "
        "`teams.names`, or of any team when that is empty)."),
    "safety.ask": (
        "The permissions a brokered session must ask for, e.g. `[\"bash\", \"edit\", \"external_directory\"]`; "
        "a file the edit tool writes is otherwise only seen after the fact."),
    "safety.hold_timeout_seconds": (
        "A request held for a person and not answered within this long is rejected; a timeout never approves."),
    "safety.release_on_stop": (
        "At a clean stop, append rules that let the brokered sessions run unasked (and unjudged) until the "
        "daemon is back. By default a stop fails closed: their requests wait, and are answered at the next "
        "start."),
    "safety.rules": (
        "Changes to the built-in rules (below), by name, and regex rules of your own. A change keeps what it "
        "does not give."),
    "safety.rules.name": "A built-in rule's name changes that rule; any other name adds one, which needs a "
                         "`pattern`.",
    "safety.rules.applies_to": "What the rule looks at: a list of `command`, `path`, `message`, `tool`.",
    "safety.rules.pattern": (
        "A regular expression, case-insensitive, searched in the text; on a built-in rule it replaces the "
        "rule's own check."),
    "safety.rules.severity": (
        "`critical` or `high` (the escalation is logged at critical priority), `medium` or `low` (logged as a "
        "warning)."),
    "safety.rules.actions": (
        "What an escalation under this rule does besides being recorded, logged and sent to the hooks: a list "
        "of `escalate`, `reject` (answer a matching permission request `reject`), `hold` (hold a matching "
        "request of a brokered session for a person), `tell` (a prompt to the orchestrator) and `abort` (abort "
        "the offending session)."),
    "safety.rules.enabled": "`false` switches the rule off.",
    "safety.rules.description": "A few words on what the rule catches; judging does not use them.",

    "safety.hooks": "Run on every escalation, each in a thread of its own, never waited for.",
    "safety.hooks.name": "Names the hook in the log.",
    "safety.hooks.command": (
        "A program (a string split as a shell would, or a list) that gets the escalation as JSON on stdin; it "
        "runs in its own process group and is killed at the timeout. It must exist when the config is "
        "checked."),
    "safety.hooks.url": "An `http://` or `https://` URL that gets the escalation as a JSON `POST`.",
    "safety.hooks.timeout_seconds": "Time limit of one run of the command, or of one POST.",
    "safety.hooks.retries": (
        "How many more times a POST is tried after a failure (no answer, HTTP 5xx or 429); the command is not "
        "run again."),
}

# Where the type the dataclass declares is not what the file takes.
TYPE_OVERRIDES = {"safety.hooks.command": "string or array of strings"}
# Where the dataclass's empty default stands for "none given".
DEFAULT_OVERRIDES = {"safety.hooks.command": "unset"}

REQUIRED = "required"

INTRO = f"""\
# Configuration reference

<!-- Generated by `make docs` (`orchestratord config reference`) from orchestratord/config.py and
orchestratord/configdoc.py: change those, not this file. -->

The config is one TOML file, `{DEFAULT_CONFIG_PATH}` unless `--config`
names another. It is validated as a whole: an unknown key is an error (with a "did you mean"),
and every problem is reported at once with its file, line and key (`orchestratord check-config`).
Durations are in seconds and take fractions (`0.5`). Relative paths are taken relative to the
config file's directory, and `~` is expanded.

A reload (`systemctl reload opencode-orchestrator`, or SIGHUP) parses and checks the whole file:
if it is valid it is swapped in and only the threads whose sections changed are restarted; on any
error every problem is logged and the daemon keeps its old config.

`orchestratord config show` prints the effective config with every default filled in;
`orchestratord init-config` writes a short starting file; the shipped example,
[etc/opencode-orchestrator/orchestrator.toml](../etc/opencode-orchestrator/orchestrator.toml),
has every key with a comment.
"""


@dataclass(frozen=True)
class Group:
    """One table of the file (``[server]``) or one array of tables (``[[triggers]]``)."""

    path: str
    cls: type
    keys: tuple[str, ...]
    array: bool = False

    @property
    def heading(self) -> str:
        return f"[[{self.path}]]" if self.array else f"[{self.path}]"

    @property
    def section(self) -> str:
        """The top-level section a reload compares."""
        return self.path.split(".")[0]


def _entry_keys(cls: type, checks: Mapping[str, Any]) -> tuple[str, ...]:
    """An array entry's keys: its dataclass's fields, then any checked key without one."""
    names = [f.name for f in dataclasses.fields(cls)]
    return tuple(names + [k for k in checks if k not in names])


def groups() -> list[Group]:
    """Every table and array of tables the file may hold, in the order the page shows them."""
    out = [Group(name, cls, tuple(checks)) for name, (cls, checks) in SCHEMA.items()]
    out.append(Group("triggers", TriggerRule, _entry_keys(TriggerRule, TRIGGER_KEYS), array=True))
    out.append(Group("safety", SafetyConfig, tuple(SAFETY_KEYS)))
    out.append(Group("safety.rules", SafetyRuleConfig, _entry_keys(SafetyRuleConfig, SAFETY_RULE_KEYS), array=True))
    out.append(Group("safety.hooks", HookConfig, _entry_keys(HookConfig, HOOK_KEYS), array=True))
    return out


def documented_keys() -> list[str]:
    """Every name that needs a description: each key as ``section.key``, and each array of tables."""
    out: list[str] = []
    for g in groups():
        if g.array:
            out.append(g.path)
        out.extend(f"{g.path}.{k}" for k in g.keys)
    return out


# -- types and defaults, from the dataclasses ---------------------------------------

def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        kept = [a for a in args if a is not type(None)]
        return " or ".join(_type_name(a) for a in kept)
    if origin is tuple:
        inner = args[0] if args else Any
        return "array of strings" if inner is str else "array of tables"
    if origin is not None and isinstance(origin, type) and issubclass(origin, Mapping):
        return "table"
    return {str: "string", bool: "boolean", int: "integer", float: "number"}.get(hint, "value")


def key_type(group: Group, key: str) -> str:
    """What the file takes for ``key``: from the dataclass's annotation, with seconds and paths named."""
    path = f"{group.path}.{key}"
    if path in TYPE_OVERRIDES:
        return TYPE_OVERRIDES[path]
    hints = typing.get_type_hints(group.cls)
    name = _type_name(hints[key]) if key in hints else "value"
    if (group.path, key) in PATH_KEYS:
        return "path"
    if name == "number" and key.endswith("_seconds"):
        return "seconds"
    return name


def _toml(value: Any) -> str:
    """One value as it would be written in the file, on one line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{}" if not value else "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return tomli_w.dumps({"v": str(value)}).split("=", 1)[1].strip()


def default_of(group: Group, key: str) -> Any:
    """The dataclass's default for ``key``; ``REQUIRED`` when it has none."""
    for f in dataclasses.fields(group.cls):
        if f.name == key:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            return REQUIRED
    return REQUIRED


def _new_rule_defaults() -> dict[str, Any]:
    """What a new ``[[safety.rules]]`` entry gets for the keys it leaves out, as the policy builds it."""
    from .policy import build_rules

    built = build_rules([SafetyRuleConfig(name="new", pattern="x")], base=())[0]
    return {"applies_to": sorted(built.applies_to), "severity": built.severity, "actions": list(built.actions)}


def default_text(group: Group, key: str, blocks: list[tuple[str, str]]) -> str:
    """The default as the table shows it; a default of several lines goes into ``blocks``."""
    path = f"{group.path}.{key}"
    if path in DEFAULT_OVERRIDES:
        return DEFAULT_OVERRIDES[path]
    value = default_of(group, key)
    if value is REQUIRED:
        return REQUIRED
    if group.path == "safety.rules" and value is None and key in _new_rule_defaults():
        return f"the rule's own; a new rule: `{_toml(_new_rule_defaults()[key])}`"
    if value is None:
        return "unset"
    if isinstance(value, str) and "\n" in value:
        blocks.append((path, value))
        return "built in (below)"
    return f"`{_toml(value)}`"


# -- the page -----------------------------------------------------------------------

def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _restarts(group: Group) -> str:
    """Which threads a reload restarts when this section changes."""
    from .supervisor import WORKER_SECTIONS

    threads = [name for name, sections in WORKER_SECTIONS.items() if group.section in sections]
    if not threads:
        return "A reload applies a change here without restarting a thread."
    return "A reload that changes this section restarts these threads: " + ", ".join(threads) + "."


def _default_triggers() -> list[str]:
    lines = ["The default rules:", "",
             "| name | event | match | sessions | says |", "|---|---|---|---|---|"]
    for r in DEFAULT_TRIGGERS:
        match = ", ".join(f"`{p}` = `{_toml(v)}`" for p, v in r.match.items()) or "-"
        lines.append(f"| `{r.name}` | `{r.event}` | {_cell(match)} | `{r.sessions}` | {_cell(r.description)} |")
    return lines


def _builtin_rules() -> list[str]:
    from .policy import DEFAULT_RULES

    lines = ["The built-in rules (what each catches is told in [safety.md](safety.md)):", "",
             "| name | looks at | severity | actions | catches |", "|---|---|---|---|---|"]
    for r in DEFAULT_RULES:
        looks = ", ".join(sorted(r.applies_to))
        lines.append(f"| `{r.name}` | {looks} | `{r.severity}` | {', '.join(r.actions)} | {_cell(r.description)} |")
    return lines


def reference() -> str:
    """The whole configuration reference as Markdown: every key, its type, default and meaning."""
    out = [INTRO.rstrip("\n"), ""]
    all_groups = groups()
    out.append("Sections: " + " · ".join(f"[{g.path}](#{slug(g.heading)})" for g in all_groups) + ".")
    for g in all_groups:
        out += ["", f"## {g.heading}", ""]
        if g.array:
            out += [DESCRIPTIONS.get(g.path, ""), ""]
        out.append(_restarts(g))
        out += ["", "| key | type | default | meaning |", "|---|---|---|---|"]
        blocks: list[tuple[str, str]] = []
        for key in g.keys:
            path = f"{g.path}.{key}"
            out.append(f"| `{path}` | {key_type(g, key)} | {_cell(default_text(g, key, blocks))} | "
                       f"{_cell(DESCRIPTIONS.get(path, ''))} |")
        for path, text in blocks:
            out += ["", f"The default of `{path}`:", "", "```text", text, "```"]
        if g.path == "triggers":
            out += [""] + _default_triggers()
        if g.path == "safety.rules":
            out += [""] + _builtin_rules()
    return "\n".join(out) + "\n"


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"`([^`]*)`", r"\1", heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")
