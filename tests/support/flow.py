"""A steady flow of teammate messages, and the count of what became of them.

``Flow`` writes numbered messages into the lead's inbox from a thread, as teammates
would, while a fault case breaks things. ``tally`` then counts, from the ledger, the
daemons' logs, the server and the fault proxy: every message reported exactly once, and
*delivered*: covered by exactly one prompt that completed on the server (a reply to it
finished there). A prompt that ended failed or timed out covers nothing; one superseded
by a re-drive is failed, and its successor carries its messages, so it counts once, as
the successor. With a proxy, no prompt was POSTed twice beyond the re-sends the daemon
announced (``prompt-lost-in-outage``, ``prompt-recovered landed=no``).
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

from tests.support.daemon import Daemon, ledger_rows, wait_for
from tests.support.team import append_message

if TYPE_CHECKING:
    from tests.support.bed import Bed
    from tests.support.faultproxy import FaultProxy

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
    lost: int  # written and not delivered (no completed prompt on the server covers it)
    problems: list[str]
    log_repeats: int = 0  # log lines written twice by a daemon killed before it committed the report
    delivered: int = 0
    posts: int = 0  # prompt POSTs that reached the server, when a proxy counted them

    def assert_exact(self) -> None:
        assert (not self.problems and self.reported == self.written == self.delivered
                and self.duplicated == 0 and self.lost == 0), f"{self}"


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


def committed(bed: "Bed") -> set[str]:
    """The flow's messages the ledger holds as reported, now."""
    rows = ledger_rows(bed.ledger, "SELECT text FROM messages WHERE reported_at IS NOT NULL")
    return {m for (text,) in rows for m in _markers(text)}


def finished_on_server(messages: list[dict[str, Any]]) -> set[str]:
    """IDs of the user messages (prompts) that a finished assistant reply answers."""
    out = set()
    for m in messages:
        info = m.get("info") or {}
        if info.get("role") == "assistant" and (info.get("time") or {}).get("completed") and not info.get("error"):
            out.add(str(info.get("parentID")))
    return out


def tally(bed: "Bed", flow: Flow, daemons: Iterable[Daemon], server_url: str | None = None,
          killed: bool = False, proxy: "FaultProxy | None" = None,
          committed_before: "dict[Daemon, set[str]] | None" = None) -> Tally:
    """Count what became of the flow's messages (call after ``wait_settled``).

    ``server_url`` is the daemon's ``server.url`` (the fault proxy's, when there is one).
    The log line of a report is written before the report is committed, so a daemon
    killed in between writes it again after its restart: with ``killed``, such repeats
    are counted apart (``log_repeats``) instead of as duplicates; the ledger must still
    hold each message and trigger once, and each message is delivered once.
    ``committed_before`` maps a daemon to the messages already reported in the ledger when
    it started (``committed(bed)``): it must log none of them again.
    """
    daemons = list(daemons)
    written = set(flow.written)
    problems: list[str] = []
    rows = ledger_rows(bed.ledger, "SELECT text, reported_at FROM messages")
    # Two rows for one marker: the same message taken for a new one (its identity changed).
    recorded = Counter(m for text, _ in rows for m in _markers(text))
    reported = {m for text, at in rows if at is not None for m in _markers(text)}
    logged = Counter(m for d in daemons for line in d.grep(r"teammate-message ") for m in _markers(line))
    repeats = sum(c - 1 for c in logged.values() if c > 1)
    duplicated = sum(c - 1 for c in recorded.values() if c > 1) + (0 if killed else repeats)
    for m in sorted(written):
        if logged[m] == 0 or (logged[m] > 1 and not killed):
            problems.append(f"{m} reported in the log {logged[m]} times")
    # A repeat after a kill is excused only if the report was not yet committed: a daemon
    # that logs a message the ledger already held as reported when it started reports twice.
    for d in daemons:
        before = (committed_before or {}).get(d, set())
        for line in d.grep(r"teammate-message "):
            for m in set(_markers(line)) & before:
                problems.append(f"{m} reported again by a daemon started after its report was committed")
                duplicated += 1
    triggers = ledger_rows(bed.ledger, "SELECT detail, dispatch_id FROM triggers WHERE rule = 'teammate-message'")
    trigger_count = Counter(m for detail, _ in triggers for m in _markers(detail))
    duplicated += sum(c - 1 for c in trigger_count.values() if c > 1)

    dispatches = {r[0]: r for r in ledger_rows(bed.ledger, "SELECT id, message_id, state, sent_at, prompt FROM dispatches")}
    session = ledger_rows(bed.ledger, "SELECT value FROM meta WHERE key = ?", (f"session:{server_url or bed.server.url}",))
    on_server: list[dict[str, Any]] = bed.server.messages(session[0][0]) if session else []
    stored = {m["info"]["id"] for m in on_server if m["info"].get("role") == "user"}
    finished = finished_on_server(on_server)

    # Delivered: the message's one trigger points at a prompt that completed, and the server
    # holds a finished reply to that prompt. (A long prompt names only some of its messages,
    # so the trigger, not the text, says which prompt carries a message; the text is still
    # checked: no message is named by two completed prompts.)
    delivered = 0
    named = Counter(m for r in dispatches.values() if r[2] == "completed" for m in set(_markers(r[4])))
    for m in sorted(written):
        if named[m] > 1:
            problems.append(f"{m} named by {named[m]} completed prompts")
            duplicated += named[m] - 1
        linked = [d for detail, d in triggers if m in _markers(detail)]
        if len(linked) != 1 or linked[0] not in dispatches:
            problems.append(f"{m}: {len(linked)} triggers, covered by prompts {linked}")
            continue
        did, mid, state = dispatches[linked[0]][:3]
        if state != "completed":
            problems.append(f"{m}: its prompt {did} ({mid}) ended {state}, so it was never delivered")
        elif mid not in finished:
            problems.append(f"{m}: prompt {mid} is completed in the ledger, but no finished reply to it is on the server")
        else:
            delivered += 1

    sent = [r for r in dispatches.values() if r[3] is not None]
    for r in sent:
        if r[1] not in stored:
            problems.append(f"dispatch {r[0]} ({r[1]}) is recorded as sent but is not on the server")
    uncovered = ledger_rows(bed.ledger, "SELECT COUNT(*) FROM triggers WHERE dispatch_id IS NULL")
    if uncovered and uncovered[0][0]:
        problems.append(f"{uncovered[0][0]} triggers never covered by a prompt")

    posts = 0
    if proxy is not None:
        # The re-sends of one ID the daemon says it makes: the server did not have it.
        resent: Counter[str] = Counter()
        for d in daemons:
            for line in d.grep(r"prompt-lost-in-outage |prompt-recovered .*landed=no"):
                found = re.search(r"message_id=(\S+)", line)
                if found:
                    resent[found.group(1)] += 1
        extra = proxy.duplicate_posts(resent)
        for mid, n in sorted(extra.items()):
            problems.append(f"prompt {mid} POSTed {n} more time(s) than once after the server had answered it")
        duplicated += sum(extra.values())
        posts = sum(proxy.posts.values())
    return Tally(written=len(written), reported=len(written & reported), sent=len(sent), duplicated=duplicated,
                 lost=len(written) - delivered, problems=problems, log_repeats=repeats if killed else 0,
                 delivered=delivered, posts=posts)
