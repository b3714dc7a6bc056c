"""The report's tables as rows: results per group, paired comparisons, selection overlap and cost per selector,
and the CSV writer. Each function reads a :class:`~instructdiff.report.study.Report` and returns plain rows."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path
from typing import Any

from instructdiff.report.fmt import label_key
from instructdiff.report.load import read_selection
from instructdiff.report.stats import jaccard, lower_is_better, mean_or_none
from instructdiff.report.study import Report, num

STAGE_ORDER = ("data", "calibrate", "score", "select", "train", "eval")
RESULTS_COLUMNS = ("domain", "setting", "fraction", "selector", "metric", "lower_is_better", "n_seeds", "seeds",
                   "mean", "ci95_half_width", "ci95_low", "ci95_high", "gain_vs_full_pct", "gain_vs_random_pct",
                   "selection_flops", "n_jobs")
PAIRED_COLUMNS = ("domain", "setting", "fraction", "selector", "metric", "lower_is_better", "reference",
                  "n_pairs", "seeds", "mean_diff", "ci_low", "ci_high", "verdict", "reference_mean",
                  "gain_pct", "gain_ci_low_pct", "gain_ci_high_pct")
RUNS_COLUMNS = ("status", "domain", "selector", "fraction", "seed", "setting", "job", "dir", "reason")
OVERLAP_COLUMNS = ("domain", "setting", "fraction", "a", "b", "jaccard", "n_seeds")
# cost.csv column -> results.json["cost"] key (instructdiff/cost.py), mean over a selector's runs. The plain columns
# count every pass from scratch, so a selector's cost does not depend on which job happened to fill the cache
# first (a rerun sweep, or random's training shared with another study); "_this_run" is what was computed.
# report.md shows the first four.
COST_COLUMNS = (("mean_selection_flops", "selection_flops_uncached"),
                ("mean_selection_flops_this_run", "selection_flops"),
                ("mean_train_flops", "train_flops_uncached"), ("mean_eval_flops", "eval_flops_uncached"),
                ("mean_total_flops", "total_flops_uncached"),
                ("mean_train_flops_this_run", "train_flops"), ("mean_eval_flops_this_run", "eval_flops"),
                ("mean_total_flops_this_run", "total_flops"))


def results_rows(rep: Report) -> list[dict[str, Any]]:
    """One row per (group, metric): mean ± t interval over seeds, seeds and jobs, gains over full and random."""
    rows = []
    for g in rep.ordered_groups():
        n_jobs = len(rep.jobs_of(g)) or None
        for m in rep.metrics:
            st = g.stats(m)
            if st is None:
                continue
            mean, half, n = st
            gf, gr = rep.gains(g, m)
            rows.append({
                "domain": g.domain, "setting": g.setting, "fraction": g.fraction, "selector": g.label,
                "metric": m, "lower_is_better": lower_is_better(m), "n_seeds": n,
                "seeds": " ".join(str(s) for s in sorted(g.values[m], key=str)), "n_jobs": n_jobs,
                "mean": mean, "ci95_half_width": half,
                "ci95_low": None if half is None else mean - half,
                "ci95_high": None if half is None else mean + half,
                "gain_vs_full_pct": gf, "gain_vs_random_pct": gr,
                "selection_flops": rep.selection_flops(g),
            })
    return rows


def paired_rows(rep: Report) -> list[dict[str, Any]]:
    rows = []
    for g, ref, p in rep.paired():
        gi = p.gain_interval
        rows.append({"domain": g.domain, "setting": g.setting, "fraction": g.fraction, "selector": g.label,
                     "metric": p.metric, "lower_is_better": lower_is_better(p.metric), "reference": ref,
                     "n_pairs": p.n, "seeds": " ".join(str(s) for s in p.seeds), "mean_diff": p.mean,
                     "ci_low": p.low, "ci_high": p.high, "verdict": p.verdict, "reference_mean": p.ref_mean,
                     "gain_pct": p.gain, "gain_ci_low_pct": gi[0] if gi else None,
                     "gain_ci_high_pct": gi[1] if gi else None})
    return rows


def runs_rows(rep: Report) -> list[dict[str, Any]]:
    return [{"status": j.status, "domain": j.domain, "selector": j.label, "fraction": j.fraction, "seed": j.seed,
             "setting": j.setting, "job": j.num, "dir": str(j.path or j.sweep), "reason": j.reason or ""}
            for j in rep.jobs]


def overlap(rep: Report) -> list[tuple[tuple, list[str], list[list[float | None]], dict]]:
    """Per (domain, setting, fraction): labels, mean Jaccard matrix over shared seeds, seeds per pair."""
    by_ctx: dict[tuple, dict[str, dict[Any, set]]] = defaultdict(lambda: defaultdict(dict))
    for j in rep.ok:
        sel = {r["id"] for r in read_selection(j) if r.get("status") == "selected" and "id" in r}
        if sel:
            by_ctx[(j.domain, j.setting, j.fraction)][j.label].setdefault(j.seed, sel)
    out = []
    for ctx in sorted(by_ctx, key=lambda c: (c[0], c[1], c[2] if c[2] is not None else -1)):
        labels = sorted(by_ctx[ctx], key=label_key)
        if len(labels) < 2:
            continue
        mat: list[list[float | None]] = []
        seeds: dict[tuple[str, str], int] = {}
        for a in labels:
            row = []
            for b in labels:
                sets_a, sets_b = by_ctx[ctx][a], by_ctx[ctx][b]
                common = set(sets_a) & set(sets_b)
                seeds[(a, b)] = len(common)
                row.append(sum(jaccard(sets_a[s], sets_b[s]) for s in common) / len(common) if common else None)
            mat.append(row)
        out.append((ctx, labels, mat, seeds))
    return out


def overlap_rows(ov: list) -> list[dict[str, Any]]:
    return [{"domain": d, "setting": s, "fraction": f, "a": a, "b": b, "jaccard": mat[i][k],
             "n_seeds": seeds[(a, b)]}
            for (d, s, f), labels, mat, seeds in ov for i, a in enumerate(labels) for k, b in enumerate(labels)]


def cost_rows(rep: Report) -> list[dict[str, Any]]:
    """Per (domain, selector label): runs (distinct seeds × fractions × settings), seeds, jobs, mean seconds per
    stage, scoring passes, trainings and cache hits actually run, and the mean FLOPs of ``COST_COLUMNS``."""
    by: dict[tuple[str, str], list] = defaultdict(list)
    for j in rep.distinct_runs():
        by[(j.domain, j.label)].append(j)
    n_jobs: dict[tuple[str, str], int] = defaultdict(int)
    for j in rep.ok:
        n_jobs[(j.domain, j.label)] += 1
    rows = []
    for (domain, label), jobs in sorted(by.items(), key=lambda kv: (kv[0][0], label_key(kv[0][1]))):
        row: dict[str, Any] = {"domain": domain, "selector": label, "runs": len(jobs),
                               "seeds": len({j.seed for j in jobs}), "jobs": n_jobs[(domain, label)]}
        seconds = [j.results.get("seconds") or {} for j in jobs]
        for st in STAGE_ORDER:
            row[f"mean_s_{st}"] = sum(s.get(st, 0.0) for s in seconds) / len(jobs)
        row["mean_s_total"] = sum(sum(s.values()) for s in seconds) / len(jobs)
        passes = [p for j in jobs for p in ((j.results.get("cache") or {}).get("score_store") or {}).get("passes", [])]
        row["score_passes"] = len(passes)
        row["score_s"] = sum(p.get("seconds", 0.0) for p in passes)
        row["trainings_computed"] = sum(not t.get("cached", False) for j in jobs for t in j.results.get("trainings", []))
        row["cache_hits"] = sum((j.results.get("cache") or {}).get("hits", 0) for j in jobs)
        row["cache_misses"] = sum((j.results.get("cache") or {}).get("misses", 0) for j in jobs)
        for col, key in COST_COLUMNS:
            row[col] = mean_or_none([num((j.results.get("cost") or {}).get(key)) for j in jobs])
        rows.append(row)
    return rows


def write_csv(path: Path, rows: list[dict], columns: list[str] | tuple[str, ...]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(columns))
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
