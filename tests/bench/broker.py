"""The permission broker's decision time, against the real opencode serve and the scripted model.

A teammate is made as claude-teams makes one (titled ``<name>@<team>``, allowed
everything) and its model runs a long turn of harmless shell commands, one after another,
with a destructive one every tenth. The daemon runs on its default config, talking to the
server through a pass-through proxy. Each request is timed from the server's
``permission.asked``, as a reader of the server's stream of its own (in this process) sees
it, to the daemon's reply passing the proxy on its way to the server (the decision); and to
the server's ``permission.replied`` (the echo, which adds the server's own handling of the
reply, about 10 ms on the 2-core machine); and ``session.created`` to the
broker's rules being on the session (the window in which a teammate's first command would
run unasked).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from tests.bench import live
from tests.support.bed import ALLOW_ALL, script_commands
from tests.support.daemon import wait_for
from tests.support.faultproxy import FaultProxy
from tests.support.watch import EventWatch


def commands(n: int) -> list[str]:
    """``n`` commands, one in ten destructive (rejected; harmless here if it ran: no repository); the rest run."""
    return ["git push --force origin main" if i % 10 == 9 else f"echo step {i}" for i in range(n)]


def run(tmp: Path, requests_n: int, say: Callable[[str], None]) -> dict[str, Any]:
    with live.Live(tmp) as bed:
        # The daemon talks to the server through a pass-through proxy that times each reply
        # on its way: the decision is from the server's permission.asked to that moment.
        proxy = FaultProxy(bed.server.port).start()
        live.write_config(bed.config, proxy.url, bed.ledger, bed.teams, extra=live.REACTION_SETTINGS)
        bed.start_daemon(proxy.url)
        watch = EventWatch(bed.server.url)
        try:
            plan = commands(requests_n)
            script_commands(bed.model, "bench broker turn", plan, text="all done", first=True)
            created = time.monotonic()
            sid = bed.server.create_session("worker-1@bench-team", permission=ALLOW_ALL)["id"]
            watch.wait("session.updated", lambda p: _ends_with_ask(p, sid), timeout=30)
            ruled = time.monotonic()
            bed.server.prompt_async(sid, "bench broker turn")
            wait_for(lambda: len(watch.find("permission.replied", lambda p: p.get("sessionID") == sid)) >= requests_n,
                     60 + requests_n, "every request answered")
            asked = {p["id"]: t for t, p in watch.find("permission.asked", lambda p: p.get("sessionID") == sid)}
            answers = {p["requestID"]: (t, p.get("reply")) for t, p in
                       watch.find("permission.replied", lambda p: p.get("sessionID") == sid)}
            with proxy.lock:
                sent = dict(proxy.replies)
        finally:
            watch.stop()
            if bed.daemon is not None:
                bed.stop_daemon()
            proxy.stop()
        say(f"broker: {len(answers)} requests answered")
    decided = [sent[rid] - t for rid, t in asked.items() if rid in sent]
    echoed = [answers[rid][0] - t for rid, t in asked.items() if rid in answers]
    replies = [reply for _, reply in answers.values()]
    return {"requests": len(decided), "decision": live.percentiles(decided), "echo": live.percentiles(echoed),
            "rejected": replies.count("reject"), "approved": replies.count("once"),
            "session_to_rules_ms": round((ruled - created) * 1000, 1)}


def _ends_with_ask(props: dict[str, Any], sid: str) -> bool:
    info = props.get("info") or {}
    rules = info.get("permission") or []
    return info.get("id") == sid and bool(rules) and rules[-1].get("action") == "ask"
