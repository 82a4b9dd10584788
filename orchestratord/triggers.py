"""Rules from the config that turn server events into triggers for the dispatcher.

A rule names an event type (a glob) and expected values for dotted paths into the
event's properties; string values are globs and lists mean "any of". ``sessions`` says
whether the event must come from a session other than the orchestrator's own, from it,
or from any.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Protocol

from .jsonvalues import as_dict
from .sessions import SessionInfo
from .stream import Event
from .teammsg import call_ckey, text_key


class Rule(Protocol):
    """A trigger rule as the matcher reads it (``config.TriggerRule``, frozen, is one)."""

    @property
    def name(self) -> str: ...
    @property
    def event(self) -> str: ...
    @property
    def match(self) -> Mapping[str, Any]: ...
    @property
    def sessions(self) -> str: ...
    @property
    def enabled(self) -> bool: ...
    @property
    def description(self) -> str: ...


_MISSING = object()


def get_path(obj: Any, path: str) -> Any:
    """The value at a dotted path (``part.state.status``), or a sentinel when absent."""
    for key in path.split("."):
        if isinstance(obj, dict) and key in obj:
            obj = obj[key]
        else:
            return _MISSING
    return obj


def _value_matches(actual: Any, expected: Any) -> bool:
    if actual is _MISSING:
        return False
    if isinstance(expected, (list, tuple)):
        return any(_value_matches(actual, e) for e in expected)
    if isinstance(expected, bool) or isinstance(actual, bool):
        return actual is expected if isinstance(expected, bool) else False
    if isinstance(expected, str):
        return isinstance(actual, str) and fnmatch.fnmatchcase(actual, expected)
    return bool(actual == expected)


def rule_matches(rule: Rule, event: Event, own_session: str | None) -> bool:
    if not rule.enabled or not fnmatch.fnmatchcase(event.type, rule.event):
        return False
    if rule.sessions == "others" and (event.session_id is None or event.session_id == own_session):
        return False
    if rule.sessions == "own" and (own_session is None or event.session_id != own_session):
        return False
    return all(_value_matches(get_path(event.properties, path), expected) for path, expected in rule.match.items())


@dataclass(frozen=True)
class Match:
    """A rule that matched an event, with what the prompt should say about it."""

    rule: str
    kind: str
    dedup: str
    detail: str
    team: str | None
    teammate: str | None
    ckey: str | None = None
    tkey: str | None = None  # a message's text key (see teammsg.text_key)


def describe(rule: Rule, event: Event, session: SessionInfo | None = None) -> Match:
    """Turn a matched event into the words the prompt will carry and a dedup key.

    The dedup key is the event's own identity (a tool part's ID and status, or the event
    ID), so the same fact seen twice (a replay after reconnect) is one trigger. The
    teammate is named by its session's title (``worker-1@my-team`` is worker-1 of my-team),
    never by what a call's arguments claim.
    """
    props = event.properties
    part = props.get("part") if isinstance(props.get("part"), dict) else None
    team = teammate = None
    words = rule.description or f"event {event.type}"
    if part and part.get("type") == "tool":
        tool = str(part.get("tool", ""))
        state = as_dict(part.get("state"))
        inp = as_dict(state.get("input"))
        team = _str(inp.get("team_name"))
        teammate = None if session is not None and session.teammate else (
            _str(inp.get("sender")) or _str(inp.get("from")))
        recipient = _str(inp.get("recipient"))
        summary = _str(inp.get("summary")) or _str(inp.get("content"))
        bits = [f"tool {tool}"]
        if team:
            bits.append(f"team {team}")
        if recipient:
            bits.append(f"to {recipient}")
        if summary:
            bits.append(f'"{_shorten(summary, 120)}"')
        words += " (" + ", ".join(bits) + ")"
        dedup = f"{rule.name}:{part.get('id')}:{state.get('status')}"
        ckey = call_ckey(tool, inp)
        content = inp.get("content")
        tkey = text_key(content) if ckey and isinstance(content, str) and (inp.get("type") or "message") in (
            "message", "broadcast") else None
    else:
        ckey = tkey = None
        dedup = f"{rule.name}:{event.id}" if event.id else f"{rule.name}:{event.type}:{event.session_id}:{id(event)}"
        if event.type == "session.error":
            err = props.get("error")
            if isinstance(err, dict):
                name = err.get("name") or ""
                data = as_dict(err.get("data"))
                msg = data.get("message") or ""
                words += f" ({_shorten(f'{name}: {msg}'.strip(': '), 160)})"
    title = session.title if session is not None else None
    mate = session.teammate if session is not None else None
    if mate is not None:
        teammate, team = mate.name, team or mate.team
    elif title and not teammate:
        teammate = title
    where = f"session {event.session_id}" if event.session_id else "the server"
    if title:
        where += f" ({title})"
    return Match(rule=rule.name, kind="event", dedup=dedup, detail=f"{words} in {where} [{event.type}]",
                 team=team, teammate=teammate, ckey=ckey, tkey=tkey)


def match_all(rules: Iterable[Rule], event: Event, own_session: str | None,
              session_of: Callable[[str], SessionInfo | None] | None = None) -> list[Match]:
    """Every rule that matches ``event``; ``session_of`` tells who a session is (its teammate)."""
    matched = [r for r in rules if rule_matches(r, event, own_session)]
    if not matched:
        return []
    info = session_of(event.session_id) if session_of and event.session_id else None
    return [describe(r, event, info) for r in matched]


class RuleSet:
    """The rules of one reader, with the rules that can fire for each event type worked out once.

    Matches exactly what :func:`match_all` matches; the glob on the event type is tried
    once per type instead of once per event and rule.
    """

    def __init__(self, rules: Iterable[Rule]) -> None:
        self.rules = [r for r in rules if r.enabled]
        self._by_type: dict[str, list[Rule]] = {}

    def for_type(self, etype: str) -> list[Rule]:
        found = self._by_type.get(etype)
        if found is None:
            found = [r for r in self.rules if fnmatch.fnmatchcase(etype, r.event)]
            if len(self._by_type) < 1024:  # a server inventing types cannot grow this without bound
                self._by_type[etype] = found
        return found

    def match(self, event: Event, own_session: str | None,
              session_of: Callable[[str], SessionInfo | None] | None = None) -> list[Match]:
        candidates = self.for_type(event.type)
        if not candidates:
            return []
        return match_all(candidates, event, own_session, session_of)


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _shorten(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
