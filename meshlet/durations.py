"""Parse and format human durations: ``24h``, ``90m``, ``1h30m``, ``10y``, ``500ms``.

Pure: no clock. Used by every CLI flag that takes a time span.
"""

from __future__ import annotations

import re

from meshlet.errors import InputError

_UNITS = {
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
    "w": 7 * 86400.0,
    "y": 365 * 86400.0,
}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w|y)")


def parse_duration(text: str, *, what: str = "duration") -> float:
    """Return seconds for ``text``; raise InputError naming ``what`` when malformed or <= 0."""
    s = text.strip()
    pos = 0
    total = 0.0
    if not s:
        raise InputError(f"{what} is empty: use a value like 24h, 90m or 1h30m")
    while pos < len(s):
        m = _PART.match(s, pos)
        if m is None:
            raise InputError(
                f"{what} {text!r} is not a duration: use a number with a unit "
                "(ms, s, m, h, d, w, y), like 24h, 90m or 1h30m"
            )
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if total <= 0:
        raise InputError(f"{what} {text!r} must be longer than zero")
    return total


def format_duration(seconds: float) -> str:
    """``93784.0`` → ``1d2h3m4s``; negative values get a leading ``-``."""
    sign = "-" if seconds < 0 else ""
    rest = int(abs(seconds))
    if rest == 0:
        return f"{sign}{abs(seconds) * 1000:.0f}ms" if seconds else "0s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        n, rest = divmod(rest, size)
        if n:
            parts.append(f"{n}{unit}")
    return sign + "".join(parts)
