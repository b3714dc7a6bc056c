"""The report's figures and the numbers they show (instructdiff/report/{plots,deltas,pareto}.py): the Pareto
frontier on a hand example, labels that never overlap, collision-free FLOPs ticks, base line and metric
direction on metric plots, ΔH/ΔNLL panels per seed, seeds and jobs counted per selector, and gains printed
with their own interval or not at all. Figures are built for real (matplotlib, Agg) and inspected."""

from __future__ import annotations

import json
import math
from itertools import combinations
from pathlib import Path

import pytest
from matplotlib.text import Annotation, Text

from instructdiff.report import BASE_LABEL, Report, build_report, pareto_front
from instructdiff.report.deltas import delta_runs, figure_deltas
from instructdiff.report.fmt import fmt_gain_ci
from instructdiff.report.pareto import FlopsAxis, _spread, figure_pareto, frontiers, place_labels, points
from instructdiff.report.plots import figure_against, pyplot
from instructdiff.report.stats import paired_diff

BPB, ACC = "t_bpb/bits_per_byte", "t/acc"
COST = {"random": 0.0, "length": 0.0, "full": 0.0, "instructdiff": 3e10, "ifd": 2e10}


def _job(sweep: Path, num: int, selector: str, seed: int, fraction: float, bpb: float,
         deltas: list[float] | None = None) -> Path:
    """A finished job directory (as Hydra and the pipeline leave it) with its selection FLOPs; ``deltas``:
    the ΔH of each pool row in selection.jsonl (the first two selected), as InstructDiff records them."""
    overrides = [f"selector={selector}", f"seed={seed}", f"selector.budget.fraction={fraction}"]
    job = sweep / f"{num}_{selector}_{seed}"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (job / ".hydra" / "hydra.yaml").write_text(
        f"hydra:\n  job:\n    num: {num}\n  runtime:\n    choices:\n      selector: {selector}\n")
    config = {"domain": {"name": "math", "eval_tasks": ["t", "t_bpb"]}, "model": {"name": "tiny"}, "seed": seed,
              "selector": {"budget": {"fraction": fraction, "count": None}}}
    (job / "manifest.json").write_text(json.dumps({"config": config}))
    (job / "results.json").write_text(json.dumps({
        "domain": "math", "seconds": {"train": 1.0}, "cost": {"selection_flops_uncached": COST[selector]},
        "eval": {"base": {"metrics": {BPB: 2.0, ACC: 0.1}}, "trained": {"metrics": {BPB: bpb, ACC: 1 - bpb / 2}}}}))
    if deltas is not None:
        (job / "selection.jsonl").write_text("".join(json.dumps({
            "id": f"r{k}", "status": "selected" if k < 2 else "not_selected",
            "scores": {"delta_entropy": d, "delta_nll": d / 2}}) + "\n" for k, d in enumerate(deltas)))
    return job


def _study(root: Path, selectors: dict[str, list[float]], fractions=(0.1,), full_fractions=(0.1,),
           deltas: bool = False) -> Path:
    """selectors: name -> bits/byte per seed; ``full`` runs once per seed at each of ``full_fractions``."""
    sweep, num = root / "sweep", 0
    for sel, values in selectors.items():
        for frac in (full_fractions if sel == "full" else fractions):
            for seed, v in enumerate(values):
                d = [0.1 * k + seed for k in range(4)] if deltas and sel == "instructdiff" else None
                _job(sweep, num, sel, seed, frac, v + (0.01 if frac != fractions[0] else 0.0), d)
                num += 1
    return sweep


def _annotations(ax) -> list[Annotation]:
    return [c for c in ax.get_children() if isinstance(c, Annotation)]


# -- the Pareto frontier ---------------------------------------------------------------------------------------
def test_pareto_front_on_a_hand_example():
    pts = [(0, 0.50), (0, 0.40), (10, 0.60), (10, 0.55), (20, 0.58), (30, 0.70), (30, 0.70)]
    # higher is better: B is beaten at equal cost, D at equal cost, E by C (cheaper and better); F = G tie
    assert pareto_front(pts) == [0, 2, 5, 6]
    # lower is better: B (cheapest and lowest) beats every other point
    assert pareto_front(pts, lower_better=True) == [1]
    assert pareto_front([(5, 1.0)]) == [0] and pareto_front([]) == []


def test_frontier_is_per_budget_fraction_and_leaves_full_out(tmp_path):
    values = {"full": [0.5, 0.6], "random": [1.0, 1.1], "length": [1.05, 1.12], "instructdiff": [0.9, 1.0],
              "ifd": [0.95, 1.05]}
    rep = Report(_study(tmp_path, values, fractions=(0.1, 0.2), full_fractions=(0.1, 0.2)))
    pts, fulls = points(rep, "math", BPB)
    assert [g.selector for g in fulls] == ["full"] and not [p for p in pts if p.name.startswith("full")]
    front = {k: [p.name for p in ps] for k, ps in frontiers(pts, BPB).items()}
    # per fraction: random is the cheapest (0 FLOPs, beats length), ifd beats it for 2e10, instructdiff for 3e10
    assert front == {(0.1, ""): ["random @0.1", "ifd @0.1", "instructdiff @0.1"],
                     (0.2, ""): ["random @0.2", "ifd @0.2", "instructdiff @0.2"]}


def test_pareto_figure_draws_the_frontier_readable_labels_and_ticks(tmp_path):
    values = {"full": [0.5, 0.6], "random": [1.0, 1.1], "length": [1.0005, 1.1004], "instructdiff": [0.9, 1.0],
              "ifd": [1.2, 1.3]}
    rep = Report(_study(tmp_path, values))
    fig = figure_pareto(rep, "math")
    ax_bpb = next(ax for ax in fig.axes if ax.get_ylabel() == BPB)
    (step,) = [ln for ln in ax_bpb.get_lines() if ln.get_label() == "Pareto frontier"]
    # the staircase passes through the frontier points random (0 FLOPs) and instructdiff (3e10), cheapest first
    assert list(step.get_ydata())[:2] == pytest.approx([1.05, 0.95])
    assert step.get_xdata()[1] == pytest.approx(math.log10(3e10))
    for ax in fig.axes:
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title(loc="left") in (
            "↓ lower is better", "↑ higher is better")
        ticks = [t.get_text() for t in ax.get_xticklabels()]
        assert ticks[0] == "0\n(model-free)" and len(ticks) == len(set(ticks)) <= 7
        _assert_no_overlap(fig, ax, n=4)  # random, length, instructdiff, ifd; full is a line, not a point
        bold = {a.get_text() for a in _annotations(ax) if a.get_fontweight() == "bold"}
        assert bold == {"random", "instructdiff"}
    pyplot().close(fig)


def _assert_no_overlap(fig, ax, n: int) -> None:
    fig.canvas.draw()  # an annotation's text is positioned at draw time
    renderer = fig.canvas.get_renderer()
    boxes = [Text.get_window_extent(a, renderer) for a in _annotations(ax)]  # the text, not its leader line
    assert len(boxes) == n
    panel = ax.get_window_extent(renderer)
    for a, b in combinations(boxes, 2):
        assert not a.overlaps(b), (a, b)
    for b in boxes:
        assert panel.x0 - 1 <= b.x0 and b.x1 <= panel.x1 + 1 and panel.y0 - 1 <= b.y0 and b.y1 <= panel.y1 + 1


def test_labels_of_points_at_one_cost_and_one_height_do_not_overlap():
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    xy = [(0.0, 1.0 + k * 1e-4) for k in range(6)] + [(10.0, 1.0), (10.2, 1.0002), (5.0, 2.0)]
    ax.plot(*zip(*xy, strict=True), "o")
    ax.set_xlim(-1, 12)
    fig.tight_layout()
    place_labels(fig, ax, xy, [f"selector number {k}" for k in range(len(xy))], [False] * len(xy))
    _assert_no_overlap(fig, ax, n=len(xy))
    plt.close(fig)


def test_spread_keeps_free_labels_in_place_and_separates_crowded_ones():
    assert _spread([30.0, 10.0, 50.0], 5.0, 0.0, 100.0) == [10.0, 30.0, 50.0]
    ys = _spread([20.0, 20.0, 20.0], 5.0, 0.0, 100.0)
    assert ys == pytest.approx([15.0, 20.0, 25.0])  # centred on where they want to be
    ys = _spread([1.0, 1.0, 1.0], 5.0, 2.0, 100.0)
    assert ys[0] == pytest.approx(2.0) and all(b - a >= 5.0 - 1e-9 for a, b in zip(ys, ys[1:], strict=False))


def test_flops_axis_ticks_never_crowd():
    axis = FlopsAxis([0.0, 3e9, 2e20])
    fig, ax = pyplot().subplots()
    axis.apply(ax)
    ticks = list(ax.get_xticks())
    assert len(ticks) <= 7 and ticks[0] == axis.zero and all(b - a >= 1.0 for a, b in zip(ticks, ticks[1:],
                                                                                           strict=False))
    assert axis.x(0.0) < axis.x(3e9) < axis.x(2e20) and axis.x(1e12) == pytest.approx(12.0)
    pyplot().close(fig)


# -- metric plots and ΔH / ΔNLL -----------------------------------------------------------------------------------
def test_metric_against_fraction_shows_the_base_model_and_the_direction(tmp_path):
    rep = Report(_study(tmp_path, {"random": [1.0, 1.1], "instructdiff": [0.9, 1.0], "full": [0.5, 0.6]},
                        fractions=(0.1, 0.2)))
    fig = figure_against(rep, "math", "fraction")
    titles = {ax.get_ylabel(): ax.get_title(loc="left") for ax in fig.axes}
    assert titles == {BPB: "↓ lower is better", ACC: "↑ higher is better"}
    for ax in fig.axes:
        base = [ln for ln in ax.get_lines() if ln.get_label() == BASE_LABEL]
        assert len(base) == 1 and set(base[0].get_ydata()) == {2.0 if ax.get_ylabel() == BPB else 0.1}
        assert "full (whole pool)" in {ln.get_label() for ln in ax.get_lines()}
        assert ax.get_xlabel().startswith("budget fraction")
    pyplot().close(fig)


@pytest.mark.parametrize("fractions,log", [((0.05, 0.1, 0.2, 0.5), True), ((0.1, 0.2), False)])
def test_values_spread_over_a_decade_get_a_log_axis_ticked_at_the_swept_values(tmp_path, fractions, log):
    rep = Report(_study(tmp_path, {"random": [1.0, 1.1], "instructdiff": [0.9, 1.0]}, fractions=fractions))
    fig = figure_against(rep, "math", "fraction")
    for ax in fig.axes:
        assert ax.get_xscale() == ("log" if log else "linear")
        if log:
            assert [t.get_text() for t in ax.get_xticklabels()] == [f"{f:g}" for f in fractions]
    pyplot().close(fig)


def test_delta_histograms_are_per_seed_never_pooled(tmp_path):
    rep = Report(_study(tmp_path, {"random": [1.0, 1.1], "instructdiff": [0.9, 1.0]}, deltas=True))
    runs = delta_runs(rep, "math")
    assert sorted(k[3] for k in runs) == [0, 1]
    for (_, _, _, seed), signals in runs.items():
        allv, sel = signals["delta_entropy"]
        assert allv == pytest.approx([0.1 * k + seed for k in range(4)]) and len(sel) == 2  # one pool, not two
    fig = figure_deltas(rep, "math")
    assert len(fig.axes) == 4
    assert {ax.get_title() for ax in fig.axes} == {"instructdiff @0.1, seed 0", "instructdiff @0.1, seed 1"}
    assert all(ax.get_xlabel().startswith(("ΔH", "ΔNLL")) and ax.get_ylabel() == "rows" for ax in fig.axes)
    pyplot().close(fig)


# -- counts and gains in report.md -------------------------------------------------------------------------------
def test_seeds_are_counted_per_selector_and_jobs_shown_where_they_differ(tmp_path):
    sweep = _study(tmp_path / "a", {"random": [1.0, 1.1], "full": [0.5, 0.6]}, full_fractions=(0.1, 0.2))
    build_report(sweep)
    md = (sweep / "report.md").read_text()
    assert "| selector | fraction | seeds | jobs |" in md
    assert "| full | 1 | 2 | 4 |" in md and "| random | 0.1 | 2 | 2 |" in md  # 4 jobs, but 2 seeds
    sweep = _study(tmp_path / "b", {"random": [1.0, 1.1, 1.2, 1.3], "full": [0.5, 0.6, 0.55, 0.65]})
    build_report(sweep)
    md = (sweep / "report.md").read_text()
    assert "| full | 1 | 4 |" in md and "| jobs |" not in md


def test_gains_carry_their_own_interval_or_none(tmp_path):
    assert fmt_gain_ci(-0.003, (-0.16, 0.15)) == "-0.003% (-0.16…+0.15%)"
    assert fmt_gain_ci(2.2, (1.3, 3.04)) == "+2.2% (+1.3…+3.0%)" and fmt_gain_ci(0.5, None) == "+0.5%"
    p = paired_diff({0: 0.95, 1: 1.04, 2: 0.86}, {0: 1.0, 1: 1.1, 2: 0.9}, BPB)
    assert p.ref_mean == pytest.approx(1.0) and p.gain == pytest.approx(5.0)  # 0.05 less bits/byte: 5% better
    lo, hi = p.gain_interval
    assert (lo, hi) == pytest.approx((-p.high * 100, -p.low * 100))  # lower is better: the ends swap
    sweep = _study(tmp_path, {"random": [1.0, 1.1, 0.9], "instructdiff": [0.95, 1.04, 0.86],
                              "ifd": [1.0004]})
    build_report(sweep)
    md = (sweep / "report.md").read_text()
    paired = md[md.index("## Paired comparison"):md.index("## Missing runs")]
    assert f"| better | +5.0% ({lo:+.1f}…{hi:+.1f}%) |" in paired
    assert "| ifd | 0.1 | t_bpb/bits_per_byte ↓ | random | 1 | +0.0004 | — | n/a | — |" in paired
    assert "±0.0%" not in md
