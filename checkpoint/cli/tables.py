"""Plain-text tables and numbers for `elastic-ckpt`, readable at 80 columns.

Columns are as wide as their content; when a table would be wider than the terminal, the
gaps between columns shrink to one space, then the columns named as shrinkable give up characters (in the order given) and long cells are cut
with "..." (in the middle for names, whose ends matter; at the end otherwise).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

WIDTH = 80
_GAP = "  "
_CUT = "..."


@dataclass(frozen=True)
class Column:
    header: str
    right: bool = False  # numbers align right
    shrink: bool = False  # may be cut to fit the width
    middle: bool = False  # cut in the middle (names) rather than at the end


def fit(text: str, width: int, *, middle: bool = False) -> str:
    """`text` cut to at most `width` characters, marking the cut with "..."."""
    if len(text) <= width:
        return text
    if width <= len(_CUT):
        return text[:width]
    keep = width - len(_CUT)
    if middle:
        head = (keep + 1) // 2
        return text[:head] + _CUT + text[len(text) - (keep - head):]
    return text[:keep] + _CUT


def render(columns: Sequence[Column], rows: Sequence[Sequence[str]], width: int = WIDTH) -> list[str]:
    """Header line plus one line per row, every line at most `width` characters."""
    widths = [max([len(c.header), *(len(r[i]) for r in rows)]) for i, c in enumerate(columns)]
    gap = _GAP if sum(widths) + len(_GAP) * (len(columns) - 1) <= width else " "
    excess = sum(widths) + len(gap) * (len(columns) - 1) - width
    for i, col in enumerate(columns):
        if excess > 0 and col.shrink:
            cut = min(excess, widths[i] - max(len(col.header), len(_CUT) + 3))
            if cut > 0:
                widths[i] -= cut
                excess -= cut
    lines = []
    for cells in [[c.header for c in columns], *rows]:
        parts = []
        for col, w, cell in zip(columns, widths, cells):
            text = fit(cell, w, middle=col.middle)
            parts.append(text.rjust(w) if col.right else text.ljust(w))
        lines.append(gap.join(parts).rstrip()[:width])
    return lines


def size(nbytes: int) -> str:
    """1023 B, 1.5 KiB, 12.0 MiB, ..."""
    if nbytes < 1024:
        return f"{nbytes} B"
    value = float(nbytes)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024:
            return f"{value:.1f} {unit}"
    return f"{value / 1024:.1f} TiB"


def age(seconds: float | None) -> str:
    """45s, 12m, 3h, 5d; "-" when unknown; "0s" for clocks slightly ahead of ours."""
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= span:
            return f"{int(seconds // span)}{unit}"
    return f"{int(seconds)}s"


def number(value: float) -> str:
    """A metric value: 4 significant digits, nan/inf spelled out."""
    if math.isnan(value):
        return "nan"
    return f"{value:.4g}"
