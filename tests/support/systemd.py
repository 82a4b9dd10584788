"""A real systemd 252, booted as PID 1 of its own PID, mount, cgroup and UTS namespaces.

The machine's systemd is not PID 1 (or not ours to touch), so tests boot one of their
own: ``sdboot.sh`` (next to this file) hides everything a booting systemd would change
(see its header) and boots a target that starts only the journal. ``systemctl`` and
``journalctl`` run inside through ``nsenter``. At the end the namespace is powered off
(or, failing that, its PID 1 killed, which ends every process in it) and the cgroups it
left are removed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.support.daemon import wait_for

SDBOOT = Path(__file__).resolve().parent / "sdboot.sh"
SYSTEMD = Path("/lib/systemd/systemd")


def cgroup2_root() -> Path | None:
    """Where the cgroup2 hierarchy is mounted (hybrid: /sys/fs/cgroup/unified)."""
    for path in (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup")):
        if (path / "cgroup.procs").exists() and (path / "cgroup.subtree_control").exists():
            return path
    return None


def why_not() -> str | None:
    """Why systemd cannot be booted here, or None when it can."""
    if os.geteuid() != 0:
        return "booting systemd in namespaces needs root"
    for tool in ("unshare", "nsenter", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} (util-linux) is not installed"
    if not SYSTEMD.exists():
        return f"systemd is not installed ({SYSTEMD} is missing)"
    if cgroup2_root() is None:
        return "no cgroup2 hierarchy under /sys/fs/cgroup"
    probe = subprocess.run(["unshare", "--mount", "--pid", "--fork", "--cgroup", "--uts", "true"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return f"cannot create namespaces: {probe.stderr.strip()}"
    return None


class BootedSystemd:
    """One booted systemd; ``share`` is visible inside at the same path."""

    def __init__(self, share: Path) -> None:
        self.share = share
        self.console = share / "console.log"
        self.out = share / "sdboot.out"
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None  # systemd, PID 1 inside, as seen from here
        root = cgroup2_root()
        assert root is not None
        own = next((line.split("::", 1)[1].strip() for line in Path("/proc/self/cgroup").read_text().splitlines()
                    if line.startswith("0::")), "/")
        self.cgroup = root / own.lstrip("/") / f"orchestratord-test-{os.getpid()}-{time.monotonic_ns()}"

    # -- boot and power-off ---------------------------------------------------------------

    def boot(self, timeout: float = 60.0) -> "BootedSystemd":
        self.cgroup.mkdir()
        with open(self.out, "wb") as out:
            # The shell moves itself into the fresh cgroup, which becomes the namespace's root.
            self.proc = subprocess.Popen(
                ["sh", "-c", 'echo $$ > "$1/cgroup.procs" && exec unshare --mount --pid --fork --cgroup --uts '
                 'sh "$2" "$3" "$4"', "sh", str(self.cgroup), str(SDBOOT), str(self.share),
                 str(Path(__file__).resolve().parents[2])],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = wait_for(self._init_pid, 20, "systemd to start in the namespace")
        try:
            state = wait_for(lambda: self._booted(), timeout, "systemd to finish booting")
        except AssertionError:
            raise AssertionError(f"systemd did not boot:\n{self.out.read_text(errors='replace')}\n"
                                 f"{self.console.read_text(errors='replace')[-3000:]}") from None
        if state != "running":
            failed = self.run("systemctl", "--failed", "--no-pager").stdout
            raise AssertionError(f"systemd booted {state}:\n{failed}")
        return self

    def _init_pid(self) -> int | None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"the namespace ended at once:\n{self.out.read_text(errors='replace')}")
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            comm = Path(f"/proc/{children[0]}/comm").read_text().strip() if children else ""
        except OSError:
            return None
        return int(children[0]) if comm == "systemd" else None

    def _booted(self) -> str | None:
        r = self.run("systemctl", "is-system-running", timeout=10)
        state = r.stdout.strip()
        return state if state in ("running", "degraded") else None

    def poweroff(self, timeout: float = 30.0) -> None:
        """Power the namespace off; kill its PID 1 if it does not go; remove its cgroups."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.run("systemctl", "--no-block", "poweroff", timeout=10)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    if self.pid is not None:
                        os.kill(self.pid, signal.SIGKILL)  # PID 1 of the namespace: takes all of it
                    self.proc.wait(10)
        finally:
            self._remove_cgroups()

    def _remove_cgroups(self) -> None:
        if not self.cgroup.exists():
            return

        def rmdir_all() -> bool:
            for path in sorted((p for p in self.cgroup.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                try:
                    path.rmdir()
                except OSError:
                    return False
            try:
                self.cgroup.rmdir()
            except OSError:
                return False
            return True

        wait_for(rmdir_all, 10, f"the namespace's cgroups under {self.cgroup} to empty")

    # -- inside -----------------------------------------------------------------------------

    def run(self, *cmd: str, timeout: float = 60.0, env: dict[str, str] | None = None,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside (mount, PID and UTS namespaces of systemd)."""
        assert self.pid is not None
        prefix = ["nsenter", "-t", str(self.pid), "-m", "-p", "-u", "--"]
        environ = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
                   "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0", **(env or {})}
        return subprocess.run(prefix + list(cmd), capture_output=True, text=True, timeout=timeout, env=environ,
                              input=input)

    def check(self, *cmd: str, **kw: Any) -> str:
        r = self.run(*cmd, **kw)
        if r.returncode != 0 and cmd[:1] == ("systemctl",):
            tail = self.run("journalctl", "-n", "25", "--no-pager", "-o", "cat")
            raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}\n"
                                 f"journal:\n{tail.stdout}")
        assert r.returncode == 0, f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
        return r.stdout

    def path(self, inside: str) -> Path:
        """A path inside, reachable from here (through /proc/<pid>/root)."""
        return Path(f"/proc/{self.pid}/root") / inside.lstrip("/")

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.check("systemctl", "show", unit, "--property", ",".join(props))
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *args: str) -> list[dict[str, Any]]:
        out = self.check("journalctl", "--no-pager", "-o", "json", *args)
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def messages(self, *args: str) -> list[str]:
        return [str(e.get("MESSAGE", "")) for e in self.journal(*args)]
