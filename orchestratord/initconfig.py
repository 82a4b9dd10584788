"""``orchestratord init-config``: a short starting config that passes ``check-config``.

It sets only what differs between machines (the server, the teams, the ledger); every
other key keeps its default, which ``orchestratord config show`` prints and
``orchestratord config reference`` explains. It never replaces an existing file unless told to.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from .config import DEFAULT_CONFIG_PATH, SERVE_TEAMS_DIR, Config, parse_config

USER_CONFIG = "~/.config/opencode-orchestrator/orchestrator.toml"
USER_LEDGER = "~/.local/state/opencode-orchestrator/ledger.sqlite3"

HEADER = """\
# orchestratord configuration, written by `orchestratord init-config`.
#
# Only the settings that differ between machines are here; every other key has its
# default. `orchestratord config show --config {path}` prints the effective config with
# every key, and `orchestratord config reference` explains each one.
# Check a change with `orchestratord check-config --config {path}`, then apply it with
# `systemctl reload {unit}` (or SIGHUP).

"""


@dataclass(frozen=True)
class InitOptions:
    server_url: str | None = None
    teams_dir: str | None = None
    teams: tuple[str, ...] = ()
    ledger: str | None = None
    user: bool = False

    def default_path(self) -> str:
        return os.path.expanduser(USER_CONFIG) if self.user else DEFAULT_CONFIG_PATH

    def values(self) -> dict[str, Any]:
        defaults = Config()
        ledger = self.ledger or (os.path.expanduser(USER_LEDGER) if self.user else defaults.ledger.path)
        return {
            "server": {"url": self.server_url or defaults.server.url},
            "ledger": {"path": os.path.abspath(os.path.expanduser(ledger))},
            # A person's own teams for a --user service; those of the shipped opencode-serve.service otherwise.
            "teams": {"base_dir": self.teams_dir or (defaults.teams.base_dir if self.user else SERVE_TEAMS_DIR),
                      "names": list(self.teams)},
        }


def render(path: str, opts: InitOptions) -> str:
    """The file's text; raises ConfigError if the options make an invalid config."""
    unit = "--user opencode-orchestrator" if opts.user else "opencode-orchestrator"
    text = HEADER.format(path=path, unit=unit) + tomli_w.dumps(opts.values())
    parse_config(text, path, Path(path).parent)
    return text


def write_initial(path: str | os.PathLike[str], opts: InitOptions, force: bool = False) -> str:
    """Write the starting config at ``path`` (and its directory); return the absolute path.

    Raises FileExistsError when the file exists and ``force`` is false. The file appears
    whole or not at all.
    """
    target = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    text = render(str(target), opts)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".orchestrator.", suffix=".toml", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        if force:
            os.replace(tmp, target)
        else:
            os.link(tmp, target)  # fails with FileExistsError instead of replacing
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
    return str(target)
