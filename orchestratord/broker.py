"""The permission broker: teammates that never ask are made to ask, and the daemon answers.

claude-teams creates every opencode teammate with a ruleset that allows everything, so the
server never asks before a shell command and the guard could only watch it run. The
broker appends rules that make the configured permissions (``bash`` by default) ask, to
every teammate session as soon as it is seen: on ``session.created`` from the stream, for
every session at start, and again after every reconnect. It then answers each request
itself, by policy, within milliseconds:

- a critical rule (a rule whose actions include ``reject``) means **reject**, with a
  message naming the rule;
- a hold rule means **hold**: a person answers with ``orchestratord allow|deny``, or
  ``safety.hold_timeout_seconds`` rejects it (a timeout never approves);
- anything else is **approved once**.

Requests of sessions it does not broker (the orchestrator's own, or with
``broker_sessions = "teammates"`` a person's own chat) are left to the person at that
client, unless a critical rule matches: those are rejected as before.

Every decision is recorded in the ledger before its reply is sent, so a crash in between
sends the same answer after the restart; an approval is only ever sent for a request the
server has just reported (an event, or a fresh ``GET /permission``), never from what the
ledger remembers alone.

Size: a brokered session's and a permission request's whole life (rules set, requests
judged and answered, holds, early turns restarted, the resync) is one state machine on one
thread; its pure part, the verdict, is the functions at the top.
"""

from __future__ import annotations

import collections
import fnmatch
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from . import logs, metrics
from .guard import FROM_PERMISSION, URGENT, Judge, Seen, escalation_specs, seen_in_permission
from .jsonvalues import as_dict
from .ledger import P_HELD, P_OPEN, PermissionRequest
from .ledgerwatch import LedgerHealth
from .opencode import NotFound, OpencodeClient, OpencodeError, SessionStatus, Unreachable, new_message_id
from .policy import Context, Finding
from .sessions import SessionDirectory, SessionInfo
from .state import Shared
from .worker import Deps, ServerWorker

if TYPE_CHECKING:
    from .config import Config

APPROVE, REJECT, HOLD, LEAVE = "approve", "reject", "hold", "leave"
#: the broker's own rule, recorded for a request no rule matched
NO_RULE = None
RETRY_COVER = 30.0
PERSON_POLL = 1.0
PERSON_MARGIN = 5.0  # seconds past the answering command's own request timeout
#: how long after its rules went on a session is watched for a turn begun before them
WATCH_SECONDS = 30.0
#: a restarted turn that the server aborts at once is prompted again, this many times
RESTART_TRIES = 3
ABORT_PAUSE = 1.5
#: how long to wait for a server to finish connecting its MCP servers before aborting a turn
MCP_WAIT = 5.0
#: how often a prompt that came before the rules is looked at until its turn begins
AWAIT_POLL = 0.1
#: the prompt sent again when the interrupted one had no text of its own (files only)
CONTINUE = ("(orchestratord interrupted this turn for a moment to put safety rules in place. Nothing was "
            "lost: carry on with the task you were given.)")


@dataclass
class Watch:
    """A session we just gave its rules: a turn whose prompt came before them runs without them."""

    ruled_at_ms: float  # the server's time.updated once the rules were on
    until: float  # monotonic
    restarted: set[str] = field(default_factory=set)  # user message IDs whose turn was restarted


@dataclass
class Restart:
    """A turn we abort and prompt again under the rules: aborting, then prompted, until it runs."""

    session_id: str
    interrupted: str  # the user message whose turn ran without the rules
    parts: list[dict[str, Any]]
    agent: str | None
    model: dict[str, Any] | None
    check_at: float
    deadline: float  # give up waiting for the aborted turn to end
    prompt_id: str | None = None  # the new prompt, once sent
    tries: int = 0


@dataclass(frozen=True)
class BrokerSettings:
    """What the broker needs from the config."""

    enabled: bool = True
    sessions: str = "others"  # others | teammates
    ask: tuple[str, ...] = ("bash",)
    hold_timeout: float = 600.0
    release_on_stop: bool = False
    teams: tuple[str, ...] = ()
    own_title: str = "orchestrator"
    # How long a person's answer is left to the command that recorded it (it sends it itself)
    # before the daemon sends it: that command's request timeout and a margin.
    person_first: float = 15.0

    def block(self, action: str = "ask") -> list[dict[str, str]]:
        """The rules appended to a session: each brokered permission asks (or, at release, is allowed)."""
        return [{"permission": p, "pattern": "*", "action": action} for p in self.ask]


@dataclass(frozen=True)
class Verdict:
    decision: str
    rule: str | None
    findings: tuple[Finding, ...]


def tier(actions: Sequence[str]) -> str:
    """What a rule's actions make of a permission request: reject, hold, or escalate only."""
    if "reject" in actions:
        return REJECT
    if "hold" in actions:
        return HOLD
    return "escalate"


def verdict(findings: Sequence[Finding], actions_of: Callable[[str], Sequence[str]], brokered: bool) -> Verdict:
    """The decision on one request from what the rules found; the strictest finding wins."""
    rejecting = [f for f in findings if tier(actions_of(f.rule)) == REJECT]
    if rejecting:
        return Verdict(REJECT, rejecting[0].rule, tuple(findings))
    holding = [f for f in findings if tier(actions_of(f.rule)) == HOLD]
    if holding:
        return Verdict(HOLD if brokered else LEAVE, holding[0].rule, tuple(findings))
    return Verdict(APPROVE if brokered else LEAVE, findings[0].rule if findings else NO_RULE, tuple(findings))


def covered(ruleset: Sequence[Any] | None, block: Sequence[dict[str, str]]) -> bool:
    """True when ``ruleset`` ends with ``block`` (the last matching rule wins, so then it holds)."""
    if ruleset is None or len(ruleset) < len(block):
        return False
    tail = [{k: r.get(k) for k in ("permission", "pattern", "action")} if isinstance(r, dict) else r
            for r in list(ruleset)[len(ruleset) - len(block):]]
    return tail == list(block)


def asked_already(ruleset: Sequence[Any] | None, permissions: Sequence[str]) -> bool:
    """True when ``ruleset`` on its own makes each of ``permissions`` ask (or deny) for every pattern.

    Then a turn under it is no less guarded than under the broker's rules. A ruleset with
    no rule for a permission leaves it to the server's config, which by default allows
    shell commands: that counts as not asked.
    """
    rules = [r for r in ruleset or () if isinstance(r, dict)]
    for perm in permissions:
        guarded = False
        for r in rules:
            if not isinstance(r.get("permission"), str) or not fnmatch.fnmatchcase(perm, r["permission"]):
                continue
            if r.get("pattern") == "*" and r.get("action") in ("ask", "deny"):
                guarded = True
            elif r.get("action") == "allow":
                guarded = False
        if not guarded:
            return False
    return True


def request_text(req: dict[str, Any]) -> str:
    """What a request asks for, for people: the command, else its patterns."""
    meta = as_dict(req.get("metadata"))
    if isinstance(meta.get("command"), str) and meta["command"].strip():
        return str(meta["command"])
    patterns = [p for p in req.get("patterns") or [] if isinstance(p, str)]
    for key in ("filepath", "filePath", "path"):
        if isinstance(meta.get(key), str):
            patterns.insert(0, meta[key])
    return "\n".join(patterns) or str(req.get("permission") or "")


def refusal(rule: str, what: str) -> str:
    return (f"Refused by orchestratord: safety rule {rule} matched ({what}). Do not retry it or work around it; "
            "ask the user for explicit permission.")


class Broker(ServerWorker):
    """Gives teammate sessions their ask rules and answers their permission requests."""

    name = "broker"
    sections = ("server", "safety", "session", "teams", "ledger")
    stall_after = 60.0


    @classmethod
    def build(cls, cfg: Config, deps: Deps) -> Broker:
        s = cfg.safety
        settings = BrokerSettings(enabled=s.enabled and s.broker, sessions=s.broker_sessions, ask=s.ask,
                                  hold_timeout=s.hold_timeout_seconds, release_on_stop=s.release_on_stop,
                                  teams=cfg.teams.names, own_title=cfg.session.title,
                                  person_first=cfg.server.timeout_seconds + PERSON_MARGIN)
        return cls(shared=deps.shared, sessions=deps.sessions, make_client=deps.make_client,
                   ledger_path=cfg.ledger.path, judge=Judge.from_config(s, lead=cfg.teams.lead), settings=settings,
                   on_escalation=deps.wake("guard"), clock=deps.clock, ledger_health=deps.ledger_health)

    def __init__(self, *, shared: Shared, sessions: SessionDirectory, make_client: Callable[[], OpencodeClient],
                 ledger_path: str, judge: Judge, settings: BrokerSettings, on_escalation: Callable[[], None],
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 ledger_health: LedgerHealth | None = None) -> None:
        super().__init__(make_client, ledger_path, clock, ledger_health)
        self.shared = shared
        self.sessions = sessions
        self.judge = judge
        self.settings = settings
        self.on_escalation = on_escalation
        self.wall = wall
        self._lock = threading.Lock()
        self._asked: collections.deque[tuple[dict[str, Any], float]] = collections.deque()
        self._replied: collections.deque[str] = collections.deque()
        self._seen: dict[str, SessionInfo] = {}  # sessions to look at, by ID (the newest news wins)
        self._resync = True  # at start: every session and every open request
        self.retry_cover: dict[str, float] = {}  # session -> monotonic time of the next try
        self.failed_logged: set[str] = set()
        self.held_since: dict[str, float] = {}  # request -> monotonic time it was first held
        self.release_at_stop = False  # set by the supervisor for a clean stop, not for a restart
        self._escalated = False
        self._resync_failures = 0
        self._mcp_up = False  # this server has its MCP servers up (asked again after every reconnect)
        self._brokered: set[str] = set()  # sessions whose ruleset ends with our rules, as last seen
        self._users: collections.deque[tuple[str, dict[str, Any]]] = collections.deque()
        self.watch: dict[str, Watch] = {}
        self.restarts: dict[str, Restart] = {}  # by the interrupted prompt's message ID
        # prompts that came before the rules, whose turn has not begun: (session, message, until)
        self.awaiting: dict[str, tuple[str, dict[str, Any], float]] = {}

    # -- what the event reader tells us (its thread) -------------------------------

    def asked(self, request: dict[str, Any]) -> None:
        with self._lock:
            self._asked.append((request, self.clock()))
        self.wake()

    def replied(self, request_id: str) -> None:
        with self._lock:
            self._replied.append(request_id)
        self.wake()

    def session_seen(self, info: SessionInfo) -> None:
        with self._lock:
            self._seen[info.id] = info
        self.wake()

    def resync(self) -> None:
        """After a (re)connect: nothing is replayed, so list every session and open request again."""
        with self._lock:
            self._resync = True
        self.wake()

    def user_message(self, session_id: str, info: dict[str, Any]) -> None:
        """A message stored in a session: a prompt may have come before our rules, a reply begun its turn."""
        with self._lock:
            if session_id not in self.watch:
                return
            if info.get("role") == "user":
                self._users.append((session_id, info))
            elif info.get("parentID") in self.awaiting:
                self._users.append(self.awaiting[info["parentID"]][:2])
            else:
                return
        self.wake()

    def asks(self, session_id: str, permission: str) -> bool:
        """Whether the server asks before ``session_id`` uses ``permission`` (we gave it that rule)."""
        if permission not in self.settings.ask:
            return False
        with self._lock:
            return session_id in self._brokered

    def _mark(self, session_id: str, brokered: bool) -> None:
        with self._lock:
            if brokered:
                self._brokered.add(session_id)
            else:
                self._brokered.discard(session_id)

    # -- the loop ----------------------------------------------------------------

    def step(self) -> float:
        assert self.ledger is not None
        self._escalated = False
        try:
            self._answer_asked()
            with self._lock:
                replied, self._replied = list(self._replied), collections.deque()
                resync, self._resync = self._resync, False
            for rid in replied:
                self._on_replied(rid)
            if resync:
                if not self._do_resync():
                    with self._lock:
                        self._resync = True
                    # The stream's reconnect asks again as soon as the server is back.
                    return min(30.0, 2.0 * 2 ** min(self._resync_failures, 4))
                self._resync_failures = 0
            self._cover_seen()
            wait = min(self._check_users(), self._follow_restarts(), self._send_person_answers())
            return min(wait, self._expire_holds())
        finally:
            if self._escalated:
                self.on_escalation()

    def _answer_asked(self) -> None:
        while True:
            with self._lock:
                if not self._asked:
                    return
                req, at = self._asked.popleft()
            self.decide(req, at)

    # -- sessions ------------------------------------------------------------------

    def wanted(self, info: SessionInfo) -> bool | None:
        """Whether to broker ``info``: True, False, or None (not yet: it may be the orchestrator's own)."""
        own = self.shared.session_id
        if info.id == own:
            return False
        if self.settings.sessions == "teammates":
            mate = info.teammate
            return mate is not None and (not self.settings.teams or mate.team in self.settings.teams)
        if info.title == self.settings.own_title and (own is None or self.shared.own_session_pending):
            return None  # the dispatcher may be creating it as the orchestrator's session right now
        return True

    def _cover_seen(self) -> None:
        with self._lock:
            seen, self._seen = self._seen, {}
        now = self.clock()
        for sid, when in list(self.retry_cover.items()):
            if when <= now and sid not in seen:
                info = self.sessions.get(sid)
                if info is not None:
                    seen[sid] = info
        for info in seen.values():
            if self.stopping:
                return
            self._answer_asked()  # a request waits less than a listing does
            self.cover(info)

    def cover(self, info: SessionInfo) -> None:
        """Make sure ``info``'s ruleset ends with the ask rules; append them once if not."""
        assert self.ledger is not None and self.client is not None
        if not self.settings.enabled:
            return
        wanted = self.wanted(info)
        if wanted is None:
            self.retry_cover[info.id] = self.clock() + 1.0
            return
        if not wanted:
            self.retry_cover.pop(info.id, None)
            return
        block = self.settings.block()
        known = self.ledger.brokered(info.id)
        if info.permission is None or (not covered(info.permission, block) and known is not None
                                       and known.state == "brokered"):
            # Unknown, or an event that came in late with the ruleset from before our rules
            # went on: ask the server itself before appending them (a second time).
            fresh = self._fresh(info)
            if fresh is None:
                return
            info = fresh
        mate = info.teammate
        if covered(info.permission, block):
            self.retry_cover.pop(info.id, None)
            self._mark(info.id, True)
            if known is None or known.state != "brokered":
                self.ledger.set_brokered(info.id, state="brokered", rules=block, title=info.title,
                                         team=mate.team if mate else None, teammate=mate.name if mate else None,
                                         directory=info.directory, now=self.wall())
            return
        before = info.permission
        try:
            answer = self.client.set_session_permission(info.id, block)  # appended to its ruleset
        except NotFound:
            self.retry_cover.pop(info.id, None)
            return
        except OpencodeError as exc:
            self._cover_failed(info, str(exc))
            return
        after = SessionInfo.from_api(answer) if isinstance(answer, dict) else None
        if after is not None:
            info = self.sessions.note(after)
        if after is None or not covered(after.permission, block):
            self._cover_failed(info, "the server did not keep the appended rules (its answer lacks them)")
            return
        self.retry_cover.pop(info.id, None)
        self.failed_logged.discard(info.id)
        self._mark(info.id, True)
        self.ledger.set_brokered(info.id, state="brokered", rules=block, title=info.title,
                                 team=mate.team if mate else None, teammate=mate.name if mate else None,
                                 directory=info.directory, now=self.wall())
        self.log.log(logs.NOTICE, logs.kv("session-brokered", session=info.id, teammate=mate.name if mate else None,
                                          team=mate.team if mate else None, title=None if mate else info.title,
                                          ask=",".join(self.settings.ask)))
        ruled = _updated_ms(answer)
        if ruled is not None and info.parent_id is None and not asked_already(before, self.settings.ask):
            # The server takes a turn's rules when its prompt arrives: a prompt that came
            # before ours (claude-teams prompts a teammate a few milliseconds after creating
            # it) runs allowed everything. Look now, and at each prompt stored from now on.
            with self._lock:
                self.watch[info.id] = Watch(ruled, self.clock() + WATCH_SECONDS)
            self._look_for_early_turn(info.id)

    def _fresh(self, info: SessionInfo) -> SessionInfo | None:
        """The session as the server has it now; None when it is gone or cannot be read (dealt with)."""
        assert self.client is not None
        try:
            fetched = SessionInfo.from_api(self.client.get_session(info.id))
        except NotFound:
            self.retry_cover.pop(info.id, None)
            return None
        except OpencodeError as exc:
            self._cover_failed(info, str(exc))
            return None
        return self.sessions.note(fetched) if fetched is not None else None

    def _cover_failed(self, info: SessionInfo, error: str) -> None:
        """Its commands would run unasked: escalate once, try again later."""
        assert self.ledger is not None
        self._mark(info.id, False)
        self.retry_cover[info.id] = self.clock() + RETRY_COVER
        mate = info.teammate
        self.ledger.set_brokered(info.id, state="failed", rules=self.settings.block(), title=info.title,
                                 team=mate.team if mate else None, teammate=mate.name if mate else None,
                                 directory=info.directory, error=error, now=self.wall())
        if info.id in self.failed_logged:
            return
        self.failed_logged.add(info.id)
        what = f"could not make {', '.join(self.settings.ask)} ask in session {info.id}: {error}"
        eid, new = self.ledger.add_escalation(
            f"broker:{info.id}", rule="broker-failed", severity="critical", source="server", kind="session",
            what=what[:200], text=what, actions=("escalate", "tell"), session_id=info.id,
            team=mate.team if mate else None, teammate=info.label, now=self.wall())
        self.log.critical(logs.kv("escalation", id=eid, rule="broker-failed", severity="critical", source="server",
                                  teammate=info.label, session=info.id, seen=error,
                                  action=f"retrying every {RETRY_COVER:g}s",
                                  fix="its shell commands run without asking until this succeeds; check the "
                                      "server's log, or stop that teammate"))
        self._escalated = self._escalated or new

    # -- turns that began before the rules --------------------------------------------

    def _look_for_early_turn(self, session_id: str) -> None:
        assert self.client is not None
        try:
            recent = self.client.messages(session_id, limit=10)
        except OpencodeError as exc:
            self.log.debug(logs.kv("early-turn-check-failed", session=session_id, error=str(exc)))
            return
        users = [m["info"] for m in recent if isinstance(m, dict) and isinstance(m.get("info"), dict)
                 and m["info"].get("role") == "user"]
        if users:
            self._consider(session_id, users[-1], recent)

    def _ours(self, message_id: str) -> bool:
        return any(r.prompt_id == message_id for r in self.restarts.values())

    def _check_users(self) -> float:
        """Look at the prompts of watched sessions; the seconds until a waiting one is looked at again."""
        now = self.clock()
        with self._lock:
            users, self._users = list(self._users), collections.deque()
            for mid in [m for m, (_, _, until) in self.awaiting.items() if until < now]:
                del self.awaiting[mid]
            users += [(sid, user) for sid, user, _ in self.awaiting.values()]
            for sid in [s for s, w in self.watch.items() if w.until < now and
                        not any(a[0] == s for a in self.awaiting.values())]:
                del self.watch[sid]
        for sid, info in users:
            if self.stopping:
                break
            self._consider(sid, info, None)
        with self._lock:
            return AWAIT_POLL if self.awaiting else PERSON_POLL

    def _consider(self, session_id: str, user: dict[str, Any], recent: list[dict[str, Any]] | None) -> None:
        """Restart the turn of ``user`` (a prompt) if it arrived before the session's rules did."""
        assert self.client is not None
        with self._lock:
            w = self.watch.get(session_id)
        mid = user.get("id")
        created = (user.get("time") or {}).get("created") if isinstance(user.get("time"), dict) else None
        if w is None or not isinstance(mid, str) or not isinstance(created, (int, float)):
            return
        if created >= w.ruled_at_ms or mid in w.restarted or mid in self.restarts or self._ours(mid):
            return  # it came after the rules: they hold for its turn
        try:
            if recent is None:
                recent = self.client.messages(session_id, limit=20)
            busy = SessionStatus.of(self.client.session_status(), session_id).busy
        except OpencodeError as exc:
            self.log.warning(logs.kv("early-turn-check-failed", session=session_id, error=str(exc)))
            return
        replies = [m for m in recent if isinstance(m, dict) and isinstance(m.get("info"), dict)
                   and m["info"].get("role") == "assistant" and m["info"].get("parentID") == mid]
        finished = any((r["info"].get("time") or {}).get("completed") and r["info"].get("finish") not in
                       ("tool-calls", "unknown", None) for r in replies)
        if finished and not busy:
            with self._lock:
                self.awaiting.pop(mid, None)
            return  # it already ended; what it did, the guard saw
        if replies and not busy and all(r["info"].get("error") for r in replies):
            with self._lock:
                self.awaiting.pop(mid, None)
            return  # it ended in an error (aborted by someone else, a model error): nothing runs
        begun = any(isinstance(p, dict) and p.get("type") == "step-start" for r in replies for p in r.get("parts") or [])
        if not replies or not (begun or self._mcp_connected()):
            # Stored, but its turn has not begun: a server's first turn connects its MCP servers
            # first, with its reply already there, empty. On opencode 1.18 an abort in that
            # window leaves the server aborting every later turn of every session. So wait for
            # the turn's first step, or for the server to say its MCP servers are up.
            with self._lock:
                self.awaiting.setdefault(mid, (session_id, user, self.clock() + WATCH_SECONDS))
            return
        with self._lock:
            self.awaiting.pop(mid, None)
        w.restarted.add(mid)
        info = self.sessions.get(session_id)
        if any(isinstance(p, dict) and p.get("type") == "tool" for r in replies for p in r.get("parts") or []):
            # It has called a tool already: prompting it again would do that again (a second
            # message, a second edit), so it runs on; its calls are judged as they run.
            self.log.warning(logs.kv("turn-ran-unbrokered", session=session_id,
                                     teammate=info.label if info else None, prompt=mid,
                                     reason="its prompt came before the session's rules and it acted before they "
                                            "were on",
                                     note="the rest of this turn runs without asking; its calls are judged as "
                                          "they run, and its next turn asks"))
            return
        original = next((m for m in recent if isinstance(m, dict) and isinstance(m.get("info"), dict)
                         and m["info"].get("id") == mid), None)
        parts = [{"type": "text", "text": p["text"]} for p in (original or {}).get("parts") or []
                 if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)]
        if not parts:
            parts = [{"type": "text", "text": CONTINUE}]
        model = user.get("model") if isinstance(user.get("model"), dict) else None
        now = self.clock()
        self._restart(Restart(session_id, mid, parts, _str(user.get("agent")), model, check_at=now + 0.05,
                              deadline=now + 10.0))

    def _mcp_connected(self) -> bool:
        """Whether this server has set up its MCP servers (``GET /mcp`` answers once it has);
        asked once per connection to the server, on the first turn that needs to know."""
        assert self.client is not None
        if self._mcp_up:
            return True
        try:
            self.client.mcp_status(timeout=MCP_WAIT)
        except OpencodeError as exc:
            self.log.debug(logs.kv("mcp-status-failed", error=str(exc), action="not aborting a turn until it has begun"))
            return False
        self._mcp_up = True
        return True

    def _restart(self, r: Restart) -> None:
        """Abort the turn; the prompt goes again once the server has wound it down."""
        assert self.client is not None
        info = self.sessions.get(r.session_id)
        try:
            self.shared.note_abort(r.session_id)
            self.client.abort(r.session_id)
        except OpencodeError as exc:
            self.log.critical(logs.kv("turn-restart-failed", session=r.session_id,
                                      teammate=info.label if info else None, error=str(exc),
                                      risk="this turn runs without the broker's rules",
                                      fix="stop that teammate, or check the server"))
            return
        self.restarts[r.interrupted] = r
        self.log.log(logs.NOTICE, logs.kv("turn-restarted", session=r.session_id,
                                          teammate=info.label if info else None, interrupted=r.interrupted,
                                          reason="its prompt came before the session's rules"))

    def _follow_restarts(self) -> float:
        """Prompt each aborted turn again once it has ended; again if the server aborts that one too.

        A prompt sent while the server still winds down an aborted turn can be aborted with
        it, so the new one waits for the session to go idle, and is sent once more (after a
        pause) if it is aborted all the same.
        """
        assert self.client is not None and self.ledger is not None
        now = self.clock()
        wait = PERSON_POLL
        for key, r in list(self.restarts.items()):
            if now < r.check_at:
                wait = min(wait, r.check_at - now)
                continue
            try:
                busy = SessionStatus.of(self.client.session_status(), r.session_id).busy
                recent = self.client.messages(r.session_id, limit=20) if r.prompt_id else []
            except NotFound:
                del self.restarts[key]
                continue
            except OpencodeError:
                r.check_at = now + 1.0
                continue
            if r.prompt_id is not None:
                replies = [m["info"] for m in recent if isinstance(m, dict) and isinstance(m.get("info"), dict)
                           and m["info"].get("parentID") == r.prompt_id]
                aborted = any(isinstance(i.get("error"), dict) and i["error"].get("name") == "MessageAbortedError"
                              for i in replies)
                if not aborted and (replies or busy):
                    del self.restarts[key]  # it runs, under the rules
                    continue
                if not aborted and now < r.deadline:
                    r.check_at = now + 0.5
                    continue
                if r.tries >= RESTART_TRIES:
                    del self.restarts[key]
                    self.log.critical(logs.kv("turn-restart-failed", session=r.session_id, prompt=r.prompt_id,
                                              error=f"the prompt sent again was aborted {r.tries} times",
                                              fix="prompt the teammate again by hand"))
                    continue
                r.prompt_id = None
                r.check_at = now + ABORT_PAUSE * 2 ** (r.tries - 1)
                continue
            if busy and now < r.deadline:
                r.check_at = now + 0.1
                continue
            new_id = new_message_id(self.wall() * 1000)
            try:
                self.client.prompt_parts(r.session_id, r.parts, new_id, agent=r.agent, model=r.model)
            except OpencodeError as exc:
                self.log.warning(logs.kv("turn-restart-prompt-failed", session=r.session_id, error=str(exc),
                                         action="retrying"))
                r.check_at = now + 1.0
                continue
            r.prompt_id, r.tries = new_id, r.tries + 1
            r.check_at, r.deadline = now + 1.0, now + 10.0
            self.ledger.record_transition("broker", "turn-restarted", f"{r.session_id} {r.interrupted} -> {new_id}")
        return wait

    def _do_resync(self) -> bool:
        """Every session and every open request, as the server has them now; False to try again."""
        assert self.ledger is not None and self.client is not None
        self._mcp_up = False  # a reconnect may be to a server that has just started
        try:
            listing = self.client.list_sessions()
            open_requests = [r for r in self.client.permissions() if isinstance(r, dict)]
        except OpencodeError as exc:
            self._resync_failures += 1
            if self._resync_failures == 1:  # once per spell; a server that is down, the health watch reports
                level = logging.INFO if isinstance(exc, Unreachable) else logging.WARNING
                self.log.log(level, logs.kv("broker-resync-failed", error=str(exc),
                                            action="listing sessions and requests again once the server answers"))
            return False
        for raw in listing:
            info = SessionInfo.from_api(raw)
            if info is not None:
                self.session_seen(self.sessions.note(info))
        self._cover_seen()
        # Asked while we were away: answered now, by the same policy, oldest first.
        open_requests.sort(key=lambda r: str(r.get("id", "")))
        live = {str(r.get("id")) for r in open_requests}
        now = self.clock()
        for req in open_requests:
            self._answer_asked()
            self.decide(req, now, fresh=True)
        for row in self.ledger.permissions(states=(P_OPEN, P_HELD)):
            if row.id not in live:
                self.ledger.permission_gone(row.id, "no longer pending on the server", now=self.wall())
                self.held_since.pop(row.id, None)
        self.shared.replace_waiting({str(r["sessionID"]): f"permission {r.get('permission', '')}".strip()
                                     for r in open_requests if isinstance(r.get("sessionID"), str)})
        return True

    # -- decisions ------------------------------------------------------------------

    def decide(self, req: dict[str, Any], seen_at: float, fresh: bool = True) -> None:
        """Judge one request, record the decision, and send it (unless it is held or left)."""
        assert self.ledger is not None
        rid, sid = req.get("id"), req.get("sessionID")
        if not isinstance(rid, str) or not isinstance(sid, str):
            return
        known = self.ledger.permission(rid)
        if known is not None:
            if known.state == P_OPEN and fresh:
                self._send(known, seen_at)  # decided before a crash or an outage; still asked: answer it now
            elif known.state == P_HELD:
                self.held_since.setdefault(rid, self.clock() - max(0.0, self.wall() - known.asked_at))
            return
        info = self.sessions.lookup(sid, self.client)
        brokered = bool(self.settings.enabled and info is not None and self.wanted(info))
        context = Context(project=info.directory if info else None)
        label = info.label if info else None
        mate = info.teammate if info else None
        items = seen_in_permission(req)
        findings: list[Finding] = []
        judged: list[tuple[Seen, Finding]] = []
        for item in items:
            for f in self.judge.findings(item, context):
                findings.append(f)
                judged.append((item, f))
        v = verdict(findings, self.judge.actions, brokered)
        text = request_text(req)
        what = next((f.what for f in v.findings if f.rule == v.rule), text)
        if v.decision == REJECT:
            reply, message, state = "reject", refusal(str(v.rule), what), P_OPEN
        elif v.decision == APPROVE:
            reply, message, state = "once", None, P_OPEN
        elif v.decision == HOLD:
            reply, message, state = None, None, P_HELD
        else:
            reply, message, state = None, None, "left"
        own = self.shared.session_id
        specs = escalation_specs([(item, f) for item, f in judged], own, label=label,
                                 team=mate.team if mate else None, now=self.wall(),
                                 actions_of=self.judge.actions)
        row = PermissionRequest(
            id=rid, session_id=sid, permission=str(req.get("permission") or ""), what=text[:4000],
            team=mate.team if mate else None, teammate=label, asked_at=self.wall(), decision=v.decision,
            rule=v.rule, escalation_id=None, decided_by="policy", decided_at=self.wall(), reply=reply,
            message=message, state=state, replied_at=None, seconds=None)
        row, results = self.ledger.decide_permission(row, specs)
        # A request decided before (a restart, a reconnect) comes back without escalations.
        for (eid, new), spec in zip(results, specs, strict=False):
            if new:
                self._escalated = True
                if v.decision != HOLD:
                    level = logging.CRITICAL if spec["severity"] in URGENT else logging.WARNING
                    self.log.log(level, logs.kv("escalation", id=eid, rule=spec["rule"], severity=spec["severity"],
                                                source=FROM_PERMISSION, team=spec["team"], teammate=label,
                                                session=sid, seen=spec["what"], permission=rid,
                                                actions=",".join(spec["actions"])))
            elif eid is not None:
                self._escalated = True  # reopened: the guard carries out what is left
        if state == P_OPEN:
            self._send(row, seen_at)
        elif state == P_HELD:
            self.held_since[rid] = seen_at
            self.log.warning(logs.kv("permission-held", permission=rid, teammate=label, session=sid, rule=v.rule,
                                     seen=what, timeout=f"{self.settings.hold_timeout:g}s",
                                     fix=f"orchestratord allow {rid}, or orchestratord deny {rid}"))

    def _send(self, row: PermissionRequest, seen_at: float | None) -> bool:
        """Send a recorded answer; True when it is settled (accepted, or nothing left to answer)."""
        assert self.ledger is not None and self.client is not None and row.reply is not None
        try:
            self.client.reply_permission(row.id, row.reply, row.message)
        except NotFound:
            self.ledger.permission_gone(row.id, "already answered or no longer pending", now=self.wall())
            self.held_since.pop(row.id, None)
            self.log.info(logs.kv("permission-already-answered", permission=row.id, session=row.session_id))
            return True
        except Unreachable as exc:
            self.log.warning(logs.kv("permission-reply-failed", permission=row.id, error=str(exc),
                                     action="answered once the server is back and still asks"))
            return False
        except OpencodeError as exc:
            self.log.error(logs.kv("permission-reply-failed", permission=row.id, error=str(exc),
                                   action="retrying after the next reconnect"))
            return False
        seconds = self.clock() - seen_at if seen_at is not None else None
        self.ledger.permission_replied(row.id, seconds=seconds, now=self.wall())
        self.held_since.pop(row.id, None)
        metrics.permission_decided(row.decision, row.decided_by, seconds)
        ms = None if seconds is None else f"{seconds * 1000:.1f}"
        if row.reply == "reject":
            level = logs.NOTICE
            event = "permission-rejected"
        else:
            level = logs.NOTICE if row.decided_by != "policy" else logging.INFO
            event = "permission-approved"
        self.log.log(level, logs.kv(event, permission=row.id, rule=row.rule, by=row.decided_by,
                                    session=row.session_id, teammate=row.teammate, seen=_short(row.what),
                                    ms=ms))
        return True

    def _on_replied(self, request_id: str) -> None:
        """``permission.replied``: ours echoed back, or someone else answered first."""
        assert self.ledger is not None
        row = self.ledger.permission(request_id)
        if row is not None and row.state in (P_OPEN, P_HELD):
            self.ledger.permission_gone(request_id, "answered outside orchestratord", now=self.wall())
            self.held_since.pop(request_id, None)
            if row.state == P_HELD:
                self.log.info(logs.kv("permission-answered-elsewhere", permission=request_id,
                                      session=row.session_id, teammate=row.teammate))

    def _send_person_answers(self) -> float:
        """Answers a person recorded that did not reach the server yet; the seconds until the next is due.

        ``orchestratord allow/deny`` records the answer and then sends it itself. The daemon
        leaves it that command's time (``person_first``) first: were both to send, one would
        be told the request is gone, and the person would read that their answer failed.
        """
        assert self.ledger is not None
        wait = PERSON_POLL
        now = self.wall()
        for row in self.ledger.permissions(states=(P_OPEN,)):
            if row.decided_by not in ("person", "timeout"):
                continue
            left = row.decided_at + self.settings.person_first - now if row.decided_by == "person" else 0.0
            if 0 < left <= self.settings.person_first:  # (beyond it: the clock was set back)
                wait = min(wait, left)
                continue
            if not self._send(row, None):
                break
        return wait

    def _expire_holds(self) -> float:
        """Reject what has waited ``hold_timeout`` for a person; the seconds until the next one is due."""
        assert self.ledger is not None
        held = self.ledger.permissions(states=(P_HELD,))
        now = self.clock()
        wait = PERSON_POLL
        for row in held:
            since = self.held_since.setdefault(row.id, now - max(0.0, self.wall() - row.asked_at))
            due = since + self.settings.hold_timeout
            if now < due:
                wait = min(wait, due - now)
                continue
            message = (f"Refused by orchestratord: held for a person (rule {row.rule}) and not allowed within "
                       f"{self.settings.hold_timeout:g}s. Do not retry it; ask the user.")
            if self.ledger.answer_permission(row.id, decision=REJECT, reply="reject", message=message, by="timeout",
                                             now=self.wall()):
                self.log.warning(logs.kv("permission-hold-expired", permission=row.id, teammate=row.teammate,
                                         rule=row.rule, seconds=f"{self.settings.hold_timeout:g}",
                                         action="rejected"))
                fresh = self.ledger.permission(row.id)
                if fresh is not None:
                    self._send(fresh, None)
        return max(0.0, wait)

    # -- a clean stop ----------------------------------------------------------------

    def teardown(self) -> None:
        try:
            if self.release_at_stop and self.settings.release_on_stop:
                self.release_all()
        finally:
            super().teardown()

    def release_all(self) -> None:
        """At a clean stop, by config: append rules that let the brokered sessions run unasked."""
        assert self.ledger is not None and self.client is not None
        block = self.settings.block("allow")
        released = 0
        for b in self.ledger.brokered_sessions(state="brokered"):
            try:
                self.client.set_session_permission(b.session_id, block)
            except NotFound:
                continue
            except OpencodeError as exc:
                self.log.error(logs.kv("session-release-failed", session=b.session_id, error=str(exc),
                                       note="it keeps asking until the daemon is back"))
                continue
            self.ledger.set_brokered(b.session_id, state="released", rules=block, title=b.title, team=b.team,
                                     teammate=b.teammate, directory=b.directory, now=self.wall())
            released += 1
        self.log.warning(logs.kv("sessions-released", sessions=released,
                                 note="their commands run unasked and unjudged until the daemon starts again"))


def _updated_ms(session: Any) -> float | None:
    t = session.get("time") if isinstance(session, dict) else None
    value = t.get("updated") if isinstance(t, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _short(text: str, limit: int = 120) -> str:
    one = " ".join(text.split())
    return one if len(one) <= limit else one[: limit - 1] + "…"


def held_listing(rows: Iterable[PermissionRequest], now: float) -> list[dict[str, Any]]:
    """``orchestratord permissions``: each held request with its age."""
    return [{"id": r.id, "session": r.session_id, "teammate": r.teammate, "team": r.team,
             "permission": r.permission, "command": r.what, "rule": r.rule,
             "age_seconds": round(max(0.0, now - r.asked_at), 1)} for r in rows]

