"""A steady flow of teammate messages, and the count of what became of them.

``Flow`` writes numbered messages into the lead's inbox from a thread, as teammates
would, while a fault case breaks things. ``tally`` then counts, from the ledger, the
daemons' logs and the server: every message reported exactly once, every prompt the
ledger says was sent present on the server, nothing covered twice.
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

from tests.support.daemon import Daemon, ledger_rows, wait_for
from tests.support.team import append_message

if TYPE_CHECKING:
    from tests.support.bed import Bed

SENDERS = ("worker-1", "worker-2")
MARK = re.compile(r"flow-\d{5}")
FINAL = ("completed", "failed", "timeout")


class Flow:
    """Numbered messages, one every ``every`` seconds until ``stop()``; ``write()`` adds one now."""

    def __init__(self, bed: "Bed", team: str, every: float = 0.3) -> None:
        self.bed = bed
        self.team = team
        self.every = every
        self.written: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def write(self) -> str:
        with self._lock:
            n = len(self.written)
            marker = f"flow-{n:05d}"
            self.written.append(marker)
        append_message(self.bed.teams_dir, self.team, "team-lead", SENDERS[n % len(SENDERS)],
                       f"{marker}: progress note {n}", summary=marker)
        return marker

    def start(self) -> "Flow":
        self._thread = threading.Thread(target=self._run, daemon=True, name="flow")
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.write()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def __len__(self) -> int:
        with self._lock:
            return len(self.written)


@dataclass
class Tally:
    written: int
    reported: int
    sent: int
    duplicated: int
    lost: int
    problems: list[str]
    log_repeats: int = 0  # log lines written twice by a daemon killed before it committed the report

    def assert_exact(self) -> None:
        assert not self.problems and self.reported == self.written and self.duplicated == 0 and self.lost == 0, \
            f"{self}"


def _markers(text: str | None) -> list[str]:
    return MARK.findall(text or "")


def settled(bed: "Bed") -> bool:
    """Every trigger covered by a prompt that reached a final state, and nothing open."""
    pending = ledger_rows(bed.ledger, "SELECT COUNT(*) FROM triggers WHERE dispatch_id IS NULL")
    open_ = ledger_rows(bed.ledger, "SELECT COUNT(*) FROM dispatches WHERE state NOT IN (?, ?, ?)", FINAL)
    return bool(pending and open_) and pending[0][0] == 0 and open_[0][0] == 0


def wait_settled(bed: "Bed", flow: Flow, timeout: float = 120.0) -> None:
    """Wait until every written message is recorded as reported and every prompt finished."""
    markers = set(flow.written)

    def done() -> bool:
        rows = ledger_rows(bed.ledger, "SELECT text FROM messages WHERE reported_at IS NOT NULL")
        seen = {m for (text,) in rows for m in _markers(text)}
        return markers <= seen and settled(bed)

    wait_for(done, timeout, f"all {len(markers)} messages reported and every prompt finished")


def tally(bed: "Bed", flow: Flow, daemons: Iterable[Daemon], server_url: str | None = None,
          killed: bool = False) -> Tally:
    """Count what became of the flow's messages (call after ``wait_settled``).

    ``server_url`` is the daemon's ``server.url`` (the fault proxy's, when there is one).
    The log line of a report is written before the report is committed, so a daemon
    killed in between writes it again after its restart: with ``killed``, such repeats
    are counted apart (``log_repeats``) instead of as duplicates; the ledger must still
    hold each message, trigger and completed prompt once.
    """
    written = set(flow.written)
    problems: list[str] = []
    rows = ledger_rows(bed.ledger, "SELECT text, reported_at FROM messages")
    recorded = Counter(m for text, _ in rows for m in _markers(text))
    reported = {m for text, at in rows if at is not None for m in _markers(text)}
    logged = Counter(m for d in daemons for line in d.grep(r"teammate-message ") for m in _markers(line))
    repeats = sum(c - 1 for c in logged.values() if c > 1)
    duplicated = sum(c - 1 for c in recorded.values() if c > 1) + (0 if killed else repeats)
    for m in sorted(written):
        if logged[m] == 0 or (logged[m] > 1 and not killed):
            problems.append(f"{m} reported in the log {logged[m]} times")
    triggers = Counter(m for (detail,) in ledger_rows(bed.ledger, "SELECT detail FROM triggers WHERE rule = 'teammate-message'")
                       for m in _markers(detail))
    duplicated += sum(c - 1 for c in triggers.values() if c > 1)

    dispatches = ledger_rows(bed.ledger, "SELECT id, message_id, state, sent_at, prompt FROM dispatches")
    ids = Counter(r[1] for r in dispatches)
    duplicated += sum(c - 1 for c in ids.values() if c > 1)
    # A message may be named by at most one prompt that ran to completion.
    completed = Counter(m for r in dispatches if r[2] == "completed" for m in set(_markers(r[4])))
    duplicated += sum(c - 1 for c in completed.values() if c > 1)

    session = ledger_rows(bed.ledger, "SELECT value FROM meta WHERE key = ?", (f"session:{server_url or bed.server.url}",))
    on_server: set[str] = set()
    if session:
        on_server = {m["info"]["id"] for m in bed.server.messages(session[0][0]) if m["info"].get("role") == "user"}
    sent = [r for r in dispatches if r[3] is not None]
    lost = len(written - reported)
    for r in sent:
        if r[1] not in on_server:
            problems.append(f"dispatch {r[0]} ({r[1]}) is recorded as sent but is not on the server")
            lost += 1
    uncovered = ledger_rows(bed.ledger, "SELECT COUNT(*) FROM triggers WHERE dispatch_id IS NULL")
    if uncovered and uncovered[0][0]:
        problems.append(f"{uncovered[0][0]} triggers never covered by a prompt")
        lost += uncovered[0][0]
    return Tally(written=len(written), reported=len(written & reported), sent=len(sent), duplicated=duplicated,
                 lost=lost, problems=problems, log_repeats=repeats if killed else 0)
