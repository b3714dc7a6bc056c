"""The report's paired comparison (same seed, same pool): per-seed differences to random and full, their t
interval, the verdict words, paired.csv, and the "What this study found" paragraph; on hand-built job dirs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from scipy import stats

from instructdiff.report import (
    build_report,
    lower_is_better,
    main,
    paired_diff,
    paired_verdict,
    primary_metric,
)
from instructdiff.report.fmt import fmt_gain as _fmt_gain

BPB, ACC = "t_bpb/bits_per_byte", "t/acc"


def _job(sweep: Path, num: int, selector: str, seed: int, metrics: dict | None, fraction: float = 0.1,
         fraction_override: bool = False, extra_overrides: tuple[str, ...] = (), config_extra: dict | None = None
         ) -> Path:
    """A job directory as Hydra and the pipeline leave it (what report.load_job reads); metrics None: the
    job crashed before writing results.json."""
    overrides = [f"selector={selector}", f"seed={seed}", *extra_overrides]
    if fraction_override:
        overrides.append(f"selector.budget.fraction={fraction}")
    job = sweep / f"{num}_{','.join(overrides)}"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (job / ".hydra" / "hydra.yaml").write_text(
        f"hydra:\n  job:\n    num: {num}\n  runtime:\n    choices:\n      selector: {selector}\n")
    config = {"domain": {"name": "math", "pool_seed": 0, "eval_tasks": ["t", "t_bpb"]},
              "eval": {"tasks": ["t", "t_bpb"]}, "model": {"name": "tiny"}, "seed": seed,
              "selector": {"budget": {"fraction": fraction, "count": None}}, **(config_extra or {})}
    (job / "manifest.json").write_text(json.dumps({"config": config}))
    if metrics is not None:
        (job / "results.json").write_text(json.dumps({
            "domain": "math", "seconds": {"train": 1.0},
            "eval": {"base": {"metrics": {BPB: 2.0, ACC: 0.1}}, "trained": {"metrics": metrics}},
            "trainings": [{"purpose": "final", "cached": False}], "cache": {"hits": 0, "misses": 1}}))
    return job


# hand-chosen: instructdiff beats random on bits/byte by 0.05 ± 0.01 per seed, length loses by 0.06 ± 0.01,
# acc differences of instructdiff to random straddle 0; ppl finished one seed only
VALUES = {
    "random": {BPB: [1.00, 1.10, 0.90], ACC: [0.40, 0.50, 0.45]},
    "instructdiff": {BPB: [0.95, 1.04, 0.86], ACC: [0.45, 0.44, 0.47]},
    "length": {BPB: [1.06, 1.15, 0.97], ACC: [0.30, 0.41, 0.33]},
    "full": {BPB: [0.80, 0.90, 0.70], ACC: [0.50, 0.50, 0.50]},
    "ppl": {BPB: [1.0004, None, None], ACC: [0.42, None, None]},
}


def _study(root: Path, values: dict = VALUES) -> Path:
    sweep = root / "sweep"
    num = 0
    for sel, by_metric in values.items():
        for seed in range(3):
            m = {k: v[seed] for k, v in by_metric.items()}
            metrics = None if any(v is None for v in m.values()) else m
            if sel == "full":  # full at two budget fractions: the same run per seed, twice
                for frac in (0.1, 0.2):
                    _job(sweep, num, sel, seed, metrics, fraction=frac, fraction_override=True)
                    num += 1
            else:
                _job(sweep, num, sel, seed, metrics)
                num += 1
    return sweep


def _csv(path: Path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def _hand_ci(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    d = [x - y for x, y in zip(xs, ys, strict=True)]
    n = len(d)
    mean = sum(d) / n
    s = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    half = stats.t.ppf(0.975, n - 1) * s / math.sqrt(n)
    return mean, mean - half, mean + half


@pytest.fixture
def report(tmp_path):
    sweep = _study(tmp_path)
    rep = build_report(sweep)
    rows = {(r["selector"], r["metric"], r["reference"]): r for r in _csv(sweep / "paired.csv")}
    return sweep, rep, rows, (sweep / "report.md").read_text()


def test_paired_means_and_intervals_match_a_hand_computation(report):
    _, _, rows, _ = report
    for sel in ("instructdiff", "length"):
        for ref in ("random", "full"):
            for metric in (BPB, ACC):
                r = rows[(sel, metric, ref)]
                mean, lo, hi = _hand_ci(VALUES[sel][metric], VALUES[ref][metric])
                assert r["n_pairs"] == "3" and r["seeds"] == "0 1 2", (sel, metric, ref)
                assert float(r["mean_diff"]) == pytest.approx(mean, abs=1e-12)
                assert float(r["ci_low"]) == pytest.approx(lo, abs=1e-9)
                assert float(r["ci_high"]) == pytest.approx(hi, abs=1e-9)
    # the numbers themselves, so a sign flip (reference − selector) cannot pass
    r = rows[("instructdiff", BPB, "random")]
    assert float(r["mean_diff"]) == pytest.approx(-0.05)
    assert float(r["ci_high"]) - float(r["mean_diff"]) == pytest.approx(4.302653 * 0.01 / math.sqrt(3), abs=1e-6)


def test_verdicts_follow_the_metric_direction(report):
    _, _, rows, _ = report
    verdict = {k: r["verdict"] for k, r in rows.items()}
    assert verdict[("instructdiff", BPB, "random")] == "better"        # lower bits/byte: negative diff
    assert verdict[("length", BPB, "random")] == "worse"               # lower-is-better, positive diff
    assert verdict[("instructdiff", ACC, "random")] == "indistinguishable"  # CI straddles 0
    assert verdict[("length", ACC, "random")] == "worse"               # higher-is-better, negative diff
    assert verdict[("instructdiff", BPB, "full")] == "worse"
    assert verdict[("random", BPB, "full")] == "worse"
    assert rows[("instructdiff", BPB, "random")]["lower_is_better"] == "True"
    assert rows[("instructdiff", ACC, "random")]["lower_is_better"] == "False"
    # nothing is compared with itself, and random/full are not compared with each other's budget
    assert not [k for k in rows if k[0] == k[2] or (k[0] == "full" and k[2] == "random")]


def test_a_single_seed_gets_no_interval_and_no_verdict(report):
    _, _, rows, md = report
    for ref in ("random", "full"):
        r = rows[("ppl", BPB, ref)]
        assert r["n_pairs"] == "1" and r["verdict"] == "n/a"
        assert r["ci_low"] == "" and r["ci_high"] == ""
    assert float(rows[("ppl", BPB, "random")]["mean_diff"]) == pytest.approx(0.0004)
    assert "| ppl | 0.1 | t_bpb/bits_per_byte ↓ | random | 1 | +0.0004 | — | n/a |" in md


def test_full_at_several_fractions_counts_its_distinct_seeds(report):
    sweep, rep, rows, md = report
    assert sum(j.selector == "full" for j in rep.ok) == 6
    assert rows[("instructdiff", BPB, "full")]["n_pairs"] == "3"   # 3 seeds, not 6 jobs
    assert "| full | 1 | 3 |" in md
    cost = {r["selector"]: r for r in _csv(sweep / "cost.csv")}
    assert (cost["full"]["runs"], cost["full"]["seeds"], cost["full"]["jobs"]) == ("3", "3", "6")
    assert cost["random"]["runs"] == "3" and cost["random"]["jobs"] == "3"


def test_the_title_names_the_runs_relative_to_the_working_directory(tmp_path, monkeypatch):
    from instructdiff.report.markdown import _shown_path

    monkeypatch.chdir(tmp_path)
    assert _shown_path((tmp_path / "results" / "study" / "runs").resolve()) == "results/study/runs"
    outside = (tmp_path.parent / "elsewhere").resolve()
    assert _shown_path(outside) == str(outside)


def test_markdown_section_and_summary_name_the_right_selectors(report):
    _, _, _, md = report
    lines = md.splitlines()
    assert lines[0].startswith("# Sweep report") and lines[2] == "## What this study found"
    summary = lines[4]
    assert f"Primary metric `{BPB}` (lower is better)" in summary
    assert ("Against `random`: 1 better (instructdiff), 0 indistinguishable, 1 worse (length), "
            "1 n/a, fewer than 2 paired seeds (ppl).") in summary
    assert ("Against `full`: 0 better, 0 indistinguishable, 3 worse (random, instructdiff, length), "
            "1 n/a") in summary
    assert "Best mean bits_per_byte: `full` (0.8, n=3 seeds)" in summary
    mean, lo, hi = _hand_ci(VALUES["instructdiff"][BPB], VALUES["random"][BPB])
    assert (f"InstructDiff beat random selection here: mean difference {mean:+.3g} "
            f"(95% CI {lo:+.3g}…{hi:+.3g}), n=3 seeds.") in summary
    assert "did not beat" not in summary
    assert "## Paired comparison (same seed, same pool)" in md and "mean diff = selector − reference" in md
    assert md.index("## Results") < md.index("## Paired comparison") < md.index("## Missing runs")


def test_summary_says_when_instructdiff_does_not_beat_random(tmp_path):
    values = {k: dict(v) for k, v in VALUES.items() if k != "ppl"}
    values["instructdiff"] = {BPB: [1.01, 1.08, 0.92], ACC: [0.4, 0.5, 0.45]}  # diffs +0.01, -0.02, +0.02
    sweep = _study(tmp_path, values)
    build_report(sweep)
    summary = (sweep / "report.md").read_text().splitlines()[4]
    mean, lo, hi = _hand_ci(values["instructdiff"][BPB], values["random"][BPB])
    assert lo < 0 < hi
    assert (f"InstructDiff did not beat random selection here: mean difference {mean:+.3g} "
            f"(95% CI {lo:+.3g}…{hi:+.3g}), n=3 seeds; the interval includes 0.") in summary
    assert "Against `random`: 0 better, 1 indistinguishable (instructdiff), 1 worse (length)." in summary


def test_primary_metric_is_the_first_bits_per_byte_metric():
    metrics = ["a/acc", "z_bpb/bits_per_byte", "b_bpb/bits_per_byte", "z_bpb/loglikelihood"]
    assert primary_metric(metrics, ["a", "z_bpb", "b_bpb"]) == "z_bpb/bits_per_byte"
    assert primary_metric(metrics) == "b_bpb/bits_per_byte"
    assert primary_metric(["b/acc", "a/exact_match"], ["b", "a"]) == "b/acc"
    assert primary_metric([]) is None


@pytest.mark.parametrize("metric,lower", [
    ("id_gsm8k_bpb/bits_per_byte", True), ("t/nll", True), ("t/word_perplexity", True),
    ("t/byte_perplexity", True), ("id_gsm8k/exact_match", False), ("id_gsm8k/exact_match/strict-match", False),
    ("t/acc", False), ("id_gsm8k_bpb/loglikelihood", False), ("id_gsm8k_bpb/acc", False)])
def test_metric_direction(metric, lower):
    assert lower_is_better(metric) is lower


def test_verdict_needs_the_interval_to_exclude_zero():
    assert paired_verdict(-0.2, -0.01, "t/bits_per_byte") == "better"
    assert paired_verdict(0.01, 0.2, "t/bits_per_byte") == "worse"
    assert paired_verdict(0.01, 0.2, "t/acc") == "better"
    assert paired_verdict(-0.2, 0.0, "t/acc") == "indistinguishable"  # touching 0 is not excluding it
    assert paired_verdict(None, None, "t/acc") == "n/a"
    p = paired_diff({0: 1.0, 1: 2.0, 2: 3.0}, {1: 1.5, 2: 2.0, 3: 9.0}, "t/acc")  # seeds 1, 2 pair up
    assert (p.seeds, p.diffs, p.n) == ([1, 2], [0.5, 1.0], 2)
    assert p.high - p.mean == pytest.approx(stats.t.ppf(0.975, 1) * math.sqrt(0.125) / math.sqrt(2))
    assert paired_diff({0: 1.0}, {1: 1.0}, "t/acc").verdict == "n/a"


def test_gains_are_signed_never_plus_minus(report):
    assert _fmt_gain(0.01) == "+0.01%" and _fmt_gain(-0.003) == "-0.003%" and _fmt_gain(0.0) == "+0.0%"
    assert _fmt_gain(11.9) == "+11.9%" and _fmt_gain(-0.3) == "-0.3%" and _fmt_gain(None) == "—"
    _, _, _, md = report
    results = md[md.index("## Results"):md.index("## Paired comparison")]
    assert "±0.0%" not in md and "-0.04%" in results  # ppl vs random: (1.0004 − 1.0) / 1.0, lower is better


def test_cli_writes_paired_csv(tmp_path, capsys):
    sweep = _study(tmp_path)
    assert main([str(sweep), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "paired.csv").is_file()
    header = next(csv.reader(open(tmp_path / "out" / "paired.csv")))
    assert {"selector", "metric", "reference", "n_pairs", "mean_diff", "ci_low", "ci_high", "verdict"} <= set(header)


def test_jobs_of_two_presets_with_the_same_config_pair_and_others_stay_apart(tmp_path):
    """warmup_ratio's instructdiff jobs and the `experiment=paper_table selector=random` jobs beside them (as
    conf/experiment/warmup_ratio.yaml says to run them) resolve to the same config: one setting, paired by seed.
    A preset that changes the config (here the scoring model) keeps its own setting and has no random to pair."""
    root = tmp_path / "study"
    num = 0
    for seed, (ours, theirs, other) in enumerate([(0.95, 1.00, 0.90), (1.04, 1.10, 0.99), (0.86, 0.90, 0.80)]):
        _job(root / "warmup", num, "instructdiff", seed, {BPB: ours, ACC: 0.4},
             extra_overrides=("experiment=warmup_ratio", "selector.warmup_ratio=0.05"))
        _job(root / "random", num, "random", seed, {BPB: theirs, ACC: 0.4}, extra_overrides=("experiment=paper_table",))
        _job(root / "w2s", num, "ifd", seed, {BPB: other, ACC: 0.4}, extra_overrides=("experiment=weak_to_strong",),
             config_extra={"score": {"model": "bigger"}})
        num += 1
    rep = build_report(root)
    settings = {j.selector: j.setting for j in rep.ok}
    assert settings["instructdiff"] == settings["random"] == "experiment=paper_table+warmup_ratio"
    assert settings["ifd"] == "experiment=weak_to_strong"
    pairs = {(g.selector, ref): p for g, ref, p in rep.paired() if p.metric == BPB}
    ours = pairs[("instructdiff", "random")]
    assert ours.n == 3
    assert ours.mean == pytest.approx(((0.95 - 1.00) + (1.04 - 1.10) + (0.86 - 0.90)) / 3)
    assert not any(sel == "ifd" and ref == "random" and p.n for (sel, ref), p in pairs.items())


def test_presets_that_tell_no_jobs_apart_leave_the_setting(tmp_path):
    root = tmp_path / "study"
    for seed in range(2):
        _job(root / "a", seed, "instructdiff", seed, {BPB: 1.0 + seed, ACC: 0.4},
             extra_overrides=("experiment=warmup_ratio",))
        _job(root / "b", seed, "random", seed, {BPB: 1.1 + seed, ACC: 0.4}, extra_overrides=("experiment=paper_table",))
    _job(root / "a", 2, "instructdiff", 2, None, extra_overrides=("experiment=warmup_ratio",))  # still running
    rep = build_report(root)
    assert {j.setting for j in rep.jobs} == {""}
