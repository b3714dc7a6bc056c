"""A study as the report sees it: the jobs under a folder grouped into (domain, setting, fraction, selector)
groups over seeds, each group's references (random, full), the paired comparisons and the cost per group."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instructdiff.report.fmt import BASE_LABEL, fmt_frac, label_key
from instructdiff.report.load import Job, describe_jobs, eval_tasks, load_jobs
from instructdiff.report.stats import (
    PairedDiff,
    mean_ci,
    mean_or_none,
    paired_diff,
    primary_metric,
    relative_gain,
)


def num(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


@dataclass
class Group:
    """Runs that differ only by seed; metric -> {seed: value}."""

    domain: str
    setting: str
    fraction: float | None
    label: str
    values: dict[str, dict[Any, float]] = field(default_factory=lambda: defaultdict(dict))
    selector: str = ""                                    # conf/selector name; BASE_LABEL for the base row
    params: dict[str, str] = field(default_factory=dict)  # swept selector options (in the label)

    def stats(self, metric: str) -> tuple[float, float | None, int] | None:
        vals = list(self.values.get(metric, {}).values())
        return mean_ci(vals) if vals else None

    @property
    def key(self) -> tuple:
        return (self.domain, self.setting, self.fraction, self.label)


def trained_metrics(job: Job) -> dict[str, float]:
    """The finite trained-model metrics of a finished job (NaN and non-numbers left out, never averaged)."""
    metrics = (((job.results or {}).get("eval") or {}).get("trained") or {}).get("metrics") or {}
    return {m: v for m, x in metrics.items() if (v := num(x)) is not None and math.isfinite(v)}


class Report:
    """Every job under ``root`` and the comparisons the report prints (write.py writes it all)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.jobs: list[Job] = load_jobs(self.root)
        self.varying, self.common = describe_jobs(self.jobs)
        self.ok = [j for j in self.jobs if j.status == "ok"]
        self.groups = self._group()
        self.metrics = sorted({m for g in self.groups.values() for m in g.values})
        self.plots: list[tuple[str, str]] = []  # (section, file name)
        self._paired: list[tuple[Group, str, PairedDiff]] | None = None

    def _group(self) -> dict[tuple, Group]:
        groups: dict[tuple, Group] = {}
        for j in self.ok:
            ev = j.results.get("eval") or {}
            for label, which in ((j.label, "trained"), (BASE_LABEL, "base")):
                metrics = (ev.get(which) or {}).get("metrics") or {}
                frac = j.fraction if which == "trained" else None
                key = (j.domain, j.setting, frac, label)
                for m, v in metrics.items():
                    v = num(v)
                    if v is None or not math.isfinite(v):
                        continue
                    g = groups.setdefault(key, Group(
                        j.domain, j.setting, frac, label, selector=j.selector if which == "trained" else BASE_LABEL,
                        params=dict(j.params) if which == "trained" else {}))
                    g.values[m].setdefault(j.seed, v)  # a seed repeated in merged sweeps counts once
        return groups

    def ordered_groups(self, domain: str | None = None) -> list[Group]:
        gs = [g for g in self.groups.values() if domain is None or g.domain == domain]
        return sorted(gs, key=lambda g: (g.domain, g.setting, g.fraction if g.fraction is not None else -1,
                                         label_key(g.label)))

    def domains(self) -> list[str]:
        return sorted({g.domain for g in self.groups.values()})

    def jobs_of(self, g: Group) -> list[Job]:
        """The finished jobs behind a selector group (``full`` at several fractions: all of them); [] for the
        base row, which every job evaluates."""
        if g.label == BASE_LABEL:
            return []
        return [j for j in self.ok if (j.domain, j.setting, j.fraction, j.label) == g.key]

    def base_group(self, domain: str, setting: str) -> Group | None:
        """The untrained model's row of a domain and setting: what any selection has to beat."""
        return self.groups.get((domain, setting, None, BASE_LABEL))

    def reference(self, g: Group, selector: str) -> Group | None:
        """The ``selector`` (random | full) group ``g`` is compared with: same domain and setting, same fraction
        (not for full, which ignores the budget), and where the reference itself has swept options, the same
        values of those; None for the base row, for a group of the reference selector itself, or when the study
        has no such runs."""
        if g.label == BASE_LABEL or g.selector == selector:
            return None
        cands = [r for r in self.groups.values()
                 if r.selector == selector and (r.domain, r.setting) == (g.domain, g.setting)
                 and (selector == "full" or r.fraction == g.fraction)
                 and all(g.params.get(k) == v for k, v in r.params.items())]
        if not cands:
            return None
        return max(cands, key=lambda r: (len(r.params), r.label))  # the most specific match

    def paired(self) -> list[tuple[Group, str, PairedDiff]]:
        """(group, reference, PairedDiff) for every selector group, metric and reference (random, full) the
        study has: same seed, same pool (domain.pool_seed), same other swept settings; cached."""
        if self._paired is None:
            self._paired = []
            for g in self.ordered_groups():
                for m in sorted(g.values):
                    for ref_name in ("random", "full"):
                        ref = self.reference(g, ref_name)
                        if ref is not None and ref.values.get(m):
                            self._paired.append((g, ref_name, paired_diff(g.values[m], ref.values[m], m)))
        return self._paired

    def paired_for(self, g: Group, metric: str, ref: str) -> PairedDiff | None:
        return next((p for x, r, p in self.paired() if x is g and r == ref and p.metric == metric), None)

    def primary_metric(self, domain: str) -> str | None:
        """The domain's first ``*bits_per_byte`` metric (in the order of its eval tasks), else its first metric."""
        metrics = {m for g in self.groups.values() if g.domain == domain and g.label != BASE_LABEL
                   for m in g.values}
        config = next((j.config for j in self.ok if j.domain == domain), {})
        return primary_metric(metrics, eval_tasks(config))

    def gains(self, g: Group, metric: str) -> tuple[float | None, float | None]:
        """Percent gain of the group's mean over the mean of ``full`` and of ``random`` (positive = better)."""
        st = g.stats(metric)
        if st is None or g.label == BASE_LABEL:
            return None, None
        out = []
        for sel in ("full", "random"):
            ref = self.reference(g, sel)
            rs = ref.stats(metric) if ref is not None and ref is not g else None
            out.append(relative_gain(st[0], rs[0] if rs else None, metric) if rs else None)
        return out[0], out[1]

    def selection_flops(self, g: Group) -> float | None:
        """Mean from-scratch selection FLOPs over the group's runs (None for the base row and for runs made
        before cost accounting)."""
        return mean_or_none([num((j.results.get("cost") or {}).get("selection_flops_uncached"))
                             for j in self.jobs_of(g)])

    def distinct_runs(self) -> list[Job]:
        """The finished jobs, one per (domain, setting, fraction, selector label, seed): the first job of a
        repeated run (a merged sweep that reran it, or ``full`` at several budget fractions: full takes the
        whole pool whatever its fraction says, so those jobs are one run per seed) is the one counted, as in
        the results table."""
        seen, out = set(), []
        for j in self.ok:
            key = (j.domain, j.setting, j.fraction, j.label, j.seed)
            if key not in seen:
                seen.add(key)
                out.append(j)
        return out

    def group_name(self, g: Group) -> str:
        """The group's label, with its fraction where the domain's selectors ran at several, and its setting."""
        fracs = {x.fraction for x in self.groups.values()
                 if x.domain == g.domain and x.selector not in (BASE_LABEL, "full")}
        name = g.label
        if len(fracs) > 1 and g.selector != "full":
            name += f" @{fmt_frac(g.fraction)}"
        return name + (f" ({g.setting})" if g.setting else "")
