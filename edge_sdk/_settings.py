"""``KEY=N`` command-line settings for the numeric fields of a config dataclass."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import fields
from typing import Any


def numeric_settings(cls: type[Any], settings: Iterable[str], option: str
                     ) -> dict[str, int | float]:
    """``KEY=N`` strings as keyword arguments for the dataclass ``cls``: each ``N`` a float
    or a whole number as its field says. Raises :class:`ValueError` with one line naming
    ``option`` and the key (the dataclass still checks the values' ranges)."""
    known = {f.name: f for f in fields(cls)}
    out: dict[str, int | float] = {}
    for s in settings:
        key, sep, num = s.partition("=")
        key = key.strip()
        if not sep or key not in known:
            raise ValueError(f"{option} {s!r} must be KEY=N with KEY one of "
                             f"{', '.join(known)}")
        kind = float if known[key].type in (float, "float") else int
        try:
            out[key] = kind(num)
        except ValueError:
            raise ValueError(f"{option} {key}: {num!r} is not a "
                             f"{'number' if kind is float else 'whole number'}") from None
    return out
