"""The real daemon while its wall clock jumps backwards and forwards (libfaketime).

Only the daemon runs under libfaketime: ``LD_PRELOAD`` with ``FAKETIME_DONT_FAKE_MONOTONIC``,
so ``time.time()`` follows the offset the test writes into ``FAKETIME_TIMESTAMP_FILE``
while ``time.monotonic()`` keeps counting real seconds. The opencode server, the model
and the team keep the real clock, as a server on another machine would. While the
offset swings between two hours behind and three hours ahead, teammate messages are
still reported once each, prompts are still sent, the hourly cap neither opens nor shuts,
the health probe goes on after every jump, and no stall or timeout fires. How promptly,
and the probe's gaps, are figures in the fault table, not assertions.

libfaketime comes from ``make libfaketime`` (part of ``make test``), like promtool.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support import faults
from tests.support.bed import NO_IDLE, TEAM, Bed, is_orchestrator, orchestrator_prompts, script_orchestrator
from tests.support.daemon import Daemon, holds, ledger_rows, wait_for
from tests.support.team import append_message

pytestmark = pytest.mark.faults

LIBFAKETIME = Path(__file__).resolve().parent / ".tools" / "libfaketime.so.1"

# Python 3.11's time.sleep() waits with clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME),
# which libfaketime 0.9.10 mishandles when it leaves the monotonic clock alone (EINVAL;
# libfaketime issue 426, fixed upstream later). Only under the preload, the daemon's
# sleeps go through select(), which waits for a relative time on the monotonic clock.
# The same file reports each health probe, so the test can measure the probe interval.
SLEEP_SHIM = '''
import select, time

def _sleep(seconds):
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        select.select([], [], [], left)

time.sleep = _sleep

# What the test watches: each health probe, stamped on the monotonic clock, on stderr.
import sys
from orchestratord import opencode as _opencode

_health = _opencode.OpencodeClient.health

def _probe(self, *args, **kwargs):
    sys.stderr.write(f"test-health-probe mono={time.monotonic():.3f}\\n")
    return _health(self, *args, **kwargs)

_opencode.OpencodeClient.health = _probe
'''


def faketime_env(tmp: Path) -> tuple[dict[str, str], Path]:
    """The environment that puts a process under libfaketime, and the offset file it reads."""
    if not LIBFAKETIME.exists():
        pytest.skip(f"{LIBFAKETIME} is missing: `make libfaketime` fetches it from Debian's libfaketime "
                    "package (apt-get download); without apt-get this test cannot run")
    offset = tmp / "faketime-offset"
    offset.write_text("+0\n")
    shim = tmp / "faketime-shim"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text(SLEEP_SHIM)
    env = {
        "LD_PRELOAD": str(LIBFAKETIME),
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "FAKETIME_NO_CACHE": "1",
        "FAKETIME_TIMESTAMP_FILE": str(offset),
        "PYTHONPATH": os.pathsep.join(p for p in (str(shim), os.environ.get("PYTHONPATH", "")) if p),
    }
    return env, offset


def set_offset(path: Path, offset: str) -> None:
    """Move the faked wall clock: the file is read again on every call (no cache)."""
    tmp = path.with_suffix(".new")
    tmp.write_text(offset + "\n")
    os.replace(tmp, path)


PROBE = ("import time, sys\n"
         "for line in sys.stdin:\n"
         "    print(time.time(), time.monotonic(), flush=True)\n"
         "    time.sleep(0.01)\n")


def test_libfaketime_moves_the_wall_clock_and_not_the_monotonic_one(tmp_path: Path) -> None:
    env, offset = faketime_env(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", PROBE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, **env})
    assert proc.stdin is not None and proc.stdout is not None
    try:
        def sample() -> tuple[float, float, float, float]:
            real_wall, real_mono = time.time(), time.monotonic()
            proc.stdin.write("\n")  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]
            wall, mono = map(float, proc.stdout.readline().split())  # type: ignore[union-attr]
            return wall, mono, real_wall, real_mono

        wall, mono, real_wall, real_mono = sample()
        assert abs(wall - real_wall) < 5 and abs(mono - real_mono) < 5
        for text, seconds in (("-2h", -7200), ("+3h", 10800), ("+0", 0)):
            set_offset(offset, text)
            wall, mono, real_wall, real_mono = sample()
            assert abs(wall - real_wall - seconds) < 5, f"offset {text}: the wall clock did not move"
            assert abs(mono - real_mono) < 5, f"offset {text}: the monotonic clock moved"
    finally:
        proc.stdin.close()
        proc.wait(10)



HEALTH_INTERVAL = 0.25
QUIET = 20  # turn, start and stall timeouts: hours of wall clock, seconds of real time
SPURIOUS = r"teammate-stalled|turn-timeout|prompt-never-ran|prompt-timeout|session-busy-too-long|worker-hung|status-mismatch"
JUMPS = ("+3h", "-2h")


def probe_times(d: Daemon) -> list[float]:
    return [float(m.group(1)) for line in d.grep(r"test-health-probe") if (m := re.search(r"mono=([\d.]+)", line))]


def probes_after_jump(d: Daemon) -> None:
    """The health probe goes on after a jump: no pause after a step forward (two more probes)."""
    before = len(probe_times(d))
    wait_for(lambda: len(probe_times(d)) >= before + 2, 30, "health probes after the clock jump")


def test_wall_clock_jumps_break_no_interval_limit_or_report(bed: Bed) -> None:
    env, offset = faketime_env(bed.tmp)
    jumps = faults.runs(2, 10)
    cap = jumps + 2
    bed.write_config(extra=NO_IDLE + f"\n[stalls]\nteammate_quiet_seconds = {QUIET}\n", health_interval=HEALTH_INTERVAL)
    text = bed.config.read_text().replace(
        "max_per_hour = 1000", f"max_per_hour = {cap}\nturn_timeout_seconds = {QUIET}\nstart_timeout_seconds = {QUIET}")
    bed.config.write_text(text)
    hold = threading.Event()
    script_orchestrator(bed.model, reply="Read the inbox.", hold=hold)
    d = bed.daemon(env=env)
    d.notify.wait("READY=1")
    bed.session_id()
    wait_for(lambda: ledger_rows(bed.ledger, "SELECT value FROM meta WHERE key = 'inbox.initialized'"), 30,
             "the inbox watcher's first scan")
    started = time.monotonic()
    written: list[str] = []
    report_delays: list[float] = []

    def write(body: str) -> None:
        written.append(body)
        at = time.monotonic()
        append_message(bed.teams_dir, TEAM, "team-lead", "worker-1", body)
        d.wait_log(rf"teammate-message .*{re.escape(body)}", timeout=15)  # the daemon running now
        report_delays.append(time.monotonic() - at)

    for i in range(jumps):
        jump = JUMPS[i % 2]
        write(f"clock step {i} at {jump}")
        d.wait_log("prompt-sent", count=i + 1, timeout=30)
        if i == 0:
            # The first turn is held while the clock jumps: hours of wall clock pass, seconds
            # of real time; no turn or start timeout may fire.
            bed.model.wait_for_request(is_orchestrator, timeout=30)
        set_offset(offset, jump)
        probes_after_jump(d)
        if i == 0:
            holds(lambda: not d.grep(SPURIOUS), 2.0, "no timeout while the held turn spans the jump")
            hold.set()
        d.wait_log("prompt-done", count=i + 1, timeout=60)
    assert len(bed.dispatches()) == jumps

    # A restart with the clock two hours back: the prompts stamped three hours ahead are
    # in the past of this process too, and hold nothing back.
    set_offset(offset, "-2h")
    crashes = 0 if d.proc is not None and d.proc.poll() is None else 1
    assert d.stop() == 0
    d = bed.daemon(env=env)
    d.notify.wait("READY=1")
    write("after the restart")
    d.wait_log("prompt-done", timeout=30)

    # The cap: one prompt left in this real hour, then none, whichever way the clock goes.
    write("one more before the cap")
    d.wait_log("prompt-done", count=2, timeout=60)
    write("over the cap")
    d.wait_log("prompt-cap-reached", timeout=15)
    for jump in ("-2h", "+3h", "-2h"):
        set_offset(offset, jump)
        probes_after_jump(d)
        holds(lambda: len(bed.dispatches()) == cap, 1.5, f"no prompt over the cap after a jump to {jump}")
    pending = ledger_rows(bed.ledger, "SELECT COUNT(*) FROM triggers WHERE dispatch_id IS NULL")[0][0]
    assert pending == 1, "the trigger over the cap waits in the ledger"

    # Every message reported once, promptly; no prompt sent twice; no spurious finding.
    for body in written:
        assert sum(len(x.grep(rf"teammate-message .*{re.escape(body)}")) for x in bed.daemons) == 1, body
    reported = ledger_rows(bed.ledger, "SELECT COUNT(*) FROM messages WHERE reported_at IS NOT NULL")[0][0]
    assert reported == len(written)
    rows = bed.dispatches()
    assert len(rows) == cap and all(r["state"] == "completed" for r in rows)
    asked = len(orchestrator_prompts(bed.model))
    assert asked == cap, "each prompt reached the model once"
    # Delivered: each message but the one over the cap is carried by a prompt that completed.
    for body in written[:-1]:
        [(state,)] = ledger_rows(bed.ledger, "SELECT d.state FROM triggers t JOIN dispatches d ON d.id = t.dispatch_id "
                                             "WHERE t.detail LIKE ?", (f"%{body}%",))
        assert state == "completed", body
    spurious = [line for x in bed.daemons for line in x.grep(SPURIOUS)]
    assert not spurious, spurious
    assert not ledger_rows(bed.ledger, "SELECT kind FROM stalls")

    # The health probe went on after every jump (probes_after_jump); its gaps and the report
    # delays are figures for the table, not asserted: durations belong to make bench.
    probes = [t for x in bed.daemons for t in probe_times(x) if t >= started]
    gaps = sorted(b - a for a, b in zip(probes, probes[1:], strict=False))[:-1]  # less the restart's gap
    figures = (f"probe gaps {min(gaps):.2f}-{max(gaps):.2f} s at a {HEALTH_INTERVAL} s interval; "
               f"slowest report {max(report_delays):.2f} s")

    crashes += 0 if d.proc is not None and d.proc.poll() is None else 1
    faults.record(faults.CaseResult(case="clock jumps", runs=jumps + 3, written=len(written), reported=reported,
                                    sent=len(rows), duplicated=max(0, asked - cap), lost=len(written) - reported,
                                    crashes=crashes, notes=figures))
    assert d.stop() == 0
