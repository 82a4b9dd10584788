"""The event rows read from the stream and the sync cursor they reach, written together.

Rows are batched: written when the stream pauses (nothing more is waiting on the socket),
at ``BATCH_ROWS``, or once the oldest is ``BATCH_SECONDS`` old, and always with a
trigger's row, before it and in the same commit. The cursor (``sync.last_seq``, the newest
durable seq seen per session) goes in the same transaction as the rows it covers: a
failed write keeps the rows for the next try and steps the cursor back to what the
ledger holds, so the catch-up after a reconnect reads again what was not recorded.
No sockets here: the reader says whether more is waiting.

A trigger is committed with the rows before it, at once when the stream has paused.
While more of the stream is already waiting, its transaction is held open and the
triggers of the next events join it (a group commit): it commits when the stream pauses,
at ``GROUP_SECONDS`` old or at ``BATCH_ROWS``, and what waits on the commit (waking the
dispatcher, the log lines) runs after it (:meth:`Ledger.when_committed`). A commit is a
sync to the disk, and under load a trigger comes every few hundred events. Nothing is
taken as done before its commit: a crash with the transaction open loses what an event
still on the socket would lose, and the cursor written with it stays where the ledger is.
"""

from __future__ import annotations

import json
from contextlib import AbstractContextManager
from typing import Any, Callable, TypeVar

from .ledger import EventRow, Ledger

#: event rows are written when the stream pauses, or at this many rows, or this old
BATCH_ROWS = 1000
BATCH_SECONDS = 1.0
#: while the stream runs ahead, a trigger's transaction is held open at most this long
GROUP_SECONDS = 0.05

T = TypeVar("T")


class EventLog:
    """The batch of event rows and the sync cursor (see the module's docstring)."""

    def __init__(self, clock: Callable[[], float], more_waiting: Callable[[], bool] = lambda: False) -> None:
        self.clock = clock
        self.more_waiting = more_waiting
        self.ledger: Ledger | None = None
        self._batch: list[EventRow] = []
        self._batch_since = 0.0  # monotonic time of the oldest row in the batch
        self.last_seq: dict[str, int] = {}
        self._seq_changed = False  # since it was last written to the ledger
        self.saved_seq: dict[str, int] = {}  # the seq the ledger holds
        self._held: AbstractContextManager[Any] | None = None  # a group commit's open transaction
        self._held_since = 0.0
        self._held_rows: list[EventRow] = []  # written in it, to keep if it rolls back
        self._no_hold_until = 0.0  # monotonic time before which no transaction is held

    def load(self, ledger: Ledger) -> None:
        """Write to ``ledger`` from now on, starting from the cursor it holds."""
        self.ledger = ledger
        saved = ledger.get_meta("sync.last_seq")
        self.last_seq = {}
        if saved:
            try:
                self.last_seq = {k: int(v) for k, v in json.loads(saved).items()}
            except (ValueError, AttributeError):
                self.last_seq = {}
        self.saved_seq = dict(self.last_seq)

    @property
    def waiting_rows(self) -> list[EventRow]:
        """The rows not yet written, oldest first."""
        return list(self._batch)

    def note_seq(self, session_id: str | None, seq: Any) -> None:
        if session_id and isinstance(seq, int) and seq > self.last_seq.get(session_id, -1):
            self.last_seq[session_id] = seq
            self._seq_changed = True

    def _seq_to_save(self) -> dict[str, str] | None:
        """The ``sync.last_seq`` meta value, if it changed since it was last written."""
        if not self.last_seq or not self._seq_changed:
            return None
        if len(self.last_seq) > 500:  # keep the newest sessions only
            self.last_seq = dict(sorted(self.last_seq.items(), key=lambda kv: kv[0])[-500:])
        return {"sync.last_seq": json.dumps(self.last_seq)}

    def save_seq(self) -> None:
        if self._held is not None:
            self.commit()
        if self.ledger is not None and (meta := self._seq_to_save()):
            try:
                self.ledger.add_events((), meta)
            except Exception:
                self.unwritten([])
                raise
            self._seq_changed = False
            self.saved_seq = dict(self.last_seq)

    def add(self, row: EventRow) -> None:
        if not self._batch:
            self._batch_since = self.clock()
        self._batch.append(row)
        if len(self._batch) >= BATCH_ROWS:
            self.flush()

    def drained(self, more: bool | None = None, now: float | None = None) -> None:
        """The bytes read so far are used up: write the batch, unless more is already waiting
        (``more``, when the reader has asked the socket already; else ``more_waiting`` is asked;
        ``now``, when it has read the clock already).

        opencode sends each event in its own HTTP chunk, so this runs after every event.
        While the stream runs ahead of us, rows are written in batches (at most
        ``BATCH_ROWS`` or ``BATCH_SECONDS`` old); once it pauses, at once.
        """
        if self._held is None and not self._batch:
            return
        if now is None:
            now = self.clock()
        if self._held is not None:
            if now - self._held_since >= GROUP_SECONDS or not (self.more_waiting() if more is None else more):
                self.commit()
        elif now - self._batch_since >= BATCH_SECONDS or not (self.more_waiting() if more is None else more):
            self.flush()

    def flush(self, then: Callable[[], T] | None = None) -> T | None:
        """Write the batch and the seq it reaches in one transaction; ``then`` (the triggers an
        event raises) runs inside it, after the rows, so they share one commit. With a
        ``then`` and more of the stream already waiting, the commit is held (a group commit,
        see the module's docstring)."""
        if self.ledger is None:
            return then() if then is not None else None
        if then is not None and (self._held is not None or (self.clock() >= self._no_hold_until and self.more_waiting())):
            return self._join(then)
        if self._held is not None:
            self.commit()
            return None
        if not self._batch:
            return then() if then is not None else None  # its writes are their own transaction
        batch, self._batch = self._batch, []
        meta = self._seq_to_save()
        try:
            with self.ledger.transaction():
                self.ledger.add_events(batch, meta)
                out = then() if then is not None else None
        except Exception:
            self.unwritten(batch)
            raise
        self._seq_changed = False
        self.saved_seq = dict(self.last_seq)
        return out

    def _join(self, then: Callable[[], T]) -> T:
        """The batch and ``then`` written in the held transaction, opened if need be; not committed."""
        assert self.ledger is not None
        if self._held is None:
            tx = self.ledger.transaction()
            tx.__enter__()
            self._held, self._held_since = tx, self.clock()
        batch, self._batch = self._batch, []
        meta = self._seq_to_save()
        self._held_rows.extend(batch)
        try:
            self.ledger.add_events(batch, meta)
            out = then()
        except BaseException as exc:
            self.rollback(exc)
            raise
        self._seq_changed = False  # written in the held transaction; saved once it commits
        return out

    @property
    def holding(self) -> bool:
        """Whether a group commit's transaction is open."""
        return self._held is not None

    def commit(self, hold_off: float = 0.0) -> None:
        """Commit the held transaction, with the rows batched since it opened (nothing if none
        is held); for ``hold_off`` seconds after, hold none (another thread is about to write)."""
        if hold_off:
            self._no_hold_until = self.clock() + hold_off
        tx = self._held
        if tx is None or self.ledger is None:
            return
        batch, self._batch = self._batch, []
        self._held_rows.extend(batch)
        meta = self._seq_to_save()
        try:
            self.ledger.add_events(batch, meta)
        except BaseException as exc:
            self.rollback(exc)
            raise
        self._held = None
        try:
            tx.__exit__(None, None, None)  # COMMIT, then what waited on it
        except BaseException:
            self.ledger.abandon()
            rows, self._held_rows = self._held_rows, []
            self.unwritten(rows)
            raise
        self._held_rows = []
        self._seq_changed = False
        self.saved_seq = dict(self.last_seq)

    def rollback(self, exc: BaseException | None = None) -> None:
        """Give up the held transaction: its rows wait for the next flush, the cursor steps back
        to what the ledger holds (the catch-up reads the rest again), nothing that waited on
        the commit runs."""
        tx, self._held = self._held, None
        rows, self._held_rows = self._held_rows, []
        if tx is None:
            return
        try:
            tx.__exit__(type(exc) if exc is not None else RuntimeError, exc, None)
        except Exception:  # noqa: BLE001 - the ROLLBACK of a transaction SQLite already ended
            pass
        self.unwritten(rows)

    def unwritten(self, batch: list[EventRow]) -> None:
        """A write failed: keep the rows for the next flush, and step back to the last saved seq.

        The stream is read again after a reconnect, from the seq the ledger holds: what
        came after it is caught up (and its triggers raised) once the ledger takes
        writes again, instead of being taken as done.
        """
        self._batch[:0] = batch[-BATCH_ROWS * 10:]
        if self.last_seq != self.saved_seq:
            self.last_seq = dict(self.saved_seq)
            self._seq_changed = False
