"""Command line: one function per subcommand, no business logic here."""

from __future__ import annotations

import argparse
import datetime as dt
import faulthandler
import json
import os
import signal
import sqlite3
import sys
from typing import Any, Callable, Sequence

from . import __version__, logs
from .config import DEFAULT_CONFIG_PATH, Config, ConfigError, load_config, summarize
from .ledger import Ledger, LedgerError

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


def _load(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        raise SystemExit(EXIT_ERROR)


def _open_ledger(cfg: Config) -> Ledger:
    try:
        return Ledger(cfg.ledger.path, readonly=True)
    except LedgerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_ERROR)


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- subcommands -----------------------------------------------------------------

def cmd_run(args: argparse.Namespace) -> int:
    from .supervisor import StartupError, Supervisor

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        logs.setup("info")
        for problem in exc.problems:
            logs.get("config").error(logs.kv("config-invalid", problem=problem))
        return EXIT_ERROR
    logs.setup(cfg.log.level)
    # `kill -USR1 <pid>` writes every thread's stack to stderr (the journal): how to see
    # where a hung worker is stuck without stopping the service.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    sup = Supervisor(cfg, os.path.abspath(args.config))
    sup.install_signals()
    try:
        sup.start()
    except StartupError as exc:
        logs.get("supervisor").critical(logs.kv("startup-failed", error=str(exc)))
        return EXIT_ERROR
    return sup.run()


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    print(f"{args.config}: ok")
    print(summarize(cfg))
    return EXIT_OK


def status_data(cfg: Config, ledger: Ledger) -> dict[str, Any]:
    """What ``status`` shows, from the ledger alone (the daemon may or may not run)."""
    st = ledger.get_state()
    daemon = st.get("daemon", {})
    running = daemon.get("state") not in (None, "stopped") and _pid_alive(daemon.get("pid"))
    server = st.get("server", {})
    stream = st.get("stream", {})
    session = st.get("session", {})
    totals = ledger.dispatch_totals()
    return {
        "state": daemon.get("state", "unknown") if running else "stopped",
        "pid": daemon.get("pid") if running else None,
        "server": {"url": server.get("url", cfg.server.url), "healthy": server.get("healthy") if running else None,
                   "version": server.get("version")},
        "stream": {"connected": bool(stream.get("connected")) and running,
                   "events_total": stream.get("events_total", 0), "last_event_at": stream.get("last_event_at")},
        "session": {"id": session.get("id") or ledger.get_meta(f"session:{cfg.server.url}"),
                    "busy": bool(session.get("busy")) and running},
        "dispatch": {"pending_triggers": ledger.count_pending_triggers(), **totals},
        "last_dispatch": (lambda d: d[0].as_dict() if d else None)(ledger.dispatches(limit=1)),
        "escalations": _escalation_totals(ledger),
        "busy_sessions": st.get("sessions", []) if running else [],
        "stalls": _recent_stalls(ledger),
    }


def _recent_stalls(ledger: Ledger) -> list[dict[str, Any]]:
    try:
        return ledger.stalls(limit=5)
    except sqlite3.OperationalError:  # a ledger from before stall records, opened read-only
        return []


def _escalation_totals(ledger: Ledger) -> dict[str, Any]:
    try:
        last = ledger.escalations(limit=1)
        return {"total": ledger.count_escalations(),
                "last": last[0].as_dict() if last else None}
    except sqlite3.OperationalError:  # a ledger from before escalations, opened read-only
        return {"total": 0, "last": None}


def cmd_status(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    ledger = _open_ledger(cfg)
    data = status_data(cfg, ledger)
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    d = data["dispatch"]
    last = data["last_dispatch"] or {}
    rows = [
        ("state", data["state"] + (f" (pid {data['pid']})" if data["pid"] else "")),
        ("server", f"{data['server']['url']} " + {True: "up", False: "down", None: "-"}[data["server"]["healthy"]]
         + (f" {data['server']['version']}" if data["server"]["version"] else "")),
        ("stream", ("connected" if data["stream"]["connected"] else "disconnected")
         + f", {data['stream']['events_total']} events, last {_when(data['stream']['last_event_at'])}"),
        ("session", f"{data['session']['id'] or '-'} " + ("busy" if data["session"]["busy"] else "idle")),
        ("triggers", f"{d['pending_triggers']} pending"),
        ("prompts", f"{d['sent_total']} sent, last {_when(d['last_sent_at'])}, outcome {d['last_outcome'] or '-'}"),
    ]
    esc = data["escalations"]
    rows.append(("escalations", f"{esc['total']}" + (
        f", last {_when(esc['last']['at'])} {esc['last']['rule']} by {esc['last']['teammate'] or esc['last']['session_id'] or '-'}"
        if esc["last"] else "")))
    for b in data["busy_sessions"]:
        what = f"waiting on {b['waiting']}" if b.get("waiting") else f"last activity {b['quiet_seconds']:g}s ago"
        rows.append(("busy", f"{b['id']}{' (orchestrator)' if b.get('own') else ''} for {b['busy_seconds']:g}s, {what}"))
    for st in data["stalls"][:3]:
        rows.append(("stall", f"{_when(st['at'])} {st['kind']}: {st['detail']}"))
    if last.get("reply_text"):
        rows.append(("last reply", " ".join(last["reply_text"].split())[:100]))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return EXIT_OK


def cmd_events(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    rows = _open_ledger(cfg).events(limit=args.limit, type_=args.type)
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    for r in reversed(rows):
        print(f"{_when(r['at'])}  {r['type']:<24} {r['session_id'] or '-':<32} {r['event_id'] or ''}")
    return EXIT_OK


def cmd_dispatches(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    ledger = _open_ledger(cfg)
    rows = ledger.dispatches(limit=args.limit)
    if args.json:
        out = []
        for d in rows:
            item = d.as_dict()
            item["triggers"] = [t.__dict__ for t in ledger.triggers_for(d.id)]
            out.append(item)
        print(json.dumps(out, indent=2))
        return EXIT_OK
    for d in reversed(rows):
        tools = ",".join(f"{c.get('tool')}:{c.get('status')}" for c in d.tool_calls) or "-"
        reply = " ".join((d.reply_text or "").split())[:60]
        print(f"{_when(d.created_at)}  {d.message_id}  {d.state:<9} tools={tools}  {reply}")
    return EXIT_OK


def cmd_messages(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    rows = _open_ledger(cfg).messages(limit=args.limit, team=args.team)
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    for m in reversed(rows):
        what = m["summary"] or " ".join(m["text"].split())
        kind = "" if m["type"] == "message" else f"[{m['type']}] "
        print(f"{m['timestamp']}  {m['team']}  {m['sender']} -> {m['recipient']}  {kind}{what[:80]}")
    return EXIT_OK


def cmd_escalations(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    try:
        rows = _open_ledger(cfg).escalations(limit=args.limit)
    except sqlite3.OperationalError:
        print(f"orchestratord: the ledger {cfg.ledger.path} predates escalations; start the daemon once to "
              "upgrade it", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        print(json.dumps([e.as_dict() for e in rows], indent=2))
        return EXIT_OK
    for e in reversed(rows):
        who = e.teammate or e.session_id or "-"
        done = ",".join(a.split(":")[0] for a in e.done if a != "hooks") or "-"
        print(f"{_when(e.at)}  {e.severity:<8} {e.rule:<16} {e.source:<10} {who:<20} done={done:<12} "
              f"{' '.join(e.what.split())[:70]}")
    return EXIT_OK


# -- parsing -----------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orchestratord",
                                     description="Always-on supervisor for opencode serve and its agent teams.")
    parser.add_argument("--version", action="version", version=f"orchestratord {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.add_argument("--config", "-c", default=DEFAULT_CONFIG_PATH, help=f"config file (default {DEFAULT_CONFIG_PATH})")
        p.set_defaults(func=func)
        return p

    add("run", cmd_run, "run the daemon in the foreground")
    add("check-config", cmd_check_config, "validate the config file and summarise it")
    p = add("status", cmd_status, "show what the daemon is doing, from its ledger")
    p.add_argument("--json", action="store_true")
    p = add("events", cmd_events, "list recorded server events")
    p.add_argument("--json", action="store_true")
    p.add_argument("--type", help="only events of this type")
    p.add_argument("--limit", type=int, default=50)
    p = add("messages", cmd_messages, "list teammate messages read from the team inboxes")
    p.add_argument("--json", action="store_true")
    p.add_argument("--team", help="only this team")
    p.add_argument("--limit", type=int, default=50)
    p = add("escalations", cmd_escalations, "list what the safety guard escalated and what it did about it")
    p.add_argument("--json", action="store_true")
    p.add_argument("--limit", type=int, default=50)
    p = add("dispatches", cmd_dispatches, "list prompts sent to the orchestrator session and their outcomes")
    p.add_argument("--json", action="store_true")
    p.add_argument("--limit", type=int, default=20)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
