"""Long lead inboxes: reaction, memory and CPU per new message as the lead's inbox grows.

claude-teams never trims an inbox, so a long-lived team's lead inbox holds tens of
thousands of messages. For each size, the lead's inbox is filled with that many
messages (about 300 bytes each, the reminder suffix included, all but the last few
marked read), in claude-teams' own layout (one-line ``json.dumps``), and a daemon is
started on a fresh ledger (so they are the first start's baseline). Then:

- *reaction*: a teammate's message is appended (the file rewritten in place under the
  lock, as the writers do); from the end of that write to the orchestrator prompt
  reaching the model, ``trials`` times after one untimed turn, with the settings of the
  other reaction trials (debounce and minimum interval 0);
- *CPU per new message*: the daemon reloaded with a minimum interval of an hour (so no
  prompt goes out and the measure is the inbox's own work: the read, the ledger, the
  trigger), then ``appends`` messages appended one at a time, each waited for in the
  ledger; the daemon's CPU time over them (``/proc/<pid>/stat``), per message;
- *RSS* after the first start and after the appends.

The file is written from a copy kept in memory (the prefix as one bytes object). A
writer that rewrites a 30 MB file for every message loads the machine (memory bandwidth,
the page cache, writeback), and the daemon's same work then takes more CPU time; so that
the sizes differ only in the inbox, every append first writes a ballast file outside the
teams directory (which the daemon does not watch), bringing the bytes written per append
to those of the largest inbox at every size.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Callable

from tests.support.daemon import ledger_rows, wait_for
from tests.support.team import history, inbox_path, locked

from .live import LEAD, REACTION_SETTINGS, TEAM, Live, percentiles, proc_cpu_seconds, proc_rss_bytes, write_config

#: messages left unread at the end of the filled inbox ("most marked read")
UNREAD = 5
QUIET = REACTION_SETTINGS.replace("min_interval_seconds = 0", "min_interval_seconds = 3600")


class LeadInbox:
    """The lead's inbox as claude-teams writes it: one line of ``json.dumps``, rewritten in place."""

    def __init__(self, teams: Path, count: int, ballast: Path | None = None, pad_to: int = 0) -> None:
        self.teams = teams
        self.ballast, self.pad_to = ballast, pad_to
        self._filler = b"x" * pad_to
        self.path = inbox_path(teams, TEAM, LEAD)
        messages = history(count)
        for m in messages[-UNREAD:]:
            m["read"] = False
        self.prefix = json.dumps(messages)[:-1].encode()  # without the closing bracket
        self.added: list[bytes] = []
        self.count = count
        self.written_at = 0.0
        self._write()

    def append(self, sender: str, text: str, summary: str) -> None:
        message = {"from": sender, "text": text, "summary": summary,
                   "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()), "color": "blue",
                   "read": False}
        self.added.append((b", " if self.count else b"") + json.dumps(message).encode())
        self.count += 1
        self._write()

    def _write(self) -> None:
        if self.ballast is not None:  # first, so that it is not written while the daemon reacts
            size = len(self.prefix) + sum(len(a) for a in self.added) + 1
            with open(self.ballast, "wb") as fh:
                fh.write(memoryview(self._filler)[:max(0, self.pad_to - size)])
        with locked(self.teams, TEAM), open(self.path, "r+b" if self.path.exists() else "wb") as fh:
            fh.truncate(0)
            fh.writelines([self.prefix, *self.added, b"]"])
        self.written_at = time.monotonic()  # the end of the append, as the reaction is timed

    def size(self) -> int:
        return self.path.stat().st_size


def _reported(ledger: Path) -> int:
    rows = ledger_rows(ledger, "SELECT COUNT(*) FROM messages WHERE reported_at IS NOT NULL")
    return int(rows[0][0]) if rows else 0


def _remove_ledger(path: Path) -> None:
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        p.unlink(missing_ok=True)


def one_size(bed: Live, count: int, trials: int, appends: int, say: Callable[[str], None],
             pad_to: int = 0) -> dict[str, Any]:
    """Fill the lead's inbox with ``count`` messages and measure a fresh daemon on it; every
    write brought to ``pad_to`` bytes with the ballast file."""
    _remove_ledger(bed.ledger)
    write_config(bed.config, bed.server.url, bed.ledger, bed.teams, extra=REACTION_SETTINGS)
    inbox = LeadInbox(bed.teams, count, bed.workdir / "ballast.bin", pad_to)
    out: dict[str, Any] = {"messages": count, "bytes": inbox.size()}
    started = time.monotonic()
    daemon = bed.start_daemon()
    assert daemon.proc is not None
    pid = daemon.proc.pid
    wait_for(lambda: ledger_rows(bed.ledger, "SELECT value FROM meta WHERE key = 'inbox.initialized'"), 600,
             f"the first read of {count} messages", interval=0.05)
    out["first_read_s"] = round(time.monotonic() - started, 2)
    bed.settled()
    out["rss_mb_start"] = round(proc_rss_bytes(pid) / 2**20, 1)
    reaction: list[float] = []
    for i in range(-1, trials):
        marker = f"long-inbox-{count}-{i}-{time.monotonic_ns()}"
        bed.settled()
        time.sleep(0.05)
        inbox.append("worker-1", f"status {marker}", marker)
        t0 = inbox.written_at
        mono, _ = bed.arrivals.wait(marker, 60)
        if i >= 0:
            reaction.append(mono - t0)
    bed.settled()
    out["reaction"] = percentiles(reaction)
    out["reaction_raw_ms"] = [round(x * 1000, 1) for x in reaction]
    say(f"long inbox {count}: reaction {out['reaction']}")

    write_config(bed.config, bed.server.url, bed.ledger, bed.teams, extra=QUIET)
    seen = len(daemon.grep("config-reloaded"))
    daemon.signal(signal.SIGHUP)
    daemon.wait_log("config-reloaded", 30, count=seen + 1)
    reported = _reported(bed.ledger)
    cpu0 = proc_cpu_seconds(pid)
    for i in range(appends):
        inbox.append(f"worker-{i % 4 + 1}", f"progress {i} on the long inbox", f"progress {i}")
        wanted = reported + i + 1

        def caught_up() -> bool:
            return _reported(bed.ledger) >= wanted
        wait_for(caught_up, 60, f"message {i} reported", interval=0.005)
    cpu = proc_cpu_seconds(pid) - cpu0
    out["appends"] = appends
    out["cpu_ms_per_message"] = round(1000 * cpu / appends, 2)
    out["rss_mb_end"] = round(proc_rss_bytes(pid) / 2**20, 1)
    out["bytes_end"] = inbox.size()
    say(f"long inbox {count}: {out['cpu_ms_per_message']} ms CPU per message, RSS {out['rss_mb_end']} MB")
    bed.stop_daemon()
    return out


def run(workdir: Path, counts: tuple[int, ...], trials: int, appends: int,
        say: Callable[[str], None]) -> dict[str, Any]:
    """The measures at each inbox size, on one server and one team."""
    sizes = []
    pad_to = len(json.dumps(history(max(counts)))) + 1024 * appends  # the largest inbox, and what it gains
    with Live(workdir) as bed:
        for count in counts:
            sizes.append(one_size(bed, count, trials, appends, say, pad_to))
    shutil.rmtree(workdir / "claude", ignore_errors=True)
    (workdir / "ballast.bin").unlink(missing_ok=True)
    first, last = sizes[0], sizes[-1]
    return {"sizes": sizes,
            "reaction_p50_added_ms": round(last["reaction"]["p50_ms"] - first["reaction"]["p50_ms"], 1),
            "rss_added_mb": round(last["rss_mb_end"] - first["rss_mb_end"], 1),
            "cpu_ratio": round(last["cpu_ms_per_message"] / first["cpu_ms_per_message"], 2)
            if first["cpu_ms_per_message"] else None}
