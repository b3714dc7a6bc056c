"""``instructdiff-report <multirun dir> [--out DIR]``: tables and plots of a sweep, from its run dirs alone.

Writes into the multirun directory (or ``--out``):

    report.md        what the study found (a paragraph generated from the paired comparison on the primary
                     metric), results per domain (mean ± 95% CI over seeds, gain over full and random), the
                     paired comparison, missing runs, selection overlap, cost per selector, the plots
    report.csv       the results table in long form: one row per (domain, setting, fraction, selector, metric)
    paired.csv       per (domain, setting, fraction, selector, metric, reference random|full): the mean of the
                     per-seed differences selector − reference over runs with the same seed (and so the same
                     pool: it is drawn by ``domain.pool_seed``), its 95% t interval, n and the verdict
                     better | indistinguishable | worse (better/worse only when the interval excludes 0, in the
                     metric's direction), n/a for fewer than 2 pairs
    runs.csv         one row per job: status (ok | missing/failed | not started), selector, seed, directory
    overlap.csv      Jaccard of the selected id sets between selectors, mean over seeds
    cost.csv         wall time per stage, scoring passes, trainings, cache hits/misses and estimated FLOPs
                     (selection from scratch and in this run, training, evaluation) per selector
    *.png            metric against the data fraction (and any other swept numeric selector option, e.g.
                     warmup_ratio, rounds), metric against selection FLOPs (``pareto_<domain>.png``, the
                     cost view of Ivison et al. 2025, arXiv 2503.01807), ΔH / ΔNLL distributions, overlap
                     heatmaps, cost bars

FLOPs come from each run's ``results.json["cost"]`` (instructdiff/cost.py). The selection cost shown is the
from-scratch one (``selection_flops_uncached``): a selector whose scores another job had cached still costs what
computing them costs, so the comparison does not depend on the order the sweep ran in.

A job is a directory with a ``.hydra/`` folder (Hydra writes it before the job starts); one without
``results.json`` crashed, was interrupted or is still running and is listed as missing. Jobs of a sweep that
never got a directory are found from the sweep's ``multirun.yaml`` (basic sweeper) and listed as not started.
Runs are told apart by the overrides that vary across the sweep: ``selector``, ``seed``,
``selector.budget.fraction``, ``selector.<option>`` (shown in the selector's label, e.g.
``instructdiff [warmup_ratio=0.05]``) and anything else (shown as the run's setting).

``instructdiff-report --verify JOB_DIR`` reruns one finished job from its recorded config and says whether it
reproduces (instructdiff/verify.py).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CI_LEVEL = 0.95
BASE_LABEL = "base (no SFT)"
# Reference rows first, then InstructDiff, then the rest alphabetically.
LABEL_ORDER = (BASE_LABEL, "full", "random", "instructdiff")
# Override keys that only say where things go, never what was run.
IGNORED_KEYS = ("paths.", "logger", "hydra.")
LOWER_IS_BETTER = ("bits_per_byte", "perplexity", "loss", "nll", "bpb")
STAGE_ORDER = ("data", "calibrate", "score", "select", "train", "eval")
MAX_DELTA_GROUPS = 8
PAIRED_COLUMNS = ("domain", "setting", "fraction", "selector", "metric", "lower_is_better", "reference",
                  "n_pairs", "seeds", "mean_diff", "ci_low", "ci_high", "verdict")
# cost.csv column -> results.json["cost"] key (instructdiff/cost.py), mean over a selector's runs
COST_COLUMNS = (("mean_selection_flops", "selection_flops_uncached"),
                ("mean_selection_flops_this_run", "selection_flops"), ("mean_train_flops", "train_flops"),
                ("mean_eval_flops", "eval_flops"), ("mean_total_flops", "total_flops"))


# -- statistics ---------------------------------------------------------------------------------------------
def t_quantile(df: int, level: float = CI_LEVEL) -> float:
    """t_{(1+level)/2, df}: the half-width multiplier of a two-sided ``level`` interval (Student's t, scipy)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    from scipy.stats import t

    return float(t.ppf((1 + level) / 2, df))


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


def eval_tasks(config: dict) -> list[str]:
    """The eval task names of a run's resolved config, in order (``eval.tasks``, else ``domain.eval_tasks``)."""
    for key in ("eval.tasks", "domain.eval_tasks"):
        tasks = _get(config, key)
        if isinstance(tasks, list) and tasks:
            return [str(t) for t in tasks]
    return []


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


@dataclass
class PairedDiff:
    """Per-seed differences ``selector − reference`` of one metric: their mean, the ``CI_LEVEL`` t interval
    (None for n < 2) and the verdict: ``better`` / ``worse`` only when the interval excludes 0 (in the
    metric's direction), ``indistinguishable`` when it contains 0, ``n/a`` when there is no interval."""

    metric: str
    seeds: list
    diffs: list[float]
    mean: float | None
    low: float | None
    high: float | None
    verdict: str

    @property
    def n(self) -> int:
        return len(self.diffs)


def paired_verdict(low: float | None, high: float | None, metric: str) -> str:
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
    mean, half, n = mean_ci(diffs, level)
    if half is None:
        return PairedDiff(metric, seeds, diffs, mean, None, None, "n/a")
    low, high = mean - half, mean + half
    return PairedDiff(metric, seeds, diffs, mean, low, high, paired_verdict(low, high, metric))


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


# -- reading run directories -------------------------------------------------------------------------------
@dataclass
class Job:
    path: Path | None                  # None: a job of the sweep that never got a directory
    sweep: Path
    num: int | None
    overrides: dict[str, str]
    choices: dict[str, Any]
    config: dict[str, Any]
    results: dict | None = None
    reason: str | None = None
    # filled by Report: what tells this job apart from the others of the sweep(s)
    selector: str = "?"
    domain: str = "?"
    seed: Any = None
    fraction: float | None = None
    params: dict[str, str] = field(default_factory=dict)
    setting: str = ""

    @property
    def status(self) -> str:
        if self.path is None:
            return "not started"
        return "ok" if self.results is not None else "missing/failed"

    @property
    def label(self) -> str:
        if not self.params:
            return self.selector
        return f"{self.selector} [{', '.join(f'{k}={v}' for k, v in sorted(self.params.items()))}]"

    @property
    def name(self) -> str:
        return self.path.name if self.path is not None else f"{self.num}_(never started)"


def _load_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def _parse_overrides(items: Iterable[str]) -> dict[str, str]:
    out = {}
    for ov in items:
        if "=" not in ov:
            continue  # "~key" deletions carry no value
        key, value = ov.split("=", 1)
        out[key.lstrip("+~")] = value
    return out


def _get(d: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def find_job_dirs(root: Path) -> list[Path]:
    """Every directory under ``root`` that holds a ``.hydra/`` folder, without descending into jobs (their
    wandb/ folders) or submitit's pickles."""
    jobs = []
    for dirpath, dirnames, _ in os.walk(root):
        if ".hydra" in dirnames and Path(dirpath) != root:
            jobs.append(Path(dirpath))
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if d not in (".submitit", "wandb", ".hydra"))
    return jobs


def _failure_reason(job_dir: Path) -> str:
    """The last error line of the job's Hydra log, else the last step the pipeline logged."""
    last_step = None
    for log in sorted(job_dir.glob("*.log")):
        try:
            lines = log.read_text(errors="replace").splitlines()
        except OSError:
            continue
        errors = [x.strip() for x in lines if re.search(r"(Error|Exception)\b", x)]
        if errors:
            return errors[-1][:300]
        steps = [m.group(1) for x in lines if (m := re.search(r"\]\[instructdiff\]\[\w+\] - (.*)", x))]
        last_step = steps[-1][:200] if steps else last_step
    reason = "no results.json (crashed, interrupted or still running)"
    return f"{reason}; last step logged: {last_step}" if last_step else reason


def load_job(job_dir: Path) -> Job:
    hydra_yaml = _load_yaml(job_dir / ".hydra" / "hydra.yaml") or {}
    hydra = hydra_yaml.get("hydra", {}) if isinstance(hydra_yaml, dict) else {}
    overrides = _load_yaml(job_dir / ".hydra" / "overrides.yaml") or []
    num = _get(hydra, "job.num")
    results = None
    if (job_dir / "results.json").is_file():
        try:
            results = json.loads((job_dir / "results.json").read_text())
        except (OSError, ValueError):
            results = None
    config: dict = {}
    if (job_dir / "manifest.json").is_file():
        try:
            config = json.loads((job_dir / "manifest.json").read_text()).get("config") or {}
        except (OSError, ValueError):
            config = {}
    if not config:
        config = _load_yaml(job_dir / ".hydra" / "config.yaml") or {}
    job = Job(path=job_dir, sweep=job_dir.parent, num=int(num) if num is not None else None,
              overrides=_parse_overrides(overrides), choices=_get(hydra, "runtime.choices") or {},
              config=config, results=results)
    if results is None:
        job.reason = _failure_reason(job_dir)
    return job


def expected_jobs(sweep_dir: Path) -> list[list[str]] | None:
    """The override list of every job the sweep in ``sweep_dir`` was to run, in job-number order, rebuilt from
    its multirun.yaml the way Hydra's basic sweeper builds it; None when that cannot be done."""
    cfg = _load_yaml(sweep_dir / "multirun.yaml")
    hydra = cfg.get("hydra") if isinstance(cfg, dict) else None
    if not isinstance(hydra, dict) or "BasicSweeper" not in str(_get(hydra, "sweeper._target_")):
        return None
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        params = _get(hydra, "sweeper.params") or {}
        args = [f"{k}={v}" for k, v in params.items()] + list(_get(hydra, "overrides.task") or [])
        parsed = OverridesParser.create().parse_overrides(args)
        return BasicSweeper.split_arguments(parsed, None)[0]
    except Exception:  # a sweep this reader cannot rebuild: report the jobs that exist
        return None


def _selector_from_target(selector_cfg: dict) -> str:
    """conf/selector name of a resolved selector config (runs made outside Hydra have no runtime choices)."""
    from instructdiff import CONF_DIR

    target = selector_cfg.get("_target_")
    matches = []
    for p in sorted((CONF_DIR / "selector").glob("*.yaml")):
        conf = _load_yaml(p) or {}
        if conf.get("_target_") == target:
            matches.append((p.stem, set(conf)))
    if len(matches) > 1:  # a class behind several files: the one with the same keys
        same = [name for name, keys in matches if keys == set(selector_cfg)]
        matches = [(same[0], set())] if same else matches
    if matches:
        return matches[0][0]
    return str(target).rsplit(".", 1)[-1] if target else "?"


# -- the report ---------------------------------------------------------------------------------------------
def _label_key(label: str) -> tuple:
    base = label.split(" [", 1)[0]
    rank = LABEL_ORDER.index(base) if base in LABEL_ORDER else len(LABEL_ORDER)
    return (rank, base, label)


def _num(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return f"{x:.{digits}g}"


def _fmt_ci(mean: float, half: float | None, n: int) -> str:
    return f"{_fmt(mean)} (n=1)" if half is None else f"{_fmt(mean)} ± {_fmt(half, 2)}"


def _fmt_gain(g: float | None) -> str:
    """A signed percentage: "+11.9%", "-0.3%"; a gain that rounds to 0.0 keeps its sign and two significant
    digits ("+0.012%", "-0.0031%"), an exact 0 is "+0.0%". Never "±": a gain is a value, not an interval."""
    if g is None or not math.isfinite(g):
        return "—"
    if g != 0 and abs(g) < 0.05:
        return f"{g:+.2g}%"
    return f"{g:+.1f}%"


def _fmt_signed(x: float | None, digits: int = 3) -> str:
    if x is None or not math.isfinite(x):
        return "—"
    return f"{x:+.{digits}g}"


def _fmt_interval(low: float | None, high: float | None, digits: int = 3) -> str:
    return "—" if low is None or high is None else f"{_fmt_signed(low, digits)}…{_fmt_signed(high, digits)}"


def _fmt_frac(f: float | None) -> str:
    return "—" if f is None else f"{f:g}"


def _fmt_flops(x: float | None) -> str:
    """FLOPs in engineering notation (2.3e+12); 0 stays 0 (a model-free selector), None is unknown."""
    if x is None or not math.isfinite(x):
        return "—"
    return "0" if x == 0 else f"{x:.2e}"


def _mean_or_none(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(vals) / len(vals) if vals else None


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


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_") or "x"


def _md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|")

    out = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return out


def _read_selection(job: Job) -> list[dict]:
    path = job.path / "selection.jsonl" if job.path else None
    if path is None or not path.is_file():
        return []
    recs = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                recs.append(json.loads(line))
            except ValueError:
                continue
    return recs


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


class Report:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.jobs: list[Job] = [load_job(p) for p in find_job_dirs(self.root)]
        self._add_not_started()
        self.jobs.sort(key=lambda j: (str(j.sweep), j.num if j.num is not None else 1 << 30, j.name))
        self.varying: list[str] = []
        self.common: dict[str, str] = {}
        self._describe_jobs()
        self.ok = [j for j in self.jobs if j.status == "ok"]
        self.groups = self._group()
        self.metrics = sorted({m for g in self.groups.values() for m in g.values})
        self.plots: list[tuple[str, str]] = []  # (section, file name)
        self._paired: list[tuple[Group, str, PairedDiff]] | None = None

    # -- loading ----------------------------------------------------------------------------------------
    def _add_not_started(self) -> None:
        sweeps = {j.sweep for j in self.jobs}
        sweeps |= {p.parent for p in self.root.rglob("multirun.yaml") if ".submitit" not in p.parts}
        for sweep in sorted(sweeps):
            expected = expected_jobs(sweep)
            if expected is None:
                continue
            have = {j.num for j in self.jobs if j.sweep == sweep}
            mr = _load_yaml(sweep / "multirun.yaml") or {}
            choices = _get(mr, "hydra.runtime.choices") or {}
            config = {k: v for k, v in mr.items() if k != "hydra"}
            for num, ovs in enumerate(expected):
                if num not in have:
                    self.jobs.append(Job(path=None, sweep=sweep, num=num, overrides=_parse_overrides(ovs),
                                         choices=choices, config=config,
                                         reason="never started (the sweep stopped before this job)"))

    def _describe_jobs(self) -> None:
        keys = sorted({k for j in self.jobs for k in j.overrides if not k.startswith(IGNORED_KEYS)})
        for k in keys:
            vals = {j.overrides.get(k) for j in self.jobs}
            if len(vals) > 1:
                self.varying.append(k)
            else:
                self.common[k] = next(iter(vals))  # type: ignore[assignment]
        models = {str(_get(j.config, "model.name")) for j in self.jobs if _get(j.config, "model.name")}
        for j in self.jobs:
            j.selector = j.overrides.get("selector") or j.choices.get("selector") or (
                _selector_from_target(j.config.get("selector") or {}) if j.config.get("selector") else "?")
            j.domain = str(_get(j.config, "domain.name") or j.overrides.get("domain")
                           or (j.results or {}).get("domain") or "?")
            j.seed = j.overrides.get("seed", _get(j.config, "seed"))
            j.seed = int(j.seed) if _num(j.seed) is not None else j.seed
            if j.selector == "full":
                j.fraction = 1.0  # full takes the whole pool whatever its budget says
            elif _get(j.config, "selector.budget.count") not in (None, "null"):
                j.fraction = None
            else:
                j.fraction = _num(j.overrides.get("selector.budget.fraction",
                                                  _get(j.config, "selector.budget.fraction")))
            setting = []
            for k in self.varying:
                if k in ("selector", "seed", "selector.budget.fraction", "domain"):
                    continue
                if k.startswith("selector."):
                    if k in j.overrides:
                        j.params[k.removeprefix("selector.")] = j.overrides[k]
                else:
                    setting.append(f"{k}={j.overrides.get(k, '(default)')}")
            if len(models) > 1 and not any(s.startswith("model=") for s in setting):
                setting.insert(0, f"model={_get(j.config, 'model.name')}")
            j.setting = ", ".join(setting)

    def _group(self) -> dict[tuple, Group]:
        groups: dict[tuple, Group] = {}
        for j in self.ok:
            ev = j.results.get("eval") or {}
            for label, which in ((j.label, "trained"), (BASE_LABEL, "base")):
                metrics = (ev.get(which) or {}).get("metrics") or {}
                frac = j.fraction if which == "trained" else None
                key = (j.domain, j.setting, frac, label)
                for m, v in metrics.items():
                    v = _num(v)
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
                                         _label_key(g.label)))

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

    def primary_metric(self, domain: str) -> str | None:
        """The domain's first ``*bits_per_byte`` metric (in the order of its eval tasks), else its first metric."""
        metrics = {m for g in self.groups.values() if g.domain == domain and g.label != BASE_LABEL
                   for m in g.values}
        config = next((j.config for j in self.ok if j.domain == domain), {})
        return primary_metric(metrics, eval_tasks(config))

    def gains(self, g: Group, metric: str) -> tuple[float | None, float | None]:
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
        if g.label == BASE_LABEL:
            return None
        return _mean_or_none([
            _num((j.results.get("cost") or {}).get("selection_flops_uncached")) for j in self.ok
            if (j.domain, j.setting, j.fraction, j.label) == (g.domain, g.setting, g.fraction, g.label)])

    # -- tables -----------------------------------------------------------------------------------------
    def results_rows(self) -> list[dict[str, Any]]:
        rows = []
        for g in self.ordered_groups():
            for m in self.metrics:
                st = g.stats(m)
                if st is None:
                    continue
                mean, half, n = st
                gf, gr = self.gains(g, m)
                rows.append({
                    "domain": g.domain, "setting": g.setting, "fraction": g.fraction, "selector": g.label,
                    "metric": m, "lower_is_better": lower_is_better(m), "n_seeds": n,
                    "seeds": " ".join(str(s) for s in sorted(g.values[m], key=str)),
                    "mean": mean, "ci95_half_width": half,
                    "ci95_low": None if half is None else mean - half,
                    "ci95_high": None if half is None else mean + half,
                    "gain_vs_full_pct": gf, "gain_vs_random_pct": gr,
                    "selection_flops": self.selection_flops(g),
                })
        return rows

    def paired_rows(self) -> list[dict[str, Any]]:
        return [{"domain": g.domain, "setting": g.setting, "fraction": g.fraction, "selector": g.label,
                 "metric": p.metric, "lower_is_better": lower_is_better(p.metric), "reference": ref,
                 "n_pairs": p.n, "seeds": " ".join(str(s) for s in p.seeds), "mean_diff": p.mean,
                 "ci_low": p.low, "ci_high": p.high, "verdict": p.verdict} for g, ref, p in self.paired()]

    def group_name(self, g: Group) -> str:
        """The group's label, with its fraction where the domain's selectors ran at several, and its setting."""
        fracs = {x.fraction for x in self.groups.values()
                 if x.domain == g.domain and x.selector not in (BASE_LABEL, "full")}
        name = g.label
        if len(fracs) > 1 and g.selector != "full":
            name += f" @{_fmt_frac(g.fraction)}"
        return name + (f" ({g.setting})" if g.setting else "")

    def paired_markdown(self) -> list[str]:
        md = ["## Paired comparison (same seed, same pool)", "",
              "Every seed's run of a selector minus the run of the reference with the same seed (same pool: "
              "the pool is drawn by `domain.pool_seed`, not by the seed), domain and other swept settings; "
              "`random` also at the same budget fraction, `full` on the seed only (it ignores the budget). "
              "**mean diff = selector − reference**, averaged over the n paired seeds, with its "
              f"{CI_LEVEL:.0%} confidence interval from Student's t (t_{{0.975,n−1}}·s_d/√n). Verdict: "
              "`better` or `worse` only when the interval excludes 0, in the metric's direction (↓ = lower is "
              "better, so a negative difference is an improvement); `indistinguishable` when it contains 0; "
              "`n/a` when fewer than 2 seeds pair up (no interval, no verdict).", ""]
        paired = self.paired()
        if not paired:
            md += ["No selector could be paired with `random` or `full` (the study has neither, or no shared "
                   "seeds and settings).", ""]
            return md
        for domain in sorted({g.domain for g, _, _ in paired}):
            rows = [(g, ref, p) for g, ref, p in paired if g.domain == domain]
            with_setting = any(g.setting for g, _, _ in rows)
            header = ["selector", "fraction", *(["setting"] if with_setting else []), "metric", "vs", "n",
                      "mean diff", f"{CI_LEVEL:.0%} CI", "verdict"]
            table = [[g.label, _fmt_frac(g.fraction), *([g.setting] if with_setting else []),
                      p.metric + (" ↓" if lower_is_better(p.metric) else ""), ref, p.n,
                      _fmt_signed(p.mean, 4), _fmt_interval(p.low, p.high, 4), p.verdict]
                     for g, ref, p in rows]
            md += [f"### {domain}", "", *_md_table(header, table), ""]
        return md

    def summary_markdown(self) -> list[str]:
        """"What this study found": per domain, on its primary metric, how many selectors were better /
        indistinguishable / worse than random and than full (paired by seed), the best by mean, and whether
        InstructDiff beat random. Built from the paired table only."""
        md = ["## What this study found", ""]
        domains = sorted({g.domain for g in self.groups.values() if g.label != BASE_LABEL})
        if not domains:
            return md + ["No trained-model metrics in any finished run: nothing to compare.", ""]
        for domain in domains:
            metric = self.primary_metric(domain)
            if metric is None:
                continue
            lower = lower_is_better(metric)
            where = f"**{domain}**: " if len(domains) > 1 else ""
            sentences = [f"{where}Primary metric `{metric}` ({'lower' if lower else 'higher'} is better); "
                         f"differences are selector − reference over runs paired by seed on the same pool, "
                         f"with {CI_LEVEL:.0%} t intervals."]
            paired = [(g, ref, p) for g, ref, p in self.paired() if g.domain == domain and p.metric == metric]
            for ref in ("random", "full"):
                rows = [(g, p) for g, r, p in paired if r == ref]
                if not any(g.selector == ref for g in self.groups.values() if g.domain == domain):
                    sentences.append(f"No `{ref}` runs to compare against.")
                    continue
                if not rows:
                    sentences.append(f"No selector could be paired with `{ref}` (no shared seeds and settings).")
                    continue
                parts = []
                for verdict in ("better", "indistinguishable", "worse"):
                    names = [self.group_name(g) for g, p in rows if p.verdict == verdict]
                    parts.append(f"{len(names)} {verdict}" + (f" ({', '.join(names)})" if names else ""))
                na = [self.group_name(g) for g, p in rows if p.verdict == "n/a"]
                if na:
                    parts.append(f"{len(na)} n/a, fewer than 2 paired seeds ({', '.join(na)})")
                sentences.append(f"Against `{ref}`: " + ", ".join(parts) + ".")
            stats = [(g, st) for g in self.ordered_groups(domain)
                     if g.label != BASE_LABEL and (st := g.stats(metric)) is not None]
            if stats:
                best, st = (min if lower else max)(stats, key=lambda gs: gs[1][0])
                sentences.append(f"Best mean {metric.split('/')[-1]}: `{self.group_name(best)}` "
                                 f"({_fmt(st[0])}, n={st[2]} seed{'s' if st[2] != 1 else ''}); whether a "
                                 f"difference is more than seed noise is what the paired verdicts say.")
            for g, ref, p in paired:
                if ref != "random" or g.selector != "instructdiff":
                    continue
                who = "InstructDiff" + (f" (`{self.group_name(g)}`)" if self.group_name(g) != "instructdiff"
                                        else "")
                diff = (f"mean difference {_fmt_signed(p.mean, 3)}"
                        + (f" (95% CI {_fmt_interval(p.low, p.high, 3)})" if p.low is not None else "")
                        + f", n={p.n} seed{'s' if p.n != 1 else ''}")
                if p.verdict == "better":
                    sentences.append(f"{who} beat random selection here: {diff}.")
                elif p.verdict == "worse":
                    sentences.append(f"{who} did not beat random selection here; it was worse: {diff}.")
                elif p.verdict == "indistinguishable":
                    sentences.append(f"{who} did not beat random selection here: {diff}; the interval "
                                     "includes 0.")
                else:
                    sentences.append(f"{who} vs random: {diff}, too few paired seeds for an interval, so no "
                                     "verdict.")
            md += [" ".join(sentences), ""]
        return md

    def overlap(self) -> list[tuple[tuple, list[str], list[list[float | None]], dict]]:
        """Per (domain, setting, fraction): labels, mean Jaccard matrix over shared seeds, seeds per pair."""
        by_ctx: dict[tuple, dict[str, dict[Any, set]]] = defaultdict(lambda: defaultdict(dict))
        for j in self.ok:
            sel = {r["id"] for r in _read_selection(j) if r.get("status") == "selected"}
            if sel:
                by_ctx[(j.domain, j.setting, j.fraction)][j.label].setdefault(j.seed, sel)
        out = []
        for ctx in sorted(by_ctx, key=lambda c: (c[0], c[1], c[2] if c[2] is not None else -1)):
            labels = sorted(by_ctx[ctx], key=_label_key)
            if len(labels) < 2:
                continue
            mat: list[list[float | None]] = []
            seeds: dict[tuple[str, str], int] = {}
            for a in labels:
                row = []
                for b in labels:
                    common = set(by_ctx[ctx][a]) & set(by_ctx[ctx][b])
                    seeds[(a, b)] = len(common)
                    sets_a, sets_b = by_ctx[ctx][a], by_ctx[ctx][b]
                    row.append(sum(jaccard(sets_a[s], sets_b[s]) for s in common) / len(common)
                               if common else None)
                mat.append(row)
            out.append((ctx, labels, mat, seeds))
        return out

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

    def cost_rows(self) -> list[dict[str, Any]]:
        by: dict[tuple[str, str], list[Job]] = defaultdict(list)
        for j in self.distinct_runs():
            by[(j.domain, j.label)].append(j)
        n_jobs = defaultdict(int)
        for j in self.ok:
            n_jobs[(j.domain, j.label)] += 1
        rows = []
        for (domain, label), jobs in sorted(by.items(), key=lambda kv: (kv[0][0], _label_key(kv[0][1]))):
            row: dict[str, Any] = {"domain": domain, "selector": label, "runs": len(jobs),
                                   "seeds": len({j.seed for j in jobs}), "jobs": n_jobs[(domain, label)]}
            seconds = [j.results.get("seconds") or {} for j in jobs]
            for st in STAGE_ORDER:
                row[f"mean_s_{st}"] = sum(s.get(st, 0.0) for s in seconds) / len(jobs)
            row["mean_s_total"] = sum(sum(s.values()) for s in seconds) / len(jobs)
            passes = [p for j in jobs for p in ((j.results.get("cache") or {}).get("score_store") or {})
                      .get("passes", [])]
            row["score_passes"] = len(passes)
            row["score_s"] = sum(p.get("seconds", 0.0) for p in passes)
            row["trainings_computed"] = sum(not t.get("cached", False) for j in jobs
                                            for t in j.results.get("trainings", []))
            row["cache_hits"] = sum((j.results.get("cache") or {}).get("hits", 0) for j in jobs)
            row["cache_misses"] = sum((j.results.get("cache") or {}).get("misses", 0) for j in jobs)
            for col, key in COST_COLUMNS:
                row[col] = _mean_or_none([_num((j.results.get("cost") or {}).get(key)) for j in jobs])
            rows.append(row)
        return rows

    # -- plots ------------------------------------------------------------------------------------------
    def _plt(self):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt

    def _save(self, fig, out: Path, name: str) -> str:
        """Lay out, write ``out/name`` and free the figure (a sweep report draws dozens); returns ``name``."""
        import matplotlib.pyplot as plt

        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        return name

    def _metric_axes(self, n: int, title: str):
        plt = self._plt()
        cols = min(3, max(1, n))
        rows = math.ceil(n / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
        fig.suptitle(title)
        flat = [a for r in axes for a in r]
        for a in flat[n:]:
            a.set_visible(False)
        return plt, fig, flat[:n]

    def plot_against(self, out: Path, param: str) -> list[str]:
        """The metric against ``param`` (``fraction`` or a selector option), one line per selector label with
        that option removed, per domain; 95% CI as error bars. Only where the param takes >= 2 values."""
        files = []
        for domain in sorted({j.domain for j in self.ok}):
            series: dict[tuple[str, str], dict[float, dict[str, dict[Any, float]]]] = defaultdict(
                lambda: defaultdict(lambda: defaultdict(dict)))
            flat_refs: dict[tuple[str, str], dict[str, dict[Any, float]]] = defaultdict(
                lambda: defaultdict(dict))
            for j in self.ok:
                if j.domain != domain:
                    continue
                metrics = ((j.results.get("eval") or {}).get("trained") or {}).get("metrics") or {}
                if param == "fraction":
                    x = j.fraction
                    line = (j.label, j.setting)
                else:
                    x = _num(j.params.get(param))
                    rest = {k: v for k, v in j.params.items() if k != param}
                    lab = j.selector + (f" [{', '.join(f'{k}={v}' for k, v in sorted(rest.items()))}]"
                                        if rest else "")
                    line = (lab + ("" if j.fraction is None else f" @{j.fraction:g}"), j.setting)
                for m, v in metrics.items():
                    v = _num(v)
                    if v is None or not math.isfinite(v):
                        continue
                    if param == "fraction" and j.selector == "full":
                        flat_refs[line][m].setdefault(j.seed, v)  # full is a level, not a function of β
                    elif x is None and j.selector in ("full", "random"):
                        flat_refs[line][m].setdefault(j.seed, v)  # the references, where the sweep has them
                    elif x is not None:
                        series[line][x][m].setdefault(j.seed, v)
            xs = {x for s in series.values() for x in s}
            if len(xs) < 2:
                continue
            metrics = sorted({m for s in series.values() for pts in s.values() for m in pts})
            plt, fig, axes = self._metric_axes(len(metrics), f"{domain}: metric against {param}")
            for ax, m in zip(axes, metrics, strict=True):
                for (lab, setting), pts in sorted(series.items(), key=lambda kv: _label_key(kv[0][0])):
                    px = sorted(x for x in pts if pts[x].get(m))
                    if not px:
                        continue
                    stats = [mean_ci(list(pts[x][m].values())) for x in px]
                    ax.errorbar(px, [s[0] for s in stats], yerr=[s[1] or 0.0 for s in stats], marker="o",
                                capsize=3, label=lab + (f" ({setting})" if setting else ""))
                for k, ((lab, setting), ms) in enumerate(sorted(flat_refs.items())):
                    if ms.get(m):
                        ax.axhline(mean_ci(list(ms[m].values()))[0], ls=("--", ":", "-.")[k % 3],
                                   color="grey", label=lab + (f" ({setting})" if setting else ""))
                ax.set_xlabel(param)
                ax.set_ylabel(m + (" (lower is better)" if lower_is_better(m) else ""))
                ax.legend(fontsize=7)
            files.append(self._save(fig, out, f"{_slug(param)}_{_slug(domain)}.png"))
        return files

    def plot_deltas(self, out: Path) -> list[str]:
        """ΔH and ΔNLL per domain (runs whose selection.jsonl has them, i.e. InstructDiff): every scored row
        vs the selected ones, seeds pooled; the analogue of the paper's differential-entropy figures."""
        files = []
        keys = ("delta_entropy", "delta_nll")
        for domain in sorted({j.domain for j in self.ok}):
            pooled: dict[tuple, dict[str, tuple[list[float], list[float]]]] = {}
            for j in self.ok:
                if j.domain != domain:
                    continue
                recs = _read_selection(j)
                if not any(k in (r.get("scores") or {}) for r in recs for k in keys):
                    continue
                gkey = (j.label, j.fraction, j.setting)
                slot = pooled.setdefault(gkey, {k: ([], []) for k in keys})
                for r in recs:
                    for k in keys:
                        v = _num((r.get("scores") or {}).get(k))
                        if v is None or not math.isfinite(v):
                            continue
                        slot[k][0].append(v)
                        if r.get("status") == "selected":
                            slot[k][1].append(v)
            if not pooled:
                continue
            gkeys = sorted(pooled, key=lambda g: (_label_key(g[0]), g[1] if g[1] is not None else -1, g[2]))
            gkeys = gkeys[:MAX_DELTA_GROUPS]
            plt = self._plt()
            fig, axes = plt.subplots(len(gkeys), 2, figsize=(10, 2.8 * len(gkeys)), squeeze=False)
            fig.suptitle(f"{domain}: ΔH and ΔNLL (base − calibrated), all scored rows vs selected")
            for row, gk in zip(axes, gkeys, strict=True):
                for ax, k, title in zip(row, keys, ("ΔH (delta_entropy)", "ΔNLL (delta_nll)"), strict=True):
                    allv, sel = pooled[gk][k]
                    if allv:
                        lo, hi = min(allv), max(allv)
                        bins = 30 if hi > lo else 1
                        rng = (lo, hi) if hi > lo else (lo - 0.5, lo + 0.5)
                        ax.hist(allv, bins=bins, range=rng, histtype="step", color="black",
                                label=f"all ({len(allv)})")
                        if sel:
                            ax.hist(sel, bins=bins, range=rng, alpha=0.6, color="tab:orange",
                                    label=f"selected ({len(sel)})")
                    label, frac, setting = gk
                    where = f" ({setting})" if setting else ""
                    ax.set_title(f"{title}: {label} @{_fmt_frac(frac)}{where}", fontsize=8)
                    ax.legend(fontsize=7)
            files.append(self._save(fig, out, f"delta_{_slug(domain)}.png"))
        return files

    def plot_overlap(self, out: Path, overlap: list) -> list[str]:
        files = []
        for (domain, setting, frac), labels, mat, _ in overlap:
            plt = self._plt()
            size = 1.2 + 0.7 * len(labels)
            fig, ax = plt.subplots(figsize=(size + 1.5, size))
            data = [[float("nan") if v is None else v for v in row] for row in mat]
            im = ax.imshow(data, vmin=0, vmax=1, cmap="viridis")
            ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
            ax.set_yticks(range(len(labels)), labels, fontsize=7)
            for i, row in enumerate(mat):
                for k, v in enumerate(row):
                    if v is not None:
                        ax.text(k, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                                color="white" if v < 0.6 else "black")
            fig.colorbar(im, ax=ax, label="Jaccard of selected ids")
            ax.set_title(f"{domain} @{_fmt_frac(frac)}" + (f" ({setting})" if setting else ""), fontsize=9)
            name = f"overlap_{_slug(domain)}_{_slug(_fmt_frac(frac))}"
            name += f"_{_slug(setting)}" if setting else ""
            files.append(self._save(fig, out, f"{name}.png"))
        return files

    def plot_cost(self, out: Path, rows: list[dict]) -> list[str]:
        if not rows:
            return []
        plt = self._plt()
        labels = [f"{r['selector']} ({r['domain']})" for r in rows]
        fig, ax = plt.subplots(figsize=(8, 1.6 + 0.45 * len(rows)))
        left = [0.0] * len(rows)
        for st in STAGE_ORDER:
            vals = [r[f"mean_s_{st}"] for r in rows]
            ax.barh(labels, vals, left=left, label=st)
            left = [a + b for a, b in zip(left, vals, strict=True)]
        ax.invert_yaxis()
        ax.set_xlabel("mean wall time per run (s); cached stages cost ~0")
        ax.legend(fontsize=7, ncols=len(STAGE_ORDER), loc="lower center", bbox_to_anchor=(0.5, 1.0),
                  frameon=False)
        return [self._save(fig, out, "cost.png")]

    def plot_pareto(self, out: Path) -> list[str]:
        """Per domain, each trained metric against the from-scratch selection FLOPs of every selector group
        (mean over seeds, 95% CI as error bars), the Pareto frontier dashed; x is symlog so the model-free
        selectors (0 FLOPs) sit on the axis. Drawn where at least two groups have a known cost."""
        files = []
        for domain in sorted({g.domain for g in self.groups.values()}):
            groups = [g for g in self.ordered_groups(domain) if g.label != BASE_LABEL]
            costed = [(g, c) for g in groups if (c := self.selection_flops(g)) is not None]
            if len(costed) < 2:
                continue
            metrics = sorted({m for g, _ in costed for m in g.values})
            plt, fig, axes = self._metric_axes(len(metrics), f"{domain}: metric against selection FLOPs "
                                               "(from scratch)")
            positive = [c for _, c in costed if c > 0]
            several_fractions = len({g.fraction for g, _ in costed if g.label != "full"}) > 1
            base = next((g for g in self.ordered_groups(domain) if g.label == BASE_LABEL), None)
            for ax, m in zip(axes, metrics, strict=True):
                pts, labels = [], []
                for k, (g, c) in enumerate(costed):
                    st = g.stats(m)
                    if st is None:
                        continue
                    name = g.label + (f" @{_fmt_frac(g.fraction)}" if several_fractions else "")
                    name += f" ({g.setting})" if g.setting else ""
                    ax.errorbar([c], [st[0]], yerr=[st[1] or 0.0], marker="o", capsize=3, ls="none",
                                color=f"C{k % 10}", label=name)
                    pts.append((c, st[0]))
                    labels.append(name)
                front = pareto_front(pts, lower_is_better(m))
                if len(front) > 1:
                    ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], ls="--", color="grey",
                            lw=1, label="Pareto frontier")
                for (c, v), name in zip(pts, labels, strict=True):
                    ax.annotate(name, (c, v), fontsize=6, xytext=(3, 3), textcoords="offset points")
                if positive:
                    ax.set_xscale("symlog", linthresh=min(positive) / 10)
                ax.set_xlabel("selection FLOPs per run (symlog; 0 = model-free)")
                ax.set_ylabel(m + (" (lower is better)" if lower_is_better(m) else ""))
                base_st = base.stats(m) if base is not None else None
                if base_st is not None:  # the untrained model: what any selection has to beat
                    ax.axhline(base_st[0], ls=":", color="black", lw=1, label=BASE_LABEL)
                ax.legend(fontsize=6)
            files.append(self._save(fig, out, f"pareto_{_slug(domain)}.png"))
        return files

    # -- writing ----------------------------------------------------------------------------------------
    def write(self, out: Path | None = None) -> Path:
        out = Path(out).resolve() if out else self.root
        out.mkdir(parents=True, exist_ok=True)
        rows = self.results_rows()
        overlap = self.overlap()
        cost = self.cost_rows()

        numeric_params = sorted({k for j in self.ok for k, v in j.params.items() if _num(v) is not None})
        for p in ["fraction", *numeric_params]:
            for f in self.plot_against(out, p):
                self.plots.append((f"metric against {p}", f))
        self.plots += [("ΔH / ΔNLL distributions", f) for f in self.plot_deltas(out)]
        self.plots += [("selection overlap", f) for f in self.plot_overlap(out, overlap)]
        self.plots += [("cost", f) for f in self.plot_cost(out, cost)]
        self.plots += [("metric against selection FLOPs", f) for f in self.plot_pareto(out)]

        _write_csv(out / "report.csv", rows, list(rows[0]) if rows else [
            "domain", "setting", "fraction", "selector", "metric", "lower_is_better", "n_seeds", "seeds",
            "mean", "ci95_half_width", "ci95_low", "ci95_high", "gain_vs_full_pct", "gain_vs_random_pct",
            "selection_flops"])
        _write_csv(out / "runs.csv", [
            {"status": j.status, "domain": j.domain, "selector": j.label, "fraction": j.fraction,
             "seed": j.seed, "setting": j.setting, "job": j.num, "dir": str(j.path or j.sweep),
             "reason": j.reason or ""}
            for j in self.jobs], ["status", "domain", "selector", "fraction", "seed", "setting", "job", "dir",
                                  "reason"])
        _write_csv(out / "overlap.csv", [
            {"domain": d, "setting": s, "fraction": f, "a": a, "b": b, "jaccard": mat[i][k],
             "n_seeds": seeds[(a, b)]}
            for (d, s, f), labels, mat, seeds in overlap for i, a in enumerate(labels)
            for k, b in enumerate(labels)], ["domain", "setting", "fraction", "a", "b", "jaccard", "n_seeds"])
        _write_csv(out / "cost.csv", cost, list(cost[0]) if cost else ["domain", "selector", "runs"])
        _write_csv(out / "paired.csv", self.paired_rows(), list(PAIRED_COLUMNS))
        path = out / "report.md"
        path.write_text("\n".join(self.markdown(overlap, cost)) + "\n")
        return path

    def markdown(self, overlap: list, cost: list[dict]) -> list[str]:
        missing = [j for j in self.jobs if j.status != "ok"]
        md = [f"# Sweep report: {self.root}", "", *self.summary_markdown(),
              f"{len(self.jobs)} jobs: {len(self.ok)} ok, "
              f"{sum(j.status == 'missing/failed' for j in self.jobs)} missing/failed, "
              f"{sum(j.status == 'not started' for j in self.jobs)} not started.", ""]
        if self.varying:
            md.append("Swept: " + ", ".join(f"`{k}`" for k in self.varying) + ".")
        if self.common:
            common = ", ".join(f"`{k}={v}`" for k, v in sorted(self.common.items()))
            md.append(f"Common overrides: {common}.")
        md += ["", "## Results", "",
               f"Trained-model metrics, mean ± half-width of the {CI_LEVEL:.0%} confidence interval over "
               "seeds (t-distribution, t_{0.975,n−1}·s/√n; n=1: no interval). Gains are relative to `full` "
               "and to `random` (same domain, setting and fraction), in percent, positive = better (the sign "
               f"is flipped for lower-is-better metrics: {', '.join(LOWER_IS_BETTER)}). `{BASE_LABEL}` is "
               "the base model.", ""]
        if missing:
            md += [f"**{len(missing)} run(s) missing**: see [Missing runs](#missing-runs); their groups have "
                   "fewer seeds.", ""]
        if not self.groups:
            md += ["No eval metrics in any finished run (eval=none, or no run finished).", ""]
        for domain in sorted({g.domain for g in self.groups.values()}):
            groups = self.ordered_groups(domain)
            metrics = sorted({m for g in groups for m in g.values})
            with_setting = any(g.setting for g in groups)
            header = ["selector", "fraction", *(["setting"] if with_setting else []), "seeds",
                      "selection FLOPs"]
            for m in metrics:
                header += [m + (" ↓" if lower_is_better(m) else ""), "vs full", "vs random"]
            table = []
            for g in groups:
                ns = {st[2] for m in metrics if (st := g.stats(m))}
                row = [g.label, _fmt_frac(g.fraction), *([g.setting] if with_setting else []),
                       "/".join(str(n) for n in sorted(ns)), _fmt_flops(self.selection_flops(g))]
                for m in metrics:
                    st = g.stats(m)
                    gf, gr = self.gains(g, m)
                    row += [_fmt_ci(*st) if st else "—", _fmt_gain(gf), _fmt_gain(gr)]
                table.append(row)
            md += [f"### {domain}", "", *_md_table(header, table), ""]
        md += self.paired_markdown()
        md += ["## Missing runs", ""]
        if missing:
            md += _md_table(["job", "status", "selector", "fraction", "seed", "reason"],
                            [[j.name, j.status, j.label, _fmt_frac(j.fraction), j.seed, j.reason or ""]
                             for j in missing])
        else:
            md.append("None: every job of the sweep wrote results.json.")
        md += ["", "## Selection overlap", "",
               "Jaccard |A∩B| / |A∪B| of the selected id sets, same domain, setting, fraction and seed, "
               "mean over the seeds both selectors ran.", ""]
        if not overlap:
            md.append("Fewer than two selectors at any (domain, fraction): nothing to compare.")
        for (domain, setting, frac), labels, mat, _ in overlap:
            md += [f"### {domain} @{_fmt_frac(frac)}" + (f" ({setting})" if setting else ""), ""]
            md += _md_table(["", *labels], [[a, *(_fmt(v, 3) for v in mat[i])] for i, a in enumerate(labels)])
            md.append("")
        md += ["## Cost", "",
               "Mean wall time per stage per run (s, results.json `seconds`), scoring passes actually run, "
               "trainings actually run, cache hits and misses (summed over runs). A run is one (selector, "
               "fraction, setting, seed): jobs that repeat one (`full` at several fractions, a rerun sweep) "
               "count once, the first of them. Work another job had "
               "already cached costs ~0 here, so the first job of a shared computation carries its cost.", "",
               "Estimated FLOPs, mean per run (results.json `cost`; forward 2·P·T, SFT 6·P·T·epochs, P = "
               "parameters without the input embedding table, T = tokens; instructdiff/cost.py): **selection** "
               "= every model pass the selector made (calibration, scoring, signals) counted from scratch, "
               "*selection (this run)* = the part not served from a cache, then the final training and the "
               "evaluation of base and trained model. Model-free selectors (random, full, length) cost 0.", ""]
        if cost:
            md += _md_table(["domain", "selector", "runs", "seeds", *STAGE_ORDER, "total", "score passes", "score s",
                             "trainings", "cache hits", "cache misses", "selection FLOPs",
                             "selection FLOPs (this run)", "train FLOPs", "eval FLOPs"],
                            [[r["domain"], r["selector"],
                              f"{r['runs']}" + (f" ({r['jobs']} jobs)" if r["jobs"] != r["runs"] else ""),
                              r["seeds"],
                              *(f"{r[f'mean_s_{s}']:.1f}" for s in STAGE_ORDER),
                              f"{r['mean_s_total']:.1f}", r["score_passes"], f"{r['score_s']:.1f}",
                              r["trainings_computed"], r["cache_hits"], r["cache_misses"],
                              *(_fmt_flops(r[c]) for c, _ in COST_COLUMNS[:4])] for r in cost])
        else:
            md.append("No finished runs.")
        md += ["", "## Plots", ""]
        if not self.plots:
            md.append("No plots: nothing varies that a plot could show.")
        for section, f in self.plots:
            md += [f"### {section}: {f}", "", f"![{f}]({f})", ""]
        return md


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})


def build_report(multirun_dir: Path | str, out: Path | str | None = None) -> Report:
    rep = Report(Path(multirun_dir))
    rep.write(Path(out) if out else None)
    return rep


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="instructdiff-report", description=__doc__.split("\n\n")[0],
        epilog="instructdiff-report --verify JOB_DIR [--verify-out DIR] [--cache-dir DIR] [--tol X]: rerun one "
               "finished job from its recorded config; exit 0 when its selection is identical and its trained "
               "metrics are within the tolerance, 1 when not (instructdiff/verify.py).")
    ap.add_argument("multirun_dir", type=Path, nargs="?",
                    help="a Hydra multirun directory (or a folder of several)")
    ap.add_argument("--out", type=Path, default=None,
                    help="where to write the report (default: multirun_dir)")
    vg = ap.add_argument_group("reproducibility check (--verify)")
    vg.add_argument("--verify", type=Path, metavar="JOB_DIR", default=None,
                    help="rerun this finished job (a directory with .hydra/ and results.json) and compare")
    vg.add_argument("--verify-out", type=Path, default=None, metavar="DIR",
                    help="empty directory for the rerun and verify.json (default: a new temp dir)")
    vg.add_argument("--cache-dir", type=Path, default=None, metavar="DIR",
                    help="paths.cache_dir of the rerun, e.g. an existing cache to reuse the converted base "
                         "model (default: a fresh empty cache, deleted afterwards)")
    vg.add_argument("--keep-cache", action="store_true", help="keep the fresh cache (in the output dir)")
    vg.add_argument("--tol", type=float, default=None,
                    help="absolute tolerance on each trained metric (default: 1e-3)")
    vg.add_argument("--metric", action="append", default=None,
                    help="compare only this trained metric (repeatable; default: all of them)")
    vg.add_argument("--from-config", action="store_true",
                    help="rerun the recorded .hydra/config.yaml instead of conf/ + .hydra/overrides.yaml")
    args = ap.parse_args(argv)
    if args.verify is not None:
        from instructdiff.verify import DEFAULT_TOL, main_verify

        if args.multirun_dir is not None:
            ap.error("--verify takes one job directory; leave out the multirun directory")
        if not args.verify.is_dir():
            ap.error(f"--verify {args.verify} is not a directory")
        tol = DEFAULT_TOL if args.tol is None else args.tol
        if not (tol >= 0 and math.isfinite(tol)):
            ap.error(f"--tol must be a finite number >= 0, got {args.tol}")
        return main_verify(args.verify, args.verify_out, args.cache_dir, tol, args.metric, args.from_config,
                           args.keep_cache)
    if args.multirun_dir is None:
        ap.error("give a multirun directory (or --verify JOB_DIR)")
    if not args.multirun_dir.is_dir():
        ap.error(f"{args.multirun_dir} is not a directory")
    rep = Report(args.multirun_dir)
    if not rep.jobs:
        ap.error(f"no job directories (with a .hydra/ folder) under {args.multirun_dir}")
    path = rep.write(args.out)
    missing = len(rep.jobs) - len(rep.ok)
    print(f"report: {path} ({len(rep.ok)} runs ok, {missing} missing/failed or not started; "
          f"{len(rep.plots)} plots)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
