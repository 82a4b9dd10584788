"""The dispatcher: turn pending triggers into prompts on the orchestrator session.

Rules it keeps, in order: at most one prompt in flight; nothing while the server is
down or the session busy; a quiet period (debounce) after the newest trigger, a minimum
interval between prompts and a cap per hour; then every pending trigger goes into one
prompt. A prompt is recorded with its ``messageID`` before the POST, marked sent after
it, and followed until its assistant reply completes. After a crash, a prompt still
``pending`` is looked up on the server by its ID and sent again only if it never landed.

Size: a prompt's whole life (the quiet period, the rate limits, sending, following it to
its outcome, the re-drive after an outage) is one state machine.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from . import logs, metrics
from .crashpoints import crash_point
from .jsonvalues import as_dict, as_list
from .ledger import COMPLETED, FAILED, PENDING, TIMEOUT, Dispatch, Trigger
from .ledgerwatch import LedgerHealth
from .opencode import (
    AuthError,
    NotFound,
    OpencodeClient,
    OpencodeError,
    SessionStatus,
    Unreachable,
    last_finished,
    messages_of,
    new_message_id,
)
from .state import Shared
from .worker import Deps, ServerWorker

if TYPE_CHECKING:
    from .config import Config

# The orchestrator session may use the team tools and read; it may not run shell
# commands, edit files or fetch from the web unless the config widens this.
SESSION_PERMISSION: list[dict[str, str]] = [
    {"permission": "bash", "pattern": "*", "action": "deny"},
    {"permission": "edit", "pattern": "*", "action": "deny"},
    {"permission": "webfetch", "pattern": "*", "action": "deny"},
    {"permission": "claude-teams_*", "pattern": "*", "action": "allow"},
]



def session_permission(extra: Sequence[tuple[str, str, str]] = ()) -> list[dict[str, str]]:
    """The orchestrator session's ruleset: the safe defaults, then ``session.permission``."""
    return SESSION_PERMISSION + [{"permission": p, "pattern": pat, "action": a} for p, pat, a in extra]


MAX_LISTED = 25
#: triggers that skip the quiet period and the minimum interval, and come first in the prompt:
#: a safety escalation, and a teammate held waiting for a person
URGENT_KINDS = ("escalation", "hold")
# After aborting a stuck turn the server takes a moment to wind it down; a prompt sent
# meanwhile is aborted with it. Wait this long, and requeue a prompt that was caught anyway.
ABORT_SETTLE = 1.5
ABORT_CATCH = 15.0
FOLLOW_POLL = 2.0
IDLE_WAIT = 60.0


@dataclass(frozen=True)
class Hold:
    """One reason the pending triggers wait, and until when (monotonic) if that is known."""

    reason: str
    detail: str
    until: float | None = None


def seed_sends(dispatches: Sequence[Dispatch], now: float, wall: float) -> list[float]:
    """Send times of earlier runs on this process's monotonic clock, oldest first.

    Rebuilt from the ledger so a restart is no loophole in the hourly cap. Only the
    ledger's wall-clock ``sent_at`` survives a restart, so this is the one place the cap
    reads the wall clock: a send stamped later than now (the clock went back since) counts
    as just made, never as one made in this process's future, which would hold prompts
    back for the hour plus the size of the jump.
    """
    ages = [max(0.0, wall - d.sent_at) for d in dispatches if d.sent_at is not None]
    return sorted(now - age for age in ages if age < 3600)


@dataclass(frozen=True)
class DispatchSettings:
    """What the dispatcher needs from the config, flattened."""

    prompt: str
    debounce: float
    min_interval: float
    max_per_hour: int
    sweep_interval: float
    busy_timeout: float
    completion_timeout: float
    session_title: str
    session_id: str | None
    agent: str | None
    model: str | None
    teams: Sequence[str]
    teams_base_dir: str
    lead: str
    permission: Sequence[tuple[str, str, str]] = ()
    turn_timeout: float = 300.0
    start_timeout: float = 30.0

    @classmethod
    def from_config(cls, cfg: Config) -> DispatchSettings:
        """The dispatcher's view of the ``dispatch``, ``session`` and ``teams`` sections."""
        d, s, t = cfg.dispatch, cfg.session, cfg.teams
        return cls(prompt=d.prompt, debounce=d.debounce_seconds, min_interval=d.min_interval_seconds,
                   max_per_hour=d.max_per_hour, sweep_interval=d.sweep_interval_seconds,
                   busy_timeout=d.busy_timeout_seconds, completion_timeout=d.completion_timeout_seconds,
                   turn_timeout=d.turn_timeout_seconds, start_timeout=d.start_timeout_seconds,
                   session_title=s.title, session_id=s.id, agent=s.agent, model=s.model, permission=s.permission,
                   teams=t.names, teams_base_dir=t.base_dir, lead=t.lead)


def render_prompt(template: str, triggers: Sequence[Trigger], teams: Sequence[str], base_dir: str, lead: str) -> str:
    """The prompt text: the template with the teams, the lead and a list of what happened."""
    lines = []
    # Escalations first, whatever their age: they are what the orchestrator must act on.
    triggers = sorted(triggers, key=lambda t: (t.kind not in URGENT_KINDS, t.id))
    for t in triggers[:MAX_LISTED]:
        who = f" teammate {t.teammate}" if t.teammate else ""
        team = f" team {t.team}" if t.team else ""
        lines.append(f"- [{t.rule or t.kind}]{team}{who}: {t.detail}")
    if len(triggers) > MAX_LISTED:
        lines.append(f"- and {len(triggers) - MAX_LISTED} more")
    team_text = ", ".join(teams) if teams else f"every team under {base_dir}"
    return template.format(teams=team_text, lead=lead, triggers="\n".join(lines) or "- (periodic check)")


def outcome(messages: list[dict[str, Any]], message_id: str) -> tuple[bool, str, list[dict[str, Any]], str | None]:
    """(finished, reply text, tool calls, error) of the assistant replies to ``message_id``.

    Finished is the last reply's :attr:`~.opencode.Message.finished` (one prompt can give
    several assistant messages, one per step).
    """
    replies = [m for m in messages_of(messages) if m.role == "assistant" and m.parent_id == message_id]
    texts: list[str] = []
    tools: list[dict[str, Any]] = []
    error: str | None = None
    for m in replies:
        for part in m.parts:
            if part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif part.get("type") == "tool":
                state = as_dict(part.get("state"))
                call: dict[str, Any] = {"tool": part.get("tool"), "status": state.get("status"),
                                        "input": state.get("input")}
                out = state.get("output") if state.get("status") == "completed" else state.get("error")
                if isinstance(out, str):
                    call["output"] = out[:2000]
                tools.append(call)
        error = m.error or error
    finished = bool(replies) and replies[-1].finished
    return finished, "\n".join(texts).strip(), tools, error


class Dispatcher(ServerWorker):
    name = "dispatch"
    sections = ("server", "dispatch", "session", "teams", "ledger")

    @classmethod
    def build(cls, cfg: Config, deps: Deps) -> Dispatcher:
        return cls(shared=deps.shared, make_client=deps.make_client, ledger_path=cfg.ledger.path,
                   settings=DispatchSettings.from_config(cfg), server_url=cfg.server.url, clock=deps.clock,
                   ledger_health=deps.ledger_health)

    def __init__(self, *, shared: Shared, make_client: Callable[[], OpencodeClient], ledger_path: str,
                 settings: DispatchSettings, server_url: str,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 ledger_health: LedgerHealth | None = None) -> None:
        super().__init__(make_client, ledger_path, clock, ledger_health)
        self.shared = shared
        self.settings = settings
        self.server_url = server_url
        self.wall = wall
        self.stall_after = 60.0
        self.session_id: str | None = None
        self.seen: dict[int, float] = {}  # trigger id -> monotonic time first seen
        self.sends: collections.deque[float] = collections.deque()  # monotonic send times, last hour
        self.last_sent: float | None = None
        self.last_sweep: float = clock()
        self.follow_started: dict[int, float] = {}
        # dispatch id -> shared.outages() (server outages, stream losses) when last looked at
        self.follow_outages: dict[int, tuple[int, int]] = {}
        self._cap_logged = False
        self._busy_warned: float | None = None
        self.aborted_at: float | None = None
        self.catches = 0  # prompts aborted along with a stuck turn, since the last that ran

    # -- lifecycle ---------------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        assert self.ledger is not None
        self.sends.extend(seed_sends(self.ledger.dispatches(limit=max(self.settings.max_per_hour, 1) + 5),
                                     self.clock(), self.wall()))
        if self.sends:
            self.last_sent = self.sends[-1]

    # -- the loop ----------------------------------------------------------------

    def step(self) -> float:
        assert self.ledger is not None
        if self.shared.server_problem is not None:
            self._hold(Hold("server-unsupported", self.shared.server_problem))
            return 5.0  # the health watch wakes us when a supported server answers
        if self.shared.server_healthy is False:
            self._hold(Hold("server-down", "the server does not answer GET /global/health; prompts go once it is back"))
            return 5.0  # the health watch wakes us when it comes back
        if self.shared.server_healthy is None:
            # Not probed yet: a server of a generation this daemon does not speak must be
            # named by the health watch before anything is sent to it.
            self._hold(Hold("server-unknown", "the first health probe has not answered yet"))
            return 5.0  # the health watch wakes us when it is up
        try:
            if self.session_id is None:
                self._hold(Hold("no-session", "the orchestrator session is being found or created"))
                self.ensure_session()
            open_ = self.ledger.open_dispatches()
            if open_:
                d = open_[0]
                self._hold(Hold("prompt-in-flight", f"prompt {d.message_id} ({d.state}) has not finished; one prompt "
                                "at a time, and what waits goes into the next"))
                return self.follow(d)
            return self.maybe_send()
        except Unreachable as exc:
            self.log.debug(logs.kv("server-unreachable", error=str(exc)))
            self._hold(Hold("server-unreachable", f"a request to the server failed: {exc}"))
            return 2.0
        except AuthError as exc:
            self.log.error(logs.kv("dispatch-auth-failed", error=str(exc)))
            self._hold(Hold("server-auth", f"the server refuses the credentials: {exc}"))
            return 30.0
        except Exception:
            if self.shared.ledger_failing:
                self._hold(Hold("ledger-failing", "the ledger cannot be written; no prompt goes without its row"))
            raise

    def _hold(self, *holds: Hold) -> None:
        """Say why the pending triggers wait (for ``orchestratord pending``); nothing when none do."""
        self.shared.set_holds(holds)

    def ensure_session(self) -> None:
        """Find or create the orchestrator session and remember it in the ledger."""
        assert self.client is not None and self.ledger is not None
        if self.settings.session_id:
            self._use_session(self.settings.session_id)
            return
        key = f"session:{self.server_url}"
        known = self.ledger.get_meta(key)
        ruleset = session_permission(self.settings.permission)
        if known:
            try:
                info = self.client.get_session(known)
                current = as_list(info.get("permission"))
                if current[len(current) - len(ruleset):] != ruleset:
                    # The config may have changed since it was created: the server appends what
                    # is sent, and the last matching rule wins, so the whole ruleset goes again.
                    self.client.set_session_permission(known, ruleset)
                    self.log.info(logs.kv("session-permission-updated", session=known, rules=len(ruleset)))
                self._use_session(known)
                return
            except NotFound:
                self.log.warning(logs.kv("session-missing", session=known, action="creating a new one"))
        self.shared.set_own_session_pending(True)
        try:
            info = self.client.create_session(self.settings.session_title, ruleset)
            sid = info["id"]
            self.ledger.set_meta(key, sid)
            self._use_session(sid)
        finally:
            self.shared.set_own_session_pending(False)
        self.log.log(logs.NOTICE, logs.kv("session-created", session=sid, title=self.settings.session_title))

    def _use_session(self, sid: str) -> None:
        if sid != self.session_id:
            self.log.info(logs.kv("session", session=sid))
        self.session_id = sid
        self.shared.set_session(sid)

    def _forget_session(self) -> None:
        self.session_id = None
        self.shared.set_session(None)

    # -- sending -----------------------------------------------------------------

    def maybe_send(self) -> float:
        assert self.ledger is not None and self.session_id is not None
        now = self.clock()
        pending = self.ledger.pending_triggers()
        self.shared.set_pending_triggers(len(pending))
        for t in pending:
            self.seen.setdefault(t.id, now)
        if not pending:
            self._hold()
            self.seen.clear()
            if self.settings.sweep_interval > 0:
                due = max(self.last_sweep, self.last_sent or 0.0) + self.settings.sweep_interval
                if now >= due:
                    self.last_sweep = now
                    self.ledger.add_trigger("sweep", "periodic check (dispatch.sweep_interval_seconds)", rule="sweep")
                    return 0.0
                return min(IDLE_WAIT, due - now)
            return IDLE_WAIT
        newest = max(self.seen[t.id] for t in pending)
        oldest = min(self.seen[t.id] for t in pending)
        urgent = any(t.kind in URGENT_KINDS for t in pending)
        # Quiet period after the newest trigger, but never starve a steady trickle. An
        # escalation skips the quiet period and the minimum interval.
        holds = []
        quiet_until = min(newest + self.settings.debounce, oldest + max(4 * self.settings.debounce, 2.0))
        if quiet_until > now and not urgent:
            holds.append(Hold("debounce", f"a quiet period of dispatch.debounce_seconds "
                              f"({self.settings.debounce:g}s) after the newest trigger, for more to come", quiet_until))
        if not urgent and self.last_sent is not None and now - self.last_sent < self.settings.min_interval:
            holds.append(Hold("min-interval", f"dispatch.min_interval_seconds ({self.settings.min_interval:g}s) since the "
                              "last prompt", self.last_sent + self.settings.min_interval))
        while self.sends and now - self.sends[0] >= 3600:
            self.sends.popleft()
        if len(self.sends) >= self.settings.max_per_hour:
            holds.append(Hold("hourly-cap", f"{len(self.sends)} prompts in the last hour, dispatch.max_per_hour = "
                              f"{self.settings.max_per_hour}; a slot frees an hour after the oldest", self.sends[0] + 3600))
            if not self._cap_logged:
                self._cap_logged = True
                self.log.warning(logs.kv("prompt-cap-reached", max_per_hour=self.settings.max_per_hour,
                                         pending=len(pending), fix="raise dispatch.max_per_hour if this is expected"))
        else:
            self._cap_logged = False
        settle = min(60.0, ABORT_SETTLE * 2 ** self.catches)
        if self.aborted_at is not None and now - self.aborted_at < settle:
            holds.append(Hold("abort-settle", "the server winds down a turn the daemon aborted; a prompt sent "
                              "meanwhile would be aborted with it", self.aborted_at + settle))
        if holds:
            self._hold(*holds)
            return min(h.until for h in holds if h.until is not None) - now
        if self.session_busy(now):
            self._hold(Hold("session-busy", "the orchestrator session is busy with a turn of its own"))
            return FOLLOW_POLL
        self._hold()
        return self.send(pending)

    def session_busy(self, now: float) -> bool:
        """True while the orchestrator session is busy; a busy that never clears is checked."""
        assert self.client is not None and self.session_id is not None
        sid = self.session_id
        status = SessionStatus.of(self.client.session_status(), sid)
        self.shared.set_status(sid, status.type if status.busy else None)
        if not status.busy:
            self._busy_warned = None
            return False
        if self.shared.quiet_for(sid) < self.settings.busy_timeout:
            return True
        # Busy, yet nothing has happened for a while: believe the messages if they say it is done.
        finished = last_finished(self.client.messages(sid, limit=1))
        if self._busy_warned is None:
            self._busy_warned = now
            self.log.warning(logs.kv("status-mismatch" if finished else "session-busy-too-long", session=sid,
                                     quiet_seconds=int(self.shared.quiet_for(sid)),
                                     last_message_complete=bool(finished),
                                     action="sending anyway" if finished else "waiting"))
            if finished:
                assert self.ledger is not None
                self.ledger.record_stall("status-mismatch", "the orchestrator session is reported busy but its last "
                                         "reply is complete", session_id=sid,
                                         seconds=round(self.shared.quiet_for(sid), 1), now=self.wall())
        return not finished

    def send(self, triggers: Sequence[Trigger]) -> float:
        assert self.ledger is not None and self.client is not None and self.session_id is not None
        s = self.settings
        text = render_prompt(s.prompt, triggers, s.teams, s.teams_base_dir, s.lead)
        message_id = new_message_id(self.wall() * 1000)
        dispatch_id = self.ledger.create_dispatch(message_id, self.session_id, text, [t.id for t in triggers],
                                                  now=self.wall())
        for t in triggers:
            self.seen.pop(t.id, None)
        self.shared.set_pending_triggers(0)
        d = self.ledger.get_dispatch(dispatch_id)
        assert d is not None
        return self._post(d, first=True)

    def _post(self, d: Dispatch, first: bool) -> float:
        assert self.ledger is not None and self.client is not None
        crash_point("before-post")
        posted_at = self.clock()  # before the POST: the session may go busy before it returns
        outages = self._outages()  # likewise: the server may die as soon as it has answered
        try:
            self.client.prompt_async(d.session_id, d.prompt, d.message_id, agent=self.settings.agent,
                                     model=self.settings.model)
        except NotFound:
            self._finish(d, FAILED, error="session not found on the server", release=True)
            self.log.warning(logs.kv("session-missing", session=d.session_id, message_id=d.message_id,
                                     action="recreating the session; the triggers stay queued"))
            self._forget_session()
            return 0.0
        except OpencodeError as exc:
            if isinstance(exc, (Unreachable, AuthError)):
                self.log.warning(logs.kv("prompt-post-failed", message_id=d.message_id, error=str(exc),
                                         action="will look it up and retry"))
                return 2.0
            self._finish(d, FAILED, error=str(exc))
            self.log.error(logs.kv("prompt-rejected", message_id=d.message_id, error=str(exc)))
            return 0.0
        crash_point("after-post")
        self.ledger.mark_sent(d.id, now=self.wall())
        now = self.clock()
        self.last_sent = now
        self.sends.append(now)
        self.follow_started[d.id] = posted_at
        self.follow_outages[d.id] = outages
        self.shared.set_status(d.session_id, "busy")
        triggers = self.ledger.triggers_for(d.id)
        wall = self.wall()
        metrics.prompt_sent([wall - t.at for t in triggers], max(0, self.settings.max_per_hour - len(self.sends)))
        self.log.log(logs.NOTICE, logs.kv("prompt-sent", session=d.session_id, message_id=d.message_id,
                                          triggers=len(triggers), resent=None if first else "yes",
                                          teammates=",".join(sorted({t.teammate for t in triggers if t.teammate})) or None))
        return FOLLOW_POLL

    # -- following ---------------------------------------------------------------

    def follow(self, d: Dispatch) -> float:
        """Recover a pending prompt, or check whether a sent one has finished."""
        assert self.ledger is not None and self.client is not None
        if d.state == PENDING:
            try:
                self.client.get_message(d.session_id, d.message_id)
                self.ledger.mark_sent(d.id, now=self.wall())
                self.follow_started[d.id] = self.clock()
                self.log.info(logs.kv("prompt-recovered", message_id=d.message_id, landed="yes"))
                return 0.0
            except NotFound:
                self.log.info(logs.kv("prompt-recovered", message_id=d.message_id, landed="no", action="sending"))
                return self._post(d, first=False)
        started = self.follow_started.setdefault(d.id, self.clock())
        try:
            messages = self.client.messages(d.session_id, limit=50)
        except NotFound:
            self._finish(d, FAILED, error="session deleted while the prompt ran")
            self.log.warning(logs.kv("prompt-failed", message_id=d.message_id, error="session deleted"))
            if d.session_id == self.session_id:
                self._forget_session()
            return 0.0
        finished, text, tools, error = outcome(messages, d.message_id)
        if not finished and self._outage_since(d.id):
            return self._after_outage(d)
        answered = any(m.parent_id == d.message_id for m in messages_of(messages))
        if not finished and not answered and (self.shared.went_busy_at(d.session_id) or -1.0) < started:
            if self.clock() - started > self.settings.start_timeout:
                return self._never_ran(d)
            return FOLLOW_POLL
        if finished:
            state = FAILED if error else COMPLETED
            # Caught by our own abort of the turn before it: the model never saw it, and its
            # triggers go back to the queue in the same commit that closes it.
            caught = bool(error and "Aborted" in error and self.aborted_at is not None
                          and 0 <= started - self.aborted_at < ABORT_CATCH)
            self._finish(d, state, reply_text=text, tool_calls=tools, error=error, release=caught)
            self.follow_started.pop(d.id, None)
            self.follow_outages.pop(d.id, None)
            if caught:
                # The server keeps aborting new turns while the stuck model stream is still
                # open, so wait longer each time rather than send a prompt a second.
                self.catches += 1
                self.aborted_at = self.clock()
                wait = min(60.0, ABORT_SETTLE * 2 ** self.catches)
                self.log.warning(logs.kv("prompt-aborted-with-stuck-turn", message_id=d.message_id,
                                         action=f"its triggers go into the next prompt, in {wait:g}s"))
                return wait
            self.catches = 0
            calls = ",".join(f"{c['tool']}:{c['status']}" for c in tools) or None
            self.log.log(logs.NOTICE, logs.kv("prompt-done", message_id=d.message_id, outcome=state, tools=calls,
                                              error=error, reply=_shorten(text, 200) or None))
            return 0.0
        quiet = self.clock() - max(started, self.shared.activity(d.session_id) or started)
        if quiet > self.settings.turn_timeout and self.shared.stream_connected:
            # (With the stream down its silence says nothing; the reconnect starts the count afresh.)
            return self._stuck(d, text, tools, quiet)
        if self.clock() - started > self.settings.completion_timeout:
            self._finish(d, TIMEOUT, reply_text=text, tool_calls=tools,
                         error=f"no completed reply after {self.settings.completion_timeout:g}s")
            self.follow_started.pop(d.id, None)
            self.follow_outages.pop(d.id, None)
            self.log.warning(logs.kv("prompt-timeout", message_id=d.message_id,
                                     seconds=f"{self.settings.completion_timeout:g}",
                                     fix="raise dispatch.completion_timeout_seconds if turns are this long"))
            return 0.0
        return FOLLOW_POLL


    # -- turns that never start or never end ------------------------------------

    def _outages(self) -> tuple[int, int]:
        return self.shared.outages()

    def _outage_since(self, dispatch_id: int) -> bool:
        """Whether the server may have restarted since ``dispatch_id`` was last looked at.

        That takes both: the health watch saw it down, and the event stream ended. A probe
        that only timed out while the stream went on (a loaded machine) is no restart, and
        taking it for one would send a second prompt beside one that is merely slow to start.
        """
        then = self.follow_outages.setdefault(dispatch_id, self._outages())
        now = self._outages()
        return now[0] != then[0] and now[1] != then[1]

    def _after_outage(self, d: Dispatch) -> float:
        """The server went down while ``d`` was in flight: find out what became of it.

        A restarted opencode neither keeps a prompt it had not yet stored nor resumes a
        turn its old process was running; a network fault, on the other hand, leaves the
        turn running. So: a prompt the server does not have is sent again under the same
        ID; a turn that is no longer running and has no finished reply is re-sent under a
        new ID; a turn still running is followed as before.
        """
        assert self.ledger is not None and self.client is not None
        seen = self._outages()  # noted as handled only once the look-ups below have answered
        try:
            self.client.get_message(d.session_id, d.message_id)
        except NotFound:
            self.log.warning(logs.kv("prompt-lost-in-outage", session=d.session_id, message_id=d.message_id,
                                     action="re-sent under the same ID"))
            return self._post(d, first=False)
        if SessionStatus.of(self.client.session_status(), d.session_id).busy:
            self.follow_outages[d.id] = seen
            return FOLLOW_POLL
        finished, *_ = outcome(self.client.messages(d.session_id, limit=50), d.message_id)
        if finished:
            self.follow_outages[d.id] = seen
            return 0.0  # it ended while we looked: the next step records it
        header = (f"(The server went down while it handled {d.message_id}; that turn did not finish. "
                  "This prompt carries the same reports.)\n\n")
        message_id = new_message_id(self.wall() * 1000)
        new = self._redrive(d, message_id, header + d.prompt,
                            f"its turn ended unfinished in a server outage; superseded by {message_id}")
        self.follow_started.pop(d.id, None)
        self.follow_outages.pop(d.id, None)
        self.log.warning(logs.kv("prompt-interrupted", session=d.session_id, message_id=d.message_id,
                                 action=f"re-sent as {message_id}"))
        return self._post(new, first=True)

    def _stuck(self, d: Dispatch, text: str, tools: list[dict[str, Any]], quiet: float) -> float:
        """A turn with no activity for turn_timeout: abort it; what is pending goes in the next prompt."""
        assert self.ledger is not None and self.client is not None
        try:
            self.client.abort(d.session_id)
            aborted = "yes"
        except NotFound:
            aborted = "session gone"
        except OpencodeError as exc:
            self.log.warning(logs.kv("turn-abort-failed", session=d.session_id, error=str(exc), action="retrying"))
            return 2.0
        self._finish(d, TIMEOUT, reply_text=text, tool_calls=tools, error=f"no activity for {quiet:.0f}s; aborted")
        self.ledger.record_stall("turn-timeout", f"orchestrator turn {d.message_id} had no activity for "
                                 f"{quiet:.0f}s and was aborted", session_id=d.session_id, seconds=round(quiet, 1),
                                 now=self.wall())
        self.follow_started.pop(d.id, None)
        self.follow_outages.pop(d.id, None)
        self.shared.set_status(d.session_id, None)
        self.aborted_at = self.clock()
        self.log.warning(logs.kv("turn-timeout", session=d.session_id, message_id=d.message_id,
                                 quiet_seconds=int(quiet), aborted=aborted,
                                 fix="raise dispatch.turn_timeout_seconds if turns may be silent this long"))
        return 0.0

    def _never_ran(self, d: Dispatch) -> float:
        """Accepted but never started: send it again once under a new ID, then escalate."""
        assert self.ledger is not None and self.client is not None
        try:
            self.client.get_message(d.session_id, d.message_id)
            landed = "yes"
        except NotFound:
            landed = "no"
        self.follow_started.pop(d.id, None)
        self.follow_outages.pop(d.id, None)
        seconds = f"{self.settings.start_timeout:g}"
        if self.ledger.supersedes(d.id) is not None:
            reason = f"never ran, twice (the server has it: {landed})"
            self._finish(d, FAILED, error=reason, release=True)  # they never reached the model: the next prompt carries them
            eid, new = self.ledger.add_escalation(
                f"never-ran:{d.message_id}", rule="prompt-never-ran", severity="critical", source="server",
                kind="prompt", what=f"prompt {d.message_id} and the one before it were accepted but never ran",
                text=d.prompt, actions=("escalate",), session_id=d.session_id, now=self.wall())
            if new:
                self.log.critical(logs.kv("escalation", id=eid, rule="prompt-never-ran", severity="critical",
                                          source="server", session=d.session_id, seen=d.message_id,
                                          fix="check the server's log and its model provider"))
            return FOLLOW_POLL
        header = (f"(This prompt supersedes {d.message_id}, which the server accepted but did not run "
                  f"within {seconds}s.)\n\n")
        message_id = new_message_id(self.wall() * 1000)
        successor = self._redrive(d, message_id, header + d.prompt,
                                  f"never ran within {seconds}s (the server has it: {landed}); "
                                  f"superseded by {message_id}")
        self.ledger.record_stall("never-ran", f"prompt {d.message_id} was accepted but never ran; re-sent as "
                                 f"{message_id}", session_id=d.session_id, now=self.wall())
        self.log.warning(logs.kv("prompt-never-ran", session=d.session_id, message_id=d.message_id, landed=landed,
                                 action=f"re-sent as {message_id}"))
        return self._post(successor, first=True)

    # -- closing prompts -----------------------------------------------------------

    def _finish(self, d: Dispatch, state: str, *, reply_text: str | None = None,
                tool_calls: list[dict[str, Any]] | None = None, error: str | None = None,
                release: bool = False) -> None:
        """Close ``d``, its triggers released or settled in the same commit; the metric once it holds."""
        assert self.ledger is not None
        wall = self.wall()
        self.ledger.finish_dispatch(d.id, state, reply_text=reply_text, tool_calls=tool_calls, error=error,
                                    release=release, now=wall)
        metrics.prompt_done(state, wall - d.sent_at if d.sent_at is not None else None)

    def _redrive(self, d: Dispatch, message_id: str, prompt: str, reason: str) -> Dispatch:
        """Close ``d`` as failed and move its triggers to a new pending prompt, in one commit."""
        assert self.ledger is not None
        new_id = self.ledger.redrive_dispatch(d, message_id, prompt, reason, now=self.wall())
        metrics.prompt_done(FAILED, None)
        new = self.ledger.get_dispatch(new_id)
        assert new is not None
        return new


def _shorten(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
