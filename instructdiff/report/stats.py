"""The report's statistics: t intervals over seeds, paired differences and their verdicts, metric direction,
relative gains, Jaccard overlap and the Pareto frontier. Pure functions of numbers; nothing here reads files."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from scipy.stats import t as student_t

CI_LEVEL = 0.95
LOWER_IS_BETTER = ("bits_per_byte", "perplexity", "loss", "nll", "bpb")


def t_quantile(df: int, level: float = CI_LEVEL) -> float:
    """t_{(1+level)/2, df}: the half-width multiplier of a two-sided ``level`` interval (Student's t)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    return float(student_t.ppf((1 + level) / 2, df))


def mean_ci(values: Sequence[float], level: float = CI_LEVEL) -> tuple[float, float | None, int]:
    """(mean, half-width, n): mean ± t_{(1+level)/2, n-1}·s/√n with s the sample std (ddof=1); the half-width
    is None for n = 1, where the spread over seeds is unknown."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        raise ValueError("mean_ci of no values")
    if all(x == xs[0] for x in xs):  # no spread: exactly 0, not the rounding noise of summing equal values
        return xs[0], (None if n == 1 else 0.0), n
    mean = sum(xs) / n
    if n == 1:
        return mean, None, 1
    s = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return mean, t_quantile(n - 1, level) * s / math.sqrt(n), n


def lower_is_better(metric: str) -> bool:
    """True for loss-like metrics (bits_per_byte, nll, word_perplexity, byte_perplexity, loss, bpb): the metric
    name (``<task>/<metric>[/<filter>]``) contains one of ``LOWER_IS_BETTER``; accuracies, exact_match,
    pass@1 and loglikelihood are higher-is-better."""
    parts = metric.split("/")
    name = parts[1] if len(parts) > 1 else parts[0]  # the task name ("id_gsm8k_bpb") says nothing
    return any(w in name for w in LOWER_IS_BETTER)


def direction(metric: str) -> str:
    """"↓ lower is better" or "↑ higher is better": what a reader of a plot or table needs first."""
    return "↓ lower is better" if lower_is_better(metric) else "↑ higher is better"


def primary_metric(metrics: Iterable[str], tasks: Sequence[str] = ()) -> str | None:
    """The first ``*bits_per_byte`` metric, else the first metric: metrics ordered by their task's place in
    ``tasks`` (the domain's eval tasks), then by name. None for no metrics."""
    def key(m: str) -> tuple:
        task = m.split("/")[0]
        return (tasks.index(task) if task in tasks else len(tasks), m)

    ordered = sorted(set(metrics), key=key)
    bpb = [m for m in ordered if m.split("/")[1 if "/" in m else 0].endswith("bits_per_byte")]
    return (bpb or ordered or [None])[0]


def relative_gain(value: float, ref: float | None, metric: str) -> float | None:
    """Percent improvement over ``ref``: positive = better, for higher- and lower-is-better metrics alike."""
    if ref is None or ref == 0 or not math.isfinite(ref):
        return None
    gain = (value - ref) / abs(ref) * 100.0
    return -gain if lower_is_better(metric) else gain


def relative_interval(low: float | None, high: float | None, ref: float | None,
                      metric: str) -> tuple[float, float] | None:
    """The interval (low, high) of a difference selector − reference as a percent gain over ``ref`` (positive =
    better, so the ends swap for lower-is-better metrics); None without an interval or a usable reference."""
    if low is None or high is None or ref is None:
        return None
    lo, hi = relative_gain(ref + low, ref, metric), relative_gain(ref + high, ref, metric)
    if lo is None or hi is None:
        return None
    return (min(lo, hi), max(lo, hi))


@dataclass
class PairedDiff:
    """Per-seed differences ``selector − reference`` of one metric: their mean, the ``CI_LEVEL`` t interval
    (None for n < 2) and the verdict: ``better`` / ``worse`` only when the interval excludes 0 (in the
    metric's direction), ``indistinguishable`` when it contains 0, ``n/a`` when there is no interval.
    ``ref_mean`` is the reference's mean over the paired seeds: the base of the relative gain."""

    metric: str
    seeds: list
    diffs: list[float]
    mean: float | None
    low: float | None
    high: float | None
    verdict: str
    ref_mean: float | None = None

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def gain(self) -> float | None:
        """The mean difference as a percent gain over the reference (positive = better)."""
        if self.mean is None or self.ref_mean is None:
            return None
        return relative_gain(self.ref_mean + self.mean, self.ref_mean, self.metric)

    @property
    def gain_interval(self) -> tuple[float, float] | None:
        return relative_interval(self.low, self.high, self.ref_mean, self.metric)


def paired_verdict(low: float | None, high: float | None, metric: str) -> str:
    """better | worse (the interval excludes 0, read in the metric's direction) | indistinguishable | n/a."""
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return "n/a"
    lower = lower_is_better(metric)
    if high < 0:
        return "better" if lower else "worse"
    if low > 0:
        return "worse" if lower else "better"
    return "indistinguishable"


def paired_diff(values: dict[Any, float], ref_values: dict[Any, float], metric: str,
                level: float = CI_LEVEL) -> PairedDiff:
    """Pair ``values`` and ``ref_values`` ({seed: value}) on the seeds both have; mean of the differences
    (values − reference) ± t_{(1+level)/2, n−1}·s_d/√n."""
    seeds = sorted(set(values) & set(ref_values), key=lambda s: (str(type(s)), s))
    diffs = [float(values[s]) - float(ref_values[s]) for s in seeds]
    if not diffs:
        return PairedDiff(metric, [], [], None, None, None, "n/a")
    ref_mean = sum(float(ref_values[s]) for s in seeds) / len(seeds)
    mean, half, n = mean_ci(diffs, level)
    if half is None:
        return PairedDiff(metric, seeds, diffs, mean, None, None, "n/a", ref_mean)
    low, high = mean - half, mean + half
    return PairedDiff(metric, seeds, diffs, mean, low, high, paired_verdict(low, high, metric), ref_mean)


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def pareto_front(points: Sequence[tuple[float, float]], lower_better: bool = False) -> list[int]:
    """Indices of the points no other point dominates (cost ≤ and metric at least as good, one strictly),
    in order of cost: the frontier of the metric-vs-cost plot."""
    sign = -1.0 if lower_better else 1.0
    front = []
    for i, (c, m) in enumerate(points):
        dominated = any((c2 <= c and sign * m2 >= sign * m) and (c2 < c or sign * m2 > sign * m)
                        for k, (c2, m2) in enumerate(points) if k != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -sign * points[i][1]))


def mean_or_none(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(vals) / len(vals) if vals else None
