"""Text from the outside made safe for one log line.

A job controls file names (any bytes but ``/`` and NUL) and the text of some errors; the worker
writes them into its own log and into the job's. ``one_line`` escapes control characters
(``\\n``, ``\\x1b``, the Unicode line separators) and the lone surrogates by which
Python carries bytes that are not UTF-8 (``\\udcff``, shown as the byte ``\\xff``), so
that a name can neither forge a log line nor make the encoding of one fail.
"""

from __future__ import annotations

__all__ = ["one_line"]

_CONTROL = {
    c: {9: "\\t", 10: "\\n", 13: "\\r"}.get(c, f"\\x{c:02x}")
    for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)]
}
_CONTROL.update({0x2028: "\\u2028", 0x2029: "\\u2029"})
# the bytes that are not UTF-8, as Python's file names carry them, shown as the bytes they are
_CONTROL.update({0xDC80 + b: f"\\x{0x80 + b:02x}" for b in range(0x80)})


def one_line(text: str) -> str:
    """``text`` with control characters and lone surrogates escaped: printable, one line,
    and encodable as UTF-8."""
    return text.translate(_CONTROL).encode("utf-8", "backslashreplace").decode("utf-8")
