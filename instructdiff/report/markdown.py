"""report.md: what the study found, results per domain, the paired comparison, missing runs, selection overlap,
cost and the plots. Every number comes from the tables (tables.py) and the study's comparisons (study.py)."""

from __future__ import annotations

from pathlib import Path

from instructdiff.report.fmt import (
    BASE_LABEL,
    fmt,
    fmt_ci,
    fmt_flops,
    fmt_frac,
    fmt_gain,
    fmt_gain_ci,
    fmt_interval,
    fmt_signed,
    md_table,
)
from instructdiff.report.stats import CI_LEVEL, LOWER_IS_BETTER, lower_is_better
from instructdiff.report.study import Report
from instructdiff.report.tables import COST_COLUMNS, STAGE_ORDER


def _arrow(metric: str) -> str:
    return " ↓" if lower_is_better(metric) else ""


def _shown_path(path: Path) -> str:
    """``path`` relative to the working directory when inside it: a committed report then names its runs as
    anyone's checkout does (results/<study>/runs), not by the folder of the machine that wrote it."""
    try:
        return path.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)


def markdown(rep: Report, overlap: list, cost: list[dict], frontiers: dict[str, list[str]] | None = None) -> list[str]:
    """The lines of report.md; ``frontiers``: plot file -> lines naming its Pareto frontier per metric."""
    missing = [j for j in rep.jobs if j.status != "ok"]
    md = [f"# Sweep report: {_shown_path(rep.root)}", "", *summary_markdown(rep),
          f"{len(rep.jobs)} jobs: {len(rep.ok)} ok, "
          f"{sum(j.status == 'missing/failed' for j in rep.jobs)} missing/failed, "
          f"{sum(j.status == 'not started' for j in rep.jobs)} not started.", ""]
    if rep.varying:
        md.append("Swept: " + ", ".join(f"`{k}`" for k in rep.varying) + ".")
    if rep.common:
        md.append("Common overrides: " + ", ".join(f"`{k}={v}`" for k, v in sorted(rep.common.items())) + ".")
    md += results_markdown(rep, missing)
    md += paired_markdown(rep)
    md += ["## Missing runs", ""]
    if missing:
        md += md_table(["job", "status", "selector", "fraction", "seed", "reason"],
                       [[j.name, j.status, j.label, fmt_frac(j.fraction), j.seed, j.reason or ""] for j in missing])
    else:
        md.append("None: every job of the sweep wrote results.json.")
    md += overlap_markdown(overlap)
    md += cost_markdown(cost)
    md += ["", "## Plots", ""]
    if not rep.plots:
        md.append("No plots: nothing varies that a plot could show.")
    for section, f in rep.plots:
        md += [f"### {section}: {f}", "", f"![{f}]({f})", ""]
        md += [*(frontiers or {}).get(f, [])]
    return md


def results_markdown(rep: Report, missing: list) -> list[str]:
    md = ["", "## Results", "",
          f"Trained-model metrics, mean ± half-width of the {CI_LEVEL:.0%} confidence interval over "
          "seeds (t-distribution, t_{0.975,n−1}·s/√n; n=1: no interval). Gains are relative to `full` "
          "and to `random` (same domain, setting and fraction), in percent, positive = better (the sign "
          f"is flipped for lower-is-better metrics: {', '.join(LOWER_IS_BETTER)}). They compare means and "
          "carry no interval of their own: the [paired comparison](#paired-comparison-same-seed-same-pool) "
          "gives each selector's gain with its interval, or none where fewer than 2 seeds pair up. "
          f"`{BASE_LABEL}` is the base model. `seeds` counts distinct seeds"
          " (`full` ignores the budget, so its jobs at several fractions are one run per seed; `jobs` then "
          "says how many ran).", ""]
    if missing:
        md += [f"**{len(missing)} run(s) missing**: see [Missing runs](#missing-runs); their groups have "
               "fewer seeds.", ""]
    if not rep.groups:
        md += ["No eval metrics in any finished run (eval=none, or no run finished).", ""]
    for domain in rep.domains():
        groups = rep.ordered_groups(domain)
        metrics = sorted({m for g in groups for m in g.values})
        with_setting = any(g.setting for g in groups)
        n_jobs = {g.key: len(rep.jobs_of(g)) for g in groups}
        n_seeds = {g.key: {st[2] for m in metrics if (st := g.stats(m))} for g in groups}
        with_jobs = any(n_jobs[k] and n_jobs[k] not in n_seeds[k] for k in n_jobs)
        header = ["selector", "fraction", *(["setting"] if with_setting else []), "seeds",
                  *(["jobs"] if with_jobs else []), "selection FLOPs"]
        for m in metrics:
            header += [m + _arrow(m), "vs full", "vs random"]
        table = []
        for g in groups:
            row = [g.label, fmt_frac(g.fraction), *([g.setting] if with_setting else []),
                   "/".join(str(n) for n in sorted(n_seeds[g.key])),
                   *([n_jobs[g.key] or "—"] if with_jobs else []), fmt_flops(rep.selection_flops(g))]
            for m in metrics:
                st = g.stats(m)
                gf, gr = rep.gains(g, m)
                row += [fmt_ci(*st) if st else "—", fmt_gain(gf), fmt_gain(gr)]
            table.append(row)
        md += [f"### {domain}", "", *md_table(header, table), ""]
    return md


def paired_markdown(rep: Report) -> list[str]:
    md = ["## Paired comparison (same seed, same pool)", "",
          "Every seed's run of a selector minus the run of the reference with the same seed (same pool: "
          "the pool is drawn by `domain.pool_seed`, not by the seed), domain and other swept settings; "
          "`random` also at the same budget fraction, `full` on the seed only (it ignores the budget). "
          "**mean diff = selector − reference**, averaged over the n paired seeds, with its "
          f"{CI_LEVEL:.0%} confidence interval from Student's t (t_{{0.975,n−1}}·s_d/√n). Verdict: "
          "`better` or `worse` only when the interval excludes 0, in the metric's direction (↓ = lower is "
          "better, so a negative difference is an improvement); `indistinguishable` when it contains 0; "
          "`n/a` when fewer than 2 seeds pair up (no interval, no verdict). `gain (95% CI)`: the mean diff as "
          "a percentage of the reference's mean over the same seeds, positive = better, with the interval "
          "scaled alike; none without an interval.", ""]
    paired = rep.paired()
    if not paired:
        return md + ["No selector could be paired with `random` or `full` (the study has neither, or no shared "
                     "seeds and settings).", ""]
    for domain in sorted({g.domain for g, _, _ in paired}):
        rows = [(g, ref, p) for g, ref, p in paired if g.domain == domain]
        with_setting = any(g.setting for g, _, _ in rows)
        header = ["selector", "fraction", *(["setting"] if with_setting else []), "metric", "vs", "n",
                  "mean diff", f"{CI_LEVEL:.0%} CI", "verdict", f"gain ({CI_LEVEL:.0%} CI)"]
        table = [[g.label, fmt_frac(g.fraction), *([g.setting] if with_setting else []),
                  p.metric + _arrow(p.metric), ref, p.n, fmt_signed(p.mean, 4), fmt_interval(p.low, p.high, 4),
                  p.verdict, fmt_gain_ci(p.gain, p.gain_interval) if p.gain_interval else "—"]
                 for g, ref, p in rows]
        md += [f"### {domain}", "", *md_table(header, table), ""]
    return md


def _verdict_counts(rep: Report, rows: list) -> str:
    parts = []
    for verdict in ("better", "indistinguishable", "worse"):
        names = [rep.group_name(g) for g, p in rows if p.verdict == verdict]
        parts.append(f"{len(names)} {verdict}" + (f" ({', '.join(names)})" if names else ""))
    na = [rep.group_name(g) for g, p in rows if p.verdict == "n/a"]
    if na:
        parts.append(f"{len(na)} n/a, fewer than 2 paired seeds ({', '.join(na)})")
    return ", ".join(parts)


def _instructdiff_sentence(rep: Report, g, p) -> str:
    who = "InstructDiff" + (f" (`{rep.group_name(g)}`)" if rep.group_name(g) != "instructdiff" else "")
    diff = (f"mean difference {fmt_signed(p.mean, 3)}"
            + (f" (95% CI {fmt_interval(p.low, p.high, 3)})" if p.low is not None else "")
            + f", n={p.n} seed{'s' if p.n != 1 else ''}")
    if p.verdict == "better":
        return f"{who} beat random selection here: {diff}."
    if p.verdict == "worse":
        return f"{who} did not beat random selection here; it was worse: {diff}."
    if p.verdict == "indistinguishable":
        return f"{who} did not beat random selection here: {diff}; the interval includes 0."
    return f"{who} vs random: {diff}, too few paired seeds for an interval, so no verdict."


def summary_markdown(rep: Report) -> list[str]:
    """"What this study found": per domain, on its primary metric, how many selectors were better /
    indistinguishable / worse than random and than full (paired by seed), the best by mean, and whether
    InstructDiff beat random. Built from the paired table only."""
    md = ["## What this study found", ""]
    domains = sorted({g.domain for g in rep.groups.values() if g.label != BASE_LABEL})
    if not domains:
        return md + ["No trained-model metrics in any finished run: nothing to compare.", ""]
    for domain in domains:
        metric = rep.primary_metric(domain)
        if metric is None:
            continue
        lower = lower_is_better(metric)
        where = f"**{domain}**: " if len(domains) > 1 else ""
        sentences = [f"{where}Primary metric `{metric}` ({'lower' if lower else 'higher'} is better); "
                     f"differences are selector − reference over runs paired by seed on the same pool, "
                     f"with {CI_LEVEL:.0%} t intervals."]
        paired = [(g, ref, p) for g, ref, p in rep.paired() if g.domain == domain and p.metric == metric]
        for ref in ("random", "full"):
            rows = [(g, p) for g, r, p in paired if r == ref]
            if not any(g.selector == ref for g in rep.groups.values() if g.domain == domain):
                sentences.append(f"No `{ref}` runs to compare against.")
            elif not rows:
                sentences.append(f"No selector could be paired with `{ref}` (no shared seeds and settings).")
            else:
                sentences.append(f"Against `{ref}`: " + _verdict_counts(rep, rows) + ".")
        stats = [(g, st) for g in rep.ordered_groups(domain)
                 if g.label != BASE_LABEL and (st := g.stats(metric)) is not None]
        if stats:
            best, st = (min if lower else max)(stats, key=lambda gs: gs[1][0])
            sentences.append(f"Best mean {metric.split('/')[-1]}: `{rep.group_name(best)}` "
                             f"({fmt(st[0])}, n={st[2]} seed{'s' if st[2] != 1 else ''}); whether a "
                             f"difference is more than seed noise is what the paired verdicts say.")
        sentences += [_instructdiff_sentence(rep, g, p) for g, ref, p in paired
                      if ref == "random" and g.selector == "instructdiff"]
        md += [" ".join(sentences), ""]
    return md


def overlap_markdown(overlap: list) -> list[str]:
    md = ["", "## Selection overlap", "",
          "Jaccard |A∩B| / |A∪B| of the selected id sets, same domain, setting, fraction and seed, "
          "mean over the seeds both selectors ran.", ""]
    if not overlap:
        md.append("Fewer than two selectors at any (domain, fraction): nothing to compare.")
    for (domain, setting, frac), labels, mat, _ in overlap:
        md += [f"### {domain} @{fmt_frac(frac)}" + (f" ({setting})" if setting else ""), ""]
        md += md_table(["", *labels], [[a, *(fmt(v, 3) for v in mat[i])] for i, a in enumerate(labels)])
        md.append("")
    return md


def cost_markdown(cost: list[dict]) -> list[str]:
    md = ["## Cost", "",
          "Mean wall time per stage per run (s, results.json `seconds`), scoring passes actually run, "
          "trainings actually run, cache hits and misses (summed over runs). A run is one (selector, "
          "fraction, setting, seed): jobs that repeat one (`full` at several fractions, a rerun sweep) "
          "count once, the first of them. Work another job had "
          "already cached costs ~0 here, so the first job of a shared computation carries its cost.", "",
          "Estimated FLOPs, mean per run (results.json `cost`; forward 2·P·T, SFT 6·P·T·epochs, P = "
          "parameters without the input embedding table, T = tokens; instructdiff/cost.py): **selection** "
          "= every model pass the selector made (calibration, scoring, signals) counted from scratch, "
          "*selection (this run)* = the part not served from a cache, then the final training and the "
          "evaluation of base and trained model, also counted from scratch (cost.csv has the `_this_run` "
          "parts of each). Model-free selectors (random, full, length) cost 0 to select.", ""]
    if not cost:
        return md + ["No finished runs."]
    return md + md_table(
        ["domain", "selector", "runs", "seeds", *STAGE_ORDER, "total", "score passes", "score s", "trainings",
         "cache hits", "cache misses", "selection FLOPs", "selection FLOPs (this run)", "train FLOPs",
         "eval FLOPs"],
        [[r["domain"], r["selector"], f"{r['runs']}" + (f" ({r['jobs']} jobs)" if r["jobs"] != r["runs"] else ""),
          r["seeds"], *(f"{r[f'mean_s_{s}']:.1f}" for s in STAGE_ORDER), f"{r['mean_s_total']:.1f}",
          r["score_passes"], f"{r['score_s']:.1f}", r["trainings_computed"], r["cache_hits"], r["cache_misses"],
          *(fmt_flops(r[c]) for c, _ in COST_COLUMNS[:4])] for r in cost])
