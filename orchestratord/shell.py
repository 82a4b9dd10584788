"""Reading a shell command line as a POSIX shell would, as far as judging it needs.

The guard must tell the words that run from the words that are only data: ``rm -rf /``
in a heredoc fed to ``cat`` or in a commit message runs nothing, the same words after
``$(`` or in a heredoc fed to ``bash`` do. :func:`parse` turns the words of
:mod:`.lexer` into the simple commands a line runs, each with its words, its
redirections (heredoc bodies and here-strings included), the command piped into it and
the directory an earlier ``cd`` on the line moved it to.

It reads the subset of the grammar that decides this (lists, pipelines, subshells,
groups, functions, the compound keywords) and never raises: what it cannot read it
names in ``problems``, and the caller judges those words the cautious way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .lexer import Lexer, Redirect, Token, Word

_ASSIGN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\[[^]]*\])?\+?=")
_SKIPPED = {"if", "then", "else", "elif", "fi", "do", "done", "while", "until", "!"}  # a command follows
MAX_NESTING = 64  # compound commands inside each other that are read as such


@dataclass
class Command:
    """A simple command, and what the line around it says about how it runs."""

    words: list[Word]
    assigns: list[Word]
    redirects: list[Redirect]
    cwd: str | None  # where it runs; None when the line does not say statically
    function: str | None = None  # the function whose body it is (it runs when that is called)
    upstream: Command | None = None  # the command piped into this one
    background: bool = False

    def scripts(self) -> list[str]:
        """The substitutions it runs before it runs."""
        return [s for w in [*self.assigns, *self.words] for s in w.subs] + [s for r in self.redirects for s in r.subs]


@dataclass
class Parsed:
    """The commands of a line in the order they run; what could not be read."""

    commands: list[Command]
    problems: list[str]


# -- commands ------------------------------------------------------------------------------

class _Parser:
    def __init__(self, tokens: list[Token], cwd: str | None, home: str) -> None:
        self.t, self.k = tokens, 0
        self.cwd, self.home = cwd, home
        self.function: str | None = None
        self.nesting = 0
        self.commands: list[Command] = []
        self.problems: list[str] = []

    def _peek(self, ahead: int = 0) -> Token | None:
        return self.t[self.k + ahead] if self.k + ahead < len(self.t) else None

    def _op(self, *ops: str, ahead: int = 0) -> bool:
        tok = self._peek(ahead)
        return tok is not None and tok[0] == "op" and tok[1] in ops

    def _keyword(self, *names: str) -> bool:
        tok = self._peek()
        return tok is not None and tok[0] == "w" and isinstance(tok[1], Word) and not tok[1].quoted \
            and tok[1].text in names

    def run(self) -> _Parser:
        self.parse_list((), ())
        return self

    def parse_list(self, stop_ops: tuple[str, ...], stop_words: tuple[str, ...]) -> None:
        while self.k < len(self.t):
            if self._op(*stop_ops) or self._keyword(*stop_words):
                return
            if self._op("\n", ";", "&"):
                self.k += 1
                continue
            if self._op(")", ";;", ";&", ";;&", "&&", "||", "|", "|&"):
                self.problems.append(f"unexpected {self.t[self.k][1]!r}")
                self.k += 1
                continue
            before = self.k
            self.and_or()
            if self.k == before:
                self.k += 1

    def and_or(self) -> None:
        first = len(self.commands)
        self.pipeline()
        while self._op("&&", "||"):
            self.k += 1
            while self._op("\n"):
                self.k += 1
            self.pipeline()
        if self._op("&"):
            for c in self.commands[first:]:
                c.background = True

    def pipeline(self) -> None:
        upstream: Command | None = None
        while True:
            start = len(self.commands)
            self.command()
            if len(self.commands) > start:
                self.commands[start].upstream = upstream
                upstream = self.commands[-1]
            if not self._op("|", "|&"):
                return
            self.k += 1
            while self._op("\n"):
                self.k += 1

    def command(self) -> None:
        tok = self._peek()
        if tok is None:
            return
        if self.nesting >= MAX_NESTING:  # read what follows as if it were not nested
            self.problems.append("nested too deep")
            if tok[0] == "op":
                self.k += 1
            else:
                self.simple()
            return
        self.nesting += 1
        self._command(tok)
        self.nesting -= 1

    def _command(self, tok: Token) -> None:
        if self._op("("):
            self.k += 1
            self._group((")",), (), scoped=True)
        elif self._keyword("{"):
            self.k += 1
            self._group((), ("}",), scoped=False)
        elif self._keyword(*_SKIPPED):
            self.k += 1
        elif self._keyword("for", "select"):
            while self.k < len(self.t) and not self._op(";", "\n") and not self._keyword("do"):
                self.k += 1
        elif self._keyword("case"):
            self._case()
        elif self._keyword("function"):
            self.k += 1
            name = self._peek()
            self.k += 1
            if self._op("(") and self._op(")", ahead=1):
                self.k += 2
            self._function(name[1].text if name and isinstance(name[1], Word) else "")
        elif tok[0] == "w" and self._op("(", ahead=1) and self._op(")", ahead=2) and isinstance(tok[1], Word):
            self.k += 3
            self._function(tok[1].text)
        else:
            self.simple()

    def _group(self, stop_ops: tuple[str, ...], stop_words: tuple[str, ...], scoped: bool) -> None:
        first, cwd = len(self.commands), self.cwd
        self.parse_list(stop_ops, stop_words)
        if self._op(*stop_ops) or self._keyword(*stop_words):
            self.k += 1
        else:
            self.problems.append("a group is not closed")
        if scoped:  # a subshell's cd ends with it
            self.cwd = cwd
        redirects = []
        while (tok := self._peek()) is not None and tok[0] == "r" and isinstance(tok[1], Redirect):
            redirects.append(tok[1])
            self.k += 1
        for c in self.commands[first:]:
            c.redirects.extend(redirects)

    def _function(self, name: str) -> None:
        while self._op("\n"):
            self.k += 1
        outer, cwd = self.function, self.cwd
        self.function = name
        self.command()
        self.function, self.cwd = outer, cwd

    def _case(self) -> None:
        while self.k < len(self.t) and not self._keyword("in"):
            self.k += 1
        self.k += 1
        while self.k < len(self.t):
            while self._op("\n", ";"):
                self.k += 1
            if self._keyword("esac"):
                self.k += 1
                return
            while self.k < len(self.t) and not self._op(")"):  # the patterns
                self.k += 1
            self.k += 1
            self.parse_list((";;", ";&", ";;&"), ("esac",))
            if self._op(";;", ";&", ";;&"):
                self.k += 1

    def simple(self) -> None:
        cmd = Command([], [], [], self.cwd, self.function)
        while (tok := self._peek()) is not None and tok[0] != "op":
            item = tok[1]
            if isinstance(item, Redirect):
                cmd.redirects.append(item)
            elif isinstance(item, Word):
                m = _ASSIGN.match(item.text)
                if not cmd.words and m and (item.plain < 0 or m.end() <= item.plain):
                    cmd.assigns.append(item)
                else:
                    cmd.words.append(item)
            self.k += 1
        self.commands.append(cmd)
        self._follow_cd([w.text for w in cmd.words])

    def _follow_cd(self, argv: list[str]) -> None:
        while argv and argv[0] in ("builtin", "command"):
            argv = argv[1:]
        if not argv or argv[0] not in ("cd", "pushd", "popd"):
            return
        operands = [a for a in argv[1:] if not (a.startswith("-") and len(a) > 1)]
        if argv[0] == "popd" or operands[:1] == ["-"]:
            self.cwd = None
        elif not operands:
            self.cwd = self.home
        else:
            self.cwd = expand_path(operands[0], self.cwd, self.home)


def parse(text: str, cwd: str | None = None, home: str = "~") -> Parsed:
    """The simple commands ``text`` runs, in order, starting in ``cwd`` (None: unknown)."""
    lexer = Lexer(text).run()
    parser = _Parser(lexer.tokens, cwd, home).run()
    return Parsed(parser.commands, lexer.problems + parser.problems)


# -- paths ------------------------------------------------------------------------------

_HOME_VAR = re.compile(r"(\$HOME|\$\{HOME(?:[:%#?=+-][^}]*)?\})(?=/|$)")
_CWD_VAR = re.compile(r"(\$PWD|\$\{PWD(?:[:%#?=+-][^}]*)?\}|\$\(\s*pwd\s*\)|`\s*pwd\s*`|~\+)(?=/|$)")


def expand_path(text: str, cwd: str | None, home: str) -> str | None:
    """An operand as the absolute path it names (``~`` standing for an unknown home); None if unknown."""
    if m := _CWD_VAR.match(text):
        if cwd is None:
            return None
        path = cwd + text[m.end():]
    elif text.startswith("~"):
        user, _, rest = text[1:].partition("/")
        base = home if not user else "/root" if user == "root" else f"/home/{user}"
        path = f"{base}/{rest}"
    elif m := _HOME_VAR.match(text):
        path = home + text[m.end():]
    elif text.startswith("/"):
        path = text
    elif text.startswith("$") or cwd is None:
        return None
    else:
        path = f"{cwd}/{text}"
    return normalize(path)


def normalize(path: str) -> str:
    """``/a//b/./c/..`` → ``/a/b``; a path under the unknown home keeps its ``~``."""
    root = "~" if path.startswith("~") else ""
    parts: list[str] = []
    for part in path[len(root):].split("/"):
        if part in ("", "."):
            continue
        if part != "..":
            parts.append(part)
        elif parts:
            parts.pop()
        elif root:  # above the unknown home: the directory of homes
            root, parts = "", ["home"]
    if root:
        return "/".join([root, *parts])
    return "/" + "/".join(parts)
