"""The benchmark's pieces run and count what they should, at a tiny size (no timing asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.bench import broker, corpus, inboxes, ingest, memory, rules, run
from tests.bench.replay import ReplayServer
from tests.corpus_commands import CASES


@pytest.fixture(scope="module")
def stream() -> corpus.Corpus:
    return corpus.load()


def test_corpus_turns_are_distinct_and_mostly_deltas(stream: corpus.Corpus) -> None:
    assert stream.deltas > stream.frames / 2
    ids = set()
    for n in range(3):
        frames = [json.loads(f[6:]) for f in stream.turn(n).split(b"\n\n") if f]
        assert len(frames) == stream.frames
        ids |= {f["payload"].get("id") for f in frames if f["payload"]["type"] != "sync"}
    assert len(ids) == 3 * (stream.frames - stream.syncs)


@pytest.mark.parametrize("store,coalesced", [("default", False), ("all", False), ("default", True)])
def test_reader_and_bare_loop_take_in_every_event(tmp_path: Path, stream: corpus.Corpus, store: str,
                                                  coalesced: bool) -> None:
    path = tmp_path / "events.sse"
    written = stream.write(path, 2 * stream.frames, coalesced=coalesced)
    ledger = tmp_path / "ledger.sqlite3"
    with ReplayServer() as server:
        assert ingest.bare_loop(server, path)[0] == written
        counted, _, _ = ingest.reader_run(server, path, ledger, store)
    assert counted == written - 2 * stream.syncs
    rows = ingest.ledger_rows(ledger, "SELECT COUNT(*) FROM events")
    connected = 1
    if store == "all":
        assert rows == written + connected
    else:
        assert rows == written - 2 * (stream.deltas + stream.syncs) + connected
        assert ingest.ledger_rows(ledger, "SELECT COUNT(*) FROM events WHERE type = 'message.part.delta'") == 0
    assert ingest.ledger_rows(ledger, "SELECT COUNT(*) FROM triggers") > 0


def test_writer_writes_every_row(tmp_path: Path, stream: corpus.Corpus) -> None:
    path = tmp_path / "events.sse"
    stream.write(path, 2500)
    n, _ = ingest.writer_rate(path, tmp_path / "ledger.sqlite3", 2500)
    assert n == 2500 == ingest.ledger_rows(tmp_path / "ledger.sqlite3", "SELECT COUNT(*) FROM events")


def test_memory_stages_and_table(tmp_path: Path, stream: corpus.Corpus) -> None:
    out = memory.run(tmp_path, stream, 2 * stream.frames, 200, lambda s: None)
    assert out["events"] == 2 * stream.frames and out["messages"] == 200
    assert all(v > 0 for k, v in out.items() if k.startswith("rss_mb"))
    fake_live = {"idle": {"seconds": 60, "cpu_seconds": 0.1, "cpu_percent_of_core": 0.2, "prompts": 0, "rss_mb": 30},
                 **{k: {"n": 50, "p50_ms": 80.0, "p99_ms": 150.0} for k in ("inbox", "tool", "bare")}}
    text = run.table({"ingest": {"bare_per_s": 2, "default_per_s": 1, "all_per_s": 1, "default_ratio": 0.5,
                                 "all_ratio": 0.5, "per_cpu_s": {"bare": 4, "default": 2, "all": 1},
                                 "default_ratio_cpu": 0.5, "all_ratio_cpu": 0.25, "coalesced_bare_per_s": 3,
                                 "coalesced_default_per_s": 2, "coalesced_ratio": 0.67, "coalesced_ratio_cpu": 0.6,
                                 "default_ratio_paired": 0.55, "coalesced_ratio_paired": 0.65},
                      "ledger": {"events": 10, "mb": 1.0, "rows": 5, "status_json_ms": 90.0,
                                 "python_start_and_import_ms": 60.0, "writer_rows_per_s": 3},
                      "memory": out, "live": fake_live, "rules": rules.run(), "inboxes": FAKE_INBOXES,
                      "broker": {"requests": 20, "approved": 18, "rejected": 2, "session_to_rules_ms": 12.0,
                                 "decision": {"n": 20, "p50_ms": 4.0, "p99_ms": 9.0},
                                 "echo": {"n": 20, "p50_ms": 14.0, "p99_ms": 29.0}}})
    assert "ingest: reader, default store" in text and "after 200 messages" in text
    assert "ingest, coalesced: reader, default store" in text
    assert "0.55 x one event per chunk; 0.65 x coalesced" in text
    assert "rules: must-block caught (reject tier)" in text and "broker: permission.asked" in text


def test_rules_piece_judges_the_whole_corpus() -> None:
    out = rules.run()
    assert out["commands"] == len(CASES) == sum(out[k]["total"] for k in ("block", "hold", "allow", "mention"))
    assert all(0.0 <= out[k]["rate"] <= 1.0 for k in ("block", "hold", "allow", "mention"))
    assert out["misclassified"] == [], "tests/test_corpus.py says which and why"
    lines = dict((row[0], row) for row in rules.rows(out, lambda ok: "yes" if ok else "NO"))
    assert lines["rules: must-block caught (reject tier)"][2:] == (">= 95%", "yes")
    assert lines["rules: false alarms, must-allow"][2:] == ("<= 2%", "yes")


def test_broker_piece_times_every_request(tmp_path: Path) -> None:
    out = broker.run(tmp_path, 12, lambda s: None)
    assert out["requests"] == 12 and out["rejected"] == 1 and out["approved"] == 11
    assert out["decision"]["n"] == 12 and out["echo"]["n"] == 12, "every reply timed at the proxy and echoed"
    assert [row[0] for row in run.broker_rows(out, str)][0].startswith("broker: permission.asked")


FAKE_INBOXES = {"sizes": [{"messages": n, "bytes": 320 * n, "reaction": {"n": 50, "p50_ms": 80.0, "p99_ms": 150.0},
                           "cpu_ms_per_message": 3.0, "appends": 200, "rss_mb_end": 36.0} for n in (0, 100_000)],
                "reaction_p50_added_ms": 0.0, "rss_added_mb": 0.0, "cpu_ratio": 1.0}


def test_long_lead_inboxes(tmp_path: Path) -> None:
    out = inboxes.run(tmp_path, (0, 40), trials=1, appends=2, say=lambda s: None)
    assert [s["messages"] for s in out["sizes"]] == [0, 40]
    for size in out["sizes"]:
        assert size["reaction"]["n"] == 1 and size["appends"] == 2
        assert size["bytes_end"] > size["bytes"] and size["rss_mb_end"] > 0
    assert out["sizes"][1]["bytes"] > 40 * 250, "messages of realistic size"
    rows = run.inbox_rows(out)
    assert [r[0] for r in rows[-3:]] == ["lead inbox 0 -> 40: p50 added", "lead inbox 0 -> 40: RSS added",
                                        "lead inbox 0 -> 40: CPU per new message"]
