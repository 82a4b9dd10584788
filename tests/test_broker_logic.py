"""The permission broker one step at a time, against a stand-in for the server's routes.

The real server is in tests/test_broker.py; here each branch is driven by hand: which
sessions get rules and how often, what each request is answered, what a crash or an
outage between deciding and answering leaves, holds and their timeout, a person's answer.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from orchestratord.broker import APPROVE, HOLD, LEAVE, REJECT, Broker, BrokerSettings, covered, tier, verdict
from orchestratord.cli import main
from orchestratord.guard import Judge
from orchestratord.opencode import NotFound, OpencodeClient, OpencodeError, Unreachable
from orchestratord.policy import Finding, build_rules
from orchestratord.sessions import SessionDirectory, SessionInfo, teammate_of
from orchestratord.state import Shared

ALLOW_ALL = [{"permission": "*", "pattern": "*", "action": "allow"}]
ASK = [{"permission": "bash", "pattern": "*", "action": "ask"}]


class FakeServer:
    """The routes the broker uses, with PATCH appending as opencode 1.18.33 does."""

    def __init__(self) -> None:
        self.sessions: dict[str, dict[str, Any]] = {}
        self.pending: dict[str, dict[str, Any]] = {}
        self.replies: list[tuple[str, str, str | None]] = []
        self.patches: list[tuple[str, list[dict[str, str]]]] = []
        self.down = False
        self.patch_fails: Exception | None = None
        self.msgs: dict[str, list[dict[str, Any]]] = {}
        self.busy: set[str] = set()
        self.aborts: list[str] = []
        self.prompted: list[tuple[str, str, list[dict[str, Any]]]] = []
        self.now_ms = 1_000_000.0
        self.mcp_up = True  # GET /mcp answers (a server still connecting them makes the client time out)
        self.mcp_asked = 0

    def add(self, sid: str, title: str, permission: list[dict[str, str]] | None = None,
            directory: str = "/srv/project") -> None:
        self.sessions[sid] = {"id": sid, "title": title, "directory": directory,
                              "permission": list(permission or ALLOW_ALL)}

    def ask(self, rid: str, sid: str, command: str) -> dict[str, Any]:
        req = {"id": rid, "sessionID": sid, "permission": "bash", "patterns": [command],
               "metadata": {"command": command}, "always": [], "tool": {"messageID": "msg_1", "callID": rid}}
        self.pending[rid] = req
        return req

    def _up(self) -> None:
        if self.down:
            raise Unreachable("connection refused")

    def list_sessions(self) -> list[dict[str, Any]]:
        self._up()
        return [dict(s, permission=list(s["permission"])) for s in self.sessions.values()]

    def get_session(self, sid: str, timeout: float | None = None) -> dict[str, Any]:
        self._up()
        if sid not in self.sessions:
            raise NotFound(sid)
        return dict(self.sessions[sid], permission=list(self.sessions[sid]["permission"]))

    def set_session_permission(self, sid: str, rules: list[dict[str, str]]) -> dict[str, Any]:
        self._up()
        if self.patch_fails is not None:
            raise self.patch_fails
        self.patches.append((sid, rules))
        self.sessions[sid]["permission"].extend(rules)
        self.now_ms += 5
        return dict(self.get_session(sid), time={"updated": self.now_ms})

    def prompted_before(self, sid: str, mid: str, text: str, begun: bool) -> dict[str, Any]:
        """A prompt stored before any PATCH (and, if ``begun``, its turn's reply started)."""
        user = {"id": mid, "role": "user", "time": {"created": self.now_ms - 50}, "agent": "build"}
        self.msgs.setdefault(sid, []).append({"info": user, "parts": [{"type": "text", "text": text}]})
        if begun:
            self.msgs[sid].append({"info": {"id": "msg_a", "role": "assistant", "parentID": mid, "time": {}},
                                   "parts": [{"type": "step-start"}]})
        self.busy.add(sid)
        return user

    def permissions(self) -> list[dict[str, Any]]:
        self._up()
        return list(self.pending.values())

    def reply_permission(self, rid: str, reply: str, message: str | None = None) -> None:
        self._up()
        if rid not in self.pending:
            raise NotFound(rid)
        del self.pending[rid]
        self.replies.append((rid, reply, message))

    # -- what a turn restart uses ------------------------------------------------------

    def messages(self, sid: str, limit: int | None = None) -> list[dict[str, Any]]:
        self._up()
        return list(self.msgs.get(sid, []))

    def session_status(self) -> dict[str, Any]:
        self._up()
        return {sid: {"type": "busy"} for sid in self.busy}

    def abort(self, sid: str) -> None:
        self._up()
        self.aborts.append(sid)
        self.busy.discard(sid)

    def prompt_parts(self, sid: str, parts: list[dict[str, Any]], message_id: str, **kw: Any) -> None:
        self._up()
        self.prompted.append((sid, message_id, parts))

    def mcp_status(self, timeout: float | None = None) -> dict[str, Any]:
        self._up()
        self.mcp_asked += 1
        if not self.mcp_up:
            raise Unreachable("read timed out")
        return {"claude-teams": {"status": "connected"}}

    def close(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def server() -> FakeServer:
    return FakeServer()


def broker(tmp_path: Path, server: FakeServer, clock: Clock | None = None, own: str | None = "ses_orch",
           **settings: Any) -> Broker:
    shared = Shared()
    shared.set_session(own)
    clock = clock or Clock()
    b = Broker(shared=shared, sessions=SessionDirectory(), make_client=lambda: server,  # type: ignore[arg-type, return-value]
               ledger_path=str(tmp_path / "l.db"), judge=Judge(build_rules(())),
               settings=BrokerSettings(**settings), on_escalation=lambda: None, clock=clock,
               wall=lambda: clock.now + 1.7e9)
    b.setup()
    return b


def replies(server: FakeServer) -> list[tuple[str, str]]:
    return [(rid, reply) for rid, reply, _ in server.replies]


# -- the pure parts ----------------------------------------------------------------------------

def test_titles_name_teammates() -> None:
    assert teammate_of("worker-1@my-team") is not None and teammate_of("worker-1@my-team").name == "worker-1"  # type: ignore[union-attr]
    for title in (None, "", "orchestrator", "fix the build", "a@b@c", "@team", "name@"):
        assert teammate_of(title) is None, title


def test_covered_means_the_ruleset_ends_with_the_block() -> None:
    assert covered(ALLOW_ALL + ASK, ASK)
    assert not covered(ALLOW_ALL, ASK)
    assert not covered(ASK + [{"permission": "bash", "pattern": "*", "action": "allow"}], ASK), "released"
    assert not covered(None, ASK)


def test_a_ruleset_that_asks_already_needs_no_restart() -> None:
    from orchestratord.broker import asked_already
    assert asked_already([{"permission": "bash", "pattern": "*", "action": "ask"}], ["bash"])
    assert asked_already([{"permission": "*", "pattern": "*", "action": "deny"}], ["bash"])
    assert not asked_already(ALLOW_ALL, ["bash"]), "claude-teams' teammates"
    assert not asked_already([], ["bash"]) and not asked_already(None, ["bash"]), "the server's default allows"
    assert not asked_already(ASK + [{"permission": "bash", "pattern": "git *", "action": "allow"}], ["bash"])
    assert not asked_already(ASK, ["bash", "edit"])


def test_the_strictest_finding_decides() -> None:
    actions = {"recursive-delete": ("escalate", "reject", "tell"), "git-discard": ("escalate", "hold", "tell"),
               "credentials": ("escalate",)}.get

    def of(rule: str) -> tuple[str, ...]:
        return actions(rule) or ("escalate",)

    crit, hold, only = (Finding(r, "x", "w") for r in ("recursive-delete", "git-discard", "credentials"))
    assert verdict([hold, crit], of, brokered=True).decision == REJECT
    assert verdict([hold], of, brokered=True).decision == HOLD
    assert verdict([hold], of, brokered=False).decision == LEAVE, "a person's own session: they answer"
    assert verdict([crit], of, brokered=False).decision == REJECT, "critical is refused in any session"
    assert verdict([only], of, brokered=True).decision == APPROVE
    assert verdict([], of, brokered=True).decision == APPROVE and verdict([], of, brokered=False).decision == LEAVE
    assert (tier(("reject", "hold")), tier(("hold",)), tier(("tell",))) == ("reject", "hold", "escalate")


# -- giving sessions their rules ----------------------------------------------------------------

def test_every_session_but_ours_gets_the_rules_once(tmp_path: Path, server: FakeServer) -> None:
    server.add("ses_w1", "worker-1@my-team")
    server.add("ses_chat", "fix the build")
    server.add("ses_orch", "orchestrator")
    b = broker(tmp_path, server)
    b.run_once()
    assert sorted(sid for sid, _ in server.patches) == ["ses_chat", "ses_w1"]
    assert server.sessions["ses_w1"]["permission"] == ALLOW_ALL + ASK
    assert server.sessions["ses_orch"]["permission"] == ALLOW_ALL, "never the orchestrator's own session"
    assert b.ledger is not None and b.ledger.brokered("ses_w1").state == "brokered"  # type: ignore[union-attr]
    # A reconnect, an update event, a restart: nothing is appended again.
    b.resync()
    b.session_seen(SessionInfo.from_api(server.get_session("ses_w1")))  # type: ignore[arg-type]
    b.run_once()
    b.teardown()
    again = broker(tmp_path, server)
    again.run_once()
    assert len(server.patches) == 2, "restarts and reconnects do not pile up rules"
    again.teardown()


def test_only_teammates_by_config_and_the_team_filter(tmp_path: Path, server: FakeServer) -> None:
    server.add("ses_w1", "worker-1@my-team")
    server.add("ses_w9", "worker-9@other-team")
    server.add("ses_chat", "fix the build")
    b = broker(tmp_path, server, sessions="teammates", teams=("my-team",))
    b.run_once()
    assert [sid for sid, _ in server.patches] == ["ses_w1"]
    b.teardown()


def test_a_new_session_titled_like_ours_waits_until_ours_is_known(tmp_path: Path, server: FakeServer) -> None:
    clock = Clock()
    server.add("ses_new", "orchestrator", permission=[{"permission": "bash", "pattern": "*", "action": "deny"}])
    b = broker(tmp_path, server, clock=clock, own=None)
    b.run_once()
    assert server.patches == [], "it may be the orchestrator's session being created"
    b.shared.set_session("ses_new")
    clock.now += 2
    b.run_once()
    assert server.patches == [], "it was ours: its deny of bash stays the last word"
    b.teardown()


def test_a_session_whose_rules_cannot_be_set_is_escalated_once_and_retried(tmp_path: Path,
                                                                           server: FakeServer) -> None:
    clock = Clock()
    server.add("ses_w1", "worker-1@my-team")
    server.patch_fails = OpencodeError("PATCH /session/ses_w1: HTTP 500")
    b = broker(tmp_path, server, clock=clock)
    b.run_once()
    b.run_once()
    assert b.ledger is not None
    [e] = b.ledger.escalations()
    assert (e.rule, e.severity, e.teammate, e.session_id) == ("broker-failed", "critical", "worker-1", "ses_w1")
    assert "tell" in e.actions and b.ledger.brokered("ses_w1").state == "failed"  # type: ignore[union-attr]
    server.patch_fails = None
    clock.now += 31
    b.run_once()
    assert b.ledger.brokered("ses_w1").state == "brokered" and len(b.ledger.escalations()) == 1  # type: ignore[union-attr]
    b.teardown()


# -- answering ------------------------------------------------------------------------------------

def test_requests_are_answered_by_policy(tmp_path: Path, server: FakeServer) -> None:
    server.add("ses_w1", "worker-1@my-team")
    b = broker(tmp_path, server)
    b.run_once()
    b.asked(server.ask("per_1", "ses_w1", "ls -la"))
    b.asked(server.ask("per_2", "ses_w1", "rm -rf /"))
    b.run_once()
    assert replies(server) == [("per_1", "once"), ("per_2", "reject")]
    assert "recursive-delete" in (server.replies[1][2] or "")
    assert b.ledger is not None
    ok, refused = b.ledger.permission("per_1"), b.ledger.permission("per_2")
    assert ok is not None and (ok.decision, ok.decided_by, ok.state, ok.teammate) == (
        "approve", "policy", "answered", "worker-1")
    assert refused is not None and (refused.decision, refused.rule, refused.state) == (
        "reject", "recursive-delete", "answered")
    [e] = b.ledger.escalations()
    assert e.permission_id == "per_2" and "reject:per_2" in e.done, "the guard has nothing left to reject"
    b.teardown()


def test_a_hold_in_disguise_is_held_and_a_force_push_stays_refused(tmp_path: Path, server: FakeServer) -> None:
    server.add("ses_w1", "worker-1@my-team")
    b = broker(tmp_path, server)
    b.run_once()
    b.asked(server.ask("per_1", "ses_w1", "env git reset --hard"))
    b.asked(server.ask("per_2", "ses_w1", "command git push --force"))
    b.run_once()
    assert replies(server) == [("per_2", "reject")]
    assert b.ledger is not None and b.ledger.permission("per_1").state == "held"  # type: ignore[union-attr]
    b.teardown()


def test_a_persons_own_session_is_left_to_them_unless_critical(tmp_path: Path, server: FakeServer) -> None:
    server.add("ses_chat", "fix the build")
    b = broker(tmp_path, server, sessions="teammates")
    b.run_once()
    b.asked(server.ask("per_1", "ses_chat", "ls"))
    b.asked(server.ask("per_2", "ses_chat", "mkfs.ext4 /dev/sda1"))
    b.run_once()
    assert replies(server) == [("per_2", "reject")]
    assert b.ledger is not None and b.ledger.permission("per_1").decision == "leave"  # type: ignore[union-attr]
    b.teardown()


def decided_while_down(tmp_path: Path, server: FakeServer) -> Broker:
    """A broker that decided ``git status`` of worker-1 but could not send the answer."""
    server.add("ses_w1", "worker-1@my-team")
    b = broker(tmp_path, server)
    b.run_once()
    server.down = True
    b.asked(server.ask("per_1", "ses_w1", "git status"))
    b.run_once()
    assert b.ledger is not None and b.ledger.permission("per_1").state == "open"  # type: ignore[union-attr]
    assert server.replies == []
    return b


def test_a_decision_survives_a_crash_before_its_reply(tmp_path: Path, server: FakeServer) -> None:
    b = decided_while_down(tmp_path, server)
    b.teardown()  # as good as a crash: the decision is recorded, the reply never went
    server.down = False
    again = broker(tmp_path, server)
    again.run_once()  # the start lists the open requests
    assert replies(server) == [("per_1", "once")]
    again.teardown()


def test_an_approval_is_never_sent_from_what_the_ledger_remembers(tmp_path: Path, server: FakeServer) -> None:
    b = decided_while_down(tmp_path, server)
    del server.pending["per_1"]  # the session went away meanwhile
    server.down = False
    b.run_once()
    assert server.replies == [], "not re-sent before the server says it still asks"
    b.resync()
    b.run_once()
    assert server.replies == [] and b.ledger is not None
    assert b.ledger.permission("per_1").state == "gone"  # type: ignore[union-attr]
    b.teardown()


def test_requests_asked_while_away_are_answered_oldest_first(tmp_path: Path, server: FakeServer) -> None:
    server.add("ses_w1", "worker-1@my-team", permission=ALLOW_ALL + ASK)
    server.add("ses_w2", "worker-2@my-team", permission=ALLOW_ALL + ASK)
    server.ask("per_2", "ses_w2", "rm -rf ~")
    server.ask("per_1", "ses_w1", "pytest -q")
    b = broker(tmp_path, server)
    b.run_once()
    assert replies(server) == [("per_1", "once"), ("per_2", "reject")]
    b.teardown()


#: the built-in rules: git-discard holds ``git reset --hard`` for a person
HOLDING = Judge(build_rules(()))


def test_held_requests_wait_for_a_person_or_the_timeout(tmp_path: Path, server: FakeServer) -> None:
    clock = Clock()
    server.add("ses_w1", "worker-1@my-team")
    b = broker(tmp_path, server, clock=clock, hold_timeout=60.0)
    b.judge = HOLDING
    b.run_once()
    b.asked(server.ask("per_1", "ses_w1", "git reset --hard"))
    b.asked(server.ask("per_2", "ses_w1", "git reset --hard HEAD~1"))
    b.run_once()
    assert server.replies == []
    assert b.ledger is not None
    assert [p.id for p in b.ledger.permissions(states=("held",))] == ["per_1", "per_2"]
    [e1, e2] = sorted(b.ledger.escalations(), key=lambda e: e.id)
    assert e1.permission_id == "per_1" and (e1.rule, e1.severity) == ("git-discard", "medium")
    assert "hold" in e1.actions and "tell" in e1.actions, "the orchestrator is told the teammate waits"
    # A person allows the first (what `orchestratord allow` records). That command sends it
    # itself; the daemon sends it only once the command has had its time, so the two never race.
    assert b.ledger.answer_permission("per_1", decision="approve", reply="once", message=None, by="person",
                                      now=b.wall())
    assert not b.ledger.answer_permission("per_1", decision="reject", reply="reject", message=None, by="timeout")
    assert b.run_once() <= b.settings.person_first
    assert server.replies == [], "left to the command that recorded it"
    clock.now += b.settings.person_first
    b.run_once()
    assert replies(server) == [("per_1", "once")]
    # Nobody answers the second: the timeout rejects it, and never approves.
    clock.now += 59 - b.settings.person_first
    b.run_once()
    assert len(server.replies) == 1
    clock.now += 2
    b.run_once()
    assert replies(server) == [("per_1", "once"), ("per_2", "reject")]
    late = b.ledger.permission("per_2")
    assert late is not None and (late.decided_by, late.decision) == ("timeout", "reject")
    b.teardown()


def test_a_person_is_told_gone_only_when_nobody_sent_their_answer(tmp_path: Path, server: FakeServer,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """`orchestratord allow` whose request the daemon answered first (the command was slow) succeeds."""
    server.add("ses_w1", "worker-1@my-team")
    b = broker(tmp_path, server)
    b.judge = HOLDING
    b.run_once()
    b.asked(server.ask("per_1", "ses_w1", "git reset --hard"))
    b.asked(server.ask("per_2", "ses_w1", "git reset --hard HEAD~1"))
    b.run_once()
    config = tmp_path / "orchestrator.toml"
    config.write_text(f'[ledger]\npath = "{tmp_path / "l.db"}"\n[teams]\nbase_dir = "{tmp_path}"\n')

    def daemon_first(_client: OpencodeClient, request_id: str, reply: str, message: str | None = None) -> None:
        if request_id == "per_1":  # the daemon's send, once the command has taken longer than its time
            b.wall = lambda: time.time() + b.settings.person_first
            b.run_once()
        raise NotFound(f"POST /permission/{request_id}/reply: not found")

    monkeypatch.setattr(OpencodeClient, "reply_permission", daemon_first)
    assert main(["allow", "per_1", "--config", str(config)]) == 0
    assert "allowed per_1 (sent by the daemon)" in capsys.readouterr().out
    assert replies(server) == [("per_1", "once")]
    assert main(["deny", "per_2", "--config", str(config)]) == 1, "nobody sent it: the server no longer has it"
    assert "the server no longer has per_2" in capsys.readouterr().err
    b.teardown()


def test_a_hold_outlives_a_restart_with_its_clock(tmp_path: Path, server: FakeServer) -> None:
    clock = Clock()
    server.add("ses_w1", "worker-1@my-team")
    b = broker(tmp_path, server, clock=clock, hold_timeout=60.0)
    b.judge = HOLDING
    b.run_once()
    b.asked(server.ask("per_1", "ses_w1", "git reset --hard"))
    b.run_once()
    b.teardown()
    clock.now += 61  # the daemon was down for longer than the timeout
    again = broker(tmp_path, server, clock=clock, hold_timeout=60.0)
    again.judge = HOLDING
    again.run_once()
    assert replies(server) == [("per_1", "reject")]
    again.teardown()


def test_someone_else_answering_first_settles_it(tmp_path: Path, server: FakeServer) -> None:
    server.add("ses_w1", "worker-1@my-team")
    b = broker(tmp_path, server)
    b.judge = HOLDING
    b.run_once()
    b.asked(server.ask("per_1", "ses_w1", "git reset --hard"))
    b.run_once()
    del server.pending["per_1"]
    b.replied("per_1")
    b.run_once()
    assert b.ledger is not None
    row = b.ledger.permission("per_1")
    assert row is not None and (row.state, row.decided_by) == ("gone", "elsewhere")
    b.teardown()


def test_release_at_a_clean_stop_by_config(tmp_path: Path, server: FakeServer) -> None:
    server.add("ses_w1", "worker-1@my-team")
    b = broker(tmp_path, server, release_on_stop=True)
    b.run_once()
    b.release_at_stop = True
    b.teardown()
    assert server.sessions["ses_w1"]["permission"][-1] == {"permission": "bash", "pattern": "*", "action": "allow"}
    again = broker(tmp_path, server, release_on_stop=True)
    again.run_once()
    assert server.sessions["ses_w1"]["permission"][-1] == ASK[0], "asked again once the daemon is back"
    again.teardown()
    kept = broker(tmp_path, server)  # fail closed, the default
    kept.release_at_stop = True
    kept.teardown()
    assert server.sessions["ses_w1"]["permission"][-1] == ASK[0]


def test_a_turn_prompted_before_the_rules_waits_to_begin_then_is_restarted(tmp_path: Path,
                                                                          server: FakeServer) -> None:
    clock = Clock()
    server.add("ses_w1", "worker-1@my-team")
    user = server.prompted_before("ses_w1", "msg_u1", "clean up the workspace", begun=False)
    b = broker(tmp_path, server, clock=clock)
    b.run_once()  # rules on; its prompt came first, but its turn has not begun: nothing aborted yet
    assert server.patches and server.aborts == []
    b.user_message("ses_w1", user)
    clock.now += 0.1
    b.run_once()
    assert server.aborts == [], "a turn waiting for the server to set up is not aborted"
    parts: list[dict[str, Any]] = []
    reply = {"info": {"id": "msg_a", "role": "assistant", "parentID": "msg_u1", "time": {}}, "parts": parts}
    server.msgs["ses_w1"].append(reply)
    server.mcp_up = False  # a server's first turn: its reply is there while it connects its MCP servers
    b.user_message("ses_w1", {"id": "msg_a", "role": "assistant", "parentID": "msg_u1"})
    clock.now += 0.1
    b.run_once()
    assert server.aborts == [] and server.mcp_asked >= 1, "not aborted while the server sets up its MCP servers"
    parts.append({"type": "step-start"})
    clock.now += 0.1
    b.run_once()
    assert server.aborts == ["ses_w1"] and b.shared.aborted_recently("ses_w1")
    clock.now += 0.1
    b.run_once()
    [(sid, new_id, parts)] = server.prompted
    assert sid == "ses_w1" and parts == [{"type": "text", "text": "clean up the workspace"}]
    # The server aborts that one too (it sometimes does, right after an abort): it goes again, later.
    server.msgs["ses_w1"].append({"info": {"id": "msg_b", "role": "assistant", "parentID": new_id, "time": {},
                                           "error": {"name": "MessageAbortedError"}}, "parts": []})
    clock.now += 1.1
    b.run_once()
    assert len(server.prompted) == 1
    clock.now += 1.6
    b.run_once()
    assert len(server.prompted) == 2 and server.aborts == ["ses_w1"], "sent again, not aborted again"
    b.teardown()


def test_an_empty_reply_is_aborted_once_the_server_says_its_mcp_servers_are_up(tmp_path: Path,
                                                                             server: FakeServer) -> None:
    clock = Clock()
    for sid in ("ses_w1", "ses_w2"):
        server.add(sid, f"{sid}@my-team")
        server.prompted_before(sid, f"msg_u_{sid}", "work", begun=False)
        server.msgs[sid].append({"info": {"id": f"msg_a_{sid}", "role": "assistant", "parentID": f"msg_u_{sid}",
                                          "time": {}}, "parts": []})
    b = broker(tmp_path, server, clock=clock)
    b.run_once()
    assert sorted(server.aborts) == ["ses_w1", "ses_w2"] and server.mcp_asked == 1, "asked once per connection"
    b.teardown()


def test_a_turn_that_asked_already_or_came_after_the_rules_is_left_alone(tmp_path: Path,
                                                                         server: FakeServer) -> None:
    server.add("ses_w1", "worker-1@my-team", permission=ASK)
    server.prompted_before("ses_w1", "msg_u1", "work", begun=True)
    server.add("ses_w2", "worker-2@my-team")
    b = broker(tmp_path, server)
    b.run_once()
    late = {"id": "msg_u2", "role": "user", "time": {"created": server.now_ms + 100}}
    b.user_message("ses_w2", late)
    b.run_once()
    assert server.aborts == [] and server.prompted == []
    b.teardown()


def test_a_turn_that_acted_before_the_rules_is_not_aborted(tmp_path: Path, server: FakeServer) -> None:
    server.add("ses_w1", "worker-1@my-team")
    server.prompted_before("ses_w1", "msg_u1", "work", begun=True)
    server.msgs["ses_w1"][-1]["parts"].append({"type": "tool", "tool": "claude-teams_send_message",
                                               "state": {"status": "running"}})
    b = broker(tmp_path, server)
    b.run_once()
    assert server.patches and server.aborts == [] and server.prompted == []
    b.teardown()
