"""The report's plots of metrics and cost: metric against the budget fraction or a swept selector option (with
the base model and the metric's direction), selection-overlap heatmaps and wall time per stage. Every axis is
labelled; every metric axis says whether lower or higher is better. The ΔH/ΔNLL histograms are in deltas.py,
the metric against selection FLOPs in pareto.py."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from instructdiff.report.fmt import BASE_LABEL, fmt_frac, label_key, slug
from instructdiff.report.stats import direction, mean_ci
from instructdiff.report.study import Report, num, trained_metrics
from instructdiff.report.tables import STAGE_ORDER

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

AXIS_LABELS = {"fraction": "budget fraction β (share of the pool selected)"}


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend: the report runs headless (clusters, CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Figure, out: Path, name: str) -> str:
    """Lay out, write ``out/name`` and free the figure (a sweep report draws dozens); returns ``name``."""
    import io

    from PIL import Image

    plt = pyplot()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    # A 256-colour palette looks the same for these flat-coloured figures at ~40% of the bytes: studies commit
    # their plots (scripts/publish_study.py refuses any over 200 KB), and a per-run ΔH panel grid is large.
    buf.seek(0)
    Image.open(buf).convert("RGB").quantize(colors=256).save(out / name, optimize=True)
    return name


def metric_axes(n: int, title: str, width: float = 5.0, height: float = 3.8) -> tuple[Figure, list[Axes]]:
    """A figure of ``n`` panels, three to a row, titled ``title``; returns (figure, the n axes)."""
    plt = pyplot()
    cols = min(3, max(1, n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    fig.suptitle(title)
    flat = [a for r in axes for a in r]
    for a in flat[n:]:
        a.set_visible(False)
    return fig, flat[:n]


def label_metric_axis(ax: Axes, metric: str, axis: str = "y") -> None:
    """The metric's name on the axis and its direction ("↓ lower is better") as the panel's title."""
    (ax.set_ylabel if axis == "y" else ax.set_xlabel)(metric, fontsize=8)
    ax.set_title(direction(metric), fontsize=9, loc="left")
    # whole tick values: an offset ("1e-5+5.046") would sit on the direction and make every tick a puzzle
    ax.ticklabel_format(axis=axis, useOffset=False)


def draw_base_line(ax: Axes, rep: Report, domain: str, setting: str, metric: str, label_setting: bool = False) -> None:
    """The untrained model's mean as a black dotted line: the level every selection has to beat."""
    base = rep.base_group(domain, setting)
    st = base.stats(metric) if base is not None else None
    if st is not None:
        ax.axhline(st[0], ls=":", color="black", lw=1.2,
                   label=BASE_LABEL + (f" ({setting})" if label_setting and setting else ""))


def _series(rep: Report, domain: str, param: str) -> tuple[dict, dict]:
    """(lines, flat references): line (label, setting) -> x -> metric -> {seed: value}; flat references are
    selectors that are a level, not a function of ``param`` (full against β; random/full without the option)."""
    series: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    flat: dict = defaultdict(lambda: defaultdict(dict))
    for j in rep.ok:
        if j.domain != domain:
            continue
        if param == "fraction":
            x, line = j.fraction, (j.label, j.setting)
        else:
            x = num(j.params.get(param))
            rest = {k: v for k, v in j.params.items() if k != param}
            lab = j.selector + (f" [{', '.join(f'{k}={v}' for k, v in sorted(rest.items()))}]" if rest else "")
            line = (lab + ("" if j.fraction is None else f" @{j.fraction:g}"), j.setting)
        for m, v in trained_metrics(j).items():
            if param == "fraction" and j.selector == "full":
                flat[line][m].setdefault(j.seed, v)  # full is a level, not a function of β
            elif x is None and j.selector in ("full", "random"):
                flat[line][m].setdefault(j.seed, v)  # the references, where the sweep has them
            elif x is not None:
                series[line][x][m].setdefault(j.seed, v)
    return series, flat


def figure_against(rep: Report, domain: str, param: str) -> Figure | None:
    """The metric against ``param`` (``fraction`` or a selector option) in one domain, one line per selector
    label with that option removed; 95% CI as error bars; the base model and the flat references as horizontal
    lines. None where the param takes fewer than 2 values."""
    series, flat = _series(rep, domain, param)
    if len({x for s in series.values() for x in s}) < 2:
        return None
    metrics = sorted({m for s in series.values() for pts in s.values() for m in pts})
    settings = sorted({setting for _, setting in series})
    fig, axes = metric_axes(len(metrics), f"{domain}: metric against {param}\n(mean ± 95% CI over seeds)")
    for ax, m in zip(axes, metrics, strict=True):
        for (lab, setting), pts in sorted(series.items(), key=lambda kv: label_key(kv[0][0])):
            px = sorted(x for x in pts if pts[x].get(m))
            if not px:
                continue
            stats = [mean_ci(list(pts[x][m].values())) for x in px]
            ax.errorbar(px, [s[0] for s in stats], yerr=[s[1] or 0.0 for s in stats], marker="o",
                        capsize=3, label=lab + (f" ({setting})" if setting else ""))
        for k, ((lab, setting), ms) in enumerate(sorted(flat.items())):
            if ms.get(m):
                ax.axhline(mean_ci(list(ms[m].values()))[0], ls=("--", "-.")[k % 2], color="grey",
                           label=lab + (" (whole pool)" if lab == "full" else "") + (f" ({setting})" if setting else ""))
        for setting in settings:
            draw_base_line(ax, rep, domain, setting, m, label_setting=len(settings) > 1)
        xs = sorted({x for pts in series.values() for x in pts})
        if xs[0] > 0 and xs[-1] / xs[0] >= 10:
            # values spread over decades (warm-up ratio 0.01 … 0.5, budget 5 … 50%): a linear axis would crowd the
            # small ones into one corner; the ticks are the swept values themselves
            ax.set_xscale("log")
            ax.set_xticks(xs, [f"{x:g}" for x in xs])
            ax.minorticks_off()
        ax.set_xlabel(AXIS_LABELS.get(param, f"selector.{param}"), fontsize=8)
        label_metric_axis(ax, m)
        ax.legend(fontsize=7)
    return fig


def plot_against(rep: Report, out: Path, param: str) -> list[str]:
    """``<param>_<domain>.png`` for every domain where ``param`` takes >= 2 values."""
    files = []
    for domain in sorted({j.domain for j in rep.ok}):
        fig = figure_against(rep, domain, param)
        if fig is not None:
            files.append(save(fig, out, f"{slug(param)}_{slug(domain)}.png"))
    return files


def plot_overlap(out: Path, overlap: list) -> list[str]:
    """One heatmap per (domain, setting, fraction): the mean Jaccard overlap of the selectors' picks."""
    files = []
    plt = pyplot()
    for (domain, setting, frac), labels, mat, _ in overlap:
        size = 1.2 + 0.7 * len(labels)
        fig, ax = plt.subplots(figsize=(size + 2.0, size + 0.6))
        data = [[float("nan") if v is None else v for v in row] for row in mat]
        im = ax.imshow(data, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_xlabel("selector B", fontsize=8)
        ax.set_ylabel("selector A", fontsize=8)
        for i, row in enumerate(mat):
            for k, v in enumerate(row):
                if v is not None:
                    ax.text(k, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if v < 0.6 else "black")
        fig.colorbar(im, ax=ax, label="Jaccard |A∩B|/|A∪B| of selected ids")
        ax.set_title(f"{domain} @{fmt_frac(frac)}" + (f" ({setting})" if setting else "")
                     + ": overlap of the picks, mean over seeds", fontsize=9)
        name = f"overlap_{slug(domain)}_{slug(fmt_frac(frac))}" + (f"_{slug(setting)}" if setting else "")
        files.append(save(fig, out, f"{name}.png"))
    return files


def plot_cost(out: Path, rows: list[dict[str, Any]]) -> list[str]:
    """Stacked bars of the mean wall time per stage per run, one bar per (selector, domain)."""
    if not rows:
        return []
    plt = pyplot()
    labels = [f"{r['selector']} ({r['domain']})" for r in rows]
    fig, ax = plt.subplots(figsize=(8, 1.8 + 0.45 * len(rows)))
    left = [0.0] * len(rows)
    for st in STAGE_ORDER:
        vals = [r[f"mean_s_{st}"] for r in rows]
        ax.barh(labels, vals, left=left, label=st)
        left = [a + b for a, b in zip(left, vals, strict=True)]
    ax.invert_yaxis()
    ax.set_xlabel("mean wall time per run (s); stages served from the cache cost ~0")
    ax.set_ylabel("selector (domain)")
    ax.legend(fontsize=7, ncols=len(STAGE_ORDER), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    return [save(fig, out, "cost.png")]
