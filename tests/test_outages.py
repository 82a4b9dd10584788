"""A server outage with a prompt in flight, against the real ``opencode serve``.

The real server is SIGKILLed by its PID, then started again on the same port and data:

- while the scripted model holds the orchestrator's turn: the restarted server has the
  prompt but not the turn, so the daemon re-sends it under a new ID
  (``prompt-interrupted``);
- the moment the server has answered ``prompt_async`` with its 204 (the fault proxy kills
  it on seeing the status line, before the answer goes on to the daemon).

Each case asserts the log line, that the model received the re-sent prompt exactly once,
and that one completed prompt, with a finished reply on the server, covers the message.
The branches a real server cannot be made to hit on demand stay with the stand-in
(``tests/test_dispatch_logic.py``): see docs/reliability.md.
"""

from __future__ import annotations

import re
import threading
from collections import Counter

import pytest

from tests.support.bed import NO_IDLE, TEAM, Bed, orchestrator_prompts, script_orchestrator
from tests.support.daemon import ledger_rows, wait_for, write_config
from tests.support.faultproxy import FaultProxy
from tests.support.flow import finished_on_server
from tests.support.llm import last_user_text
from tests.support.team import append_message

pytestmark = pytest.mark.faults

FAST = NO_IDLE + "\n[stalls]\nenabled = false\n"


def delivered_once(bed: Bed, proxy: FaultProxy, marker: str) -> dict[str, object]:
    """The message's one trigger points at a completed prompt whose reply finished on the server."""
    [(dispatch_id,)] = ledger_rows(bed.ledger, "SELECT dispatch_id FROM triggers WHERE detail LIKE ?", (f"%{marker}%",))
    row = next(r for r in bed.dispatches() if r["id"] == dispatch_id)
    assert row["state"] == "completed", row
    [(sid,)] = ledger_rows(bed.ledger, "SELECT value FROM meta WHERE key = ?", (f"session:{proxy.url}",))
    assert row["message_id"] in finished_on_server(bed.server.messages(sid)), "no finished reply on the server"
    assert [r for r in bed.dispatches() if r["state"] == "completed" and marker in r["prompt"]] == [row]
    return row


def prompts_naming(bed: Bed, text: str) -> list[str]:
    """The orchestrator turns the model was asked to start whose prompt (last user message) says ``text``."""
    return [last_user_text(r) for r in orchestrator_prompts(bed.model) if text in last_user_text(r)]


def test_server_killed_while_the_model_holds_the_turn(bed: Bed, proxy: FaultProxy) -> None:
    write_config(bed.config, server_url=proxy.url, ledger=bed.ledger, teams_base=bed.teams_dir, extra=FAST)
    hold = threading.Event()
    script_orchestrator(bed.model, reply="noted", hold=hold)
    d = bed.daemon()
    d.notify.wait("READY=1", timeout=30)
    wait_for(lambda: ledger_rows(bed.ledger, "SELECT value FROM meta WHERE key = 'inbox.initialized'"), 30,
             "the inbox watcher's first scan")
    append_message(bed.teams_dir, TEAM, "team-lead", "worker-1", "OUTAGE-HELD: the turn dies with the server")
    d.wait_log(r"\bprompt-sent ", timeout=30)
    wait_for(lambda: prompts_naming(bed, "OUTAGE-HELD"), 30, "the model holding the orchestrator's turn")
    [first] = bed.dispatches()
    bed.server.kill()  # SIGKILL, by the PID the test started
    hold.set()  # the turn the new process runs is answered at once
    d.wait_server_down()
    bed.server.start()

    [line] = d.wait_log(r"\bprompt-interrupted ", timeout=90)
    assert f"message_id={first['message_id']}" in line
    new_id = re.search(r"re-sent as (msg_\w+)", line)
    assert new_id is not None, line
    wait_for(lambda: any(r["message_id"] == new_id.group(1) and r["state"] == "completed" for r in bed.dispatches()),
             60, "the re-sent prompt completed")
    row = delivered_once(bed, proxy, "OUTAGE-HELD")
    assert row["message_id"] == new_id.group(1)
    old = next(r for r in bed.dispatches() if r["id"] == first["id"])
    assert old["state"] == "failed" and "superseded by" in (old["error"] or ""), old
    resent = prompts_naming(bed, f"The server went down while it handled {first['message_id']}")
    assert len(resent) == 1, f"the model got the re-sent prompt {len(resent)} times"
    assert proxy.duplicate_posts() == {}, "a prompt POSTed twice"
    assert not d.grep(r"\bprompt-lost-in-outage ")


def test_server_killed_between_its_204_and_storing_the_prompt(bed: Bed, proxy: FaultProxy) -> None:
    write_config(bed.config, server_url=proxy.url, ledger=bed.ledger, teams_base=bed.teams_dir, extra=FAST)
    script_orchestrator(bed.model, reply="noted")
    d = bed.daemon()
    d.notify.wait("READY=1", timeout=30)
    wait_for(lambda: ledger_rows(bed.ledger, "SELECT value FROM meta WHERE key = 'inbox.initialized'"), 30,
             "the inbox watcher's first scan")
    killed: list[str] = []
    dead = threading.Event()

    def kill_on_204(message_id: str, code: int) -> None:
        if code == 204 and not killed:
            killed.append(message_id)
            bed.server.kill()  # before the 204 reaches the daemon, as fast as a crash
            dead.set()  # (only now may the test start it again: kill() reaps by the current PID)

    proxy.on_prompt_answered = kill_on_204
    append_message(bed.teams_dir, TEAM, "team-lead", "worker-1", "OUTAGE-204: the server dies as it answers")
    assert dead.wait(30), "the server never answered the prompt with a 204"
    d.wait_server_down()
    bed.server.start()

    [line] = d.wait_log(r"\bprompt-lost-in-outage |\bprompt-interrupted ", timeout=90)
    assert f"message_id={killed[0]}" in line
    wait_for(lambda: any(r["state"] == "completed" for r in bed.dispatches()), 60, "a completed prompt")
    row = delivered_once(bed, proxy, "OUTAGE-204")
    prompts = prompts_naming(bed, "OUTAGE-204")
    assert len(prompts) == 1, f"the model got the prompt {len(prompts)} times"
    if "prompt-lost-in-outage" in line:
        # Not stored: sent again under the same ID, and the server answered it twice in all.
        assert row["message_id"] == killed[0]
        assert proxy.answered[killed[0]] == 2
    else:
        # Stored, its turn never ran: re-sent under a new ID, which says what it supersedes.
        assert row["message_id"] != killed[0] and killed[0] in prompts[0]
    resends = 1 if "prompt-lost-in-outage" in line else 0
    assert proxy.duplicate_posts(Counter({killed[0]: resends})) == {}, "a prompt POSTed twice"
