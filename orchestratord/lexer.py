"""The words of a shell command line: quotes, escapes, operators, redirections, heredocs.

The first half of reading a command the way the shell does (:mod:`.shell` is the
second): text becomes words with their quotes and escapes removed (``r''m``, ``\\rm``,
``$'\\x72m'`` are all ``rm``), with ``$VAR`` and ``$(…)`` kept as written and the scripts
of command substitutions set aside to be read in turn; operators; and redirections,
heredoc bodies and here-strings attached. It never raises: what it cannot read (an
unclosed quote) it names in ``problems``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

OPS = ("&&", "||", ";;&", ";;", ";&", "|&", "&", "|", ";", "(", ")")
REDIRS = ("<<<", "<<-", "<<", "&>>", "&>", ">>", ">&", "<&", "<>", ">|", "<", ">")
HEREDOCS = ("<<", "<<-")
_BREAK = set(" \t\r\n;&|()<>")
_FD = re.compile(r"\d*")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9@*#?$!-]")
_ANSI = re.compile(r"x([0-9a-fA-F]{1,2})|u([0-9a-fA-F]{1,4})|U([0-9a-fA-F]{1,8})|([0-7]{1,3})|c(.)", re.S)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "a": "\a", "b": "\b", "e": "\x1b", "E": "\x1b", "f": "\f",
            "v": "\v", "\\": "\\", "'": "'", '"': '"', "?": "?"}


@dataclass
class Word:
    """A word as the program receives it, or as written where that depends on run time ($HOME)."""

    text: str = ""
    quoted: bool = False  # some of it was quoted or escaped: never a keyword
    plain: int = -1  # how many leading characters were unquoted (-1: all)
    subs: list[str] = field(default_factory=list)  # the scripts of its $(…), `…`, <(…), >(…)


@dataclass
class Redirect:
    """``>file``, ``<file``, a heredoc or a here-string; what a program reads or writes besides its words."""

    op: str
    target: str = ""
    body: str | None = None  # a heredoc's lines, a here-string's word
    subs: list[str] = field(default_factory=list)


Token = tuple[str, object]  # ("w", Word) | ("op", str) | ("r", Redirect)


# -- words and operators -----------------------------------------------------------------

def close_of(s: str, i: int, opening: str = "(", closing: str = ")") -> int:
    """The index of the ``closing`` that ends a group opened just before ``i``; -1 if none."""
    depth, n = 1, len(s)
    while i < n:
        c = s[i]
        if c == "\\":
            i += 2
            continue
        if c == "'" or c == "`":
            j = s.find(c, i + 1)
            if j < 0:
                return -1
            i = j
        elif c == '"':
            i += 1
            while i < n and s[i] != '"':
                i += 2 if s[i] == "\\" else 1
        elif c == opening:
            depth += 1
        elif c == closing:
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return -1


def substitutions(text: str) -> list[str]:
    """The scripts of the ``$(…)`` and backticks in text the shell expands (a heredoc's body)."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
        elif text.startswith("$(", i):
            end = close_of(text, i + 2)
            end = n if end < 0 else end
            if not text.startswith("$((", i):
                out.append(text[i + 2:end])
            i = end + 1
        elif c == "`":
            end = text.find("`", i + 1)
            end = n if end < 0 else end
            out.append(text[i + 1:end])
            i = end + 1
        else:
            i += 1
    return out


def _ansi_c(s: str, i: int) -> tuple[str, int]:
    """The value of ``$'…'`` whose body starts at ``i``, and the index after its quote."""
    out, n = [], len(s)
    while i < n and s[i] != "'":
        if s[i] != "\\" or i + 1 >= n:
            out.append(s[i])
            i += 1
            continue
        c = s[i + 1]
        m = _ANSI.match(s, i + 1)
        if c in _ESCAPES:
            out.append(_ESCAPES[c])
            i += 2
        elif m:
            hexa = m.group(1) or m.group(2) or m.group(3)
            if m.group(5):
                out.append(chr(ord(m.group(5)) & 0x1F))
            else:
                code = int(hexa, 16) if hexa else int(m.group(4), 8)
                out.append(chr(code) if code < 0x110000 else "?")
            i = m.end()
        else:
            out.append("\\" + c)
            i += 2
    return "".join(out), i + 1


class Lexer:
    def __init__(self, text: str) -> None:
        self.s, self.i = text, 0
        self.tokens: list[Token] = []
        self.pending: list[tuple[Redirect, str, bool, bool]] = []  # heredoc, delimiter, strip tabs, expands
        self.problems: list[str] = []

    def run(self) -> Lexer:
        s, n = self.s, len(self.s)
        while self.i < n:
            c = s[self.i]
            if c in " \t\r":
                self.i += 1
            elif c == "\\" and s.startswith("\n", self.i + 1):
                self.i += 2
            elif c == "\n":
                self.i += 1
                self.tokens.append(("op", "\n"))
                self._bodies()
            elif c == "#":
                end = s.find("\n", self.i)
                self.i = n if end < 0 else end
            elif s.startswith(("<(", ">("), self.i) or not self._redirect():
                if c in ";&|()":
                    op = next(o for o in OPS if s.startswith(o, self.i))
                    self.tokens.append(("op", op))
                    self.i += len(op)
                else:
                    word = self._word()
                    if word is None:  # nothing readable here: step over it
                        self.i += 1
                    else:
                        self.tokens.append(("w", word))
        return self

    def _redirect(self) -> bool:
        s = self.s
        m = _FD.match(s, self.i)
        j = m.end() if m else self.i
        op = next((r for r in REDIRS if s.startswith(r, j)), None)
        if op is None or (j > self.i and op.startswith("&")):
            return False
        self.i = j + len(op)
        while self.i < len(s) and s[self.i] in " \t":
            self.i += 1
        target = self._word()
        r = Redirect(op, target.text if target else "")
        if target is None:
            self.problems.append(f"{op} without a target")
        elif op in HEREDOCS:
            self.pending.append((r, target.text, op == "<<-", not target.quoted))
        else:
            r.subs = target.subs
            if op == "<<<":
                r.body = target.text + "\n"
        self.tokens.append(("r", r))
        return True

    def _bodies(self) -> None:
        """The heredocs opened on the line just ended start on the next one."""
        s, n = self.s, len(self.s)
        for r, delimiter, strip, expands in self.pending:
            lines = []
            while self.i < n:
                end = s.find("\n", self.i)
                end = n if end < 0 else end
                line = s[self.i:end].rstrip("\r")
                self.i = end + 1
                if (line.lstrip("\t") if strip else line) == delimiter:
                    break
                lines.append(line)
            r.body = "\n".join(lines) + "\n"
            if expands:
                r.subs = substitutions(r.body)
        self.pending = []

    def _word(self) -> Word | None:
        s, n = self.s, len(self.s)
        start = self.i
        w, text = Word(), list[str]()
        while self.i < n:
            c = s[self.i]
            if c in "<>" and s.startswith("(", self.i + 1):
                self._group(w, text, self.i + 2)
                continue
            if c in _BREAK:
                break
            if c in "\\'\"" and w.plain < 0:
                w.plain = len("".join(text))
            if c == "\\":
                if s.startswith("\n", self.i + 1):
                    self.i += 2
                    continue
                text.append(s[self.i + 1:self.i + 2])
                w.quoted = True
                self.i += 2
            elif c == "'":
                end = s.find("'", self.i + 1)
                if end < 0:
                    self.problems.append("a quote is not closed")
                    end = n
                text.append(s[self.i + 1:end])
                w.quoted = True
                self.i = end + 1
            elif c == '"':
                self._double(w, text)
            elif c in "$`":
                self._expand(w, text, False)
            else:
                text.append(c)
                self.i += 1
        if self.i == start:
            return None
        w.text = "".join(text)
        return w

    def _double(self, w: Word, text: list[str]) -> None:
        s, n = self.s, len(self.s)
        w.quoted = True
        self.i += 1
        while self.i < n:
            c = s[self.i]
            if c == '"':
                self.i += 1
                return
            if c == "\\" and s[self.i + 1:self.i + 2] in ("$", "`", '"', "\\", "\n"):
                text.append(s[self.i + 1].replace("\n", ""))
                self.i += 2
            elif c in "$`":
                self._expand(w, text, True)
            else:
                text.append(c)
                self.i += 1
        self.problems.append("a double quote is not closed")

    def _expand(self, w: Word, text: list[str], in_double: bool) -> None:
        if self.s[self.i] == "`":
            self._backtick(w, text)
        else:
            self._dollar(w, text, in_double)

    def _group(self, w: Word, text: list[str], body: int) -> None:
        """``$(…)``, ``<(…)``, ``>(…)`` or ``$((…))`` whose inside starts at ``body``."""
        s = self.s
        end = close_of(s, body)
        if end < 0:
            self.problems.append(f"{s[self.i:body]} is not closed")
            end = len(s)
        inner = s[body:end]
        if s.startswith("$((", self.i):
            w.subs.extend(substitutions(inner))  # arithmetic: only its own substitutions run
        else:
            w.subs.append(inner)
        text.append(s[self.i:end + 1])
        self.i = end + 1

    def _dollar(self, w: Word, text: list[str], in_double: bool) -> None:
        s, i = self.s, self.i
        nxt = s[i + 1:i + 2]
        if nxt == "(":
            self._group(w, text, i + 2)
        elif nxt == "{":
            end = close_of(s, i + 2, "{", "}")
            end = len(s) if end < 0 else end
            w.subs.extend(substitutions(s[i + 2:end]))
            text.append(s[i:end + 1])
            self.i = end + 1
        elif nxt == "'" and not in_double:
            value, self.i = _ansi_c(s, i + 2)
            text.append(value)
            w.quoted = True
        elif nxt == '"' and not in_double:
            self.i += 1  # $"…" is a double-quoted string
        else:
            m = _NAME.match(s, i + 1)
            end = m.end() if m else i + 1
            text.append(s[i:end])
            self.i = end

    def _backtick(self, w: Word, text: list[str]) -> None:
        s = self.s
        j = self.i + 1
        while j < len(s) and s[j] != "`":
            j += 2 if s[j] == "\\" else 1
        if j >= len(s):
            self.problems.append("a backtick is not closed")
        inner = re.sub(r"\\([\\`$])", r"\1", s[self.i + 1:j])
        w.subs.append(inner)
        text.append(f"`{inner}`")
        self.i = j + 1


def words(text: str) -> list[str]:
    """Just the words of ``text`` (an ``env -S`` string, a here-string fed to ``xargs``)."""
    return [t.text for kind, t in Lexer(text).run().tokens if kind == "w" and isinstance(t, Word)]
