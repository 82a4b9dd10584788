"""What only the machine can tell about a config: the files, directories and port it names.

``check-config`` runs these after the file's own validation, as whoever runs it: under
systemd that is ``ExecReload=``, as the service's user inside its sandbox, so a reload
fails on what the start would refuse (a password file it cannot read, a ledger directory
it cannot write, a metrics port in use) and on a teams directory that is not there.
Each problem is ``(key, message)``; a key already in error is not looked at again.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from typing import Any, Callable

from .config import MISSING_TEAMS_FIX, Config
from .ledger import SCHEMA_VERSION, Ledger, LedgerError, unreadable, version_problem
from .opencode import read_password

Problems = list[tuple[str, str]]


def environment(running: Callable[[Config], dict[str, Any] | None] = lambda cfg: None
                ) -> Callable[[Config, Callable[..., bool]], Problems]:
    """The check for :func:`orchestratord.config.load_config`; ``running`` finds the live daemon's state, if any."""
    def check(cfg: Config, clean: Callable[..., bool]) -> Problems:
        found: Problems = []
        if clean("server.password_file"):
            found += password_problems(cfg)
        if clean("teams.base_dir"):
            found += teams_problems(cfg.teams.base_dir)
        if clean("ledger.path"):
            found += ledger_problems(cfg.ledger.path)
        if clean("metrics.listen") and cfg.metrics.listen:
            found += port_problems(cfg.metrics.listen, running(cfg))
        return found
    return check


def password_problems(cfg: Config) -> Problems:
    """The password file, or the systemd credential, must be readable: the start reads it."""
    try:
        read_password(cfg.server.password_file)
    except OSError as exc:
        path = cfg.server.password_file or os.path.join(os.environ.get("CREDENTIALS_DIRECTORY", ""), "opencode-password")
        what = "" if cfg.server.password_file else " (the systemd credential opencode-password)"
        return [("server.password_file", f"cannot read {path}{what}: {exc.strerror or exc}; fix the path or let "
                 "the daemon's user read it (systemd: LoadCredential=opencode-password:/path/to/file)")]
    return []


def teams_problems(base_dir: str) -> Problems:
    """The teams directory must exist and be readable; its ``teams/`` appears with the first team."""
    try:
        st = os.stat(base_dir)
    except FileNotFoundError:
        return [("teams.base_dir", f"{base_dir} does not exist; {MISSING_TEAMS_FIX}")]
    except OSError as exc:
        return [("teams.base_dir", f"{base_dir}: {exc.strerror or exc}; let the daemon's user reach it")]
    if not stat.S_ISDIR(st.st_mode):
        return [("teams.base_dir", f"{base_dir} is not a directory")]
    for path in (base_dir, os.path.join(base_dir, "teams")):
        if os.path.isdir(path) and not os.access(path, os.R_OK | os.X_OK):
            return [("teams.base_dir", f"{path} is not readable by this user; give the daemon's user read "
                     "access (the same user as the server, or its group)")]
    return []


def ledger_problems(path: str) -> Problems:
    """A directory the daemon can write its ledger (and -wal, -shm) in, and a ledger it would open."""
    directory = os.path.dirname(os.path.abspath(path))
    existing = directory
    while not os.path.exists(existing):  # the daemon makes the missing directories
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == directory else f" (it would be made in {existing})"
        return [("ledger.path", f"the directory {directory} is not writable by this user{where}; SQLite writes "
                 "-wal and -shm files beside the ledger: make it writable (systemd: StateDirectory=) or change "
                 "ledger.path")]
    if not os.path.lexists(path):
        return []  # the daemon creates it
    trouble = unreadable(path)
    if trouble is None and not os.access(path, os.W_OK):
        trouble = (f"ledger {path} is not writable by this user", "give the file to the daemon's user "
                   "(chown opencode-orchestrator), or change ledger.path")
    if trouble is None:
        trouble = _refused(path)
    return [("ledger.path", f"{trouble[0]}; {trouble[1]}")] if trouble else []


def _refused(path: str) -> tuple[str, str] | None:
    """Why the start would refuse the ledger at ``path``, found cheaply (its header and schema)."""
    try:
        ledger = Ledger(path, readonly=True)
    except LedgerError as exc:
        # An empty file is no refusal: the start sets the ledger up in it.
        return None if "no daemon has written it" in exc.problem else (exc.problem, exc.fix or "")
    try:
        version = ledger.db.execute("PRAGMA user_version").fetchone()[0]
        return version_problem(path, version, 1) if version > SCHEMA_VERSION else None
    finally:
        ledger.close()


def port_problems(listen: str, running: dict[str, Any] | None) -> Problems:
    """``metrics.listen`` must be free to bind, unless the running daemon holds it at that same address."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return [("metrics.listen", f"{host} is not an address of this machine: {exc.strerror}")]
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the metrics server binds
        sock.bind(addr)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE and running is not None and running.get("metrics_listen") == listen:
            return []  # the daemon being reloaded serves its metrics there
        if exc.errno == errno.EADDRINUSE:
            return [("metrics.listen", f"{listen} is in use by another program; choose a free port")]
        return [("metrics.listen", f"cannot listen on {listen}: {exc.strerror or exc}")]
    finally:
        sock.close()
    return []
