"""Escalation hooks: a command fed the escalation as JSON, or a webhook POST.

A hook runs in a thread of its own and is never waited for: one that hangs, fails or
points at a dead URL costs a log line, not a delayed guard. Commands run in their own
process group so a timeout (or the daemon stopping) kills everything they started.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
import time
from typing import Any, Callable, Sequence

import requests

from . import logs

MAX_RUNNING = 32


class Hooks:
    """Fire-and-forget runner for the configured ``[[safety.hooks]]``."""

    def __init__(self, hooks: Sequence[Any], log: logging.Logger | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.hooks = tuple(hooks)
        self.log = log or logs.get("hooks")
        self.sleep = sleep
        self._lock = threading.Lock()
        self._running = 0
        self._procs: set[subprocess.Popen[bytes]] = set()
        self._closed = False

    def fire(self, payload: dict[str, Any]) -> None:
        """Start every hook for ``payload``; returns at once."""
        body = json.dumps(payload, sort_keys=True).encode()
        for hook in self.hooks:
            with self._lock:
                if self._closed:
                    return
                if self._running >= MAX_RUNNING:
                    self.log.error(logs.kv("hook-skipped", hook=hook.name, escalation=payload.get("id"),
                                           reason=f"{MAX_RUNNING} hooks still running",
                                           fix="shorten the hooks' timeout_seconds or make them faster"))
                    continue
                self._running += 1
            threading.Thread(target=self._run, args=(hook, body, payload.get("id")), name=f"hook-{hook.name}",
                             daemon=True).start()

    def close(self) -> None:
        """Stop starting hooks and kill the commands still running."""
        with self._lock:
            self._closed = True
            procs = list(self._procs)
        for proc in procs:
            _kill_group(proc)

    def running(self) -> int:
        with self._lock:
            return self._running

    def _run(self, hook: Any, body: bytes, escalation: Any) -> None:
        try:
            if hook.command:
                self._command(hook, body, escalation)
            if hook.url:
                self._webhook(hook, body, escalation)
        except Exception as exc:  # a hook must never take a thread of the daemon down with it
            self.log.error(logs.kv("hook-failed", hook=hook.name, escalation=escalation,
                                   error=f"{type(exc).__name__}: {exc}"))
        finally:
            with self._lock:
                self._running -= 1

    def _command(self, hook: Any, body: bytes, escalation: Any) -> None:
        try:
            proc = subprocess.Popen(list(hook.command), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, start_new_session=True, close_fds=True)
        except OSError as exc:
            self.log.error(logs.kv("hook-failed", hook=hook.name, escalation=escalation, command=hook.command[0],
                                   error=exc.strerror or str(exc), fix="check safety.hooks command"))
            return
        with self._lock:
            self._procs.add(proc)
        try:
            try:
                _, err = proc.communicate(body, timeout=hook.timeout_seconds)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                proc.communicate()
                self.log.error(logs.kv("hook-timeout", hook=hook.name, escalation=escalation,
                                       seconds=f"{hook.timeout_seconds:g}", action="killed",
                                       fix="make the hook faster or raise its timeout_seconds"))
                return
        finally:
            with self._lock:
                self._procs.discard(proc)
        if proc.returncode != 0:
            tail = (err or b"").decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
            self.log.error(logs.kv("hook-failed", hook=hook.name, escalation=escalation, exit=proc.returncode,
                                   stderr=tail[0][:200] or None))
        else:
            self.log.info(logs.kv("hook-done", hook=hook.name, escalation=escalation))

    def _webhook(self, hook: Any, body: bytes, escalation: Any) -> None:
        error = ""
        for attempt in range(hook.retries + 1):
            if attempt:
                self.sleep(min(5.0, 0.5 * 2 ** (attempt - 1)))
            try:
                resp = requests.post(hook.url, data=body, timeout=hook.timeout_seconds,
                                     headers={"Content-Type": "application/json",
                                              "User-Agent": "orchestratord"})
            except requests.RequestException as exc:
                error = f"{type(exc).__name__}: {str(exc)[:160]}"
                continue
            if resp.status_code < 300:
                self.log.info(logs.kv("hook-done", hook=hook.name, escalation=escalation, status=resp.status_code))
                return
            error = f"HTTP {resp.status_code}"
            if resp.status_code < 500 and resp.status_code != 429:
                break  # the receiver refused it; asking again will not help
        self.log.error(logs.kv("hook-failed", hook=hook.name, escalation=escalation, url=hook.url, error=error,
                               attempts=attempt + 1, fix="check safety.hooks url and that the receiver is up"))


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
