"""The documentation stays true to the code: the generated reference, the example, the links.

docs/configuration.md is generated from the config schema (``make docs``); these tests fail
when it is stale, when a key has no description or a description outlives its key, when the
shipped example config leaves a key out, when the README grows past a few screens, and when
a relative link or an #anchor in README.md or docs/*.md points at nothing.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from orchestratord.config import locate_keys
from orchestratord.configdoc import DESCRIPTIONS, documented_keys, reference, slug

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "etc" / "opencode-orchestrator" / "orchestrator.toml"
README_LIMIT = 12 * 1024
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_the_configuration_reference_is_up_to_date() -> None:
    on_disk = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert on_disk == reference(), "docs/configuration.md is stale: run `make docs` and commit the result"


def test_the_reference_command_prints_the_generated_page() -> None:
    out = subprocess.run([sys.executable, "-m", "orchestratord", "config", "reference"], capture_output=True,
                         text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout == reference()


def test_every_key_has_a_description_and_every_description_a_key() -> None:
    keys = documented_keys()
    assert len(keys) == len(set(keys))
    missing = [k for k in keys if not DESCRIPTIONS.get(k, "").strip()]
    assert missing == [], f"keys without a description in orchestratord/configdoc.py: {missing}"
    orphans = sorted(set(DESCRIPTIONS) - set(keys))
    assert orphans == [], f"descriptions of keys that do not exist: {orphans}"


def test_the_reference_shows_every_key_with_its_default() -> None:
    page = reference()
    for key in documented_keys():
        if key not in ("triggers", "safety.rules", "safety.hooks"):
            assert f"| `{key}` |" in page, key
    assert "| `dispatch.max_per_hour` | integer | `60` |" in page
    assert "| `ledger.path` | path |" in page and "| `events.read_timeout_seconds` | seconds | `25` |" in page


def example_keys(text: str) -> set[str]:
    """Every key the example sets or shows in a comment, as ``section.key`` (array indices dropped)."""
    shown = re.compile(r"^(\s*)#\s?(?=\s*(\[\[?[A-Za-z0-9_.]+\]\]?\s*$|[A-Za-z0-9_]+\s*=))")
    uncommented = "\n".join(shown.sub(r"\1", line) for line in text.splitlines())
    return {re.sub(r"\.\d+(?=\.|$)", "", path) for path in locate_keys(uncommented)}


def test_the_example_config_shows_every_key() -> None:
    found = example_keys(EXAMPLE.read_text(encoding="utf-8"))
    missing = [k for k in documented_keys() if k not in found]
    assert missing == [], f"{EXAMPLE.relative_to(ROOT)} does not show {missing} (set or in a comment)"


def test_example_keys_reads_commented_tables_and_keys() -> None:
    text = "[a]\nx = 1\n# y = 2\n# prose, not a key\n# [[b.c]]\n# z = 3\n"
    assert {"a.x", "a.y", "b.c", "b.c.z"} <= example_keys(text)
    assert "a.z" not in example_keys(text)


def test_the_readme_is_a_few_screens() -> None:
    size = len((ROOT / "README.md").read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes, over {README_LIMIT}: move detail into docs/"


# -- links --------------------------------------------------------------------------

FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks, with inline code spans blanked."""
    out: list[str] = []
    fenced = False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append(re.sub(r"`[^`]*`", "``", line))
    return out


def anchors(path: Path) -> set[str]:
    """The #anchors GitHub gives the headings of ``path`` (a repeated one gets -1, -2, …)."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if fenced or not heading:
            continue
        base = slug(heading.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[str]:
    return [m.group(1) for line in prose_lines(path.read_text(encoding="utf-8")) for m in LINK.finditer(line)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page: Path) -> None:
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:, file:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            broken.append(f"{target}: no heading with that anchor in {dest.relative_to(ROOT)}")
    assert broken == [], f"{page.relative_to(ROOT)}: {broken}"


def test_the_link_checker_sees_links_and_anchors(tmp_path: Path) -> None:
    page = tmp_path / "a.md"
    page.write_text("# Title `x`\n## What it does, and why\n## What it does, and why\n"
                    "See [b](b.md#part) and [c](#what-it-does-and-why-1), not `[d](nowhere.md)`.\n"
                    "```\n[e](inside-a-fence.md)\n```\n")
    assert links(page) == ["b.md#part", "#what-it-does-and-why-1"]
    assert anchors(page) == {"title-x", "what-it-does-and-why", "what-it-does-and-why-1"}
    assert slug("[[safety.rules]]") == "safetyrules"
