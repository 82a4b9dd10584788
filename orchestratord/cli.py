"""Command line: one function per subcommand, no business logic here.

Size: one small function per subcommand; the read-only ones render the same ledger views
as text and as JSON.
"""

from __future__ import annotations

import argparse
import datetime as dt
import faulthandler
import json
import os
import signal
import sqlite3
import sys
import time
from typing import Any, Callable, Sequence

from . import __version__, logs
from .config import DEFAULT_CONFIG_PATH, SERVE_TEAMS_DIR, Config, ConfigError, dump_config, load_config, summarize
from .ledger import Ledger, LedgerError, query_problem

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
DEFAULT_LOG_FILE = "/var/log/opencode-orchestrator/orchestratord.log"


def _load(path: str) -> Config:
    """The config; a ConfigError goes up to :func:`main`, which prints every problem."""
    return load_config(path)


def _reader(args: argparse.Namespace) -> tuple[Config, Ledger]:
    """The config and its ledger opened read-only; what goes wrong reaches :func:`main` as one line."""
    cfg = load_config(args.config)
    args.ledger_path = cfg.ledger.path
    return cfg, Ledger(cfg.ledger.path, readonly=True)


def _failed(args: argparse.Namespace, problem: str, fix: str, **more: Any) -> int:
    """One line with its fix (stderr), or with ``--json`` one JSON object (stdout); exit 1."""
    if getattr(args, "json", False):
        print(json.dumps({"error": problem, "fix": fix, **more}))
    else:
        print(f"error: {problem}; fix: {fix}", file=sys.stderr)
    return EXIT_ERROR


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _running(daemon: dict[str, Any]) -> bool:
    """Whether the daemon whose state row this is runs now (it may have been killed without a word)."""
    return daemon.get("state") not in (None, "stopped") and _pid_alive(daemon.get("pid"))


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

    if args.daemon and not args.pidfile:
        print("error: --daemon needs --pidfile PATH", file=sys.stderr)
        return EXIT_USAGE
    config_path = os.path.abspath(args.config)
    try:
        cfg = load_config(config_path)
    except ConfigError as exc:
        logs.setup("info")
        for problem in exc.problems:
            logs.get("config").error(logs.kv("config-invalid", problem=problem))
        return EXIT_ERROR
    if args.daemon:
        return _run_detached(args, cfg, config_path)
    logs.setup(cfg.log.level)
    # `kill -USR1 <pid>` writes every thread's stack to stderr (the journal): how to see
    # where a hung worker is stuck without stopping the service.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    sup = Supervisor(cfg, config_path)
    sup.install_signals()
    try:
        sup.start()
    except StartupError as exc:
        logs.get("supervisor").critical(logs.kv("startup-failed", error=str(exc)))
        return EXIT_ERROR
    return sup.run()


def _run_detached(args: argparse.Namespace, cfg: Config, config_path: str) -> int:
    from .service import AlreadyRunning, PidFile, daemonize
    from .supervisor import Supervisor

    # Fail here, on the terminal, for what can be checked before detaching.
    try:
        Ledger(cfg.ledger.path).close()
    except LedgerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    log_path = os.path.abspath(args.log_file)
    try:
        log_file = open(log_path, "a", buffering=1, encoding="utf-8")
    except OSError as exc:
        print(f"error: cannot open --log-file {log_path}: {exc.strerror}", file=sys.stderr)
        return EXIT_ERROR
    with log_file:
        logs.setup(cfg.log.level, journal=False)
        sup = Supervisor(cfg, config_path)
        try:
            return daemonize(PidFile(args.pidfile), log_file, start=sup.start, run=sup.run,
                             on_signal=sup._on_signal)
        except AlreadyRunning as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_ERROR
        except OSError as exc:
            print(f"error: pidfile {os.path.abspath(args.pidfile)}: {exc.strerror or exc}", file=sys.stderr)
            return EXIT_ERROR


def cmd_check_config(args: argparse.Namespace) -> int:
    from .preflight import environment

    cfg = load_config(args.config, environment(running=_running_daemon))
    print(f"{args.config}: ok")
    print(summarize(cfg))
    return EXIT_OK


def _running_daemon(cfg: Config) -> dict[str, Any] | None:
    """The live state of the daemon that runs on this config's ledger, if one does (a reload's check)."""
    try:
        ledger = Ledger(cfg.ledger.path, readonly=True)
    except LedgerError:
        return None
    try:
        daemon = ledger.get_state().get("daemon", {})
    except sqlite3.Error:
        return None
    finally:
        ledger.close()
    return daemon if _running(daemon) else None


def status_data(cfg: Config, ledger: Ledger) -> dict[str, Any]:
    """What ``status`` shows, from the ledger alone (the daemon may or may not run)."""
    st = ledger.get_state()
    daemon = st.get("daemon", {})
    running = _running(daemon)
    server = st.get("server", {})
    stream = st.get("stream", {})
    session = st.get("session", {})
    totals = ledger.dispatch_totals()
    return {
        "state": daemon.get("state", "unknown") if running else "stopped",
        "pid": daemon.get("pid") if running else None,
        "config": {"path": daemon.get("config"), "digest": daemon.get("config_digest")} if running else None,
        "server": {"url": server.get("url", cfg.server.url), "healthy": server.get("healthy") if running else None,
                   "version": server.get("version"), "problem": server.get("problem") if running else None},
        "stream": {"connected": bool(stream.get("connected")) and running,
                   "events_total": stream.get("events_total", 0), "last_event_at": stream.get("last_event_at")},
        "session": {"id": session.get("id") or ledger.get_meta(f"session:{cfg.server.url}"),
                    "busy": bool(session.get("busy")) and running},
        "dispatch": {"pending_triggers": ledger.count_pending_triggers(), **totals,
                     "holds": _holds(st, running)},
        "last_dispatch": (lambda d: d[0].as_dict() if d else None)(ledger.dispatches(limit=1)),
        "escalations": _escalation_totals(ledger),
        "permissions": _permission_totals(ledger),
        "busy_sessions": st.get("sessions", []) if running else [],
        "stalls": _recent_stalls(ledger),
        "ledger": ledger_view(cfg.ledger.path, st, running),
    }


#: a running daemon writes its state every few seconds; older than this, it cannot
STATE_STALE_SECONDS = 30.0


def ledger_view(path: str, st: dict[str, Any], running: bool, now: float | None = None) -> dict[str, Any]:
    """Whether the daemon can write its ledger: what it recorded, and what the filesystem says now.

    A daemon whose ledger fails may not be able to record even that, so a state row
    that has stopped moving, a read-only or full filesystem count as failing too.
    """
    now = time.time() if now is None else now
    recorded = st.get("ledger") or {}
    written_at = (st.get("daemon") or {}).get("written_at")
    problem = None
    if recorded.get("failing"):
        problem = recorded.get("error")
    disk = _filesystem_problem(path)
    if disk:
        problem = f"{problem}; {disk}" if problem else disk
    if running and isinstance(written_at, (int, float)) and now - written_at > STATE_STALE_SECONDS:
        problem = (problem + "; " if problem else "") + f"state not written for {now - written_at:.0f}s"
    from .ledgerwatch import fix_for

    return {"path": path, "failing": bool(problem) and running, "problem": problem,
            "since": recorded.get("since") if recorded.get("failing") else None,
            "fix": fix_for(problem) if problem else None, "last": recorded.get("last")}


def _filesystem_problem(path: str) -> str | None:
    """A read-only or full filesystem under the ledger, as the OS sees it now."""
    try:
        fs = os.statvfs(os.path.dirname(os.path.abspath(path)))
    except OSError as exc:
        return f"its directory: {exc.strerror or exc}"
    from .ledgerwatch import read_only_filesystem

    read_only = read_only_filesystem(path)
    if read_only:
        return read_only
    if fs.f_flag & os.ST_RDONLY:
        return "the filesystem is read-only"
    if fs.f_bavail * fs.f_frsize < 64 * 1024:
        return "no space left on its filesystem"
    return None


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


def _permission_totals(ledger: Ledger) -> dict[str, Any]:
    try:
        return ledger.permission_totals()
    except sqlite3.OperationalError:  # a ledger from before the broker, opened read-only
        return {"held": 0, "total": 0, "brokered_sessions": 0}


def cmd_init_config(args: argparse.Namespace) -> int:
    from .initconfig import InitOptions, write_initial

    opts = InitOptions(server_url=args.server_url, teams_dir=args.teams_dir, teams=tuple(args.team or ()),
                       ledger=args.ledger, user=args.user)
    path = args.config if args.config is not None else opts.default_path()
    try:
        written = write_initial(path, opts, force=args.force)
    except FileExistsError:
        print(f"error: {path} exists; not overwriting it (pass --force to replace it)", file=sys.stderr)
        return EXIT_ERROR
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:
        print(f"error: cannot write {path}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_ERROR
    print(f"wrote {written}; check it with: orchestratord check-config --config {written}")
    return EXIT_OK


def cmd_config_show(args: argparse.Namespace) -> int:
    print(dump_config(_load(args.config)), end="")
    return EXIT_OK


def cmd_config_reference(args: argparse.Namespace) -> int:
    from .configdoc import reference

    print(reference(), end="")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    cfg, ledger = _reader(args)
    data = status_data(cfg, ledger)
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    d = data["dispatch"]
    last = data["last_dispatch"] or {}
    rows = [
        ("state", data["state"] + (f" (pid {data['pid']})" if data["pid"] else "")),
        *([("config", f"{data['config']['path']} (sha256 {data['config']['digest'] or '-'}…)")] if data["config"] else []),
        ("server", f"{data['server']['url']} " + ("unsupported" if data["server"].get("problem") else {
            True: "up", False: "down", None: "-"}[data["server"]["healthy"]])
         + (f" {data['server']['version']}" if data["server"]["version"] else "")
         + (f": {data['server']['problem']}" if data["server"].get("problem") else "")),
        ("stream", ("connected" if data["stream"]["connected"] else "disconnected")
         + f", {data['stream']['events_total']} events, last {_when(data['stream']['last_event_at'])}"),
        ("session", f"{data['session']['id'] or '-'} " + ("busy" if data["session"]["busy"] else "idle")),
        ("triggers", f"{d['pending_triggers']} pending" + (
            f", held back by {', '.join(_hold_text(h) for h in d['holds'])} (orchestratord pending)"
            if d["pending_triggers"] and d["holds"] else "")),
        ("prompts", f"{d['sent_total']} sent, last {_when(d['last_sent_at'])}, outcome {d['last_outcome'] or '-'}"),
    ]
    esc = data["escalations"]
    rows.append(("escalations", f"{esc['total']}" + (
        f", last {_when(esc['last']['at'])} {esc['last']['rule']} by "
        f"{esc['last']['teammate'] or esc['last']['session_id'] or '-'}"
        if esc["last"] else "")))
    perm = data["permissions"]
    rows.append(("permissions", f"{perm['held']} held for a person" + (" (orchestratord permissions)" if perm["held"]
                                                                      else "")
                 + f", {perm['total']} answered or held in all, {perm['brokered_sessions']} sessions brokered"))
    rows.append(("ledger", _ledger_line(data["ledger"])))
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


STOPPED_HOLD = {"reason": "daemon-stopped", "detail": "the daemon is not running; nothing is sent until it starts",
                "until": None}


def _holds(st: dict[str, Any], running: bool) -> list[dict[str, Any]]:
    """Why the dispatcher holds the pending triggers back, as it last wrote it."""
    return (st.get("dispatch") or {}).get("holds", []) if running else [STOPPED_HOLD]


def _hold_text(h: dict[str, Any]) -> str:
    return h["reason"] + (f" until {_when(h['until'])}" if h.get("until") else "")


def cmd_pending(args: argparse.Namespace) -> int:
    _, ledger = _reader(args)
    st = ledger.get_state()
    daemon = st.get("daemon", {})
    running = _running(daemon)
    triggers = ledger.pending_triggers()
    holds = _holds(st, running) if triggers else []
    now = time.time()
    items: list[dict[str, Any]] = [{"id": t.id, "kind": t.kind, "rule": t.rule, "team": t.team, "teammate": t.teammate,
              "age_seconds": round(max(0.0, now - t.at), 1), "detail": t.detail,
              "held_by": [h["reason"] for h in holds]} for t in triggers]
    if args.json:
        print(json.dumps({"daemon": "running" if running else "stopped", "holds": holds, "triggers": items}, indent=2))
        return EXIT_OK
    if not items:
        print("no trigger is waiting")
        return EXIT_OK
    print(f"{len(items)} trigger{'s' if len(items) != 1 else ''} waiting, "
          + ("held back by:" if holds else "nothing holds them back: the next prompt carries them"))
    for h in holds:
        print(f"  {_hold_text(h)}: {h['detail']}")
    for t in items:
        who = " ".join(x for x in (t["team"], t["teammate"]) if x) or "-"
        print(f"{t['id']:>6}  {_age(t['age_seconds']):>6}  {t['rule'] or t['kind']:<18} {who:<24} "
              f"{' '.join(str(t['detail']).split())[:70]}")
    return EXIT_OK


def _ledger_line(led: dict[str, Any]) -> str:
    if led["failing"]:
        since = f" since {_when(led['since'])}" if led["since"] else ""
        return f"FAILING{since}: {led['problem']}; fix: {led['fix']}"
    text = "ok" if not led["problem"] else f"ok for now, but {led['problem']}"
    last = led.get("last")
    if last:
        text += f" (last failed {_when(last['since'])} to {_when(last['until'])}: {last['error']})"
    return text


def cmd_events(args: argparse.Namespace) -> int:
    _, ledger = _reader(args)
    rows = ledger.events(limit=args.limit, type_=args.type)
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    for r in reversed(rows):
        print(f"{_when(r['at'])}  {r['type']:<24} {r['session_id'] or '-':<32} {r['event_id'] or ''}")
    return EXIT_OK


def cmd_dispatches(args: argparse.Namespace) -> int:
    _, ledger = _reader(args)
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
    _, ledger = _reader(args)
    rows = ledger.messages(limit=args.limit, team=args.team)
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    for m in reversed(rows):
        what = m["summary"] or " ".join(m["text"].split())
        kind = "" if m["type"] == "message" else f"[{m['type']}] "
        print(f"{m['timestamp']}  {m['team']}  {m['sender']} -> {m['recipient']}  {kind}{what[:80]}")
    return EXIT_OK


def cmd_escalations(args: argparse.Namespace) -> int:
    _, ledger = _reader(args)
    rows = ledger.escalations(limit=args.limit)
    if args.json:
        print(json.dumps([e.as_dict() for e in rows], indent=2))
        return EXIT_OK
    for e in reversed(rows):
        who = e.teammate or e.session_id or "-"
        done = ",".join(a.split(":")[0] for a in e.done if a != "hooks") or "-"
        print(f"{_when(e.at)}  {e.severity:<8} {e.rule:<16} {e.source:<10} {who:<20} done={done:<12} "
              f"{' '.join(e.what.split())[:70]}")
    return EXIT_OK


def cmd_permissions(args: argparse.Namespace) -> int:
    from .broker import held_listing
    from .ledger import P_HELD

    _, ledger = _reader(args)
    rows = ledger.permissions(limit=args.limit) if args.all else ledger.permissions(states=(P_HELD,))
    now = time.time()
    if args.json:
        items = [r.as_dict() for r in rows] if args.all else held_listing(rows, now)
        print(json.dumps(items, indent=2))
        return EXIT_OK
    if not rows:
        print("no request is held for a person" if not args.all else "no permission request recorded yet")
        return EXIT_OK
    for r in rows:
        age = _age(now - r.asked_at)
        who = r.teammate or r.session_id
        command = " ".join(r.what.split())
        if args.all:
            print(f"{_when(r.asked_at)}  {r.id}  {r.decision:<7} by {r.decided_by:<9} {r.state:<8} {who:<16} "
                  f"{r.rule or '-':<16} {command[:70]}")
        else:
            print(f"{r.id}  {age:>6}  {who:<16} {r.rule or '-':<16} {command[:80]}")
    if not args.all:
        print("answer with: orchestratord allow ID   or   orchestratord deny ID [--message TEXT]")
    return EXIT_OK


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def cmd_ledger_check(args: argparse.Namespace) -> int:
    """SQLite's own check of every page and index, on a read-only connection (safe while the daemon runs)."""
    cfg, ledger = _reader(args)
    version = ledger.db.execute("PRAGMA user_version").fetchone()[0]
    rows = [r[0] for r in ledger.db.execute("PRAGMA integrity_check")]
    if rows == ["ok"]:
        print(json.dumps({"path": cfg.ledger.path, "ok": True, "schema": version}) if args.json
              else f"{cfg.ledger.path}: ok (schema {version})")
        return EXIT_OK
    return _failed(args, f"ledger {cfg.ledger.path} is damaged: {'; '.join(rows[:3])}",
                   "stop the daemon, keep a copy (orchestratord ledger backup PATH may still read most of it), move "
                   "the file aside and start again: a fresh ledger is created", ok=False, schema=version, problems=rows)


def cmd_ledger_copy(args: argparse.Namespace) -> int:
    """``backup``: a consistent copy; ``vacuum``: a compacted one. Both read only, so both are safe while it runs."""
    from .ledger import copy_database

    cfg, ledger = _reader(args)
    target = os.path.abspath(args.path)
    if os.path.lexists(target):
        return _failed(args, f"{target} exists", "give a path that does not exist yet; nothing is overwritten")
    try:
        if args.ledger_command == "backup":
            copy_database(ledger.db, target)
        else:
            ledger.db.execute("VACUUM INTO ?", (target,))
    except OSError as exc:
        return _failed(args, f"cannot write {target}: {exc.strerror or exc}", "choose a directory this user can "
                       "write, with room for a copy of the ledger")
    size = os.path.getsize(target)
    done = {"path": cfg.ledger.path, "copy": target, "bytes": size, "ledger_bytes": os.path.getsize(cfg.ledger.path)}
    if args.json:
        print(json.dumps(done))
    elif args.ledger_command == "backup":
        print(f"copied {cfg.ledger.path} to {target} ({size} bytes)")
    else:
        print(f"wrote a compacted copy of {cfg.ledger.path} to {target} ({size} bytes, the ledger has "
              f"{done['ledger_bytes']}); to use it, with the daemon stopped (systemctl stop opencode-orchestrator):\n"
              f"  mv {cfg.ledger.path} {cfg.ledger.path}.old && mv {target} {cfg.ledger.path}\n"
              "then start it again; a running daemon would restore its own file over it")
    return EXIT_OK


def cmd_allow(args: argparse.Namespace) -> int:
    return _answer(args, "approve")


def cmd_deny(args: argparse.Namespace) -> int:
    return _answer(args, "reject")


def _answer(args: argparse.Namespace, decision: str) -> int:
    """A person's answer to a held request: recorded first, then sent (or left to the daemon to send)."""
    from .ledger import P_ANSWERED, P_HELD
    from .opencode import NotFound, OpencodeClient, OpencodeError, read_password

    cfg = _load(args.config)
    try:
        ledger = Ledger(cfg.ledger.path)
    except LedgerError as exc:
        print(f"error: {exc}; an answer is written to the ledger: run this as the daemon's user "
              "(sudo -u opencode-orchestrator orchestratord ...) or as root", file=sys.stderr)
        return EXIT_ERROR
    row = ledger.permission(args.id)
    if row is None:
        print(f"error: no permission request {args.id} in {cfg.ledger.path}; `orchestratord permissions` lists "
              "the held ones", file=sys.stderr)
        return EXIT_ERROR
    if row.state != P_HELD:
        print(f"error: {args.id} is not held (it was decided {row.decision} by {row.decided_by}, now {row.state})",
              file=sys.stderr)
        return EXIT_ERROR
    verb = "allowed" if decision == "approve" else "denied"
    reply = "once" if decision == "approve" else "reject"
    message = args.message or None
    if decision == "reject":
        message = "Denied by a person through orchestratord" + (f": {message}" if message else ".") + \
            " Do not retry it; ask the user what to do instead."
    try:
        took = ledger.answer_permission(args.id, decision=decision, reply=reply, message=message, by="person")
    except sqlite3.Error as exc:
        print(f"error: cannot record the answer in {cfg.ledger.path}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if not took:
        print(f"error: {args.id} was answered meanwhile; see `orchestratord permissions --all`", file=sys.stderr)
        return EXIT_ERROR
    try:
        password = read_password(cfg.server.password_file)
    except OSError as exc:
        print(f"{verb} {args.id} (recorded; the daemon sends it: cannot read server.password_file here: "
              f"{exc.strerror or exc})")
        return EXIT_OK
    client = OpencodeClient(cfg.server.url, cfg.server.username, password, cfg.server.timeout_seconds)
    try:
        client.reply_permission(args.id, reply, message)
    except NotFound:
        fresh = ledger.permission(args.id)
        if fresh is not None and fresh.state == P_ANSWERED:  # the daemon sent this answer (this command was slow)
            print(f"{verb} {args.id} (sent by the daemon)")
            return EXIT_OK
        ledger.permission_gone(args.id, "no longer pending on the server when a person answered")
        print(f"error: the server no longer has {args.id} (answered elsewhere, or its session ended)",
              file=sys.stderr)
        return EXIT_ERROR
    except OpencodeError as exc:
        print(f"{verb} {args.id} (recorded; the daemon sends it once the server answers: {exc})")
        return EXIT_OK
    finally:
        client.close()
    ledger.permission_replied(args.id)
    print(f"{verb} {args.id}: {row.teammate or row.session_id} {'runs' if reply == 'once' else 'may not run'} "
          f"{' '.join(row.what.split())[:80]!r}")
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

    p = add("run", cmd_run, "run the daemon (in the foreground unless --daemon)")
    p.add_argument("--daemon", action="store_true",
                   help="detach into the background (for init systems without a supervisor); needs --pidfile")
    p.add_argument("--pidfile", help="with --daemon: pidfile, locked while the daemon runs")
    p.add_argument("--log-file", default=DEFAULT_LOG_FILE,
                   help=f"with --daemon: where the log goes (default {DEFAULT_LOG_FILE})")
    add("check-config", cmd_check_config, "validate the config file and summarise it")
    p = add("init-config", cmd_init_config, "write a starting config file (never over an existing one)")
    p.set_defaults(config=None)
    p.add_argument("--server-url", help="the opencode serve to watch (default http://127.0.0.1:4096)")
    p.add_argument("--teams-dir", help="where claude-teams keeps teams/ (default: that of the shipped opencode-serve "
                   f"service, {SERVE_TEAMS_DIR}; with --user, ~/.claude)")
    p.add_argument("--team", action="append", help="a team to look after (repeat for several; default all)")
    p.add_argument("--ledger", help="the ledger file")
    p.add_argument("--user", action="store_true",
                   help="for a systemd --user service: config under ~/.config, ledger under ~/.local/state")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p = sub.add_parser("config", help="show the effective config, or what every key means")
    config_sub = p.add_subparsers(dest="config_command", required=True)
    p = config_sub.add_parser("show", help="print the effective config as TOML, every default filled in")
    p.add_argument("--config", "-c", default=DEFAULT_CONFIG_PATH, help=f"config file (default {DEFAULT_CONFIG_PATH})")
    p.set_defaults(func=cmd_config_show)
    p = config_sub.add_parser("reference", help="print the configuration reference (Markdown): every key, its "
                              "type, default and meaning")
    p.set_defaults(func=cmd_config_reference)
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
    p = add("pending", cmd_pending, "list the triggers waiting for a prompt, and what holds them back until when")
    p.add_argument("--json", action="store_true")
    p = add("escalations", cmd_escalations, "list what the safety guard escalated and what it did about it")
    p.add_argument("--json", action="store_true")
    p.add_argument("--limit", type=int, default=50)
    p = add("permissions", cmd_permissions, "list the permission requests held for a person (--all: every decision)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--all", action="store_true", help="every recorded request and its decision, not only the held")
    p.add_argument("--limit", type=int, default=50)
    p = add("allow", cmd_allow, "let a held permission request run, once")
    p.add_argument("id", help="the request's ID (per_…), from `orchestratord permissions`")
    p.add_argument("--message", help="a note kept with the answer")
    p = add("deny", cmd_deny, "refuse a held permission request")
    p.add_argument("id", help="the request's ID (per_…), from `orchestratord permissions`")
    p.add_argument("--message", help="told to the teammate with the refusal")
    p = sub.add_parser("ledger", help="check, copy or compact the ledger (safe while the daemon runs)")
    ledger_sub = p.add_subparsers(dest="ledger_command", required=True)
    for name, func, help_ in (
            ("check", cmd_ledger_check, "SQLite's integrity check of the whole ledger"),
            ("backup", cmd_ledger_copy, "write a consistent copy of the ledger to PATH (SQLite's online backup)"),
            ("vacuum", cmd_ledger_copy, "write a compacted copy of the ledger to PATH (VACUUM INTO); swap it in with "
                                        "the daemon stopped")):
        p = ledger_sub.add_parser(name, help=help_)
        p.add_argument("--config", "-c", default=DEFAULT_CONFIG_PATH,
                       help=f"config file (default {DEFAULT_CONFIG_PATH})")
        p.add_argument("--json", action="store_true")
        if name != "check":
            p.add_argument("path", help="where the copy goes (must not exist)")
        p.set_defaults(func=func)
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
    except ConfigError as exc:
        if getattr(args, "json", False):
            return _failed(args, f"{args.config}: {len(exc.problems)} problem(s) in the config",
                           "correct them (orchestratord check-config lists them)", problems=exc.problems)
        # Under systemd (ExecReload= runs check-config) each problem is an error in the journal.
        prefix = "<3>" if logs.under_journal() else ""
        for problem in exc.problems:
            print(prefix + problem, file=sys.stderr)
        return EXIT_ERROR
    except LedgerError as exc:
        from .ledgerwatch import fix_for

        return _failed(args, exc.problem, exc.fix or fix_for(exc.problem))
    except sqlite3.Error as exc:
        path = getattr(args, "ledger_path", None)
        if path is None:
            raise
        return _failed(args, *query_problem(path, exc))


if __name__ == "__main__":
    sys.exit(main())
