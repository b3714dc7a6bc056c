"""Write a report: the plots, report.csv, runs.csv, overlap.csv, cost.csv, paired.csv and report.md."""

from __future__ import annotations

from pathlib import Path

from instructdiff.report.deltas import plot_deltas
from instructdiff.report.markdown import markdown
from instructdiff.report.pareto import frontier_lines, plot_pareto
from instructdiff.report.plots import plot_against, plot_cost, plot_overlap
from instructdiff.report.study import Report, num
from instructdiff.report.tables import (
    OVERLAP_COLUMNS,
    PAIRED_COLUMNS,
    RESULTS_COLUMNS,
    RUNS_COLUMNS,
    cost_rows,
    overlap,
    overlap_rows,
    paired_rows,
    results_rows,
    runs_rows,
    write_csv,
)


def write_report(rep: Report, out: Path | str | None = None) -> Path:
    """Everything into ``out`` (default: the study folder); returns the path of report.md."""
    out = Path(out).resolve() if out else rep.root
    out.mkdir(parents=True, exist_ok=True)
    ov = overlap(rep)
    cost = cost_rows(rep)

    numeric_params = sorted({k for j in rep.ok for k, v in j.params.items() if num(v) is not None})
    for p in ["fraction", *numeric_params]:
        rep.plots += [(f"metric against {p}", f) for f in plot_against(rep, out, p)]
    rep.plots += [("ΔH / ΔNLL distributions", f) for f in plot_deltas(rep, out)]
    rep.plots += [("selection overlap", f) for f in plot_overlap(out, ov)]
    rep.plots += [("cost", f) for f in plot_cost(out, cost)]
    pareto = plot_pareto(rep, out)
    rep.plots += [("metric against selection FLOPs", f) for _, f in pareto]
    frontiers = {f: ["Pareto frontier per budget fraction, cheapest first (selection FLOPs, mean metric):", "",
                     *frontier_lines(rep, domain)] for domain, f in pareto}

    write_csv(out / "report.csv", results_rows(rep), RESULTS_COLUMNS)
    write_csv(out / "runs.csv", runs_rows(rep), RUNS_COLUMNS)
    write_csv(out / "overlap.csv", overlap_rows(ov), OVERLAP_COLUMNS)
    write_csv(out / "cost.csv", cost, list(cost[0]) if cost else ["domain", "selector", "runs"])
    write_csv(out / "paired.csv", paired_rows(rep), PAIRED_COLUMNS)
    path = out / "report.md"
    path.write_text("\n".join(markdown(rep, ov, cost, frontiers)) + "\n", encoding="utf-8")
    return path


def build_report(multirun_dir: Path | str, out: Path | str | None = None) -> Report:
    """Read every job under ``multirun_dir`` and write the report (into ``out``, default that folder)."""
    rep = Report(Path(multirun_dir))
    write_report(rep, out)
    return rep
