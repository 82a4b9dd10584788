"""The safety guard: judge what teammates say and do, escalate at once, refuse destructive commands.

Judging is cheap and pure (see :mod:`.policy`), so it happens in the thread that sees the
input: the event reader for tool calls, permission requests and the orchestrator's own
output, the inbox watcher for teammate messages. That thread records the escalation in
the ledger and logs it (at critical priority; a hold rule's at warning) before it moves
on, so a crash cannot lose one. The :class:`Guard` worker then carries out what the rule
asks (reject the permission request or note that it is held for a person, tell the
orchestrator, abort the session, run the hooks), each action once, from the ledger.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import time
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from . import logs
from .hooks import Hooks
from .jsonvalues import as_dict
from .ledger import Escalation, Ledger
from .ledgerwatch import LedgerHealth
from .opencode import OpencodeClient, OpencodeError, Unreachable
from .policy import COMMAND, MESSAGE, PATH, TOOL, Context, Finding, Rule, build_rules, evaluate
from .sessions import SessionInfo
from .stream import Event
from .teammsg import TeamMessage, call_ckey, message_ckey
from .worker import Deps, ServerWorker, crash_point

if TYPE_CHECKING:
    from .config import Config

log = logs.get("guard")

FROM_MESSAGE, FROM_TOOL, FROM_PERMISSION, FROM_OUTPUT = "message", "tool", "permission", "output"
PATH_TOOLS = {"read", "write", "edit", "multiedit", "patch"}
PATH_PERMISSIONS = {"edit", "read", "external_directory"}
URGENT = ("critical", "high")
#: how many judgements of short inputs are remembered, and how short
JUDGED_CACHE = 1024
JUDGED_TEXT = 4096


@dataclass(frozen=True)
class Seen:
    """One piece of input to judge, and who it came from."""

    source: str
    kind: str
    text: str
    key: str  # the act's identity; the rule name is appended per finding
    session_id: str | None = None
    team: str | None = None
    teammate: str | None = None
    permission_id: str | None = None
    directory: str | None = None  # the event's directory: the project, when the session is not known
    claimed: str | None = None  # a send_message call's ``sender``: who it says it is from


#: claude-teams' default ``sender`` when a call names none
DEFAULT_SENDER = "team-lead"
FORGED = "forged-sender"


# -- what there is to judge --------------------------------------------------------

def seen_in_message(m: TeamMessage) -> Seen:
    """A teammate message; keyed like the same message seen as a send_message call."""
    return Seen(FROM_MESSAGE, MESSAGE, m.text, f"msg:{message_ckey(m)}", team=m.team, teammate=m.sender)


def permission_of(tool: str) -> str:
    """The permission the server asks before running ``tool`` (opencode's names)."""
    if tool in ("write", "edit", "multiedit", "patch"):
        return "edit"
    return tool


def seen_in_event(event: Event, own_session: str | None,
                  asked_first: Callable[[str, str], bool] | None = None) -> list[Seen]:
    """Tool calls in any session; the orchestrator's own text (the broker judges permission requests).

    A call that the server will ask about first (``asked_first(session, permission)``: the
    broker gave that session the rule) is judged by the broker when it asks, before it
    runs; here it is looked at only once it has ended, which a call that ran unasked does.
    """
    props = event.properties
    if event.type != "message.part.updated":
        return []
    part = props.get("part")
    if not isinstance(part, dict):
        return []
    sid = part.get("sessionID") if isinstance(part.get("sessionID"), str) else event.session_id
    if part.get("type") == "text":
        done = isinstance(part.get("time"), dict) and part["time"].get("end")
        if sid and sid == own_session and done and isinstance(part.get("text"), str):
            return [Seen(FROM_OUTPUT, MESSAGE, part["text"], f"text:{part.get('id')}", session_id=sid)]
        return []
    if part.get("type") != "tool":
        return []
    state = as_dict(part.get("state"))
    inp = state.get("input")
    if not isinstance(inp, dict) or not inp:
        return []
    tool = str(part.get("tool") or "")
    if (asked_first is not None and sid and state.get("status") in ("pending", "running")
            and asked_first(sid, permission_of(tool))):
        return []
    key = f"call:{part.get('messageID')}:{part.get('callID') or part.get('id')}"
    source = FROM_OUTPUT if sid and sid == own_session else FROM_TOOL
    return [Seen(source, kind, text, key, session_id=sid, team=team, teammate=who, directory=event.directory,
                 claimed=who if tool.endswith("send_message") else None)
            for kind, text, team, who, key in _tool_inputs(tool, inp, key)]


def _tool_inputs(tool: str, inp: dict[str, Any], key: str) -> Iterable[tuple[str, str, str | None, str | None, str]]:
    if tool == "bash" and isinstance(inp.get("command"), str):
        yield COMMAND, inp["command"], None, None, key
    elif tool in PATH_TOOLS:
        path = inp.get("filePath") or inp.get("path")
        if isinstance(path, str):
            yield PATH, path, None, None, key
    elif tool.endswith("send_message"):
        # Judged as what it is, a message, keyed so the inbox file's copy is the same act.
        content = inp.get("content")
        if isinstance(content, str) and content:
            ckey = call_ckey(tool, inp)
            yield (MESSAGE, content, _str(inp.get("team_name")), _str(inp.get("sender")) or DEFAULT_SENDER,
                   f"msg:{ckey}" if ckey else key)
    else:
        yield TOOL, json.dumps(inp, sort_keys=True, ensure_ascii=False), None, None, key


def seen_in_permission(req: dict[str, Any]) -> list[Seen]:
    """A permission request: its command whatever the permission's name, or its paths."""
    pid = req.get("id")
    if not isinstance(pid, str):
        return []
    sid = _str(req.get("sessionID"))
    tool = as_dict(req.get("tool"))
    key = (f"call:{tool.get('messageID')}:{tool.get('callID')}" if tool.get("callID") else f"perm:{pid}")
    meta = as_dict(req.get("metadata"))
    name = str(req.get("permission") or "")
    patterns = [p for p in req.get("patterns") or [] if isinstance(p, str)]
    out: list[Seen] = []
    if isinstance(meta.get("command"), str) and meta["command"].strip():
        out.append(Seen(FROM_PERMISSION, COMMAND, meta["command"], key, session_id=sid, permission_id=pid))
    elif name == "bash" and patterns:
        out.append(Seen(FROM_PERMISSION, COMMAND, "\n".join(patterns), key, session_id=sid, permission_id=pid))
    for field in ("filepath", "filePath", "path"):
        if isinstance(meta.get(field), str):
            out.append(Seen(FROM_PERMISSION, PATH, meta[field], key, session_id=sid, permission_id=pid))
    if name in PATH_PERMISSIONS:
        out.extend(Seen(FROM_PERMISSION, PATH, p, key, session_id=sid, permission_id=pid) for p in patterns)
    return out


# -- judging and recording -----------------------------------------------------------

def forged_sender(seen: Seen, caller: SessionInfo | None, leads: Sequence[str] = (DEFAULT_SENDER,)) -> str | None:
    """Who really sent a send_message signed ``seen.claimed``, when that is not who it says.

    claude-teams takes ``sender`` on trust; the session that made the call is the truth. A
    teammate (a session titled ``<name>@<team>``) may only sign as itself; a session that is
    no teammate (the lead's own chat, the orchestrator) as the lead, or as what its title
    says it is.
    """
    if seen.claimed is None or caller is None or caller.title is None:
        return None
    mate = caller.teammate
    if mate is not None:
        return mate.name if seen.claimed != mate.name else None
    return caller.title if seen.claimed not in leads and seen.claimed != caller.title.strip() else None


class Judge:
    """The effective rules and allow-list; immutable, shared by the threads that judge."""

    def __init__(self, rules: Sequence[Rule], allow: Sequence[str] = (), enabled: bool = True,
                 leads: Sequence[str] = (DEFAULT_SENDER,)) -> None:
        self.rules = tuple(rules)
        self.allow = tuple(" ".join(a.split()) for a in allow)
        self.enabled = enabled
        self.leads = tuple(dict.fromkeys((*leads, DEFAULT_SENDER)))
        self._by_name = {r.name: r for r in self.rules}
        # A tool call is seen again at each state it reaches (running, completed) with the
        # same input, and a teammate repeats its commands: each is judged once.
        self._judged = lru_cache(maxsize=JUDGED_CACHE)(self._judge)

    @classmethod
    def from_config(cls, safety: Any, lead: str = DEFAULT_SENDER) -> "Judge":
        return cls(build_rules(safety.rules), safety.allow, safety.enabled, leads=(lead,))

    def allowed(self, text: str) -> bool:
        flat = " ".join(text.split())
        return any(fnmatch.fnmatchcase(flat, pattern) for pattern in self.allow)

    def findings(self, seen: Seen, context: Context | None = None) -> list[Finding]:
        if not self.enabled or self.allowed(seen.text):
            return []
        if (context is None or context.project is None) and seen.directory and seen.directory.startswith("/"):
            context = Context(project=seen.directory, home=context.home if context else None)
        if len(seen.text) > JUDGED_TEXT:
            return evaluate(seen.text, seen.kind, self.rules, context)
        return list(self._judged(seen.text, seen.kind, context))

    def _judge(self, text: str, kind: str, context: Context | None) -> tuple[Finding, ...]:
        return tuple(evaluate(text, kind, self.rules, context))

    def rule(self, name: str) -> Rule | None:
        return self._by_name.get(name)

    def actions(self, rule: str) -> tuple[str, ...]:
        r = self._by_name.get(rule)
        return r.actions if r is not None else ("escalate",)

    def forgery(self, seen: Seen, caller: SessionInfo | None) -> Finding | None:
        """The forged-sender finding for a send_message call, if its rule is on and it applies."""
        rule = self._by_name.get(FORGED)
        if not self.enabled or rule is None or not rule.enabled:
            return None
        real = forged_sender(seen, caller, self.leads)
        if real is None:
            return None
        return Finding(FORGED, rule.severity, f"{real} sent a message signed {seen.claimed!r}")

    def record(self, ledger: Ledger, items: Iterable[Seen], own_session: str | None = None,
               lookup: Callable[[str], SessionInfo | None] | None = None, now: float | None = None) -> int:
        """Judge ``items``; record and log each new escalation. Returns how many are new or reopened.

        ``lookup`` tells what is known of a session: its teammate (named in the log, the
        trigger and the prompt by the name in its title), its directory (what the rules take
        as the project) and, for a send_message call, who really made it.
        """
        changed = 0
        for seen in items:
            info = lookup(seen.session_id) if lookup is not None and seen.session_id else None
            found = self.findings(seen, Context(project=info.directory if info else None))
            forged = self.forgery(seen, info)
            if forged is not None:
                found.append(forged)
            if found and info is not None and info.label:
                # Named by its session's title, the one statement of who it is that it cannot forge.
                seen = replace(seen, teammate=info.label,
                               team=seen.team or (info.teammate.team if info.teammate else None))
            for f in found:
                [spec] = escalation_specs([(seen, f)], own_session, now=now, actions_of=self.actions)
                crash_point("before-escalation")  # test hook: judged, the escalation not yet recorded
                eid, new = ledger.add_escalation(**spec)
                if new:
                    level = logging.CRITICAL if f.severity in URGENT else logging.WARNING
                    log.log(level, logs.kv("escalation", id=eid, rule=f.rule, severity=f.severity, source=seen.source,
                                           team=seen.team, teammate=seen.teammate, session=seen.session_id,
                                           seen=f.what, claimed=seen.claimed if f.rule == FORGED else None,
                                           permission=seen.permission_id, actions=",".join(spec["actions"])))
                if new or seen.permission_id:
                    changed += 1
        return changed


def escalation_specs(judged: Iterable[tuple[Seen, Finding]], own_session: str | None, *, label: str | None = None,
                     team: str | None = None, now: float | None = None,
                     actions_of: Callable[[str], Sequence[str]] = lambda rule: ("escalate",)) -> list[dict[str, Any]]:
    """The ledger rows (``Ledger.add_escalation`` arguments) for what was found in each input.

    The orchestrator is not told about its own session's acts (it would be told about
    what it just did); everything else keeps the rule's actions.
    """
    out = []
    for seen, f in judged:
        actions = tuple(a for a in actions_of(f.rule)
                        if not (a == "tell" and seen.session_id and seen.session_id == own_session))
        out.append({"key": f"{seen.key}:{f.rule}", "rule": f.rule, "severity": f.severity, "source": seen.source,
                    "kind": seen.kind, "what": f.what, "text": seen.text, "actions": actions,
                    "session_id": seen.session_id, "team": seen.team or team, "teammate": seen.teammate or label,
                    "permission_id": seen.permission_id, "now": now})
    return out


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


# -- the worker that carries out the actions -----------------------------------------

class Guard(ServerWorker):
    """Carries out each escalation's actions once: hooks, tell, abort."""

    name = "guard"
    sections = ("server", "safety", "ledger")
    stall_after = 60.0


    @classmethod
    def build(cls, cfg: Config, deps: Deps) -> Guard:
        shared = deps.shared
        return cls(make_client=deps.make_client, ledger_path=cfg.ledger.path, hooks=cfg.safety.hooks,
                   own_session=lambda: shared.session_id, on_trigger=deps.wake("dispatch"),
                   note_abort=shared.note_abort, clock=deps.clock, ledger_health=deps.ledger_health)

    def __init__(self, *, make_client: Callable[[], OpencodeClient], ledger_path: str, hooks: Sequence[Any],
                 own_session: Callable[[], str | None], on_trigger: Callable[[], None],
                 note_abort: Callable[[str], None] = lambda sid: None,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 ledger_health: LedgerHealth | None = None) -> None:
        super().__init__(make_client, ledger_path, clock, ledger_health)
        self.note_abort = note_abort
        self.hook_configs = tuple(hooks)
        self.own_session = own_session
        self.on_trigger = on_trigger
        self.wall = wall
        self._told = False  # a tell trigger written in this step: wake the dispatcher once, at its end
        self.hooks: Hooks | None = None

    def setup(self) -> None:
        super().setup()
        self.hooks = Hooks(self.hook_configs)

    def teardown(self) -> None:
        if self.hooks:
            self.hooks.close()
        super().teardown()

    def interrupt(self) -> None:
        if self.hooks:
            self.hooks.close()

    def step(self) -> float:
        assert self.ledger is not None
        items = self.ledger.open_escalations()
        retry = False
        self._told = False
        try:
            for e in items:
                if self.stopping:
                    return 0.0
                retry = not self.handle(e) or retry
        finally:
            if self._told:
                # One wake for the batch: the escalations of one message (a text can match
                # several rules) go to the orchestrator in one prompt, not one each.
                self.on_trigger()
        if retry:
            return 2.0
        return 0.0 if len(items) >= 100 else 20.0  # woken at once on a new one

    def handle(self, e: Escalation) -> bool:
        """Do what is left of ``e``'s actions; False when something must be tried again.

        Rejecting (and holding) a permission request is the broker's: it answers every
        request itself, before this runs.
        """
        assert self.ledger is not None and self.client is not None and self.hooks is not None
        done, outcome = list(e.done), dict(e.outcome)
        finished = True
        if "hooks" not in done:
            if self.hook_configs:
                self.hooks.fire(e.as_dict())
            done.append("hooks")
        if "tell" in e.actions and "tell" not in done:
            self._tell(e, outcome)
            done.append("tell")
        if "abort" in e.actions and e.session_id and "abort" not in done:
            if self._abort(e, outcome):
                done.append("abort")
            else:
                finished = False
        self.ledger.update_escalation(e.id, done, outcome, handled=finished, now=self.wall())
        return finished

    def _tell(self, e: Escalation, outcome: dict[str, Any]) -> None:
        assert self.ledger is not None
        who = e.teammate or (f"the teammate in session {e.session_id}" if e.session_id else "a teammate")
        where = f" (session {e.session_id})" if e.session_id and e.teammate else ""
        if "hold" in e.actions and e.permission_id:
            detail = (f"HELD FOR A PERSON: {who}{where} asked to run something a person must allow, rule {e.rule}: "
                      f"{e.what}. It waits until a person runs `orchestratord allow {e.permission_id}` or "
                      f"`orchestratord deny {e.permission_id}`, and is refused if nobody does. Tell {who} to wait "
                      "or to carry on with something else; do not ask it to find another way to do the same.")
        else:
            detail = (f"SAFETY ESCALATION [{e.severity}]: {who}{where} {_verb(e.source)} something unsafe, rule "
                      f"{e.rule}: {e.what}. Stop {who} now with a shutdown_request and check the team config.")
        kind = "hold" if "hold" in e.actions and e.permission_id else "escalation"
        tid = self.ledger.add_trigger(kind, detail, rule=f"safety:{e.rule}", dedup=f"escalation:{e.id}",
                                      team=e.team, teammate=e.teammate, session_id=e.session_id, now=self.wall())
        outcome["trigger"] = tid
        if tid is not None:
            self._told = True

    def _abort(self, e: Escalation, outcome: dict[str, Any]) -> bool:
        assert self.client is not None and e.session_id is not None
        if e.session_id == self.own_session():
            outcome["abort"] = "skipped: the orchestrator's own session"
            return True
        try:
            self.note_abort(e.session_id)
            self.client.abort(e.session_id)
        except Unreachable as exc:
            self.log.warning(logs.kv("session-abort-failed", session=e.session_id, error=str(exc), action="retrying"))
            return False
        except OpencodeError as exc:
            outcome["abort"] = str(exc)
            self.log.error(logs.kv("session-abort-failed", session=e.session_id, error=str(exc)))
            return True
        outcome["abort"] = "aborted"
        self.log.log(logs.NOTICE, logs.kv("session-aborted", session=e.session_id, rule=e.rule, teammate=e.teammate))
        return True


def _verb(source: str) -> str:
    return {FROM_MESSAGE: "wrote", FROM_TOOL: "ran", FROM_PERMISSION: "asked to run", FROM_OUTPUT: "produced"}.get(source, "did")
