"""The code an interpreter is given on its command line, and what that code deletes or runs.

``python -c``, ``perl -e``, ``ruby -e``, ``node -e`` and ``php -r`` (and ``python - <<EOF``)
are as able to delete a home as ``rm -rf``. This reads no language properly: it finds
the calls that delete (``shutil.rmtree``, ``FileUtils.rm_rf``, ``fs.rmSync`` …) and
run shell commands (``os.system``, ``system``, ``execSync`` …), and reads their first
argument when it is a literal the line itself spells out: a string, the home
(``Path.home()``, ``os.path.expanduser("~")``, ``$ENV{HOME}``, ``Dir.home``,
``os.homedir()``), the working directory (``os.getcwd()``, ``Dir.pwd``, ``process.cwd()``)
or a join of those. Anything computed at run time is not read.
"""

from __future__ import annotations

import re
import shlex
from typing import Iterator, Sequence

LANGUAGES = (("python", re.compile(r"(python|pypy)[\d.]*")), ("perl", re.compile(r"perl[\d.]*")),
             ("ruby", re.compile(r"ruby[\d.]*")), ("node", re.compile(r"node(js)?|bun")),
             ("php", re.compile(r"php[\d.]*")))


def language(prog: str) -> str | None:
    for lang, rx in LANGUAGES:
        if rx.fullmatch(prog):
            return lang
    return None


# Per language: the options whose value is code, the options with a value of their own, and
# the short options whose value may be glued on (``-MFile::Path``), which are never clusters.
_OPTIONS = {
    "python": ({"-c"}, {"-m", "-W", "-X", "-Q"}, {"-m", "-W", "-X", "-Q"}),
    "perl": ({"-e", "-E"}, {"-I"}, {"-I", "-M", "-m"}),
    "ruby": ({"-e"}, {"-r", "-I", "-E", "-C"}, {"-r", "-I", "-E", "-C", "-K", "-W", "-x"}),
    "node": ({"-e", "--eval", "-p", "--print"}, {"-r", "--require", "--import", "--loader", "-C", "--conditions"},
             set()),
    "php": ({"-r"}, {"-d", "-c", "-z", "-f"}, {"-d"}),
}


def code_of(prog: str, args: Sequence[str], stdin: str | None) -> tuple[str, str] | None:
    """(language, code) given on the command line or on stdin; None for a script file."""
    lang = language(prog)
    if lang is None:
        return None
    code_opts, value_opts, glued = _OPTIONS[lang]
    codes: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        key, eq, value = a.partition("=")
        if a in code_opts or (key in code_opts and eq and a.startswith("--")):
            if eq and a.startswith("--"):
                codes.append(value)
            elif i + 1 < len(args):
                codes.append(args[i + 1])
                i += 1
            if lang == "python":
                break  # what follows is sys.argv
        elif a == "-m" and lang == "python":
            return None  # a module runs
        elif a.startswith("-") and not a.startswith("--") and len(a) > 2 and a[:2] not in glued:
            cluster = a[1:]
            found = next((j for j, ch in enumerate(cluster) if f"-{ch}" in code_opts), None)
            if found is not None:  # -le 'code', -Bc 'code', -ecode
                attached = cluster[found + 1:]
                codes.append(attached if attached else (args[i + 1] if i + 1 < len(args) else ""))
                i += 0 if attached else 1
                if lang == "python":
                    break
        elif a in value_opts:
            i += 1
        elif a == "-" or not a.startswith("-"):
            if codes:
                break  # arguments to the code
            return (lang, stdin) if a == "-" and stdin is not None else None
        i += 1
    if codes:
        return lang, "\n".join(codes)
    return (lang, stdin) if stdin is not None else None


# -- what it deletes --------------------------------------------------------------------

_DELETES = {
    "python": r"\b(?:shutil\s*\.\s*)?rmtree|\bos\s*\.\s*(?:remove|unlink|rmdir|removedirs)",
    "perl": r"\b(?:File::Path::)?(?:rmtree|remove_tree)|\bunlink",
    "ruby": r"\bFileUtils\s*\.\s*(?:rm_rf|rm_r|rm_f|rm|remove_dir|remove_entry|remove_entry_secure|rmtree|remove)"
            r"|\b(?:File|Dir)\s*\.\s*(?:delete|unlink|rmdir)",
    "node": r"\b(?:fs|promises)\s*\.\s*(?:rm|rmdir)\b|\b(?:rmSync|rmdirSync|unlinkSync)|\brimraf(?:\s*\.\s*sync)?",
    "php": r"\b(?:unlink|rmdir)",
}
_NEEDS_RECURSIVE = re.compile(r"(?:^|\.)\s*(?:rm|rmdir|rmSync|rmdirSync)$")
_PATH_METHOD = re.compile(r"\s*\.\s*(?:unlink|rmdir|rmtree)\s*\(")
_PATH_START = re.compile(r"\b(?:pathlib\s*\.\s*)?Path\b")
_HOME = re.compile(r"(?:pathlib\s*\.\s*)?Path\s*\.\s*home\s*\(\s*\)|os\s*\.\s*environ\s*(?:\[\s*|\.get\s*\(\s*)(['\"])"
                   r"HOME\1\s*[)\]]|os\s*\.\s*getenv\s*\(\s*(['\"])HOME\2\s*\)|\$ENV\s*\{\s*['\"]?HOME['\"]?\s*\}"
                   r"|Dir\s*\.\s*home\b|ENV\s*(?:\[\s*|\.fetch\s*\(\s*)(['\"])HOME\3\s*[)\]]"
                   r"|(?:require\s*\(\s*['\"](?:node:)?os['\"]\s*\)|\bos)\s*\.\s*homedir\s*\(\s*\)"
                   r"|process\s*\.\s*env\s*(?:\.HOME\b|\[\s*(['\"])HOME\4\s*\])|getenv\s*\(\s*(['\"])HOME\5\s*\)")
_CWD = re.compile(r"os\s*\.\s*getcwd\s*\(\s*\)|(?:pathlib\s*\.\s*)?Path\s*\.\s*cwd\s*\(\s*\)|os\s*\.\s*curdir\b"
                  r"|Dir\s*\.\s*(?:pwd|getwd)\b|process\s*\.\s*cwd\s*\(\s*\)|\b(?:Cwd::)?(?:get)?cwd\s*\(\s*\)"
                  r"|__dirname\b|getcwd\s*\(\s*\)")
_JOINERS = re.compile(r"(?:os\s*\.\s*path\s*\.\s*(?:join|expanduser|abspath|realpath|normpath)|(?:pathlib\s*\.\s*)?"
                      r"(?:Pure)?Path|path\s*\.\s*(?:join|resolve)|File\s*\.\s*(?:join|expand_path|absolute_path)"
                      r"|Pathname\s*\.\s*new)\s*\(")
_STRING = re.compile(r"[rRbBuU]?('''|\"\"\"|'|\"|`)")
_CONCAT = re.compile(r"\s*(/|\+|\.(?=\s*['\"$]))\s*")
_NOOP_METHOD = re.compile(r"\s*\.\s*(?:expanduser|resolve|absolute|expand_path|to_s)\s*\(\s*\)")
_COMMA = re.compile(r"\s*,\s*")
_CLOSE = re.compile(r"\s*\)")
_RECURSIVE = re.compile(r"recursive\s*:\s*true")
_INTERPOLATION = re.compile(r"\$\{([^}]*)\}|#\{([^}]*)\}|(\$ENV\s*\{\s*['\"]?HOME['\"]?\s*\})")


def deleted_paths(lang: str, src: str) -> list[str]:
    """The literal paths ``src`` deletes (``~`` the home, ``.`` the working directory)."""
    out: list[str] = []
    interpolates = lang != "python"
    for m in _calls(_DELETES[lang], src):
        value, end = expr(src, m.end(), interpolates)
        if value is None:
            continue
        name = m.group(0)[:m.start(1) - m.start()]
        if lang == "node" and _NEEDS_RECURSIVE.search(name) and not _RECURSIVE.search(src, end, end + 200):
            continue
        out.append(value)
    if lang == "python":
        for m in _PATH_START.finditer(src):
            value, end = expr(src, m.start(), False)
            if value is not None and _PATH_METHOD.match(src, end):
                out.append(value)
    return out


def _calls(names: str, src: str) -> Iterator[re.Match[str]]:
    """Each call of one of ``names`` (a regex) in ``src``; the match ends where its arguments start."""
    return re.finditer(rf"(?:{names})(\s*\(\s*|\s+)", src)


def expr(src: str, i: int, interpolates: bool, depth: int = 0) -> tuple[str | None, int]:
    """A path expression made of literals at ``i``: its value and where it ends."""
    value, i = _atom(src, i, depth, interpolates)
    while value is not None:
        if m := _NOOP_METHOD.match(src, i):
            i = m.end()
        elif (m := _CONCAT.match(src, i)) and (nxt := _atom(src, m.end(), depth, interpolates))[0] is not None:
            rest, i = nxt
            value = f"{value.rstrip('/')}/{(rest or '').lstrip('/')}" if m.group(1) == "/" else value + (rest or "")
        else:
            break
    return value, i


def _atom(src: str, i: int, depth: int, interpolates: bool) -> tuple[str | None, int]:
    while i < len(src) and src[i] in " \t":
        i += 1
    if depth > 6:
        return None, i
    if m := _HOME.match(src, i):
        return "~", m.end()
    if m := _CWD.match(src, i):
        return ".", m.end()
    if m := _JOINERS.match(src, i):
        return _joined(src, m.end(), depth, interpolates)
    if m := _STRING.match(src, i):
        quote = m.group(1)
        end = src.find(quote, m.end())
        while end > 0 and src[end - 1] == "\\" and len(quote) == 1:
            end = src.find(quote, end + 1)
        if end < 0:
            return None, i
        body: str | None = src[m.end():end]
        if interpolates and quote[0] != "'":
            body = _interpolate(src[m.end():end], depth)
        return (None if body is None else body.replace("\\\\", "\\")), end + len(quote)
    return None, i


def _items(src: str, j: int, interpolates: bool, depth: int) -> tuple[list[str], int]:
    """Literal path expressions separated by commas, from ``j``; where the last one ends."""
    items: list[str] = []
    while True:
        value, j = expr(src, j, interpolates, depth + 1)
        if value is None:
            return items, j
        items.append(value)
        comma = _COMMA.match(src, j)
        if not comma:
            return items, j
        j = comma.end()


def _joined(src: str, j: int, depth: int, interpolates: bool) -> tuple[str | None, int]:
    """The arguments of a path-joining call, joined; ``j`` is just after its parenthesis."""
    parts, j = _items(src, j, interpolates, depth)
    close = _CLOSE.match(src, j)
    if close is None:
        return None, j
    if not parts:
        return ".", close.end()  # Path() is the working directory
    joined = parts[0]
    for p in parts[1:]:
        joined = p if p.startswith("/") else f"{joined.rstrip('/')}/{p}"
    return joined, close.end()


def _interpolate(body: str, depth: int) -> str | None:
    """A double-quoted or template string with known pieces filled in; None if a piece is unknown."""
    def fill(m: re.Match[str]) -> str:
        if m.group(3):
            return "~"
        inner = m.group(1) if m.group(1) is not None else m.group(2)
        value, end = expr(inner, 0, True, depth + 1)
        if value is None or inner[end:].strip():
            raise LookupError(inner)
        return value
    try:
        body = _INTERPOLATION.sub(fill, body)
    except LookupError:
        return None
    return None if re.search(r"[$@]\w", body) else body


# -- what it runs ------------------------------------------------------------------------

_SHELL_OUTS = {
    "python": r"\bos\s*\.\s*(?:system|popen)|\bsubprocess\s*\.\s*(?:run|call|check_call|check_output|Popen|getoutput"
              r"|getstatusoutput)",
    "perl": r"\b(?:system|exec)",
    "ruby": r"\b(?:system|exec|spawn)|\bOpen3\s*\.\s*\w+",
    "node": r"\b(?:execSync|exec|execFileSync|execFile|spawnSync|spawn)",
    "php": r"\b(?:system|exec|shell_exec|passthru|popen|proc_open)",
}
_LIST = re.compile(r"\s*\[")
_LIST_END = re.compile(r"\s*,?\s*\]")


def shell_outs(lang: str, src: str) -> list[str]:
    """The shell commands ``src`` runs with a literal command line."""
    out: list[str] = []
    interpolates = lang != "python"
    for m in _calls(_SHELL_OUTS[lang], src):
        first, end = _atom(src, m.end(), 0, interpolates)
        if first is None:
            words = _string_list(src, m.end(), interpolates)
        else:
            comma = _COMMA.match(src, end)
            more = _string_list(src, comma.end(), interpolates) if comma else None
            words = [first, *more] if more else None
            if words is None:
                out.append(first)  # a whole command line, run by a shell
        if words:
            out.append(" ".join(shlex.quote(w) for w in words))
    if lang in ("perl", "ruby"):
        out.extend(m.group(1) for m in re.finditer(r"`([^`]*)`", src))
    return out


def _string_list(src: str, i: int, interpolates: bool) -> list[str] | None:
    m = _LIST.match(src, i)
    if not m:
        return None
    items, j = _items(src, m.end(), interpolates, 0)
    return items if _LIST_END.match(src, j) else None
