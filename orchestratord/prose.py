"""Reading text word by word, the cautious way: for prose, and for a command line the shell reading cannot read.

A teammate's message may quote a command anywhere ("I will now run rm -rf /"), and a
command with an unclosed quote cannot be read as the shell would. Both are split into
shell-like tokens (quotes removed, operators apart), and every place a program is named
starts a call; a quoted piece with spaces in it (``sh -c '…'``, a quote in prose) is read
as a script too.
"""

from __future__ import annotations

import re
import shlex

MAX_DEPTH = 8  # quoted pieces inside quoted pieces that are read as scripts
OPERATORS = {";", "&&", "||", "|", "&", "|&", "(", ")", "{", "}", "\n", "`", "$(", "<(", ">(", "!"}


def _dequote_fallback(text: str) -> list[str]:
    text = re.sub(r"[\"'`\\]", "", text)
    return re.findall(r"\|\||&&|\$\(|[;|&(){}\n]|[^\s;|&(){}]+", text)


def tokens(text: str) -> list[str]:
    """Shell-like tokens with quotes removed and operators separate."""
    text = text.replace("\\\n", " ")
    lex = shlex.shlex(text, posix=True, punctuation_chars=";&|()<>")
    lex.whitespace_split = True
    lex.commenters = ""
    try:
        out = list(lex)
    except ValueError:  # unbalanced quotes: prose, or an evasion attempt
        out = _dequote_fallback(text)
    result: list[str] = []
    for tok in out:  # ``$(`` and backticks end up glued to words; split them off
        result.extend(piece for piece in re.split(r"(\$\(|`|<\(|>\()", tok) if piece)
    return result


def segments(text: str, depth: int = 0) -> list[list[str]]:
    """The token lists between shell operators; a quoted piece with spaces is read as a script too."""
    segs: list[list[str]] = [[]]
    nested: list[list[str]] = []
    for tok in tokens(text):
        if depth < MAX_DEPTH and any(c.isspace() for c in tok.strip()) and tok.strip() != text.strip():
            nested.extend(segments(tok, depth + 1))  # sh -c '…', eval "…", ssh host '…', or a quote in prose
        if tok in OPERATORS or (tok and set(tok) <= set(";&|()<>")):
            segs.append([tok] if tok in ("|", "|&") else [])
        else:
            segs[-1].append(tok)
    return [s for s in segs if s] + nested
