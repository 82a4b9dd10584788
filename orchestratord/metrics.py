"""Prometheus metrics, optional: an HTTP endpoint, a node_exporter textfile, or neither.

The workers call the module-level helpers (``metrics.event("session.idle")``); with
metrics off, or without the ``prometheus_client`` extra installed, those are no-ops, so
nothing else in the daemon knows whether metrics are on. The exposition format is
``prometheus_client``'s own; the textfile is written to a temporary name and renamed,
so node_exporter never reads half of it.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from . import logs

log = logs.get("metrics")

REACTION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DECISION_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
DURATION_BUCKETS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


class MetricsUnavailable(Exception):
    """Metrics are configured but prometheus_client is not installed."""


class _Metrics:
    def __init__(self) -> None:
        import prometheus_client as pc

        self.pc = pc
        r = self.registry = pc.CollectorRegistry()
        p = "orchestratord_"
        self.server_up = pc.Gauge(p + "server_up", "1 when GET /global/health answers healthy", registry=r)
        self.stream_connected = pc.Gauge(p + "stream_connected", "1 while the event stream is connected", registry=r)
        self.last_event = pc.Gauge(p + "last_event_timestamp_seconds", "Wall time of the last event read", registry=r)
        self.since_event = pc.Gauge(p + "seconds_since_last_event", "Seconds since the last event read", registry=r)
        self.events = pc.Counter(p + "events", "Events read from the stream, by type", ["type"], registry=r)
        self.triggers = pc.Counter(p + "triggers", "Triggers recorded, by kind", ["kind"], registry=r)
        self.prompts_sent = pc.Counter(p + "prompts_sent", "Prompts sent to the orchestrator session", registry=r)
        self.prompts = pc.Counter(p + "prompts", "Prompts finished, by outcome", ["outcome"], registry=r)
        self.reaction = pc.Histogram(p + "reaction_seconds", "From a trigger to the prompt that carries it",
                                     buckets=REACTION_BUCKETS, registry=r)
        self.duration = pc.Histogram(p + "prompt_duration_seconds", "From a prompt sent to its reply finished",
                                     buckets=DURATION_BUCKETS, registry=r)
        self.messages = pc.Counter(p + "teammate_messages", "Teammate messages reported, by team", ["team"],
                                   registry=r)
        self.escalations = pc.Counter(p + "escalations", "Safety escalations, by rule and severity",
                                      ["rule", "severity"], registry=r)
        self.rejected = pc.Counter(p + "permissions_rejected", "Permission requests answered reject", registry=r)
        self.permissions = pc.Counter(p + "permissions", "Permission requests answered, by decision and by whom",
                                      ["decision", "by"], registry=r)
        self.decision_seconds = pc.Histogram(p + "permission_decision_seconds",
                                             "From a permission request seen to its answer accepted (policy only)",
                                             buckets=DECISION_BUCKETS, registry=r)
        self.restarts = pc.Counter(p + "worker_restarts", "Worker threads restarted after dying", ["worker"],
                                   registry=r)
        self.ledger_errors = pc.Counter(p + "ledger_write_errors", "Failed writes to the ledger", registry=r)
        self.reloads = pc.Counter(p + "config_reloads", "Config reloads, by result", ["result"], registry=r)
        self.cap_left = pc.Gauge(p + "prompts_left_in_hourly_cap", "Prompts that may still go out this hour",
                                 registry=r)
        self.stalls = pc.Counter(p + "stalls", "Stall findings, by kind", ["kind"], registry=r)
        self._last_event_mono: float | None = None
        self.since_event.set_function(self._since)
        self.server_up.set(0)
        self.stream_connected.set(0)

    def _since(self) -> float:
        last = self._last_event_mono
        return float("nan") if last is None else time.monotonic() - last


_m: _Metrics | None = None
_lock = threading.Lock()
_http: Any = None
_http_addr: tuple[str, int] | None = None


def available() -> bool:
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return False
    return True


def enable() -> None:
    """Create the registry once (counters survive reloads)."""
    global _m
    with _lock:
        if _m is None:
            if not available():
                raise MetricsUnavailable("metrics are configured but prometheus_client is not installed: "
                                         "pip install 'orchestratord[metrics]' (make install EXTRAS=metrics), "
                                         "or remove [metrics]")
            _m = _Metrics()


def serve(listen: str | None) -> None:
    """Start, move or stop the HTTP endpoint to match ``listen`` ("host:port" or None)."""
    global _http, _http_addr
    addr = None
    if listen:
        host, _, port = listen.rpartition(":")
        addr = (host.strip("[]") or "127.0.0.1", int(port))
    if addr == _http_addr:
        return
    if _http is not None:
        _http.shutdown()
        _http.server_close()
        _http = _http_addr = None
    if addr is not None:
        enable()
        assert _m is not None
        server, _thread = _m.pc.start_http_server(addr[1], addr=addr[0], registry=_m.registry)
        _http, _http_addr = server, addr
        log.info(logs.kv("metrics-listening", address=f"{addr[0]}:{addr[1]}"))


def stop() -> None:
    serve(None)


def write_textfile(path: str) -> bool:
    """Write the exposition to ``path`` atomically (temporary file, then rename)."""
    if _m is None:
        return False
    try:
        _m.pc.write_to_textfile(path, _m.registry)
        return True
    except OSError as exc:
        log.error(logs.kv("metrics-textfile-failed", path=path, error=exc.strerror or str(exc),
                          fix="check metrics.textfile's directory and its permissions"))
        return False


def exposition() -> bytes:
    return b"" if _m is None else _m.pc.generate_latest(_m.registry)


def reset_for_tests() -> None:
    """Forget the registry (tests in one process)."""
    global _m
    stop()
    with _lock:
        _m = None


# -- what the workers call: each a no-op with metrics off ---------------------------------

def _on(fn: Callable[[_Metrics], None]) -> None:
    m = _m
    if m is not None:
        try:
            fn(m)
        except Exception as exc:  # a metric must never break the work it measures
            log.log(logging.DEBUG, logs.kv("metric-failed", error=str(exc)))


def server_up(up: bool) -> None:
    _on(lambda m: m.server_up.set(1 if up else 0))


def stream_connected(connected: bool) -> None:
    _on(lambda m: m.stream_connected.set(1 if connected else 0))


def event(etype: str, wall: float) -> None:
    m = _m
    if m is not None:  # the hot path: no closure, no lock beyond the counter's own
        m.events.labels(etype).inc()
        m.last_event.set(wall)
        m._last_event_mono = time.monotonic()


def trigger(kind: str) -> None:
    _on(lambda m: m.triggers.labels(kind).inc())


def prompt_sent(reactions: list[float], cap_left: int) -> None:
    def go(m: _Metrics) -> None:
        m.prompts_sent.inc()
        for r in reactions:
            m.reaction.observe(max(0.0, r))
        m.cap_left.set(cap_left)
    _on(go)


def prompt_done(outcome: str, seconds: float | None) -> None:
    def go(m: _Metrics) -> None:
        m.prompts.labels(outcome).inc()
        if seconds is not None:
            m.duration.observe(max(0.0, seconds))
    _on(go)


def cap_left(n: int) -> None:
    _on(lambda m: m.cap_left.set(n))


def teammate_message(team: str) -> None:
    _on(lambda m: m.messages.labels(team).inc())


def escalation(rule: str, severity: str) -> None:
    _on(lambda m: m.escalations.labels(rule, severity).inc())


def permission_decided(decision: str, by: str, seconds: float | None) -> None:
    def go(m: _Metrics) -> None:
        m.permissions.labels(decision, by).inc()
        if decision == "reject":
            m.rejected.inc()
        if seconds is not None and by == "policy":
            m.decision_seconds.observe(seconds)
    _on(go)


def worker_restart(worker: str) -> None:
    _on(lambda m: m.restarts.labels(worker).inc())


def ledger_error() -> None:
    _on(lambda m: m.ledger_errors.inc())


def reload(ok: bool) -> None:
    _on(lambda m: m.reloads.labels("ok" if ok else "failed").inc())


def stall(kind: str) -> None:
    _on(lambda m: m.stalls.labels(kind).inc())
