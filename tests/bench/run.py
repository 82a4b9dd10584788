"""``make bench``: measure, print one table, write the figures as JSON.

    python -m tests.bench.run [--out FILE] [--quick]

``--quick`` runs every piece at a tiny size (a check that the bench works, not a
measure). Everything runs under one temporary directory, removed at the end; every
process started is stopped by its PID.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import broker, corpus, inboxes, ingest, live, memory, rules
from .replay import ReplayServer


@dataclass(frozen=True)
class Sizes:
    ingest_events: int
    ingest_rounds: int
    ledger_events: int
    writer_rows: int
    status_runs: int
    memory_events: int
    memory_messages: int
    idle_seconds: float
    trials: int
    broker_requests: int
    inbox_counts: tuple[int, ...]
    inbox_appends: int


FULL = Sizes(ingest_events=200_000, ingest_rounds=3, ledger_events=1_000_000, writer_rows=200_000, status_runs=7,
             memory_events=200_000, memory_messages=10_000, idle_seconds=60.0, trials=50,
             broker_requests=250, inbox_counts=(0, 10_000, 30_000, 100_000), inbox_appends=200)
QUICK = Sizes(ingest_events=3_000, ingest_rounds=1, ledger_events=5_000, writer_rows=2_000, status_runs=1,
              memory_events=2_000, memory_messages=200, idle_seconds=1.0, trials=2,
              broker_requests=12, inbox_counts=(0, 50, 100, 200), inbox_appends=3)


#: the most the second half of a load may add to RSS and still count as levelled off
LEVEL_MB = 2.0
#: from the empty lead inbox to the largest: the most the reaction's p50 and RSS may add,
#: and the most the CPU time per new message may grow
INBOX_P50_MS = 30.0
INBOX_RSS_MB = 8.0
INBOX_CPU_RATIO = 1.25


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cores": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
            "kernel": platform.release(), "loadavg_start": _loadavg()}


def _loadavg() -> list[float]:
    try:
        with open("/proc/loadavg") as fh:
            return [float(x) for x in fh.read().split()[:3]]
    except OSError:
        return []


def bench_ingest(tmp: Path, sizes: Sizes, stream: corpus.Corpus, say: Callable[[str], None]) -> dict[str, Any]:
    """Bare loop, reader (default store), reader (store all), in turn, ``ingest_rounds`` times,
    on the stream as opencode sends it (one event per chunk); then bare loop and reader
    (default store) on the same events coalesced (a turn per chunk).

    The headline is the best round of each (the one least disturbed by anything else on
    the machine); events per CPU-second of the reading thread are kept beside it, as the
    steadier figure on a shared machine, and the median over rounds of the reader's rate
    against the bare loop's of the same round.
    """
    path = tmp / "ingest.sse"
    joined = tmp / "ingest-coalesced.sse"
    events = stream.write(path, sizes.ingest_events)
    assert stream.write(joined, sizes.ingest_events, coalesced=True) == events
    plain = events - stream.turns_for(sizes.ingest_events) * stream.syncs
    runs = ("bare", "default", "all", "coalesced_bare", "coalesced_default")
    wall: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    with ReplayServer() as server:
        for r in range(sizes.ingest_rounds):
            for prefix, source, stores in (("", path, ("default", "all")), ("coalesced_", joined, ("default",))):
                n, seconds, cpu_seconds = ingest.bare_loop(server, source)
                assert n == events, (n, events)
                wall[prefix + "bare"].append(events / seconds)
                cpu[prefix + "bare"].append(events / cpu_seconds)
                for store in stores:
                    ledger = tmp / f"ingest-{prefix}{store}-{r}.sqlite3"
                    counted, seconds, cpu_seconds = ingest.reader_run(server, source, ledger, store)
                    assert counted == plain, (prefix, store, counted, plain)
                    wall[prefix + store].append(events / seconds)
                    cpu[prefix + store].append(events / cpu_seconds)
                    _remove_ledger(ledger)
            say(f"ingest round {r + 1}/{sizes.ingest_rounds}")
    path.unlink()
    joined.unlink()
    best = {k: max(v) for k, v in wall.items()}
    per_cpu = {k: max(v) for k, v in cpu.items()}
    # The reader against the bare loop of its own round, the median over rounds: steadier
    # than best against best when one round of one loop is far off the others.
    paired = {k: statistics.median(r / b for r, b in zip(wall[k], wall[bare], strict=True))
              for k, bare in (("default", "bare"), ("coalesced_default", "coalesced_bare"))}
    return {"events": events, "rounds": sizes.ingest_rounds,
            "bare_per_s": round(best["bare"]), "default_per_s": round(best["default"]), "all_per_s": round(best["all"]),
            "default_ratio": round(best["default"] / best["bare"], 3), "all_ratio": round(best["all"] / best["bare"], 3),
            "coalesced_bare_per_s": round(best["coalesced_bare"]),
            "coalesced_default_per_s": round(best["coalesced_default"]),
            "coalesced_ratio": round(best["coalesced_default"] / best["coalesced_bare"], 3),
            "per_cpu_s": {k: round(v) for k, v in per_cpu.items()},
            "default_ratio_cpu": round(per_cpu["default"] / per_cpu["bare"], 3),
            "all_ratio_cpu": round(per_cpu["all"] / per_cpu["bare"], 3),
            "coalesced_ratio_cpu": round(per_cpu["coalesced_default"] / per_cpu["coalesced_bare"], 3),
            "default_ratio_paired": round(paired["default"], 3),
            "coalesced_ratio_paired": round(paired["coalesced_default"], 3),
            "rounds_per_s": {k: [round(x) for x in v] for k, v in wall.items()}}


def bench_ledger(tmp: Path, sizes: Sizes, stream: corpus.Corpus, say: Callable[[str], None]) -> dict[str, Any]:
    path = tmp / "ledger.sse"
    events = stream.write(path, sizes.ledger_events)
    ledger = tmp / "million.sqlite3"
    with ReplayServer() as server:
        _, seconds, _ = ingest.reader_run(server, path, ledger, "default")
    path.unlink()
    say(f"ledger: {events} events in")
    rows = ingest.ledger_rows(ledger, "SELECT COUNT(*) FROM events")
    config = tmp / "status.toml"
    config.write_text(f'[ledger]\npath = "{ledger}"\n')
    times = []
    for _ in range(sizes.status_runs):
        started = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "orchestratord", "status", "--json", "--config", str(config)],
                             capture_output=True, text=True, timeout=60)
        times.append(time.perf_counter() - started)
        assert out.returncode == 0, out.stderr
        json.loads(out.stdout)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import orchestratord.cli"], check=True, timeout=60)
    import_only = time.perf_counter() - started
    size = ingest.ledger_bytes(ledger)
    _remove_ledger(ledger)
    corpus_rows = tmp / "writer.sse"
    stream.write(corpus_rows, sizes.writer_rows)
    writer_ledger = tmp / "writer.sqlite3"
    n, wseconds = ingest.writer_rate(corpus_rows, writer_ledger, sizes.writer_rows)
    corpus_rows.unlink()
    _remove_ledger(writer_ledger)
    say("ledger: status and writer done")
    return {"events": events, "rows": rows, "bytes": size, "mb": round(size / 2**20, 1),
            "bytes_per_event": round(size / events, 1), "reader_per_s": round(events / seconds),
            "status_json_ms": round(statistics.median(times) * 1000, 1),
            "status_json_runs_ms": [round(t * 1000, 1) for t in times],
            "python_start_and_import_ms": round(import_only * 1000, 1),
            "writer_rows": n, "writer_rows_per_s": round(n / wseconds)}


def bench_live(tmp: Path, sizes: Sizes, say: Callable[[str], None]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with live.Live(tmp) as bed:
        bed.start_daemon()
        out["idle"] = bed.idle(sizes.idle_seconds, warmup=min(5.0, sizes.idle_seconds))
        say(f"idle: {out['idle']}")
        inbox = bed.inbox_trials(sizes.trials, lambda s: None)
        say("reaction: inbox trials done")
        mate = bed.server.create_session("worker-1")["id"]
        tool = bed.tool_trials(sizes.trials, mate, lambda s: None, "tool")
        say("reaction: tool trials done")
        bed.stop_daemon()
        loop = live.BareLoop(bed.server.url, bed.server.create_session("bare")["id"]).start()
        try:
            bare = bed.tool_trials(sizes.trials, mate, lambda s: None, "bare")
        finally:
            loop.stop()
        say("reaction: bare loop trials done")
    out["inbox"] = live.percentiles(inbox)
    out["tool"] = live.percentiles(tool)
    out["bare"] = live.percentiles(bare)
    out["raw_ms"] = {k: [round(x * 1000, 1) for x in v] for k, v in (("inbox", inbox), ("tool", tool), ("bare", bare))}
    return out


def _remove_ledger(path: Path) -> None:
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        p.unlink(missing_ok=True)


def table(r: dict[str, Any]) -> str:
    ing, led, mem, lv, inb = r["ingest"], r["ledger"], r["memory"], r["live"], r["inboxes"]
    idle = lv["idle"]
    ev_keys = [k for k in mem if k.startswith("rss_mb_after_") and k.endswith("_events")]
    msg_keys = [k for k in mem if k.startswith("rss_mb_after_") and k.endswith("_messages")]

    def n(k: str) -> str:
        return k.removeprefix("rss_mb_after_").replace("_", " ")

    def yes(ok: bool) -> str:
        return "yes" if ok else "NO"

    rows: list[tuple[str, str, str, str]] = [
        ("ingest: bare loop (split + json.loads)", f"{ing['bare_per_s']:,} ev/s", "", ""),
        ("ingest: reader, default store", f"{ing['default_per_s']:,} ev/s = {ing['default_ratio']:.2f} x bare",
         ">= 0.6 x bare", yes(ing["default_ratio"] >= 0.6)),
        ("ingest: reader, store all", f"{ing['all_per_s']:,} ev/s = {ing['all_ratio']:.2f} x bare", "", ""),
        ("ingest, coalesced (a turn per chunk): bare loop", f"{ing['coalesced_bare_per_s']:,} ev/s", "", ""),
        ("ingest, coalesced: reader, default store",
         f"{ing['coalesced_default_per_s']:,} ev/s = {ing['coalesced_ratio']:.2f} x bare", ">= 0.6 x bare",
         yes(ing["coalesced_ratio"] >= 0.6)),
        ("ingest per CPU-second: bare / default / all",
         " / ".join(f"{ing['per_cpu_s'][k]:,}" for k in ("bare", "default", "all"))
         + f" (default {ing['default_ratio_cpu']:.2f} x; coalesced {ing['coalesced_ratio_cpu']:.2f} x)", "", ""),
        ("ingest: reader / bare loop of the same round, median of rounds",
         f"{ing['default_ratio_paired']:.2f} x one event per chunk; {ing['coalesced_ratio_paired']:.2f} x coalesced",
         "", ""),
        ("reaction: inbox write -> prompt", _pct(lv["inbox"]), "p50 < 120 ms", yes(lv["inbox"]["p50_ms"] < 120)),
        ("reaction: send_message end -> prompt", _pct(lv["tool"]), "p50 <= bare p50",
         yes(lv["tool"]["p50_ms"] <= lv["bare"]["p50_ms"])),
        ("reaction: bare loop, same measure", _pct(lv["bare"]), "", ""),
        (f"idle {idle['seconds']:g} s: CPU", f"{idle['cpu_seconds']:.2f} s = {idle['cpu_percent_of_core']:.2f}% of a core",
         "< 1% of a core", yes(idle["cpu_percent_of_core"] < 1)),
        ("idle: prompts sent", str(idle["prompts"]), "0", yes(idle["prompts"] == 0)),
        ("idle: resident memory", f"{idle['rss_mb']} MB", "", ""),
        ("memory: at start", f"{mem['rss_mb_start']} MB", "", ""),
        *[(f"memory: after {n(k)}", f"{mem[k]} MB", "", "") for k in ev_keys + msg_keys],
        ("memory: growth, 2nd half of events", f"{mem[ev_keys[1]] - mem[ev_keys[0]]:+.1f} MB",
         f"levels off (<= {LEVEL_MB:g} MB)", yes(mem[ev_keys[1]] - mem[ev_keys[0]] <= LEVEL_MB)),
        ("memory: growth, 2nd half of messages", f"{mem[msg_keys[1]] - mem[msg_keys[0]]:+.1f} MB",
         f"levels off (<= {LEVEL_MB:g} MB)", yes(mem[msg_keys[1]] - mem[msg_keys[0]] <= LEVEL_MB)),
        (f"ledger after {led['events']:,} events", f"{led['mb']} MB ({led['rows']:,} rows)", "", ""),
        ("ledger: status --json", f"{led['status_json_ms']} ms (python start {led['python_start_and_import_ms']} ms)",
         "< 200 ms", yes(led["status_json_ms"] < 200)),
        ("ledger: writer alone, batches of 1,000", f"{led['writer_rows_per_s']:,} rows/s", "", ""),
        *broker_rows(r["broker"], yes),
        *rules.rows(r["rules"], yes),
        *inbox_rows(inb),
    ]
    widths = [max(len(row[i]) for row in rows + [("measure", "figure", "goal", "met")]) for i in range(4)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(("measure", "figure", "goal", "met"), widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines)


def broker_rows(b: dict[str, Any], yes: Callable[[bool], str]) -> list[tuple[str, str, str, str]]:
    d, e = b["decision"], b["echo"]
    return [
        (f"broker: permission.asked -> reply at the server ({b['approved']} approved, {b['rejected']} rejected)",
         f"p50 {d['p50_ms']:.1f} ms, p99 {d['p99_ms']:.1f} ms (n={d['n']})",
         "p50 <= 10 ms, p99 <= 50 ms", yes(d["p50_ms"] <= 10 and d["p99_ms"] <= 50)),
        ("broker: permission.asked -> permission.replied (the server's echo)",
         f"p50 {e['p50_ms']:.1f} ms, p99 {e['p99_ms']:.1f} ms (n={e['n']})", "", ""),
        ("broker: session created -> its rules on", f"{b['session_to_rules_ms']} ms", "", ""),
    ]


def inbox_rows(inb: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """One row per lead inbox size, then the three goals, largest against empty."""
    rows = []
    for size in inb["sizes"]:
        name = f"lead inbox of {size['messages']:,} ({size['bytes'] / 2**20:.1f} MB)"
        rows.append((f"{name}: write -> prompt", _pct(size["reaction"]), "", ""))
        rows.append((f"{name}: CPU per new message, RSS",
                     f"{size['cpu_ms_per_message']:.2f} ms (n={size['appends']}), {size['rss_mb_end']} MB", "", ""))
    first, last = inb["sizes"][0], inb["sizes"][-1]
    span = f"{first['messages']:,} -> {last['messages']:,}"
    ratio = inb["cpu_ratio"]
    rows += [
        (f"lead inbox {span}: p50 added", f"{inb['reaction_p50_added_ms']:+.0f} ms", f"<= {INBOX_P50_MS:g} ms",
         "yes" if inb["reaction_p50_added_ms"] <= INBOX_P50_MS else "NO"),
        (f"lead inbox {span}: RSS added", f"{inb['rss_added_mb']:+.1f} MB", f"<= {INBOX_RSS_MB:g} MB",
         "yes" if inb["rss_added_mb"] <= INBOX_RSS_MB else "NO"),
        (f"lead inbox {span}: CPU per new message", "-" if ratio is None else f"{ratio:.2f} x",
         f"<= {INBOX_CPU_RATIO:g} x", "yes" if ratio is not None and ratio <= INBOX_CPU_RATIO else "NO"),
    ]
    return rows


def _pct(p: dict[str, Any]) -> str:
    return f"p50 {p['p50_ms']:.0f} ms, p99 {p['p99_ms']:.0f} ms (n={p['n']})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="bench-results/bench.json")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: check that every piece runs")
    args = ap.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    started = time.monotonic()

    def say(msg: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="orchestratord-bench-"))
    try:
        ingest.quiet_logs(tmp / "reader.log")
        stream = corpus.load()
        result: dict[str, Any] = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                                  "machine": machine(), "quick": args.quick,
                                  "corpus": {"events_per_turn": stream.frames, "deltas_per_turn": stream.deltas,
                                             "sync_per_turn": stream.syncs}}
        result["rules"] = rules.run()
        say(f"rules: {result['rules']['commands']} commands judged")
        result["ingest"] = bench_ingest(tmp, sizes, stream, say)
        result["ledger"] = bench_ledger(tmp, sizes, stream, say)
        (tmp / "memory").mkdir()
        result["memory"] = memory.run(tmp / "memory", stream, sizes.memory_events, sizes.memory_messages, say)
        (tmp / "live").mkdir()
        result["live"] = bench_live(tmp / "live", sizes, say)
        (tmp / "broker").mkdir()
        result["broker"] = broker.run(tmp / "broker", sizes.broker_requests, say)
        (tmp / "inboxes").mkdir()
        result["inboxes"] = inboxes.run(tmp / "inboxes", sizes.inbox_counts, sizes.trials, sizes.inbox_appends, say)
        result["machine"]["loadavg_end"] = _loadavg()
        result["seconds"] = round(time.monotonic() - started, 1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    print(f"orchestratord bench, {result['date']}, {m['cores']} cores, {m['cpu_model']}, "
          f"load {m['loadavg_start']} -> {m['loadavg_end']}, {result['seconds']:g} s")
    print(table(result))
    print(f"figures: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
