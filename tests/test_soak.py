"""A soak: the daemon under a steady mixed load, its memory, descriptors and threads sampled.

The load: a teammate message in the inbox every second, and every few seconds a
teammate turn on the real server that calls send_message (events on the stream, model
traffic); the orchestrator answers each prompt. ``make test`` runs half a minute of it;
``make faults`` also runs 30 minutes (marked slow), sampling once a minute. Growth is
measured from the sample after warm-up to the last, against small bounds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import faults
from tests.support.bed import NO_IDLE, TEAM, Bed, script_orchestrator, script_teammate, send_message_args
from tests.support.daemon import holds, ledger_rows, wait_for, write_config
from tests.support.flow import Flow, tally, wait_settled

pytestmark = pytest.mark.faults

MiB = 1024 * 1024


@dataclass
class Sample:
    rss: int  # bytes
    fds: int
    threads: int


def sample(pid: int) -> Sample:
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return Sample(rss=int(status["VmRSS"].split()[0]) * 1024, fds=len(os.listdir(f"/proc/{pid}/fd")),
                  threads=int(status["Threads"]))


@pytest.mark.parametrize("minutes, every", [
    pytest.param(0.5, 5.0, id="quick"),
    pytest.param(30, 60.0, id="30min", marks=pytest.mark.slow),
])
def test_soak(bed: Bed, minutes: float, every: float) -> None:
    write_config(bed.config, server_url=bed.server.url, ledger=bed.ledger, teams_base=bed.teams_dir,
                 extra=NO_IDLE + "\n[stalls]\nenabled = false\n",
                 max_per_hour=100_000)  # about a prompt a second: 30 minutes of it would pass 1,000 an hour
    script_orchestrator(bed.model, reply="noted")
    d = bed.daemon()
    d.notify.wait("READY=1", timeout=30)
    wait_for(lambda: ledger_rows(bed.ledger, "SELECT value FROM meta WHERE key = 'inbox.initialized'"), 30,
             "the inbox watcher's first scan")
    assert d.proc is not None
    pid = d.proc.pid
    flow = Flow(bed, TEAM, every=1.0).start()
    turns = 0
    samples: list[Sample] = []
    rounds = max(2, int(minutes * 60 / every))
    try:
        for i in range(rounds):
            # A teammate turn through the server each round: stream events and model traffic.
            marker = f"SOAK-TURN-{i}"
            script_teammate(bed.model, marker, [send_message_args(f"soak turn {i} done")])
            bed.server.prompt_async(bed.teammate(f"worker-{1 + i % 2}"), f"{marker}: carry on")
            turns += 1
            holds(lambda: d.proc is not None and d.proc.poll() is None, every, "the daemon keeps running")
            samples.append(sample(pid))
    finally:
        flow.stop()
    wait_settled(bed, flow, 180)
    t = tally(bed, flow, bed.daemons)
    base, end = samples[1] if len(samples) > 2 else samples[0], samples[-1]
    notes = (f"{minutes:g} min; RSS {base.rss / MiB:.1f} to {end.rss / MiB:.1f} MiB, "
             f"fds {base.fds} to {end.fds}, threads {base.threads} to {end.threads}")
    faults.record(faults.CaseResult(case=f"soak ({minutes:g} min, {turns} teammate turns)", runs=len(samples),
                                    written=t.written, reported=t.reported, sent=t.sent, duplicated=t.duplicated,
                                    lost=t.lost, crashes=0 if d.proc.poll() is None else 1, notes=notes))
    t.assert_exact()
    assert end.fds <= base.fds + 4, f"descriptors grow: {notes}"
    assert end.threads <= base.threads + 2, f"threads grow: {notes}"
    assert end.rss <= base.rss + 16 * MiB, f"memory grows: {notes}"
    assert len(d.grep(r"\bteammate-message .*soak turn")) == turns, "each turn's send_message reported once"
    assert d.grep(r"\b(worker-hung|worker-restart|worker-died|worker-error)\b") == [], "every worker kept going"
