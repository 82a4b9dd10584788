"""Memory under load: the daemon's resident memory as events and teammate messages pile up.

``orchestratord run`` (a subprocess, default settings) watches a :class:`ReplayServer`
and a team. Events are fed in two equal stages and messages written to the lead's inbox
in two equal stages (in writes of ``MESSAGES_PER_WRITE``, as a busy team does); RSS is
read from /proc after each stage, once the daemon has taken everything in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from tests.support.daemon import Daemon, ledger_rows, wait_for
from tests.support.team import inbox_path, locked, make_team, now_iso, rewrite_in_place

from .corpus import Corpus
from .live import proc_rss_bytes, write_config
from .replay import ReplayServer

TEAM = "load-team"
MESSAGES_PER_WRITE = 100


def _events_total(ledger: Path) -> int:
    rows = ledger_rows(ledger, "SELECT value FROM state WHERE key = 'stream'")
    return int(json.loads(rows[0][0]).get("events_total", 0)) if rows else 0


def _reported(ledger: Path) -> int:
    rows = ledger_rows(ledger, "SELECT COUNT(*) FROM messages WHERE reported_at IS NOT NULL")
    return int(rows[0][0]) if rows else 0


def _write_messages(teams: Path, start: int, count: int) -> None:
    """Append ``count`` messages to the lead's inbox, ``MESSAGES_PER_WRITE`` per rewrite."""
    path = inbox_path(teams, TEAM, "team-lead")
    for first in range(start, start + count, MESSAGES_PER_WRITE):
        with locked(teams, TEAM):
            current = json.loads(path.read_text() or "[]")
            current.extend({"from": f"worker-{i % 4 + 1}", "text": f"progress report {i}: step done, tests pass",
                            "summary": f"report {i}", "timestamp": now_iso(), "read": False}
                           for i in range(first, min(first + MESSAGES_PER_WRITE, start + count)))
            rewrite_in_place(path, current)


def run(workdir: Path, corpus: Corpus, events: int, messages: int,
        progress: Callable[[str], None]) -> dict[str, Any]:
    """RSS after ``events`` / 2 and ``events`` events, then after ``messages`` / 2 and ``messages`` messages."""
    teams = workdir / "claude"
    (teams / "teams").mkdir(parents=True)
    make_team(teams, TEAM, members=["worker-1", "worker-2", "worker-3", "worker-4"])
    ledger = workdir / "ledger.sqlite3"
    half = events // 2
    stages = []
    for n in range(2):
        path = workdir / f"events-{n}.sse"
        written = corpus.write(path, half, first_turn=n * corpus.turns_for(half))
        stages.append((path, written, written - corpus.turns_for(half) * corpus.syncs))
    out: dict[str, Any] = {}
    with ReplayServer() as server:
        config = write_config(workdir / "orchestrator.toml", server.url, ledger, teams, team=TEAM)
        daemon = Daemon(config, workdir).start()
        try:
            daemon.wait_log("stream-connected", 30)
            pid = daemon.proc.pid if daemon.proc else 0
            out["rss_mb_start"] = round(proc_rss_bytes(pid) / 2**20, 1)
            counted = 1  # server.connected
            fed = 0
            for path, written, plain in stages:
                server.feed.put(path)
                fed += written
                counted += plain
                def taken_in(c: int = counted) -> bool:
                    return _events_total(ledger) >= c

                wait_for(taken_in, 300, f"{fed} events taken in", interval=0.5)
                out[f"rss_mb_after_{fed}_events"] = round(proc_rss_bytes(pid) / 2**20, 1)
                progress(f"memory: {fed} events")
            out["events"] = fed
            sent = 0
            for _ in range(2):
                _write_messages(teams, sent, messages // 2)
                sent += messages // 2
                def reported(n: int = sent) -> bool:
                    return _reported(ledger) >= n

                wait_for(reported, 300, f"{sent} messages reported", interval=0.5)
                out[f"rss_mb_after_{sent}_messages"] = round(proc_rss_bytes(pid) / 2**20, 1)
                progress(f"memory: {sent} messages")
            out["messages"] = sent
        finally:
            daemon.close()
    for n in range(2):
        (workdir / f"events-{n}.sse").unlink(missing_ok=True)
    return out
