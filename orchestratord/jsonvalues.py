"""Reading decoded JSON from the server and from inbox files, whose shapes are not trusted.

``as_dict(x.get("k"))`` is the one way to say "the object under k, or an empty one": the
``x if isinstance(x, dict) else {}`` it replaces is what a type checker cannot follow.
"""

from __future__ import annotations

from typing import Any


def as_dict(value: Any) -> dict[str, Any]:
    """``value`` if it is a JSON object, else an empty one."""
    return value if isinstance(value, dict) else {}


def as_list(value: Any) -> list[Any]:
    """``value`` if it is a JSON array, else an empty one."""
    return value if isinstance(value, list) else []
