"""Parsing JSON that came over the network: bounded before it is parsed.

``json.loads`` recurses once per nesting level, so 5,000 bytes of ``[`` raise
``RecursionError`` — not a ``ValueError`` — and end whatever thread parsed
them. :func:`loads_bounded` checks the size first, then the nesting depth with
a byte scan that skips string contents, and only then parses. Every way a
message can be wrong (too big, too deep, not UTF-8, not JSON, NaN or
Infinity) is one :class:`UnsafeJsonError`, a :class:`ValueError`.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

#: The protocol's payload limit (DESIGN.md, "MQTT protocol"): nothing on the wire is larger.
MESSAGE_MAX_BYTES = 128 * 1024
#: No message of the protocol nests deeper than 4; 16 leaves room and stays far from the
#: interpreter's recursion limit.
MESSAGE_MAX_DEPTH = 16

# A JSON string, or an unterminated one running to the end; its brackets do not count.
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"?', re.DOTALL)
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")


class UnsafeJsonError(ValueError):
    """A network message that is not a bounded, well-formed JSON document."""


def loads_bounded(data: bytes, *, max_bytes: int, max_depth: int) -> Any:
    """Parse ``data`` as strict UTF-8 JSON of at most ``max_bytes`` bytes and
    ``max_depth`` levels of arrays/objects. Raises :class:`UnsafeJsonError`
    (a ``ValueError``) for anything else, including NaN, Infinity and numbers
    too large for a finite float."""
    if max_bytes < 1 or not 1 <= max_depth <= 256:
        raise ValueError("max_bytes must be >= 1 and max_depth 1..256")
    if len(data) > max_bytes:
        raise UnsafeJsonError(f"message is {len(data)} bytes, over the limit of {max_bytes}")
    depth = _max_depth(data, max_depth)
    if depth > max_depth:
        raise UnsafeJsonError(f"JSON nested deeper than the limit of {max_depth} levels")
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as err:
        raise UnsafeJsonError(f"message is not UTF-8: {err.reason} at byte {err.start}") \
            from None
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except UnsafeJsonError:
        raise
    except ValueError as err:  # JSONDecodeError, and int() of more than 4300 digits
        msg = err.msg if isinstance(err, json.JSONDecodeError) else str(err)
        where = f" at byte {err.pos}" if isinstance(err, json.JSONDecodeError) else ""
        raise UnsafeJsonError(f"message is not JSON: {msg}{where}") from None


def _max_depth(data: bytes, stop_above: int) -> int:
    """The deepest bracket nesting outside strings (scanning stops once past ``stop_above``)."""
    brackets = _STRING.sub(b"", data).translate(None, _NOT_BRACKET)
    depth = deepest = 0
    for b in brackets:
        if b in b"[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > stop_above:
                    break
        else:
            depth -= 1
    return deepest


def _no_constant(name: str) -> Any:
    raise UnsafeJsonError(f"message is not JSON: {name} is not a JSON value")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise UnsafeJsonError(f"message is not JSON: number {text[:20]} is out of range")
    return value
