"""The metric against selection FLOPs (``pareto_<domain>.png``, the cost view of Ivison et al. 2025, arXiv
2503.01807): one point per selector group (mean over seeds, 95% CI as error bars), the Pareto frontier of each
budget fraction drawn as a staircase (the best metric reachable at no more selection compute), ``full`` and the
base model as horizontal reference lines (``full`` trains on the whole pool: it is no selection at the budget,
so it is not on a frontier).

The x axis is log10 FLOPs with the model-free selectors (0 FLOPs) on a tick of their own left of an axis break,
and at most six decade ticks, so tick labels never collide; point labels are pushed apart until no two overlap.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from instructdiff.report.fmt import BASE_LABEL, fmt, fmt_flops, fmt_frac, slug
from instructdiff.report.plots import label_metric_axis, metric_axes, save
from instructdiff.report.stats import lower_is_better, pareto_front
from instructdiff.report.study import Group, Report

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MAX_DECADE_TICKS = 6
LINE_STYLES = ("--", "-.", ":", (0, (5, 1)))
FRONTIER_COLOR = "tab:red"
# point colours: the tab10 palette without its red, which marks the frontier
POINT_COLORS = ("C0", "C1", "C2", "C4", "C5", "C6", "C8", "C9", "C7")


@dataclass
class Point:
    name: str
    cost: float          # mean from-scratch selection FLOPs per run
    mean: float
    half: float | None   # 95% CI half-width over seeds (None: one seed)
    frontier_key: tuple  # (fraction, setting): points compete only with the same budget and setting


def points(rep: Report, domain: str, metric: str) -> tuple[list[Point], list[Group]]:
    """The costed selector groups of a domain as points of ``metric``, and the ``full`` groups (references)."""
    groups = [g for g in rep.ordered_groups(domain) if g.label != BASE_LABEL]
    several_fractions = len({g.fraction for g in groups if g.selector != "full"}) > 1
    pts, fulls = [], []
    for g in groups:
        st = g.stats(metric)
        if st is None:
            continue
        if g.selector == "full":
            fulls.append(g)
            continue
        cost = rep.selection_flops(g)
        if cost is None:
            continue
        name = g.label + (f" @{fmt_frac(g.fraction)}" if several_fractions else "")
        name += f" ({g.setting})" if g.setting else ""
        pts.append(Point(name, cost, st[0], st[1], (g.fraction, g.setting)))
    return pts, fulls


def frontiers(pts: list[Point], metric: str) -> dict[tuple, list[Point]]:
    """(fraction, setting) -> the points on its Pareto frontier, cheapest first."""
    by: dict[tuple, list[Point]] = defaultdict(list)
    for p in pts:
        by[p.frontier_key].append(p)
    out = {}
    for key, ps in by.items():
        idx = pareto_front([(p.cost, p.mean) for p in ps], lower_is_better(metric))
        out[key] = [ps[i] for i in idx]
    return out


def frontier_lines(rep: Report, domain: str) -> list[str]:
    """Markdown lines naming each metric's Pareto frontier (cheapest first), for the report beside the plot."""
    lines = []
    for metric in sorted({m for g in rep.ordered_groups(domain) if g.label != BASE_LABEL for m in g.values}):
        pts, _ = points(rep, domain, metric)
        for (frac, setting), front in sorted(frontiers(pts, metric).items(), key=lambda kv: str(kv[0])):
            where = f"@{fmt_frac(frac)}" + (f" ({setting})" if setting else "")
            steps = " → ".join(f"`{p.name}` ({fmt_flops(p.cost)} FLOPs, {fmt(p.mean)})" for p in front)
            lines.append(f"- {domain} {where}, `{metric}`: {steps}")
    return lines + [""] if lines else []


class FlopsAxis:
    """log10 of the FLOPs, with 0 (model-free) drawn one decade left of the smallest decade, past a break."""

    def __init__(self, costs: list[float]) -> None:
        positive = [c for c in costs if c > 0]
        self.has_zero = any(c == 0 for c in costs)
        self.has_positive = bool(positive)
        if positive:
            self.lo = math.floor(math.log10(min(positive)))
            self.hi = max(math.ceil(math.log10(max(positive))), self.lo + 1)
        else:
            self.lo, self.hi = 0, 1
        self.zero = self.lo - 1.5 if positive else 0.0

    def x(self, cost: float) -> float:
        return math.log10(cost) if cost > 0 else self.zero

    def apply(self, ax: Axes) -> None:
        step = max(1, math.ceil((self.hi - self.lo + 1) / MAX_DECADE_TICKS))
        decades = list(range(self.lo, self.hi + 1, step)) if self.has_positive else []
        ticks = ([self.zero] if self.has_zero else []) + [float(d) for d in decades]
        labels = (["0\n(model-free)"] if self.has_zero else []) + [f"$10^{{{d}}}$" for d in decades]
        ax.set_xticks(ticks, labels, fontsize=7)
        left = self.zero - 0.6 if self.has_zero else self.lo - 0.5
        ax.set_xlim(left, self.hi + 0.9)  # room on the right for the labels of the costliest points
        if self.has_zero and decades:
            ax.axvline(self.zero + 0.75, color="0.75", lw=0.8, ls=(0, (2, 2)))  # the axis break
        ax.set_xlabel("selection FLOPs per run, from scratch" + (" (log scale)" if decades else ""), fontsize=8)


LABEL_GAP_PT = 10      # from a column of points to its labels
COLUMN_PX = 40         # points closer than this on x share one column of labels


def place_labels(fig: Figure, ax: Axes, xy: list[tuple[float, float]], names: list[str], bold: list[bool]) -> None:
    """Label every point without overlaps: points whose x lie within ``COLUMN_PX`` form a column, whose labels
    stack beside it (right of it, left for columns in the right third), each at its point's height where it
    can be and pushed apart by one text height where not, joined to its point by a leader line, and kept
    inside the panel. Hand-written because the library that does this (adjustText) is not a dependency, and
    this 1-D stacking is all the few labels per column need."""
    from matplotlib.text import Text

    renderer = fig.canvas.get_renderer()
    panel = ax.get_window_extent(renderer)
    px = [tuple(ax.transData.transform(p)) for p in xy]
    columns: list[list[int]] = []
    for i in sorted(range(len(xy)), key=lambda k: px[k][0]):
        if columns and px[i][0] - px[columns[-1][-1]][0] < COLUMN_PX:
            columns[-1].append(i)
        else:
            columns.append([i])
    to_px = fig.dpi / 72.0

    def to_axes(x: float, y: float) -> tuple[float, float]:  # dpi-independent: savefig may use another dpi
        return tuple(ax.transAxes.inverted().transform((x, y)))

    for col in columns:
        right = px[col[-1]][0] < panel.x0 + 0.67 * panel.width
        x_text = (px[col[-1]][0] + LABEL_GAP_PT * to_px) if right else (px[col[0]][0] - LABEL_GAP_PT * to_px)
        texts = {i: ax.annotate(names[i], xy[i], xytext=to_axes(x_text, px[i][1]), textcoords="axes fraction",
                                fontsize=7, fontweight="bold" if bold[i] else "normal", ha="left" if right else
                                "right", va="center", annotation_clip=False,
                                bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.85),
                                arrowprops=dict(arrowstyle="-", color="0.55", lw=0.5, shrinkA=0, shrinkB=3))
                 for i in col}
        for t in texts.values():
            t.set_in_layout(False)  # laid out inside the panel already: the figure's layout must not move it
        # the text's own box: an Annotation's extent would include its leader line
        width = max(Text.get_window_extent(t, renderer).width for t in texts.values())
        if (x_text + width > panel.x1) if right else (x_text - width < panel.x0):  # no room: the other side
            right = not right
            x_text = (px[col[-1]][0] + LABEL_GAP_PT * to_px) if right else (px[col[0]][0] - LABEL_GAP_PT * to_px)
            for t in texts.values():
                t.set_ha("left" if right else "right")
        height = max(Text.get_window_extent(t, renderer).height for t in texts.values()) + 4.0  # + the pad
        ys = _spread([px[i][1] for i in col], height, panel.y0 + height / 2, panel.y1 - height / 2)
        order = sorted(col, key=lambda i: px[i][1])
        for i, y in zip(order, ys, strict=True):
            texts[i].xyann = to_axes(x_text, y)


def _spread(targets: list[float], gap: float, low: float, high: float) -> list[float]:
    """Positions for labels wanted at ``targets`` (any order), returned for the targets sorted ascending: as
    close to them as possible while at least ``gap`` apart and inside [low, high]."""
    ys = sorted(targets)
    for k in range(1, len(ys)):  # push up whatever sits too close above its lower neighbour
        ys[k] = max(ys[k], ys[k - 1] + gap)
    shift = (sum(ys) - sum(sorted(targets))) / len(ys)  # then centre the stack on its targets
    ys = [y - shift for y in ys]
    ys = [y + max(0.0, low - ys[0]) for y in ys]  # and keep it inside the panel
    return [y - max(0.0, ys[-1] - high) for y in ys]


def _reference(ax, value: float, label: str, ls, color: str, lo: float, hi: float) -> None:
    """A horizontal reference line, or, when it lies far outside the points' range (more than that range
    away), a legend entry with its value: drawing it would squash the points the plot is about."""
    span = max(hi - lo, 1e-12)
    if lo - span <= value <= hi + span:
        ax.axhline(value, color=color, ls=ls, lw=1.1, label=label)
    else:
        where = "above" if value > hi else "below"
        ax.plot([], [], color=color, ls=ls, lw=1.1, label=f"{label}: {fmt(value)} ({where} the panel)")


def _draw_metric(ax, rep: Report, domain: str, metric: str, axis: FlopsAxis) -> tuple[list, list, list]:
    """Points, frontiers and reference lines of one panel; returns what its point labels need: positions,
    names and whether each is on a frontier."""
    pts, fulls = points(rep, domain, metric)
    front = frontiers(pts, metric)
    on_front = {id(p) for ps in front.values() for p in ps}
    for k, p in enumerate(pts):
        ax.errorbar([axis.x(p.cost)], [p.mean], yerr=[p.half or 0.0], marker="o", capsize=3, ls="none",
                    color=POINT_COLORS[k % len(POINT_COLORS)])
    for n, ((frac, setting), ps) in enumerate(sorted(front.items(), key=lambda kv: str(kv[0]))):
        xs = [axis.x(p.cost) for p in ps] + [axis.hi + 0.9]
        ys = [p.mean for p in ps]
        # the staircase: from each frontier point the best metric stays until a costlier point improves it
        ax.step(xs, ys + [ys[-1]], where="post", color=FRONTIER_COLOR, lw=1.2, ls=LINE_STYLES[n % len(LINE_STYLES)],
                label="Pareto frontier" + (f" @{fmt_frac(frac)}" if len(front) > 1 else "")
                + (f" ({setting})" if setting and len(front) > 1 else ""))
    lo = min(p.mean - (p.half or 0.0) for p in pts)
    hi = max(p.mean + (p.half or 0.0) for p in pts)
    for k, g in enumerate(fulls):
        _reference(ax, g.stats(metric)[0], f"{g.label} (whole pool)" + (f" ({g.setting})" if g.setting else ""),
                   LINE_STYLES[k % len(LINE_STYLES)], "grey", lo, hi)
    settings = sorted({g.setting for g in rep.ordered_groups(domain)})
    for setting in settings:
        base = rep.base_group(domain, setting)
        if base is not None and base.stats(metric) is not None:
            _reference(ax, base.stats(metric)[0], BASE_LABEL + (f" ({setting})" if len(settings) > 1 else ""),
                       ":", "black", lo, hi)
    axis.apply(ax)
    label_metric_axis(ax, metric)
    ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=2, frameon=False)
    return [(axis.x(p.cost), p.mean) for p in pts], [p.name for p in pts], [id(p) in on_front for p in pts]


def figure_pareto(rep: Report, domain: str) -> Figure | None:
    """Each trained metric of ``domain`` against the from-scratch selection FLOPs of every selector group; None
    where fewer than two selector groups have a known cost."""
    metrics = sorted({m for g in rep.ordered_groups(domain) if g.label != BASE_LABEL for m in g.values})
    costed = {m: points(rep, domain, m)[0] for m in metrics}
    metrics = [m for m in metrics if len(costed[m]) >= 2]
    if not metrics:
        return None
    axis = FlopsAxis([p.cost for m in metrics for p in costed[m]])
    crowd = max(len(costed[m]) for m in metrics)  # a wider panel for many labelled points
    fig, axes = metric_axes(len(metrics), f"{domain}: metric against selection FLOPs\n(mean ± 95% CI over seeds; "
                            "bold: on the Pareto frontier)", width=5.6 + 0.2 * max(0, crowd - 6), height=4.4)
    labels = [_draw_metric(ax, rep, domain, m, axis) for ax, m in zip(axes, metrics, strict=True)]
    fig.tight_layout()  # labels are placed in display space: lay the panels out first
    for ax, (xy, names, bold) in zip(axes, labels, strict=True):
        place_labels(fig, ax, xy, names, bold)
    return fig


def plot_pareto(rep: Report, out: Path) -> list[tuple[str, str]]:
    """``pareto_<domain>.png`` per domain; returns (domain, file) pairs."""
    files = []
    for domain in rep.domains():
        fig = figure_pareto(rep, domain)
        if fig is not None:
            files.append((domain, save(fig, out, f"pareto_{slug(domain)}.png")))
    return files
