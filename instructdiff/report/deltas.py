"""ΔH and ΔNLL histograms: every scored row against the selected ones, one row of panels per run (selector
group and seed). Seeds are never pooled: each seed has its own calibrated model and so its own ΔH and ΔNLL of
the same pool, and pooling them would count every row once per seed. The analogue of the InstructDiff paper's
differential-entropy figures."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from instructdiff.report.fmt import fmt_frac, label_key, slug
from instructdiff.report.load import read_selection
from instructdiff.report.plots import pyplot, save
from instructdiff.report.study import Report, num

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MAX_DELTA_PANELS = 8
DELTA_KEYS = ("delta_entropy", "delta_nll")
DELTA_AXES = {"delta_entropy": "ΔH = H_base − H_calibrated (nats per response token)",
              "delta_nll": "ΔNLL = NLL_base − NLL_calibrated (nats per response token)"}


def delta_runs(rep: Report, domain: str) -> dict[tuple, dict[str, tuple[list[float], list[float]]]]:
    """(label, fraction, setting, seed) -> signal -> (every scored row's value, the selected rows' values), for
    the runs of ``domain`` whose selection.jsonl records ΔH or ΔNLL (InstructDiff's)."""
    runs: dict[tuple, dict[str, tuple[list[float], list[float]]]] = {}
    for j in rep.ok:
        if j.domain != domain:
            continue
        recs = read_selection(j)
        if not any(k in (r.get("scores") or {}) for r in recs for k in DELTA_KEYS):
            continue
        key = (j.label, j.fraction, j.setting, j.seed)
        if key in runs:
            continue  # the same run again (a merged or rerun sweep) counts once
        slot = runs[key] = {k: ([], []) for k in DELTA_KEYS}
        for r in recs:
            for k in DELTA_KEYS:
                v = num((r.get("scores") or {}).get(k))
                if v is None or not math.isfinite(v):
                    continue
                slot[k][0].append(v)
                if r.get("status") == "selected":
                    slot[k][1].append(v)
    return runs


def _hist(ax, allv: list[float], sel: list[float]) -> None:
    lo, hi = min(allv), max(allv)
    bins, rng = (30, (lo, hi)) if hi > lo else (1, (lo - 0.5, lo + 0.5))
    ax.hist(allv, bins=bins, range=rng, histtype="step", color="black", label=f"all scored ({len(allv)})")
    if sel:
        ax.hist(sel, bins=bins, range=rng, alpha=0.6, color="tab:orange", label=f"selected ({len(sel)})")


def figure_deltas(rep: Report, domain: str) -> Figure | None:
    """A row of (ΔH, ΔNLL) panels per run of ``domain``, at most ``MAX_DELTA_PANELS`` rows (the title says how
    many runs were left out); None where no run recorded them."""
    runs = delta_runs(rep, domain)
    if not runs:
        return None
    keys = sorted(runs, key=lambda k: (label_key(k[0]), k[1] if k[1] is not None else -1, k[2], str(k[3])))
    shown = keys[:MAX_DELTA_PANELS]
    fig, axes = pyplot().subplots(len(shown), 2, figsize=(10, 0.6 + 2.9 * len(shown)), squeeze=False)
    title = f"{domain}: ΔH and ΔNLL (base − calibrated) per run, all scored rows vs selected"
    if len(keys) > len(shown):
        title += f"\n(first {len(shown)} of {len(keys)} runs shown)"
    fig.suptitle(title)
    for row, key in zip(axes, shown, strict=True):
        label, frac, setting, seed = key
        where = f" ({setting})" if setting else ""
        for ax, k in zip(row, DELTA_KEYS, strict=True):
            allv, sel = runs[key][k]
            if allv:
                _hist(ax, allv, sel)
            ax.set_title(f"{label} @{fmt_frac(frac)}{where}, seed {seed}", fontsize=8)
            ax.set_xlabel(DELTA_AXES[k], fontsize=8)
            ax.set_ylabel("rows", fontsize=8)
            ax.legend(fontsize=7)
    return fig


def plot_deltas(rep: Report, out: Path) -> list[str]:
    """``delta_<domain>.png`` for every domain with ΔH/ΔNLL records."""
    files = []
    for domain in sorted({j.domain for j in rep.ok}):
        fig = figure_deltas(rep, domain)
        if fig is not None:
            files.append(save(fig, out, f"delta_{slug(domain)}.png"))
    return files
