"""What a command line runs: each program with its wrappers taken off and its scripts read.

:mod:`.shell` reads the syntax; this module knows the programs. ``sudo env X=1 nice git
push`` runs git; ``bash -c '…'``, ``eval``, a heredoc or an ``echo … |`` fed to a shell,
``$(…)``, ``find -exec``, ``ssh host '…'`` and the shell-outs of ``python -c`` run
scripts that are read in turn; the words after ``echo``, ``grep`` or ``git commit -m`` are
only data. The rules ask a :class:`Reading` for the calls of the programs they judge.

Prose (a teammate's message) and whatever the shell reading could not read are read word
by word (:mod:`.prose`): wherever a program is named, a call starts.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import shlex
from dataclasses import dataclass, field
from typing import Container, Iterator, Sequence

from . import code, lexer, shell
from .prose import segments

COMMAND, PATH, MESSAGE, TOOL = "command", "path", "message", "tool"  # what a rule can look at
MAX_DEPTH = 8  # scripts inside scripts read before the rest is judged word by word
PROSE_ARGS = 64  # the words after a program named in prose that are taken for its arguments
SHELLS = {"sh", "bash", "zsh", "dash", "ksh", "ash", "mksh", "rbash", "fish", "csh", "tcsh", "yash"}
FETCHERS = {"curl", "wget", "fetch", "aria2c", "http", "https", "xh", "lwp-request", "GET"}


@dataclass(frozen=True)
class Wrapper:
    """A program that runs another one: which options take a value, what comes before it."""

    takes: str = ""  # short options with a value
    long_takes: tuple[str, ...] = ()
    before: int = 0  # operands before the command (timeout's duration, chroot's directory)
    lookup: str = ""  # short options that only look the command up (command -v)


WRAPPERS: dict[str, Wrapper] = {
    "sudo": Wrapper("ugCDhprtTU", ("--user", "--group", "--close-from", "--chdir", "--host", "--prompt", "--role",
                                   "--type", "--command-timeout", "--other-user"), lookup="lv"),
    "doas": Wrapper("uC"), "env": Wrapper("uCSP", ("--unset", "--chdir", "--split-string")),
    "nohup": Wrapper(), "builtin": Wrapper(), "command": Wrapper(lookup="vV"), "exec": Wrapper("a"),
    "time": Wrapper("fo", ("--format", "--output")), "nice": Wrapper("n", ("--adjustment",)),
    "ionice": Wrapper("cnpPu", ("--class", "--classdata", "--pid", "--pgid", "--uid")),
    "timeout": Wrapper("sk", ("--signal", "--kill-after"), before=1), "stdbuf": Wrapper("ioe"),
    "setsid": Wrapper(), "xargs": Wrapper("IadELnPs", ("--arg-file", "--delimiter", "--eof", "--replace",
                                                      "--max-lines", "--max-args", "--max-procs", "--max-chars")),
    "chroot": Wrapper(long_takes=("--userspec", "--groups"), before=1), "strace": Wrapper("eopsuEabIOPSX"),
    "ltrace": Wrapper("eopsuEaDnS"), "busybox": Wrapper(), "unbuffer": Wrapper(), "pkexec": Wrapper(
        long_takes=("--user",)), "taskset": Wrapper(before=1), "chrt": Wrapper(before=1),
    "caffeinate": Wrapper("t"), "runuser": Wrapper("ugG", ("--user", "--group")),
    "flock": Wrapper("wEn", ("--timeout", "--conflict-exit-code"), before=1), "watch": Wrapper("nd", ("--interval",)),
}
SCRIPT_TAKERS = {"su", "runuser", "flock", "script"}  # their -c runs a shell script
_STATIC_NAME = re.compile(r"^(?:\$\(\s*|`\s*)(?:which|command\s+-v|type\s+-p|echo)\s+([\w./+-]+)\s*(?:\)|`)$")


class Programs:
    """Program names by pattern (``mkfs.ext4``, ``python3.11``), to ask a reading for their calls."""

    def __init__(self, pattern: str) -> None:
        self.pattern = re.compile(pattern)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.pattern.fullmatch(name) is not None


INTERPRETERS = Programs("|".join(rx.pattern for _, rx in code.LANGUAGES))


def program_name(word: str) -> str:
    """``/usr/bin/rm`` → ``rm``; ``\\rm`` → ``rm``; ``$(which rm)`` → ``rm``."""
    m = _STATIC_NAME.match(word)
    if m:
        word = m.group(1)
    return os.path.basename(word.lstrip("\\")).lower()


def options(args: Sequence[str]) -> tuple[set[str], list[str]]:
    """Short options as letters and long ones whole (also without their ``=value``); the operands."""
    flags: set[str] = set()
    operands: list[str] = []
    done = False
    for a in args:
        if done or not a.startswith("-") or a == "-":
            operands.append(a)
        elif a == "--":
            done = True
        elif a.startswith("--"):
            flags.update((a, a.split("=", 1)[0]))
        else:
            flags.update(a[1:])
    return flags, operands


@dataclass(frozen=True)
class Call:
    """One program that runs, its arguments, and what the line says about where and on what."""

    prog: str
    args: tuple[str, ...]
    cwd: str | None = None  # where it runs (None: unknown)
    stdin: str | None = None  # the text it reads, when the line holds it
    redirects: tuple[tuple[str, str], ...] = ()  # (operator, file)
    upstream: Call | None = None  # the program piped into it
    background: bool = False
    function: str | None = None  # the shell function whose body it is
    exact: bool = True  # read from a parsed command line, not from prose


@dataclass
class Reading:
    """A command line read once for every rule: its calls, and what is left to read word by word."""

    text: str
    kind: str = COMMAND
    project: str | None = None
    home: str | None = None
    exact: list[Call] = field(default_factory=list)
    loose: list[str] = field(default_factory=list)
    _segments: list[tuple[list[str], list[str]]] | None = None  # (tokens, their program names)

    @property
    def home_dir(self) -> str:
        return self.home or "~"

    def calls(self, names: Container[str]) -> Iterator[Call]:
        for c in self.exact:
            if c.prog in names:
                yield c
        if self._segments is None:
            self._segments = [(seg, [program_name(t) for t in seg]) for text in self.loose for seg in segments(text)]
        for seg, progs in self._segments:
            for i, prog in enumerate(progs):
                if prog in names:
                    yield Call(prog, tuple(seg[i + 1:i + 1 + PROSE_ARGS]), exact=False)


def read_command(text: str, project: str | None = None, home: str | None = None) -> Reading:
    """A shell command line, read as the shell would."""
    r = Reading(text, COMMAND, project, home)
    _read_script(r, text, project, 0)
    return r


def read_prose(text: str) -> Reading:
    """A message: every program it names is a call."""
    return Reading(text, MESSAGE, loose=[text])


def _read_script(r: Reading, text: str, cwd: str | None, depth: int) -> None:
    if depth > MAX_DEPTH:
        r.loose.append(text)
        return
    parsed = shell.parse(text, cwd, r.home_dir)
    if parsed.problems and not any(text in t for t in r.loose):
        r.loose.append(text)
    made: dict[int, Call] = {}
    for cmd in parsed.commands:
        for script in cmd.scripts():
            _read_script(r, script, cmd.cwd, depth + 1)
        up = made.get(id(cmd.upstream)) if cmd.upstream is not None else None
        call = _call(r, cmd, up, depth)
        if call is not None:
            made[id(cmd)] = call


def _call(r: Reading, cmd: shell.Command, up: Call | None, depth: int) -> Call | None:
    stdin: str | None = produced(up) if up is not None else None
    files: list[tuple[str, str]] = []
    for red in cmd.redirects:
        if red.op in ("<<", "<<-", "<<<"):
            stdin = red.body or ""
        elif red.op not in (">&", "<&"):
            files.append((red.op, red.target))
            if red.op in ("<", "<>"):
                stdin, up = None, None
    words = [w.text for w in cmd.words]
    argv, cwd, stdin = unwrap(words, cmd.cwd, stdin, r.home_dir)
    if not argv:
        return None
    if program_name(argv[0]) in WRAPPERS:  # wrapped more deeply than is read
        r.loose.append(" ".join(words))
    call = Call(program_name(argv[0]), tuple(argv[1:]), cwd, stdin, tuple(files), up, cmd.background, cmd.function)
    _add(r, call, depth)
    return call


def _add(r: Reading, call: Call, depth: int) -> None:
    """Keep ``call`` and read the scripts it runs."""
    if ("--help" in call.args or "--version" in call.args) and call.prog not in SHELLS and call.prog not in INTERPRETERS:
        return  # it prints its usage and does nothing else
    if depth > MAX_DEPTH:
        r.loose.append(" ".join([call.prog, *call.args]))
        return
    r.exact.append(call)
    script = None
    if call.prog in SHELLS:
        script = shell_script(call)
    elif call.prog == "eval":
        script = " ".join(call.args)
    elif call.prog == "ssh" or call.prog in CONTAINER_TOOLS:
        remote = _ssh_command(call.args) if call.prog == "ssh" else _container_command(call.args)
        if remote:
            _read_script(r, remote, None, depth + 1)  # it runs elsewhere, in a directory we do not know
    elif call.prog == "find":
        for argv in find_commands(call.args):
            inner, cwd, _ = unwrap(argv, call.cwd, None, r.home_dir)
            if inner:
                _add(r, Call(program_name(inner[0]), tuple(inner[1:]), cwd), depth + 1)
    elif (given := code.code_of(call.prog, call.args, call.stdin)) is not None:
        for command in code.shell_outs(*given):
            _read_script(r, command, call.cwd, depth + 1)
    if script is not None:
        _read_script(r, script, call.cwd, depth + 1)


def unwrap(argv: list[str], cwd: str | None, stdin: str | None, home: str) -> tuple[list[str], str | None, str | None]:
    """The command a chain of wrappers runs, the directory it runs in, and its stdin."""
    for _ in range(32):
        if not argv:
            break
        name = program_name(argv[0])
        if name in SCRIPT_TAKERS and (script := _script_option(argv[1:])) is not None:
            return ["sh", "-c", script], cwd, stdin
        spec = WRAPPERS.get(name)
        if spec is None:
            break
        i, before = 1, spec.before
        while i < len(argv):
            a = argv[i]
            if a == "--":
                i += 1
                break
            if a.startswith("--") and len(a) > 2:
                key, eq, value = a.partition("=")
                if key in spec.long_takes and not eq:
                    value = argv[i + 1] if i + 1 < len(argv) else ""
                    i += 1
                if name == "env" and key == "--chdir":
                    cwd = shell.expand_path(value, cwd, home)
                i += 1
                continue
            if a == "-" and name == "env":  # the same as -i
                i += 1
                continue
            if a.startswith("-") and len(a) > 1:
                letters = a[1:]
                if any(c in spec.lookup for c in letters[:1]):
                    return [], cwd, None  # command -v rm: a look-up, nothing runs
                for j, c in enumerate(letters):
                    if c in spec.takes:
                        value = letters[j + 1:]
                        if not value and i + 1 < len(argv):
                            i += 1
                            value = argv[i]
                        if name == "env" and c == "C":
                            cwd = shell.expand_path(value, cwd, home)
                        elif name == "env" and c == "S":
                            argv = argv[:i + 1] + lexer.words(value) + argv[i + 1:]
                        break
                i += 1
                continue
            if name in ("env", "sudo") and re.match(r"[A-Za-z_]\w*=", a):
                i += 1
                continue
            if before:
                before -= 1
                i += 1
                continue
            break
        argv = argv[i:]
        if name == "watch":  # it runs its words with sh -c
            return (["sh", "-c", " ".join(argv)] if argv else []), cwd, stdin
        if name == "xargs":
            argv = argv or ["echo"]
            if stdin is not None:
                argv = argv + lexer.words(stdin)
            stdin = None  # xargs's command reads nothing of it
    return argv, cwd, stdin


def produced(call: Call) -> str | None:
    """What ``call`` writes to a pipe, when the line says (echo, printf, cat of a heredoc, base64 -d)."""
    flags, operands = options(call.args)
    if call.prog == "echo":
        words = list(call.args)
        while words and re.fullmatch(r"-[neE]+", words[0]):
            words.pop(0)
        return _unescape(" ".join(words)) + "\n"
    if call.prog == "printf" and call.args:
        fmt, rest = call.args[0], list(call.args[1:])
        text = re.sub(r"%[-#0 +]*\d*(?:\.\d+)?[sbdqc]", lambda m: rest.pop(0) if rest else "", fmt)
        return _unescape(text) + "".join(" " + r for r in rest)
    if call.prog in ("cat", "tee") and (call.prog == "tee" or operands in ([], ["-"])):
        return call.stdin
    if call.prog == "base64" and ({"d", "D", "--decode"} & flags) and call.stdin is not None:
        try:
            return base64.b64decode(re.sub(r"\s", "", call.stdin) + "==", validate=False).decode("utf-8", "replace")
        except (binascii.Error, ValueError):
            return None
    return None


def _unescape(text: str) -> str:
    return text.replace("\\n", "\n").replace("\\t", "\t")


def shell_script(call: Call) -> str | None:
    """The script a shell runs: its ``-c`` argument, or its stdin; None for a script file."""
    args, i, command, stdin = call.args, 0, False, False
    while i < len(args):
        a = args[i]
        if a == "--":
            i += 1
            break
        if a in ("-o", "+o", "-O", "+O", "--rcfile", "--init-file"):
            i += 2
            continue
        if a.startswith("--") or (a[:1] in ("-", "+") and len(a) > 1):
            command = command or (not a.startswith("--") and "c" in a)
            stdin = stdin or (not a.startswith("--") and "s" in a)
            i += 1
            continue
        break
    if command:
        return args[i] if i < len(args) else None
    if i < len(args) and args[i] != "-" and not stdin:
        return None
    return call.stdin


def _script_option(args: Sequence[str]) -> str | None:
    for i, a in enumerate(args):
        if a in ("-c", "--command") and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--command="):
            return a.split("=", 1)[1]
    return None


SSH_TAKES = "BbcDEeFIiJLlmOoPpQRSWw"


def _ssh_command(args: Sequence[str]) -> str | None:
    i, host = 0, False
    while i < len(args):
        a = args[i]
        if not host and a.startswith("-") and len(a) > 1:
            i += 2 if a[-1] in SSH_TAKES and len(a) == 2 else 1
            continue
        if not host:
            host = True
            i += 1
            continue
        return " ".join(args[i:])
    return None


CONTAINER_TOOLS = {"docker", "podman", "nerdctl", "kubectl", "oc"}
CONTAINER_TAKES = {"-e", "--env", "--env-file", "-u", "--user", "-w", "--workdir", "--detach-keys", "--index",
                   "-n", "--namespace", "-c", "--container", "--context", "--kubeconfig", "-f", "--file", "-p",
                   "--project-name", "--pod-running-timeout"}


def _container_command(args: Sequence[str]) -> str | None:
    """The command of ``docker exec C cmd``, ``docker compose exec S cmd``, ``kubectl exec P -- cmd``."""
    if "exec" not in args:
        return None
    rest = list(args[args.index("exec") + 1:])
    if "--" in rest:  # kubectl's way
        argv = rest[rest.index("--") + 1:]
    else:
        i, named = 0, False
        while i < len(rest) and not named:
            if rest[i] in CONTAINER_TAKES:
                i += 2
            elif rest[i].startswith("-"):
                i += 1
            else:
                named = True
                i += 1
        argv = rest[i:]
    return " ".join(shlex.quote(a) for a in argv) or None


def find_commands(args: Sequence[str]) -> Iterator[list[str]]:
    """The commands of find's ``-exec``, ``-execdir``, ``-ok`` and ``-okdir``."""
    i = 0
    while i < len(args):
        if args[i] in ("-exec", "-execdir", "-ok", "-okdir"):
            argv = []
            i += 1
            while i < len(args) and args[i] not in (";", "+"):
                argv.append(args[i])
                i += 1
            yield argv
        i += 1
