"""A realistic event stream for the benchmarks, built from a recorded opencode stream.

One *turn* is the recorded ``/global/event`` stream of opencode 1.18.33 (a session's
creation, prompt cycles with tool calls, sync events, heartbeats), minus the startup-only
``plugin.added`` frames and the ``server.connected`` frame the replay server sends itself.
Each ``message.part.delta`` frame in it is repeated, as a long streamed answer does, so
deltas are the bulk of the stream. Turns are repeated with fresh event, part and message
IDs (same length as the originals), so every event is distinct and triggers are not
deduplicated away; sessions stay the same, as in a long-running team.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from tests.support.reference import reference_dir

REFERENCE_STREAM = "global-event-stream.sse"
DELTA_COPIES = 60
_ID = re.compile(r"\b(evt|prt|msg)_([0-9a-f]{12})([0-9A-Za-z]{14})\b")
_B62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_MARK = "\x00"


def b62(n: int, width: int) -> str:
    out = ""
    for _ in range(width):
        n, r = divmod(n, 62)
        out = _B62[r] + out
    return out


def _type_of(data: str) -> str:
    obj = json.loads(data)
    return str(obj.get("payload", obj).get("type"))


@dataclass(frozen=True)
class Corpus:
    """The template of one turn and what it holds."""

    template: str  # frames, ``data: ...\\n\\n`` each, with a marker where a turn's number goes
    frames: int  # per turn
    deltas: int  # per turn
    syncs: int  # per turn (not counted in the daemon's events_total)

    def turn(self, n: int) -> bytes:
        return self.template.replace(_MARK, b62(n, 3)).encode()

    def turn_chunked(self, n: int) -> bytes:
        """A turn in HTTP chunked framing, one event per chunk, as opencode sends its stream."""
        return b"".join(chunk(frame + b"\n\n") for frame in self.turn(n).split(b"\n\n")[:-1])

    def turns_for(self, events: int) -> int:
        return -(-events // self.frames)

    def write(self, path: Path, events: int, first_turn: int = 0, coalesced: bool = False) -> int:
        """Write at least ``events`` events (whole turns, chunked) to ``path``; the number written.

        ``coalesced``: a whole turn in one chunk, as a buffering proxy passes the stream on,
        instead of one event per chunk.
        """
        turns = self.turns_for(events)
        with open(path, "wb") as fh:
            for n in range(first_turn, first_turn + turns):
                fh.write(chunk(self.turn(n)) if coalesced else self.turn_chunked(n))
        return turns * self.frames


def chunk(data: bytes) -> bytes:
    """``data`` as one HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def load(delta_copies: int = DELTA_COPIES) -> Corpus:
    path = reference_dir() / REFERENCE_STREAM
    raw = path.read_text()
    datas = [line[6:] for line in raw.splitlines() if line.startswith("data: ")]
    frames: list[str] = []
    deltas = syncs = 0
    for data in datas:
        etype = _type_of(data)
        if etype in ("plugin.added", "server.connected"):
            continue
        copies = delta_copies if etype == "message.part.delta" else 1
        for copy in range(copies):
            # The copy number goes in the event ID, the turn number (the marker) in every ID.
            text = data
            if copies > 1:
                text = _ID.sub(lambda m: m.group(0) if m.group(1) != "evt" else
                               f"{m.group(1)}_{m.group(2)}{m.group(3)[:8]}{b62(copy, 3)}{m.group(3)[11:]}", text)
            frames.append(f"data: {text}\n\n")
            deltas += etype == "message.part.delta"
            syncs += etype == "sync"
    template = _ID.sub(lambda m: f"{m.group(1)}_{m.group(2)}{m.group(3)[:11]}{_MARK}", "".join(frames))
    return Corpus(template=template, frames=len(frames), deltas=deltas, syncs=syncs)
