"""Ingest: events per second through the whole event reader, and through a bare loop.

The reader is the daemon's own :class:`~orchestratord.events.EventReader` with the
default trigger rules and safety rules, run for one connection in this thread: connect, re-read
statuses, then parse, normalise, match rules, write the ledger until the replay server
closes the stream. The bare loop reads the same bytes from the same server and only
splits frames and calls ``json.loads``: the limit for a Python reader of this stream.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

import requests

from orchestratord import logs
from orchestratord.config import DEFAULT_TRIGGERS, Config
from orchestratord.events import EventReader
from orchestratord.guard import Judge
from orchestratord.ledger import EventRow, Ledger
from orchestratord.opencode import OpencodeClient
from orchestratord.state import Shared

from .replay import ReplayServer


def quiet_logs(path: Path) -> None:
    """The daemon's logger at its default level (info), into a file instead of the terminal."""
    logs.setup("info", stream=open(path, "a", encoding="utf-8"), journal=False)


def bare_loop(server: ReplayServer, corpus_file: Path) -> tuple[int, float, float]:
    """(events, seconds, CPU seconds of this thread): frame split and ``json.loads``, nothing else."""
    server.feed.put(corpus_file)
    server.feed.put(None)
    n = 0
    started, cpu = time.perf_counter(), time.thread_time()
    with requests.get(server.url + "/global/event", stream=True, timeout=25) as resp:
        buf = b""
        for chunk in resp.iter_content(65536):
            frames = (buf + chunk).split(b"\n\n")
            buf = frames.pop()
            for frame in frames:
                if frame.startswith(b"data: "):
                    json.loads(frame[6:])
                    n += 1
    return n - 1, time.perf_counter() - started, time.thread_time() - cpu  # not counting server.connected


def reader_run(server: ReplayServer, corpus_file: Path, ledger_path: Path, store: str) -> tuple[int, float, float]:
    """(events, seconds, CPU seconds) through one connection of the daemon's event reader, in this thread."""
    server.feed.put(corpus_file)
    server.feed.put(None)
    shared = Shared(server_url=server.url)
    reader = EventReader(shared=shared, make_client=lambda: OpencodeClient(server.url), ledger_path=str(ledger_path),
                         stream="global", directory=None, read_timeout=25.0, max_event_bytes=4 * 1024 * 1024,
                         reconnect_max=5.0, store=store, rules=DEFAULT_TRIGGERS, on_trigger=lambda: None,
                         on_own_activity=lambda: None, judge=Judge.from_config(Config().safety))
    reader.setup()
    try:
        started, cpu = time.perf_counter(), time.thread_time()
        reader.step()
        seconds, cpu = time.perf_counter() - started, time.thread_time() - cpu
    finally:
        reader.teardown()
    return shared.events_total - 1, seconds, cpu  # not counting server.connected


def ledger_rows(path: Path, sql: str) -> int:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(db.execute(sql).fetchone()[0])
    finally:
        db.close()


def ledger_bytes(path: Path) -> int:
    """The ledger's size on disk, its WAL and shared-memory files included."""
    return sum(os.path.getsize(p) for p in (str(path), f"{path}-wal", f"{path}-shm") if os.path.exists(p))


def writer_rate(corpus_file: Path, ledger_path: Path, limit: int) -> tuple[int, float]:
    """(rows, seconds) of the ledger writer alone: event rows in batches of 1,000."""
    rows: list[EventRow] = []
    now = time.time()
    with open(corpus_file, "rb") as fh:
        for line in fh:
            if line.startswith(b"data: "):
                data = line[6:].decode().rstrip("\n")
                obj = json.loads(data)
                payload = obj.get("payload", obj)
                rows.append(EventRow(now, payload.get("id"), payload.get("type"),
                                     (payload.get("properties") or {}).get("sessionID"), obj.get("directory"), data))
                if len(rows) >= limit:
                    break
    ledger = Ledger(str(ledger_path))
    try:
        started = time.perf_counter()
        for i in range(0, len(rows), 1000):
            ledger.add_events(rows[i:i + 1000])
        seconds = time.perf_counter() - started
    finally:
        ledger.close()
    return len(rows), seconds
