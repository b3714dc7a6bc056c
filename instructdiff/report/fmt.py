"""How the report writes numbers, labels and markdown tables: one place, so the tables and plots agree."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

BASE_LABEL = "base (no SFT)"
# Reference rows first, then InstructDiff, then the rest alphabetically.
LABEL_ORDER = (BASE_LABEL, "full", "random", "instructdiff")


def label_key(label: str) -> tuple:
    base = label.split(" [", 1)[0]
    rank = LABEL_ORDER.index(base) if base in LABEL_ORDER else len(LABEL_ORDER)
    return (rank, base, label)


def fmt(x: float | None, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return f"{x:.{digits}g}"


def fmt_ci(mean: float, half: float | None, n: int) -> str:
    return f"{fmt(mean)} (n=1)" if half is None else f"{fmt(mean)} ± {fmt(half, 2)}"


def fmt_gain(g: float | None) -> str:
    """A signed percentage: "+11.9%", "-0.3%"; a gain that rounds to 0.0 keeps its sign and two significant
    digits ("+0.012%", "-0.0031%"), an exact 0 is "+0.0%". Never "±": a gain is a value, not an interval."""
    if g is None or not math.isfinite(g):
        return "—"
    if g != 0 and abs(g) < 0.05:
        return f"{g:+.2g}%"
    return f"{g:+.1f}%"


def fmt_gain_ci(g: float | None, interval: tuple[float, float] | None) -> str:
    """A gain with its own interval, "+2.2% (+1.3…+3.0%)", or the bare gain where there is none (one seed);
    ends below 1% keep two significant digits ("-0.16…+0.0031%"), so a small interval never reads as 0."""
    if interval is None:
        return fmt_gain(g)
    lo, hi = (f"{x:+.1f}" if abs(x) >= 1 else f"{x:+.2g}" for x in interval)
    return f"{fmt_gain(g)} ({lo}…{hi}%)"


def fmt_signed(x: float | None, digits: int = 3) -> str:
    if x is None or not math.isfinite(x):
        return "—"
    return f"{x:+.{digits}g}"


def fmt_interval(low: float | None, high: float | None, digits: int = 3) -> str:
    return "—" if low is None or high is None else f"{fmt_signed(low, digits)}…{fmt_signed(high, digits)}"


def fmt_frac(f: float | None) -> str:
    return "—" if f is None else f"{f:g}"


def fmt_flops(x: float | None) -> str:
    """FLOPs in engineering notation (2.3e+12); 0 stays 0 (a model-free selector), None is unknown."""
    if x is None or not math.isfinite(x):
        return "—"
    return "0" if x == 0 else f"{x:.2e}"


def slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_") or "x"


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|")

    out = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return out
