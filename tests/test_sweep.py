"""Sweeps: presets and launchers compose, W&B identity of a job, the report's statistics, and a real tiny
multirun that is reported, rerun without recomputing anything, and reported again with runs missing."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf, open_dict

from instructdiff import CONF_DIR, PROJECT_ROOT
from instructdiff.report import (
    Report,
    build_report,
    jaccard,
    lower_is_better,
    main,
    mean_ci,
    relative_gain,
    t_quantile,
)
from instructdiff.selection import Selector
from instructdiff.sweep import (
    DEFAULT_SUBDIR,
    find_jobs,
    job_dir_name,
    override_tags,
    stage_metrics,
    sweep_group,
    sweep_summary_lines,
    swept_keys,
    tracker_identity,
)

PRESETS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
# preset -> jobs its sweep runs (None: a single run)
SWEEP_SIZES = {"smoke": None, "smoke_sweep": 16, "paper_table": 45, "warmup_ratio": 15, "data_fraction": 24,
               "iterations": 9, "weak_to_strong": 24}
LAUNCHERS = ["basic", "joblib", "submitit_local", "submitit_slurm", *sorted(
    p.stem for p in (CONF_DIR / "hydra" / "launcher").glob("*.yaml"))]


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


def _sweep_jobs(cfg) -> list[list[str]]:
    """The override lists Hydra's basic sweeper makes of a composed config's hydra.sweeper.params."""
    params = cfg.hydra.sweeper.params or {}
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    return BasicSweeper.split_arguments(parsed, None)[0]


# -- presets and launchers ----------------------------------------------------------------------------------
def test_every_preset_is_listed_here():
    assert set(PRESETS) == set(SWEEP_SIZES), "add the new preset's sweep size to SWEEP_SIZES"


@pytest.mark.parametrize("preset", PRESETS)
def test_every_job_of_every_preset_composes_and_builds_its_selector(preset):
    cfg = _compose([f"experiment={preset}"])
    plain = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    OmegaConf.resolve(plain)  # every interpolation outside hydra (which needs a running job) resolves
    first = (CONF_DIR / "experiment" / f"{preset}.yaml").read_text().splitlines()
    assert first[0] == "# @package _global_"
    assert first[1].startswith(f"# instructdiff -m experiment={preset}") or preset == "smoke"
    jobs = _sweep_jobs(cfg)
    if SWEEP_SIZES[preset] is None:
        assert jobs == [[]]
        return
    assert len(jobs) == SWEEP_SIZES[preset]
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    # what Hydra composes per job (seeds aside: they change no key); a selector lacking a swept key fails here
    distinct = {tuple(o for o in job if not o.startswith("seed=")) for job in jobs}
    for job in sorted(distinct):
        job_cfg = _compose([f"experiment={preset}", *job])
        selector = instantiate(job_cfg.selector, _convert_="all")
        assert isinstance(selector, Selector), job


def test_presets_sweep_what_the_issue_asks():
    def params(preset):
        return dict(_compose([f"experiment={preset}"]).hydra.sweeper.params)

    table = params("paper_table")
    assert {s.strip() for s in table["selector"].split(",")} == {
        "instructdiff", "random", "full", "ifd", "superfiltering", "zip", "ppl", "entropy", "length",
        "complexity", "mads", "gradfiltering", "selectit", "rds", "less"}
    assert table["seed"] == "0,1,2" and float(table["selector.budget.fraction"]) == 0.1
    assert params("warmup_ratio")["selector.warmup_ratio"] == "0.01,0.05,0.1,0.2,0.5"
    frac = params("data_fraction")
    assert frac["selector.budget.fraction"] == "0.05,0.1,0.2,0.5"
    assert frac["selector"] == "instructdiff,random"
    assert params("iterations")["selector.rounds"] == "1,2,3"
    w2s = _compose(["experiment=weak_to_strong"])
    assert w2s.model.name == "qwen2_5_0_5b" and "smollm2_135m" in w2s.hydra.sweeper.params["selector.model"]
    assert "network" in (CONF_DIR / "experiment" / "weak_to_strong.yaml").read_text().lower()
    assert _compose(["experiment=smoke_sweep"]).model.name == "tiny"


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_every_launcher_composes(launcher):
    cfg = _compose([f"hydra/launcher={launcher}", "experiment=smoke_sweep"])
    target = cfg.hydra.launcher._target_
    get_class(target)  # the plugin is installed and its launcher class imports
    if launcher == "id_joblib":
        assert target.endswith("JoblibLauncher") and cfg.hydra.launcher.n_jobs >= 1
    if launcher == "id_submitit_local":
        assert target.endswith("submitit_launcher.LocalLauncher")
    if launcher == "id_submitit_slurm":
        assert target.endswith("SlurmLauncher")
        text = (CONF_DIR / "hydra" / "launcher" / "id_submitit_slurm.yaml").read_text()
        for key in ("partition", "gpus_per_node", "timeout_min", "mem_gb", "cpus_per_task"):
            assert f"\n{key}:" in text, f"{key} should be set (and documented) in the YAML"
        assert cfg.hydra.launcher.timeout_min > 0 and cfg.hydra.launcher.gpus_per_node == 1
    if launcher.startswith("id_"):
        # submitit writes its pickles inside the sweep, which is unique per start (microseconds)
        launcher_cfg = str(OmegaConf.to_container(cfg.hydra.launcher))
        assert "${hydra.sweep.dir}" in launcher_cfg or launcher == "id_joblib"


def test_sweep_dirs_are_unique_per_start_and_the_sweep_summary_callback_is_registered():
    cfg = _compose([])
    assert "%f" in OmegaConf.to_container(cfg.hydra.sweep)["dir"]  # microseconds
    assert cfg.hydra.callbacks.sweep_summary._target_ == "instructdiff.sweep.SweepSummary"
    get_class(cfg.hydra.callbacks.sweep_summary._target_)


# -- W&B identity -------------------------------------------------------------------------------------------
@pytest.fixture
def multirun_job_hydra(tmp_path):
    """HydraConfig as inside job 3 of a multirun."""
    sweep = tmp_path / "multirun" / "2026-01-02" / "10-11-12-123456"
    cfg = _compose(["model=tiny", "seed=1", "selector=random", f"paths.output_root={tmp_path}"])
    with open_dict(cfg):
        cfg.hydra.mode = "MULTIRUN"
        cfg.hydra.sweep.dir = str(sweep)
        cfg.hydra.runtime.output_dir = str(sweep / "3_model=tiny,seed=1,selector=random")
        cfg.hydra.overrides.task = ["model=tiny", "seed=1", "selector=random",
                                    f"paths.output_root={tmp_path}", "eval.tasks=[a,b]"]
    HydraConfig.instance().set_config(cfg)
    try:
        yield cfg, sweep
    finally:
        HydraConfig.instance().cfg = None


def test_tracker_identity_groups_a_multirun_job_by_its_sweep(multirun_job_hydra):
    cfg, sweep = multirun_job_hydra
    run_dir = Path(cfg.hydra.runtime.output_dir)
    ident = tracker_identity(cfg, run_dir)
    assert ident["group"] == "2026-01-02_10-11-12-123456"
    assert ident["name"] == run_dir.name
    assert ident["tags"] == ["domain=math", "model=tiny", "seed=1", "selector=random", "eval.tasks=[a,b]"]


def test_tracker_identity_tags_the_default_selector_by_its_yaml_name(tmp_path):
    cfg = _compose(["model=tiny"])  # no selector override: the default, instructdiff
    HydraConfig.instance().set_config(cfg)
    try:
        assert "selector=instructdiff" in tracker_identity(cfg, tmp_path / "run")["tags"]
    finally:
        HydraConfig.instance().cfg = None


def test_tracker_identity_outside_a_sweep_keeps_the_domain_group(tmp_path):
    cfg = _compose(["model=tiny"])
    assert tracker_identity(cfg, tmp_path / "run") == {
        "name": "run", "group": "math", "tags": ["domain=math", "model=tiny"]}


def test_override_tags_and_group_names():
    assert override_tags(["a=1", "paths.cache_dir=/x", "+b=2", "c=" + "x" * 100], ["paths.cache_dir"]) == [
        "a=1", "+b=2", "c=" + "x" * 62]
    assert sweep_group(Path("/o/multirun/2026-01-02/10-11-12-123456")) == "2026-01-02_10-11-12-123456"
    assert sweep_group(Path("/o/my_sweep")) == "my_sweep"


def test_stage_metrics_flattens_a_results_dict():
    results = {"seconds": {"score": 1.5, "train": 2.0},
               "selection": {"counts": {"selected": 3}, "n_pool": 30},
               "trainings": [{"purpose": "final", "train_loss": 1.25, "steps": 4, "method": "full"}],
               "cache": {"hits": 2, "misses": 1, "score_store": {"passes": [{"tokens": 10}, {"tokens": 5}]}},
               "cost": {"selection_flops_uncached": 3e9, "selection_flops": 0.0, "train_flops": None}}
    assert stage_metrics(results) == {
        "time/score": 1.5, "time/train": 2.0, "select/selected": 3, "select/n_pool": 30,
        "train/final/train_loss": 1.25, "train/final/steps": 4, "cache/hits": 2, "cache/misses": 1,
        "score/passes": 2, "score/tokens": 15, "cost/selection_flops_uncached": 3e9, "cost/selection_flops": 0.0}


def test_sweep_summary_prints_one_wandb_sync_line(tmp_path):
    for i in range(2):
        (tmp_path / f"{i}_seed={i}" / ".hydra").mkdir(parents=True)
        (tmp_path / f"{i}_seed={i}" / "wandb" / f"offline-run-2026_{i}").mkdir(parents=True)
    (tmp_path / "0_seed=0" / "results.json").write_text("{}")
    lines = sweep_summary_lines(tmp_path)
    assert "2 jobs, 1 with results.json, 1 missing/failed" in lines[0]
    assert lines[1] == f"report: instructdiff-report {tmp_path}"
    assert lines[2].endswith(f"wandb sync {tmp_path}/*/wandb/offline-run-*")


def test_sweep_summary_finds_jobs_nested_by_the_old_layout_and_lists_their_wandb_runs(tmp_path):
    """Before short job names, domain.pool_path=/data/my.jsonl nested a job three folders deep ("0 jobs")."""
    nested = tmp_path / "0_domain.pool_path=" / "data" / "my.jsonl,selector=random"
    flat = tmp_path / "1_length_0a1b2c"
    for job in (nested, flat):
        (job / ".hydra").mkdir(parents=True)
        (job / "results.json").write_text("{}")
        (job / "wandb" / "offline-run-1").mkdir(parents=True)
    (tmp_path / ".submitit" / "123" / ".hydra").mkdir(parents=True)  # submitit's own files are no job
    assert find_jobs(tmp_path) == [nested, flat]
    lines = sweep_summary_lines(tmp_path)
    assert "(2 jobs, 2 with results.json, 0 missing/failed)" in lines[0]
    assert lines[2] == (f"W&B: 2 offline runs; upload them all with: wandb sync "
                        f"{nested}/wandb/offline-run-1 {flat}/wandb/offline-run-1")


def test_job_folder_names_are_short_and_safe_whatever_the_overrides_hold():
    secret = "hunter2-SECRET"
    overrides = ["selector=random", "domain.pool_path=/data/users/me/my pool.jsonl", f"+wandb.api_key={secret}",
                 "pipeline.stages=[calibrate,score,select]", "selector.budget.fraction=0.05", "seed=1",
                 "eval.tasks=[" + ",".join(f"task_{k}" for k in range(200)) + "]"]
    keys = ["selector", "domain.pool_path", "wandb.api_key", "pipeline.stages", "selector.budget.fraction", "seed",
            "eval.tasks"]
    name = job_dir_name(overrides, keys)
    assert re.fullmatch(r"[A-Za-z0-9._+=-]+", name) and len(name) <= 110
    assert name.startswith("random_pool_path=my-pool.jsonl_stages=calibrate-score-select_fraction=0.05_seed=1_")
    assert secret not in name and "api_key" not in name
    # the hash keeps apart jobs that differ outside the label, and does not depend on the secret's value
    assert job_dir_name(overrides, ["selector"]) != job_dir_name([*overrides[:-1], "eval.tasks=[a]"], ["selector"])
    assert job_dir_name(overrides, keys) == job_dir_name([o.replace(secret, "other") for o in overrides], keys)
    assert re.fullmatch(r"[0-9a-f]{6}", job_dir_name(["+hf_token=x"], ["hf_token"]))


def test_the_sweep_layout_is_the_default_and_labels_what_the_sweep_varies():
    cfg = _compose([])
    assert OmegaConf.to_container(cfg.hydra.sweep)["subdir"] == DEFAULT_SUBDIR
    assert swept_keys(["model=tiny", "seed=0,1", "domain.pool_path=/a.jsonl", "selector=random,length"],
                      {"selector.budget.fraction": "0.1,0.2", "trainer.epochs": "2"}) == [
        "selector", "selector.budget.fraction", "seed"]
    # the label of a preset's jobs
    table = _compose(["experiment=data_fraction"])
    assert swept_keys([], OmegaConf.to_container(table.hydra.sweeper.params)) == [
        "selector", "selector.budget.fraction", "seed"]


# -- statistics ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("df,expected", [(1, 12.706205), (2, 4.302653), (3, 3.182446), (4, 2.776445),
                                         (9, 2.262157), (29, 2.045230), (100, 1.983972)])
def test_t_quantile_matches_the_table(df, expected):
    assert t_quantile(df) == pytest.approx(expected, abs=1e-6)


def test_confidence_interval_hand_computed():
    mean, half, n = mean_ci([1.0, 2.0, 3.0])
    assert (mean, n) == (2.0, 3)
    assert half == pytest.approx(4.302653 * 1.0 / 3 ** 0.5, abs=1e-5)  # s = 1 (ddof=1)
    assert half == pytest.approx(2.4841, abs=1e-4)
    assert mean_ci([0.5]) == (0.5, None, 1)
    assert mean_ci([2.0, 2.0]) == (2.0, 0.0, 2)
    mean, half, _ = mean_ci([0.30, 0.34, 0.35, 0.31])  # s = 0.023805
    assert mean == pytest.approx(0.325) and half == pytest.approx(3.182446 * 0.0238048 / 2, abs=1e-6)


def test_relative_gain_is_positive_when_better_and_jaccard():
    assert relative_gain(0.55, 0.5, "id_gsm8k/exact_match") == pytest.approx(10.0)
    assert relative_gain(0.9, 1.0, "id_gsm8k_bpb/bits_per_byte") == pytest.approx(10.0)  # lower is better
    assert not lower_is_better("id_gsm8k_bpb/loglikelihood") and lower_is_better("x/word_perplexity")
    assert relative_gain(1.0, None, "a/acc") is None and relative_gain(1.0, 0.0, "a/acc") is None
    assert jaccard({1, 2, 3}, {2, 3, 4}) == 0.5


def _fake_job(sweep: Path, num: int, selector: str, seed: int, acc: float | None, extra: dict | None = None,
              fraction: float = 0.1, selected: tuple = ("a",)) -> Path:
    """A job directory as Hydra and the pipeline leave it (acc None: the job crashed before results.json)."""
    extra = extra or {}
    overrides = [f"selector={selector}", f"seed={seed}", *(f"selector.{k}={v}" for k, v in extra.items())]
    job = sweep / f"{num}_{','.join(overrides)}"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (job / ".hydra" / "hydra.yaml").write_text(
        f"hydra:\n  job:\n    num: {num}\n  runtime:\n    choices:\n      selector: {selector}\n")
    config = {"domain": {"name": "math"}, "model": {"name": "tiny"}, "seed": seed,
              "selector": {"budget": {"fraction": fraction, "count": None}, **extra}}
    (job / "manifest.json").write_text(json.dumps({"config": config}))
    if acc is not None:
        (job / "results.json").write_text(json.dumps({
            "domain": "math", "seconds": {"train": 2.0, "score": 1.0},
            "eval": {"base": {"metrics": {"t/acc": 0.3}},
                     "trained": {"metrics": {"t/acc": acc, "t/x": float("nan")}}},
            "trainings": [{"purpose": "final", "cached": False}],
            "cache": {"hits": 1, "misses": 2, "score_store": {"passes": [{"seconds": 1.0}]}}}))
        ids = ["a", "b", "c", "d"]
        scored = selector == "instructdiff"
        (job / "selection.jsonl").write_text("".join(json.dumps({
            "id": i, "status": "selected" if i in selected else "not_selected",
            "scores": {"delta_entropy": 0.1 * k, "delta_nll": 0.2 * k} if scored else {}}) + "\n"
            for k, i in enumerate(ids)))
    return job


def test_report_of_a_synthetic_sweep_labels_groups_and_gains(tmp_path):
    sweep = tmp_path / "sweep"
    num = 0
    accs = {("full", None): [0.5, 0.5, 0.5], ("random", None): [0.40, 0.42, 0.44],
            ("instructdiff", "0.1"): [0.45, 0.47, 0.49], ("instructdiff", "0.05"): [0.46, None, None]}
    for (sel, wr), values in accs.items():
        for seed, acc in enumerate(values):
            extra = {"warmup_ratio": wr} if wr else {}
            _fake_job(sweep, num, sel, seed, acc, extra, fraction=1.0 if sel == "full" else 0.1,
                      selected=("a", "b") if sel == "instructdiff" else ("b", "c"))
            num += 1
    rep = build_report(sweep)
    assert rep.varying == ["seed", "selector", "selector.warmup_ratio"]
    rows = {r["selector"]: r for r in _csv(sweep / "report.csv") if r["metric"] == "t/acc"}
    assert set(rows) == {"base (no SFT)", "full", "random", "instructdiff [warmup_ratio=0.1]",
                         "instructdiff [warmup_ratio=0.05]"}
    idf = rows["instructdiff [warmup_ratio=0.1]"]
    assert float(idf["mean"]) == pytest.approx(0.47) and idf["n_seeds"] == "3" and idf["seeds"] == "0 1 2"
    assert float(idf["ci95_half_width"]) == pytest.approx(4.302653 * 0.02 / 3 ** 0.5, abs=1e-6)
    assert float(idf["gain_vs_full_pct"]) == pytest.approx(-6.0)
    assert float(idf["gain_vs_random_pct"]) == pytest.approx((0.47 - 0.42) / 0.42 * 100)
    one = rows["instructdiff [warmup_ratio=0.05]"]
    assert one["n_seeds"] == "1" and one["ci95_half_width"] == ""
    assert rows["full"]["fraction"] == "1.0" and rows["full"]["gain_vs_full_pct"] == ""
    md = (sweep / "report.md").read_text()
    assert "0.46 (n=1)" in md and "| 0.47 ± 0.05 | -6.0% | +11.9% |" in md
    assert "2 missing/failed" in md and "t/x" not in md  # NaN metrics are left out, not averaged
    assert {"warmup_ratio_math.png", "delta_math.png", "overlap_math_0.1.png", "cost.png"} <= {
        p.name for p in sweep.glob("*.png")}
    overlap = {(r["a"], r["b"]): float(r["jaccard"]) for r in _csv(sweep / "overlap.csv")}
    assert overlap[("random", "instructdiff [warmup_ratio=0.1]")] == pytest.approx(1 / 3)  # {a,b} vs {b,c}
    cost = {r["selector"]: r for r in _csv(sweep / "cost.csv")}
    assert cost["random"]["runs"] == "3" and float(cost["random"]["mean_s_train"]) == 2.0
    assert cost["random"]["cache_misses"] == "6" and cost["random"]["score_passes"] == "3"


# -- a real multirun ----------------------------------------------------------------------------------------
SELECTORS, FRACTIONS, SEEDS = ("instructdiff", "random"), ("0.1", "0.2"), (0, 1)


def _multirun(tmp_path: Path, cache: Path) -> Path:
    """Run the 8-job sweep; returns its multirun directory."""
    out = tmp_path / "outputs"
    before = set(out.glob("multirun/*/*"))
    cmd = [sys.executable, "-m", "instructdiff", "-m", "model=tiny", "logger=none", "eval=quick",
           "eval.limit=3", "eval.tasks=[id_gsm8k_bpb]", f"selector={','.join(SELECTORS)}",
           f"selector.budget.fraction={','.join(FRACTIONS)}", f"seed={','.join(map(str, SEEDS))}",
           "domain.pool_size=32",
           # one optimiser step per row (the first is warmup at LR 0): calibration moves the model and
           # ΔH, ΔNLL are not all zero.
           "trainer.per_device_batch_size=1", "trainer.gradient_accumulation_steps=1",
           "trainer.learning_rate=3e-3",
           f"paths.output_root={out}", f"paths.cache_dir={cache}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (sweep,) = set(out.glob("multirun/*/*")) - before
    assert f"report: instructdiff-report {sweep}" in proc.stdout  # the SweepSummary callback ran
    return sweep


def _csv(path: Path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_multirun_is_reported_rerun_from_cache_and_reported_partially(tmp_path, tiny_model_cache, capsys):
    cache = tmp_path / "cache"
    shutil.copytree(tiny_model_cache / "models", cache / "models")
    t0 = time.time()
    sweep = _multirun(tmp_path, cache)
    first_s = time.time() - t0
    jobs = sorted(p for p in sweep.iterdir() if (p / ".hydra").is_dir())
    assert len(jobs) == 8 and all((j / "results.json").is_file() for j in jobs)

    # the report: every (selector, fraction) row with both seeds, every plot
    assert main([str(sweep)]) == 0
    assert "8 runs ok" in capsys.readouterr().out
    rows = _csv(sweep / "report.csv")
    bpb = [r for r in rows if r["metric"] == "id_gsm8k_bpb/bits_per_byte"]
    got = {(r["selector"], float(r["fraction"])) for r in bpb if r["fraction"]}
    assert got == {(s, float(f)) for s in SELECTORS for f in FRACTIONS}
    assert all(r["n_seeds"] == "2" and r["ci95_half_width"] != "" for r in bpb)
    assert all(r["gain_vs_random_pct"] != "" for r in bpb if r["selector"] == "instructdiff")
    md = (sweep / "report.md").read_text()
    for f in FRACTIONS:
        assert f"| instructdiff | {float(f):g} | 2 |" in md and f"| random | {float(f):g} | 2 |" in md
    plots = {"fraction_math.png", "delta_math.png", "overlap_math_0.1.png", "overlap_math_0.2.png",
             "cost.png"}
    assert plots <= {p.name for p in sweep.glob("*.png")}
    for p in plots:
        assert f"]({p})" in md and (sweep / p).stat().st_size > 1000
    overlap = _csv(sweep / "overlap.csv")
    assert {(r["a"], r["b"]) for r in overlap if r["fraction"] == "0.1"} >= {("random", "instructdiff")}
    cost = {r["selector"]: r for r in _csv(sweep / "cost.csv")}
    assert int(cost["instructdiff"]["score_passes"]) >= 2 and int(cost["instructdiff"]["cache_misses"]) > 0
    assert "None: every job of the sweep wrote results.json." in md

    # the same sweep again (a restarted sweep): a new directory, and every job finds every stage cached
    t0 = time.time()
    again = _multirun(tmp_path, cache)
    second_s = time.time() - t0
    assert again != sweep
    for job in sorted(p for p in again.iterdir() if (p / ".hydra").is_dir()):
        results = json.loads((job / "results.json").read_text())
        assert results["cache"]["misses"] == 0 and results["cache"]["hits"] > 0, job.name
        assert results["cache"]["score_store"]["passes"] == [] and "train" not in results["seconds"]
    # a selector's FLOPs count every pass from scratch, so the cached rerun reports the same cost; what it
    # computed itself is the "_this_run" part, zero here
    assert main([str(again)]) == 0
    cost_again = {r["selector"]: r for r in _csv(again / "cost.csv")}
    for sel in SELECTORS:
        for col in ("mean_selection_flops", "mean_train_flops", "mean_eval_flops", "mean_total_flops"):
            assert float(cost_again[sel][col]) == pytest.approx(float(cost[sel][col])), (sel, col)
        assert float(cost[sel]["mean_train_flops"]) > 0 and float(cost[sel]["mean_eval_flops"]) > 0
        assert float(cost_again[sel]["mean_train_flops_this_run"]) == 0
        assert float(cost_again[sel]["mean_total_flops_this_run"]) == 0
    print(f"multirun of 8 jobs: {first_s:.0f} s; again from the cache: {second_s:.0f} s")

    # a partial sweep: one job crashed (no results.json), one never started (no directory)
    partial = tmp_path / "partial"
    shutil.copytree(sweep, partial)
    for p in partial.glob("*.png"):
        p.unlink()
    crashed, never = sorted(p for p in partial.iterdir() if (p / ".hydra").is_dir())[2:4]
    (crashed / "results.json").unlink()
    shutil.rmtree(never)
    out = tmp_path / "partial_report"
    rep = build_report(partial, out)
    assert len(rep.ok) == 6
    assert {j.status for j in rep.jobs} == {"ok", "missing/failed", "not started"}
    md = (out / "report.md").read_text()
    assert "2 missing/failed" not in md and "1 missing/failed, 1 not started" in md
    assert crashed.name in md and "never started" in md
    status = {(r["selector"], r["fraction"], r["seed"]): r["status"] for r in _csv(out / "runs.csv")}
    assert sorted(status.values()).count("ok") == 6
    # jobs 2 and 3 are instructdiff at 0.2, seeds 0 and 1: that group has no seed left
    assert status[("instructdiff", "0.2", "0")] != "ok" and status[("instructdiff", "0.2", "1")] != "ok"
    rows = _csv(out / "report.csv")
    assert not [r for r in rows if r["selector"] == "instructdiff" and r["fraction"] == "0.2"]
    assert (out / "fraction_math.png").is_file() and (out / "cost.png").is_file()

    # the script wrapper is the same entry point
    proc = subprocess.run([sys.executable, str(PROJECT_ROOT / "scripts" / "report.py"), str(partial), "--out",
                           str(tmp_path / "via_script")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "via_script" / "report.md").is_file()


def test_report_of_a_directory_without_runs_fails_clearly(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
    assert "no job directories" in capsys.readouterr().err
    assert Report(tmp_path).jobs == []


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["id_submitit_local", "id_joblib"])
def test_parallel_and_cluster_launchers_run_a_real_sweep(tmp_path, tiny_model_cache, launcher):
    """submitit_local pickles each job as SLURM would; joblib runs two jobs at once on one shared cache."""
    cache = tmp_path / "cache"
    shutil.copytree(tiny_model_cache / "models", cache / "models")
    out = tmp_path / "outputs"
    cmd = [sys.executable, "-m", "instructdiff", "-m", f"hydra/launcher={launcher}", "model=tiny", "logger=none",
           "eval=quick", "eval.limit=3", "eval.tasks=[id_gsm8k_bpb]", "domain.pool_size=32",
           "selector=random,length", f"paths.output_root={out}", f"paths.cache_dir={cache}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (sweep,) = out.glob("multirun/*/*")
    assert "(2 jobs, 2 with results.json, 0 missing/failed)" in proc.stdout
    selectors = set()
    for job in (p for p in sweep.iterdir() if (p / ".hydra").is_dir()):
        results = json.loads((job / "results.json").read_text())
        selectors.add(results["selector"])
        assert results["eval"]["trained"]["metrics"]["id_gsm8k_bpb/bits_per_byte"] > 0
    assert selectors == {"random", "length"}  # results.json names a selector by its conf/selector YAML
    if launcher == "id_submitit_local":
        assert list((sweep / ".submitit").glob("*/*_submitted.pkl")), "jobs did not go through submitit"
    rep = build_report(sweep)
    assert len(rep.ok) == 2
