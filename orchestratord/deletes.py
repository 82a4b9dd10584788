"""Which deletes destroy work: the checks of the recursive-delete rule.

A delete is judged by what its operand names once resolved the way the shell would
resolve it (against the directory an earlier ``cd`` moved to, else the session's project
directory): the root, a home, the project or a directory above it, everything inside
one of those (``*``, ``.*``, ``{*,.*}``), ``.`` or ``..``, or anything under a system
directory. Scratch space (``/tmp/x``, ``/var/tmp/x``) and the project's own
subdirectories (``build``, ``node_modules``) are what cleaning up is for. The same
judgement serves ``rm -r``, ``find -delete``/``-exec rm``, ``rsync --delete`` and the
deletes of ``python -c``/``perl -e``/``ruby -e``/``node -e`` code.
"""

from __future__ import annotations

import re
from typing import Iterator

from . import code, shell
from .commands import INTERPRETERS, Call, Reading, find_commands, options, program_name

SYSTEM_TREES = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/sbin", "/sys",
                "/usr", "/var")  # nothing under them is anyone's work
SYSTEM_TOPS = ("/opt", "/srv", "/mnt", "/media", "/home", "/Users", "/snap", "/run", "/tmp", "/var/tmp", "/nix",
               "/lost+found")  # the directory itself, and everything in it at once
SCRATCH = ("/tmp", "/var/tmp")  # what is in them is there to be deleted
PRECIOUS = (".ssh", ".gnupg", ".aws", ".kube", ".config", ".local", "Documents", "Desktop")  # in a home
NARROWING = {"-name", "-iname", "-path", "-ipath", "-regex", "-iregex", "-wholename", "-iwholename", "-newer",
             "-mtime", "-mmin", "-atime", "-amin", "-ctime", "-cmin", "-size", "-user", "-group", "-uid", "-gid",
             "-empty", "-perm", "-links", "-inum", "-samefile", "-lname", "-ilname", "-newermt"}
RSYNC_TAKES = {"-e", "--rsh", "-f", "--filter", "--exclude", "--include", "--exclude-from", "--include-from",
               "--files-from", "-T", "--temp-dir", "--backup-dir", "--log-file", "--port", "--password-file", "-B",
               "--chmod", "--compare-dest", "--copy-dest", "--link-dest", "--suffix", "--rsync-path", "-M"}
_GLOB_ALL = re.compile(r"[*?.]*\*[*?.]*")
_BRACES = re.compile(r"\{([^{}]*,[^{}]*)\}")


def check_recursive_delete(r: Reading) -> str | None:
    for call in r.calls({"rm"}):
        flags, operands = options(call.args)
        if "--help" in flags or "--version" in flags:
            continue
        if {"r", "R", "--recursive", "--no-preserve-root"} & flags:
            for op in operands:
                if why := danger(op, call.cwd, r):
                    return f"recursive delete of {why}"
    for call in r.calls({"mv"}):
        _, operands = options(call.args)
        if len(operands) >= 2 and operands[-1] == "/dev/null":
            for op in operands[:-1]:
                if why := danger(op, call.cwd, r):
                    return f"move to /dev/null of {why}"
    for call in r.calls({"find"}):
        if why := _find(call, r):
            return why
    for call in r.calls({"rsync"}):
        if why := _rsync(call, r):
            return why
    for call in r.calls(INTERPRETERS):
        given = code.code_of(call.prog, call.args, call.stdin)
        for path in code.deleted_paths(*given) if given else ():
            if why := danger(path, call.cwd, r):
                return f"{call.prog} code deleting {why}"
    return None


def _find(call: Call, r: Reading) -> str | None:
    args = list(call.args)
    i = 0
    while i < len(args) and (args[i] in ("-H", "-L", "-P") or args[i].startswith("-O") or args[i] == "-D"):
        i += 2 if args[i] == "-D" else 1
    roots = []
    while i < len(args) and not args[i].startswith(("-", "(", "!", ")")):
        roots.append(args[i])
        i += 1
    expression = args[i:]
    removes = "-delete" in expression or any(argv and program_name(argv[0]) in ("rm", "shred")
                                             for argv in find_commands(expression))
    narrowed = any(a in NARROWING and (a == "-empty" or not everything(nxt))
                   for a, nxt in zip(expression, [*expression[1:], ""], strict=False))
    if not removes or narrowed:
        return None
    for root in roots or ["."]:
        if why := danger(root, call.cwd, r):
            return f"find deleting {why}"
    return None


def _rsync(call: Call, r: Reading) -> str | None:
    if not any(a.startswith(("--delete", "--del", "--remove-source-files")) for a in call.args):
        return None
    operands, skip = [], False
    for a in call.args:
        if skip:
            skip = False
        elif a in RSYNC_TAKES:
            skip = True
        elif not a.startswith("-"):
            operands.append(a)
    if len(operands) < 2 or re.match(r"^[\w.@-]+:", operands[-1]):  # a remote destination is not ours to judge
        return None
    why = danger(operands[-1], call.cwd, r)
    return f"rsync --delete into {why}" if why else None


def danger(operand: str, cwd: str | None, r: Reading) -> str | None:
    """What destroying ``operand`` destroys, when it is work; None when it is not."""
    for alt in _brace_expansions(operand):
        path = shell.expand_path(alt, cwd, r.home_dir)
        if path is not None and (why := judge(path, r.project, r.home)):
            return f"{alt} ({why})"
        trimmed = alt.rstrip("/") or "/"
        last = trimmed.rsplit("/", 1)[-1]
        if last in (".", ".."):
            return f"{alt} ({'the directory itself' if last == '.' else 'a parent directory'})"
        if cwd is None and everything(last) and re.fullmatch(r"(\.{1,2}/)*", trimmed[:-len(last)]):
            return f"{alt} (everything in the working directory)"
    return None


def judge(path: str, project: str | None, home: str | None) -> str | None:
    """Why deleting the absolute ``path`` (``~``: the home) loses work, or None."""
    base, last = path.rsplit("/", 1) if "/" in path else ("", path)
    whole = everything(last)
    if not whole:
        base = path
    base = base or "/"
    inside = "everything in " if whole else ""
    if base == "/":
        return f"{inside}the root directory"
    if is_home(base, home):
        return f"{inside}a home directory"
    if project and (base == project or project.startswith(base.rstrip("/") + "/")):
        return f"{inside}the project directory" if base == project else "a directory above the project"
    if project and base == f"{project}/.git":
        return f"{inside}the project's git history"
    parent, _, name = base.rpartition("/")
    if name in PRECIOUS and is_home(parent, home):
        return f"{inside}{name} in a home directory"
    if base in SYSTEM_TOPS and (not whole or base not in SCRATCH):
        return f"{inside}the system directory {base}"
    for tree in SYSTEM_TREES:
        if (base == tree or base.startswith(tree + "/")) and not (base + "/").startswith("/var/tmp/"):
            return f"{inside}{base}, under the system directory {tree}"
    return None


def everything(component: str) -> bool:
    """``*``, ``.*``, ``.[!.]*``, ``..?*``: a last component that names all there is."""
    return bool(_GLOB_ALL.fullmatch(re.sub(r"\[[!^]\.\]", "", component)))


def is_home(path: str, home: str | None) -> bool:
    return path in ("~", "/root") or path == home or bool(re.fullmatch(r"/(home|Users)/[^/]+", path))


def _brace_expansions(word: str, limit: int = 16) -> Iterator[str]:
    """``{*,.*}`` → ``*`` and ``.*``; at most ``limit`` words."""
    out: list[str] = []
    todo = [word]
    while todo and len(out) < limit:
        w = todo.pop()
        m = _BRACES.search(w)
        if m is None:
            out.append(w)
            continue
        todo.extend(w[:m.start()] + part + w[m.end():] for part in m.group(1).split(","))
    return iter(out or [word])
