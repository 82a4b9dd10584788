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
from typing import Any, Callable, Iterable, Sequence

from . import logs, metrics
from .hooks import Hooks
from .inbox import TeamMessage, message_ckey
from .ledger import Escalation, Ledger
from .opencode import NotFound, OpencodeClient, OpencodeError, Unreachable
from .policy import COMMAND, MESSAGE, PATH, TOOL, Context, Finding, Rule, build_rules, evaluate
from .stream import Event
from .triggers import _message_ckey
from .worker import ServerWorker

log = logs.get("guard")

FROM_MESSAGE, FROM_TOOL, FROM_PERMISSION, FROM_OUTPUT = "message", "tool", "permission", "output"
PATH_TOOLS = {"read", "write", "edit", "multiedit", "patch"}
PATH_PERMISSIONS = {"edit", "read", "external_directory"}
URGENT = ("critical", "high")


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
    directory: str | None = None  # where the session runs (its project), when the event says


# -- what there is to judge --------------------------------------------------------

def seen_in_message(m: TeamMessage) -> Seen:
    """A teammate message; keyed like the same message seen as a send_message call."""
    return Seen(FROM_MESSAGE, MESSAGE, m.text, f"msg:{message_ckey(m)}", team=m.team, teammate=m.sender)


def seen_in_event(event: Event, own_session: str | None) -> list[Seen]:
    """Tool calls and permission requests in any session; the orchestrator's own text."""
    props = event.properties
    if event.type == "permission.asked":
        return [replace(s, directory=event.directory) for s in seen_in_permission(props)]
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
    state = part.get("state") if isinstance(part.get("state"), dict) else {}
    inp = state.get("input")
    if not isinstance(inp, dict) or not inp:
        return []
    tool = str(part.get("tool") or "")
    key = f"call:{part.get('messageID')}:{part.get('callID') or part.get('id')}"
    source = FROM_OUTPUT if sid and sid == own_session else FROM_TOOL
    return [Seen(source, kind, text, key, session_id=sid, team=team, teammate=who, directory=event.directory)
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
            ckey = _message_ckey(tool, inp)
            yield (MESSAGE, content, _str(inp.get("team_name")), _str(inp.get("sender")),
                   f"msg:{ckey}" if ckey else key)
    else:
        yield TOOL, json.dumps(inp, sort_keys=True, ensure_ascii=False), None, None, key


def seen_in_permission(req: dict[str, Any]) -> list[Seen]:
    """A permission request: its command whatever the permission's name, or its paths."""
    pid = req.get("id")
    if not isinstance(pid, str):
        return []
    sid = _str(req.get("sessionID"))
    tool = req.get("tool") if isinstance(req.get("tool"), dict) else {}
    key = (f"call:{tool.get('messageID')}:{tool.get('callID')}" if tool.get("callID") else f"perm:{pid}")
    meta = req.get("metadata") if isinstance(req.get("metadata"), dict) else {}
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

class Judge:
    """The effective rules and allow-list; immutable, shared by the threads that judge."""

    def __init__(self, rules: Sequence[Rule], allow: Sequence[str] = (), enabled: bool = True) -> None:
        self.rules = tuple(rules)
        self.allow = tuple(" ".join(a.split()) for a in allow)
        self.enabled = enabled

    @classmethod
    def from_config(cls, safety: Any) -> "Judge":
        return cls(build_rules(safety.rules), safety.allow, safety.enabled)

    def allowed(self, text: str) -> bool:
        flat = " ".join(text.split())
        return any(fnmatch.fnmatchcase(flat, pattern) for pattern in self.allow)

    def findings(self, seen: Seen) -> list[Finding]:
        if not self.enabled or self.allowed(seen.text):
            return []
        where = Context(project=seen.directory) if seen.directory and seen.directory.startswith("/") else None
        return evaluate(seen.text, seen.kind, self.rules, where)

    def actions(self, rule: str) -> tuple[str, ...]:
        for r in self.rules:
            if r.name == rule:
                return r.actions
        return ("escalate",)

    def record(self, ledger: Ledger, items: Iterable[Seen], own_session: str | None = None,
               name_of: Callable[[str], str | None] | None = None, now: float | None = None) -> int:
        """Judge ``items``; record and log each new escalation. Returns how many are new or reopened."""
        changed = 0
        for seen in items:
            for f in self.findings(seen):
                if seen.teammate is None and seen.session_id and name_of is not None:
                    seen = replace(seen, teammate=name_of(seen.session_id))
                actions = tuple(a for a in self.actions(f.rule)
                                if not (a == "tell" and seen.session_id and seen.session_id == own_session))
                eid, new = ledger.add_escalation(
                    f"{seen.key}:{f.rule}", rule=f.rule, severity=f.severity, source=seen.source, kind=seen.kind,
                    what=f.what, text=seen.text, actions=actions, session_id=seen.session_id, team=seen.team,
                    teammate=seen.teammate, permission_id=seen.permission_id, now=now)
                if new:
                    level = logging.CRITICAL if f.severity in URGENT else logging.WARNING
                    log.log(level, logs.kv("escalation", id=eid, rule=f.rule, severity=f.severity, source=seen.source,
                                           team=seen.team, teammate=seen.teammate, session=seen.session_id,
                                           seen=f.what, permission=seen.permission_id,
                                           actions=",".join(actions)))
                if new or seen.permission_id:
                    changed += 1
        return changed


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


# -- the worker that carries out the actions -----------------------------------------

class Guard(ServerWorker):
    """Carries out each escalation's actions once: hooks, reject, tell, abort."""

    name = "guard"
    stall_after = 60.0

    def __init__(self, *, make_client: Callable[[], OpencodeClient], ledger_path: str, hooks: Sequence[Any],
                 own_session: Callable[[], str | None], on_trigger: Callable[[], None],
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        super().__init__(make_client, ledger_path, clock)
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
        """Do what is left of ``e``'s actions; False when something must be tried again."""
        assert self.ledger is not None and self.client is not None and self.hooks is not None
        done, outcome = list(e.done), dict(e.outcome)
        finished = True
        if "hooks" not in done:
            if self.hook_configs:
                self.hooks.fire(e.as_dict())
            done.append("hooks")
        if "reject" in e.actions and e.permission_id and f"reject:{e.permission_id}" not in done:
            if self._reject(e, outcome):
                done.append(f"reject:{e.permission_id}")
            else:
                finished = False
        if "hold" in e.actions and "reject" not in e.actions and e.permission_id and "hold" not in done:
            outcome["hold"] = f"{e.permission_id}: left for a person to answer"
            self.log.log(logs.NOTICE, logs.kv("permission-held", permission=e.permission_id, rule=e.rule,
                                              session=e.session_id, teammate=e.teammate, seen=e.what))
            done.append("hold")
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

    def _reject(self, e: Escalation, outcome: dict[str, Any]) -> bool:
        assert self.client is not None and e.permission_id is not None
        why = (f"Refused by orchestratord: safety rule {e.rule} matched ({e.what}). "
               "Do not retry; ask the user for explicit permission.")
        try:
            self.client.reply_permission(e.permission_id, "reject", why)
        except NotFound:
            outcome["reject"] = f"{e.permission_id}: already answered"
            self.log.warning(logs.kv("permission-already-answered", permission=e.permission_id, rule=e.rule,
                                     session=e.session_id))
            return True
        except Unreachable as exc:
            self.log.warning(logs.kv("permission-reject-failed", permission=e.permission_id, error=str(exc),
                                     action="retrying"))
            return False
        except OpencodeError as exc:
            outcome["reject"] = f"{e.permission_id}: {exc}"
            self.log.error(logs.kv("permission-reject-failed", permission=e.permission_id, error=str(exc)))
            return True
        outcome["reject"] = f"{e.permission_id}: rejected"
        metrics.permission_rejected()
        self.log.log(logs.NOTICE, logs.kv("permission-rejected", permission=e.permission_id, rule=e.rule,
                                          session=e.session_id, teammate=e.teammate, seen=e.what))
        return True

    def _tell(self, e: Escalation, outcome: dict[str, Any]) -> None:
        assert self.ledger is not None
        who = e.teammate or (f"the teammate in session {e.session_id}" if e.session_id else "a teammate")
        where = f" (session {e.session_id})" if e.session_id and e.teammate else ""
        detail = (f"SAFETY ESCALATION [{e.severity}]: {who}{where} {_verb(e.source)} something unsafe, rule "
                  f"{e.rule}: {e.what}. Stop {who} now with a shutdown_request and check the team config.")
        tid = self.ledger.add_trigger("escalation", detail, rule=f"safety:{e.rule}", dedup=f"escalation:{e.id}",
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
