"""Another library's exception quoted inside a one-line diagnosis.

Every ``raise XError(f"...: {one_line(err)}") from err`` and every candidate's or
report's ``error`` field quotes a cause the same way, with one cap. The CLI prints at
most ``edge_sdk.cli.MAX_ERROR_CHARS`` (300) characters of a message; a quote of at most
:data:`CAUSE_CHARS` leaves room for the diagnosis around it (the path, what failed,
what to change).
"""

from __future__ import annotations

from .errors import EdgeError

#: Characters of an exception quoted in a message (skl2onnx once put a 700,000-character
#: attribute dump on one line).
CAUSE_CHARS = 200


def one_line(err: BaseException) -> str:
    """``err`` on one line of at most :data:`CAUSE_CHARS` characters, ending in ``…`` when
    cut. A library's exception is named by its class (``ValueError: ...``; the class
    alone when it has no message); an :class:`~edge_sdk.errors.EdgeError` is a diagnosis
    already and is quoted as it is."""
    text = " ".join(str(err).split())
    if not text:
        return type(err).__name__
    if not isinstance(err, EdgeError):
        text = f"{type(err).__name__}: {text}"
    return text if len(text) <= CAUSE_CHARS else text[: CAUSE_CHARS - 1] + "…"


__all__ = ["CAUSE_CHARS", "one_line"]
