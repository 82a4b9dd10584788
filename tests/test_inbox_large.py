"""A lead inbox of 20 MB, against the real server: every new message heard once, then again
after the model's ``read_inbox`` has flipped the flags.

claude-teams never trims an inbox, so a long-lived team's lead inbox is this large; the
old watcher refused any inbox over 8 MiB and went deaf. Here the inbox is written by the
same code the test claude-teams server uses (in place, under the lock), and the flags
are flipped by the orchestrator's own ``claude-teams_read_inbox`` call.
"""

from __future__ import annotations

import json

from tests.support.bed import NO_IDLE, TEAM, Bed, orchestrator_prompts, script_orchestrator
from tests.support.daemon import holds, ledger_rows, wait_for
from tests.support.team import append_message, history, inbox_path, locked, read_inbox, rewrite_in_place

SIZE = 20 * 1024 * 1024
#: one line of json.dumps, as claude-teams writes it: about 320 bytes a message
COUNT = SIZE // 315


def test_a_20_mb_lead_inbox_hears_each_new_message_once(bed: Bed) -> None:
    path = inbox_path(bed.teams_dir, TEAM, "team-lead")
    with locked(bed.teams_dir, TEAM):
        rewrite_in_place(path, history(COUNT))
    assert path.stat().st_size >= SIZE
    old = COUNT
    bed.write_config(extra=NO_IDLE, debounce=0.3)
    # Rewriting 20 MB in pure Python (this test, the test server's read_inbox) keeps both cores
    # busy: a health probe given a second could take the server for down.
    health = "[health]\ninterval_seconds = 0.25\ntimeout_seconds = 1\n"
    assert health in bed.config.read_text()
    bed.config.write_text(bed.config.read_text().replace(health, health.replace("= 1\n", "= 10\n")))
    script_orchestrator(bed.model, reply="read the new ones")
    d = bed.daemon()
    d.notify.wait("READY=1")
    bed.session_id()
    wait_for(lambda: ledger_rows(bed.ledger, "SELECT value FROM meta WHERE key = 'inbox.initialized'"), 120,
             "the first read of the 20 MB inbox")
    assert ledger_rows(bed.ledger, "SELECT COUNT(*) FROM messages WHERE reported_at IS NOT NULL")[0][0] == old

    def reported() -> list[str]:
        return d.grep(r"teammate-message team=")

    def round_of(n: int, first: int) -> None:
        for i in range(first, first + n):
            append_message(bed.teams_dir, TEAM, "team-lead", f"worker-{i % 2 + 1}", f"large inbox news {i}",
                           summary=f"news {i}")
        wait_for(lambda: len(reported()) >= first + n, 60, f"{first + n} reports")
        wait_for(lambda: all(m["read"] for m in read_inbox(bed.teams_dir, TEAM, "team-lead")[-n:]), 120,
                 "the orchestrator's read_inbox flipping their flags")
        wait_for(lambda: _all_dispatched(bed), 120, "every trigger covered by a finished prompt")

    round_of(3, 0)
    # Appends that land together are read together: one read may take two or three of them.
    assert d.grep(r'inbox-read .*team-lead\.json read="new part" elements=[123]\b'), \
        "an append is read from where the last read ended: " + "\n".join(d.grep(r"inbox-"))
    flips = len(d.grep(r'inbox-read .*team-lead\.json read="whole file"'))
    round_of(3, 3)
    wait_for(lambda: len(d.grep(r'inbox-read .*team-lead\.json read="whole file"')) > flips, 120,
             "the whole read that follows a flag flip")
    holds(lambda: len(reported()) == 6, 1.0, "no second report after the flags flipped")

    lines = reported()
    for i in range(6):
        assert sum(f"summary=\"news {i}\"" in line for line in lines) == 1, f"news {i} reported once: {lines}"
    assert not d.grep("inbox-unreadable")
    rows = ledger_rows(bed.ledger, "SELECT COUNT(*), COUNT(reported_at), COUNT(DISTINCT trigger_id) FROM messages")[0]
    assert rows == (old + 6, old + 6, 6), "every message recorded once, the six new ones each with its trigger"
    prompts = [json.dumps(p) for p in orchestrator_prompts(bed.model)]
    for i in range(6):
        assert sum(f"news {i}" in p for p in prompts) >= 1, f"no prompt named news {i}"


def _all_dispatched(bed: Bed) -> bool:
    pending = ledger_rows(bed.ledger, "SELECT COUNT(*) FROM triggers WHERE dispatch_id IS NULL AND covered IS NULL")[0][0]
    states = [r["state"] for r in bed.dispatches()]
    return pending == 0 and bool(states) and all(s in ("completed", "failed") for s in states)
