"""A prompt closed as failed gives its triggers back in the same commit, crash or no crash.

Against the real server: the orchestrator's session is deleted under the daemon, so the
next prompt is refused (404) and closed as failed with its triggers released. The daemon
is killed right before that commit; after the restart no trigger may be left tied to a
failed prompt (nothing would ever send it), and the report reaches a new session.
"""

from __future__ import annotations

import requests

from tests.support.bed import NO_IDLE, TEAM, Bed, script_orchestrator
from tests.support.daemon import ledger_rows, wait_for
from tests.support.team import append_message

TIED_TO_FAILED = ("SELECT COUNT(*) FROM triggers t JOIN dispatches d ON t.dispatch_id = d.id "
                  "WHERE d.state = 'failed'")


def test_a_crash_while_a_failed_prompt_releases_its_triggers_loses_no_report(bed: Bed) -> None:
    bed.write_config(extra=NO_IDLE, debounce=0.2)
    script_orchestrator(bed.model, reply="handled")
    first = bed.ready_daemon()
    old = bed.session_id()
    assert first.stop() == 0

    crashing = bed.daemon(env={"ORCHESTRATORD_TEST_CRASH": "before-settle-commit"})
    crashing.notify.wait("READY=1")
    crashing.wait_log(rf"session session={old}")  # the dispatcher holds the session it will post to
    assert requests.delete(f"{bed.server.url}/session/{old}", timeout=10).ok
    append_message(bed.teams_dir, TEAM, "team-lead", "worker-1", "report after the session went away")
    assert crashing.wait_exit(60) == 137, "the failed prompt's settle was not reached"
    [(state, tied)] = ledger_rows(bed.ledger, "SELECT d.state, COUNT(t.id) FROM dispatches d "
                                  "JOIN triggers t ON t.dispatch_id = d.id GROUP BY d.id")
    assert (state, tied) == ("pending", 1), "the crash rolled back the close and the release together"

    again = bed.daemon()
    again.notify.wait("READY=1")
    wait_for(lambda: [r for r in bed.dispatches() if r["state"] == "completed"], 90, "the report prompted anew")
    assert ledger_rows(bed.ledger, TIED_TO_FAILED) == [(0,)], "no trigger is left with a failed prompt"
    assert ledger_rows(bed.ledger, "SELECT COUNT(*) FROM triggers WHERE dispatch_id IS NULL") == [(0,)]
    assert bed.session_id() != old, "the prompt went to a new session"
    states = [r["state"] for r in bed.dispatches()]
    assert states == ["failed", "completed"], states
    assert again.grep("session-missing")
