"""Fault cases against the real server: keep working, lose nothing, report each message once.

Teammates write a steady flow of messages (``tests/support/flow.py``) while the case
breaks something: a fault proxy between the daemon and the server (every fault alone,
then a random sequence), the server killed and restarted, the daemon killed at random
moments, a storm of reloads. Every case runs through the fault proxy, which counts the
prompt POSTs. Each ends with the same count (``tally``): every message written was
reported exactly once and delivered, covered by exactly one prompt that completed on the
server; no prompt was POSTed twice beyond the re-sends the daemon announced; every
prompt the ledger calls sent is on the server; and the ledger passes
``PRAGMA integrity_check``.

``make test`` runs the quick form; ``make faults`` the long one and prints the table
(``tests/support/faults.py``).
"""

from __future__ import annotations

import hashlib
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support import faults
from tests.support.bed import NO_IDLE, TEAM, Bed, script_orchestrator
from tests.support.daemon import Daemon, holds, ledger_rows, status_json, wait_for, write_config
from tests.support.faultproxy import FaultProxy
from tests.support.flow import Flow, committed, tally, wait_settled

pytestmark = pytest.mark.faults

# Quick detection and reconnects, so a case spends its time on faults, not on waiting.
FAST = NO_IDLE + """
[stalls]
enabled = false
"""


def configure(bed: Bed, server_url: str, extra: str = "") -> Path:
    return write_config(bed.config, server_url=server_url, ledger=bed.ledger, teams_base=bed.teams_dir,
                        extra=FAST + extra, debounce=0.2)


def start(bed: Bed) -> Daemon:
    script_orchestrator(bed.model, reply="noted")
    d = bed.daemon()
    d.notify.wait("READY=1", timeout=30)
    wait_for(lambda: ledger_rows(bed.ledger, "SELECT value FROM meta WHERE key = 'inbox.initialized'"), 30,
             "the inbox watcher's first scan")
    return d


def integrity(bed: Bed) -> str:
    return ledger_rows(bed.ledger, "PRAGMA integrity_check")[0][0]


def conclude(bed: Bed, flow: Flow, case: str, runs: int, d: Daemon | None, proxy: FaultProxy,
             worst: float | None = None, notes: str = "", killed: bool = False,
             committed_before: dict[Daemon, set[str]] | None = None) -> None:
    """The end of every case: wait for the flow to settle, count, record the row, assert."""
    wait_settled(bed, flow, 180)
    t = tally(bed, flow, bed.daemons, proxy.url, killed=killed, proxy=proxy, committed_before=committed_before)
    if t.log_repeats:
        notes += f"; log lines repeated after a kill between the line and its commit: {t.log_repeats}"
    ok = integrity(bed)
    crashes = 0 if d is None or alive(d) else 1
    faults.record(faults.CaseResult(case=case, runs=runs, written=t.written, reported=t.reported, sent=t.sent,
                                    duplicated=t.duplicated, lost=t.lost, worst_recovery=worst, crashes=crashes,
                                    notes="; ".join(n for n in (notes, "" if ok == "ok" else f"integrity: {ok}") if n)))
    t.assert_exact()
    assert crashes == 0, "the daemon exited on its own"
    assert ok == "ok", ok


def recovered(d: Daemon) -> bool:
    """Server up and stream connected, by the daemon's own latest words on each."""
    server = d.grep(r"\bserver-(up|down) ")
    stream = d.grep(r"\bstream-(connected|disconnected|connect-failed) ")
    return bool(server and stream) and "server-up " in server[-1] and "stream-connected " in stream[-1]


def alive(d: Daemon) -> bool:
    return d.proc is not None and d.proc.poll() is None


# -- the fault proxy, each fault alone -----------------------------------------------------

# What each fault looks like from the daemon: the server down, or only the stream broken,
# or nothing at all (slow or fragmented bytes are still the same bytes).
SYMPTOMS = {
    "hang": "down", "status": "down", "refuse": "down", "truncate": "down",
    "cut": "stream", "latency": "none", "slice": "none",
}


@pytest.mark.parametrize("kind", sorted(SYMPTOMS))
def test_each_proxy_fault_alone(bed: Bed, proxy: FaultProxy, kind: str, rng: random.Random) -> None:
    configure(bed, proxy.url)
    d = start(bed)
    flow = Flow(bed, TEAM)
    worst = 0.0
    rounds = faults.runs(1, 5)
    for _ in range(rounds):
        flow.write()
        wait_settled(bed, flow, 60)
        # Counted before the fault: the health probe may see it before the writes below end.
        connects = len(d.grep(r"\bstream-connected "))
        opts: dict[str, Any] = {"code": rng.choice([500, 502, 503])} if kind == "status" else {}
        if kind == "latency":
            opts = {"seconds": 0.3}
        proxy.set(kind, **opts)
        if kind == "cut":
            bed.server.create_session("poke")  # an event on the stream, cut in half
        for _ in range(3):
            flow.write()
        if SYMPTOMS[kind] == "down":
            d.wait_server_down()
            wait_for(lambda: status_json(bed.config)["server"]["healthy"] is False, 30, "status: server down")
        elif SYMPTOMS[kind] == "stream":
            d.wait_log(r"\bstream-connected ", timeout=30, count=connects + 1)
        else:
            wait_settled(bed, flow, 90)  # prompts go through the slow or sliced connection
        assert alive(d)
        proxy.clear()
        cleared = time.monotonic()
        wait_for(lambda: recovered(d), 60, f"recovery after {kind}")
        worst = max(worst, time.monotonic() - cleared)
        wait_for(lambda: status_json(bed.config)["server"]["healthy"] is True
                 and status_json(bed.config)["stream"]["connected"], 30, "status: server up, stream connected")
    flow.write()
    conclude(bed, flow, f"proxy: {kind}", rounds, d, proxy, worst)


def test_random_fault_sequence(bed: Bed, proxy: FaultProxy, rng: random.Random) -> None:
    configure(bed, proxy.url)
    d = start(bed)
    flow = Flow(bed, TEAM, every=0.4).start()
    seconds = faults.runs(20, 300)
    applied: list[str] = []
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            kind = rng.choice(sorted(SYMPTOMS))
            opts: dict[str, Any] = {"code": rng.choice([500, 502, 503])} if kind == "status" else {}
            if kind == "cut":
                opts = {"now": rng.random() < 0.5}
            proxy.set(kind, **opts)
            applied.append(kind)
            holds(lambda: alive(d), rng.uniform(0.5, 3.0), "the daemon keeps running under the fault")
            proxy.clear()
            holds(lambda: alive(d), rng.uniform(0.3, 2.0), "the daemon keeps running between faults")
    finally:
        proxy.clear()
        flow.stop()
    cleared = time.monotonic()
    wait_for(lambda: recovered(d), 60, f"recovery after {len(applied)} faults")
    conclude(bed, flow, "proxy: random sequence", len(applied), d, proxy, time.monotonic() - cleared,
             f"{seconds} s of faults")


# -- the server killed and restarted ---------------------------------------------------------

def test_server_killed_and_restarted(bed: Bed, proxy: FaultProxy) -> None:
    configure(bed, proxy.url)
    d = start(bed)
    flow = Flow(bed, TEAM, every=0.3).start()
    restarts = faults.runs(3, 20)
    worst = 0.0
    try:
        for i in range(restarts):
            # Let some work reach the server between outages.
            prompts = len(d.grep(r"\bprompt-sent "))
            wait_for(lambda: len(d.grep(r"\bprompt-sent ")) > prompts, 60, f"a prompt before restart {i + 1}")
            connects = len(d.grep(r"\bstream-connected "))
            bed.server.kill()
            d.wait_server_down()
            bed.server.start()
            back = time.monotonic()
            d.wait_log(r"\bstream-connected ", timeout=60, count=connects + 1)
            worst = max(worst, time.monotonic() - back)
            assert alive(d)
    finally:
        flow.stop()
    conclude(bed, flow, "server SIGKILL and restart", restarts, d, proxy, worst=worst,
             notes="recovery: from the server healthy again to the stream connected")


# -- the daemon killed at random moments -------------------------------------------------------

def test_daemon_sigkilled_at_random_moments(bed: Bed, proxy: FaultProxy, rng: random.Random) -> None:
    configure(bed, proxy.url)
    first = start(bed)
    assert first.stop() == 0
    flow = Flow(bed, TEAM, every=0.15).start()
    kills = faults.runs(6, 100)
    before: dict[Daemon, set[str]] = {}
    try:
        for _ in range(kills):
            reported = committed(bed)  # what this daemon must not report again
            d = bed.daemon()
            before[d] = reported
            d.notify.wait("READY=1", timeout=30)
            # The random moment: somewhere in startup, catch-up, a prompt or a quiet spell.
            holds(lambda: alive(d), rng.uniform(0.05, 5.0), "the daemon runs until it is killed")
            d.kill()
            assert integrity(bed) == "ok", "the ledger after a SIGKILL"
    finally:
        flow.stop()
    reported = committed(bed)
    last_daemon = bed.daemon()
    before[last_daemon] = reported
    last_daemon.notify.wait("READY=1", timeout=30)
    conclude(bed, flow, "daemon SIGKILL at random moments", kills, last_daemon, proxy, notes="integrity_check after each: ok",
             killed=True, committed_before=before)


# -- reload storms ----------------------------------------------------------------------------

def test_reload_storm_ends_on_the_last_valid_config(bed: Bed, proxy: FaultProxy) -> None:
    configure(bed, proxy.url)
    d = start(bed)
    good = bed.config.read_text()
    signals, burst = 200, 50  # the last 50 come faster than reloads finish: they coalesce

    def outcomes() -> int:
        return len(d.grep(r"\bconfig-(reloaded|reload-failed) "))

    final = ""
    for i in range(signals):
        if i % 2 == 0:
            text = good.replace("[dispatch]\n", "[dispatch]\nbroken = [\n", 1) if i % 4 == 0 else \
                good.replace("debounce_seconds = 0.2", "debounce_seconds = -1")
        else:
            final = text = good.replace("debounce_seconds = 0.2", f"debounce_seconds = {0.2 + i / 10000:.4f}")
        tmp = bed.config.with_suffix(".new")
        tmp.write_text(text)
        tmp.replace(bed.config)  # as editors and config management do: never half a file
        before = outcomes()
        d.signal(signal.SIGHUP)
        if i < signals - burst:
            wait_for(lambda: outcomes() > before, 30, f"the outcome of reload {i + 1}")
    digest = hashlib.sha256(final.encode()).hexdigest()[:12]
    wait_for(lambda: (status_json(bed.config).get("config") or {}).get("digest") == digest, 60,
             "the last valid config in effect")
    assert alive(d), "the daemon survived the storm"
    assert d.grep(r"\bconfig-reloaded "), "valid files were applied"
    assert d.grep(r"\bconfig-rejected "), "broken files were rejected"
    assert not d.grep("Traceback"), "\n".join(d.grep("Traceback"))
    # And it still does its job.
    flow = Flow(bed, TEAM)
    flow.write()
    conclude(bed, flow, "reload storm (valid and broken alternating)", signals, d, proxy,
             notes=f"{len(d.grep(r'config-reloaded '))} applied, {len(d.grep(r'config-reload-failed '))} refused")
