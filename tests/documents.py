"""Places in a JSON- or TOML-shaped document, for tests that mutate one place at a time."""

from __future__ import annotations

from typing import Any


def places(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in `doc`: the document itself, then each key of its objects (tables) and
    each index of its arrays, depth first, as paths from the top."""
    out = [prefix]
    items = (
        doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    )
    for key, value in items:
        out += places(value, (*prefix, key))
    return out
