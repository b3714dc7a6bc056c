"""The report's reading of run directories (instructdiff/report/load.py): a folder of single runs, the jobs a
sweep defined but never started (found from multirun.yaml and each job's overrides, never from folder names),
the selector's name from overrides, Hydra choices, results.json or an old class name, and masked secrets."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from instructdiff import PROJECT_ROOT
from instructdiff.report import Report, build_report, main
from instructdiff.report.load import as_int, selector_name, sweep_of

BPB = "t_bpb/bits_per_byte"


def _job(job: Path, overrides: list[str], *, num: int | str | None = None, selector: str | None = None,
         metrics: dict | None = None, results_selector: str | None = None, seed: int = 0,
         config: dict | None = None) -> Path:
    """A job directory as Hydra and the pipeline leave it. ``num`` None: no hydra.yaml (a published copy);
    ``"???"``: a single run; ``selector``: Hydra's runtime choice; ``metrics`` None: no results.json."""
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if num is not None:
        hydra = {"hydra": {"job": {"num": num}, "runtime": {"choices": {"selector": selector} if selector else {}}}}
        (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    cfg = config if config is not None else {"domain": {"name": "math"}, "model": {"name": "tiny"}, "seed": seed,
                                             "selector": {"budget": {"fraction": 0.1, "count": None}}}
    (job / "manifest.json").write_text(json.dumps({"config": cfg}))
    if metrics is not None:
        (job / "results.json").write_text(json.dumps({
            "domain": "math", "seed": seed, "selector": results_selector, "seconds": {"train": 1.0},
            "eval": {"base": {"metrics": {BPB: 2.0}}, "trained": {"metrics": metrics}}}))
    return job


def _multirun_yaml(sweep: Path, params: dict[str, str], task: list[str]) -> None:
    """The parts of Hydra's multirun.yaml the report reads (what the basic sweeper writes)."""
    sweep.mkdir(parents=True, exist_ok=True)
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({
        "hydra": {"sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                              "max_batch_size": None, "params": params},
                  "overrides": {"hydra": [], "task": task}, "runtime": {"choices": {}}},
        "seed": 0}))


def _csv(path: Path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_job_num_of_a_single_run_is_none_and_the_sweep_is_the_folder_with_multirun_yaml(tmp_path):
    assert as_int("???") is None and as_int(None) is None and as_int(3) == 3 and as_int("12") == 12
    assert as_int(True) is None
    nested = tmp_path / "sweep" / "0_domain.pool_path=" / "data" / "my.jsonl,selector=random"
    nested.mkdir(parents=True)
    assert sweep_of(nested, tmp_path) == nested.parent  # no multirun.yaml anywhere: the parent folder
    _multirun_yaml(tmp_path / "sweep", {}, [])
    assert sweep_of(nested, tmp_path) == tmp_path / "sweep"


def test_a_folder_of_single_runs_is_reported(tmp_path):
    """Single runs have no job number (Hydra records ``???``) and no multirun.yaml."""
    day = tmp_path / "runs" / "2026-12-06"
    _job(day / "10-00-00_math_random", ["selector=random"], num="???", selector="random", metrics={BPB: 1.0})
    _job(day / "10-05-00_math_length", ["selector=length"], num="???", selector="length", metrics={BPB: 1.1})
    _job(day / "10-09-00_math_instructdiff", [], num="???", selector="instructdiff", metrics=None)
    assert main([str(day), "--out", str(tmp_path / "out")]) == 0
    runs = {r["selector"]: r for r in _csv(tmp_path / "out" / "runs.csv")}
    assert {k: r["status"] for k, r in runs.items()} == {
        "random": "ok", "length": "ok", "instructdiff": "missing/failed"}
    assert all(r["job"] == "" for r in runs.values())
    md = (tmp_path / "out" / "report.md").read_text()
    assert "3 jobs: 2 ok, 1 missing/failed, 0 not started." in md


def test_not_started_lists_only_the_jobs_the_sweep_defined(tmp_path):
    """Job folders have short hashed names (or misleading ones): the report matches the sweep's jobs by
    number or by their recorded overrides. Of the 4 jobs multirun.yaml defines, 3 ran; one is not started."""
    sweep = tmp_path / "sweep"
    _multirun_yaml(sweep, {"selector": "random,length", "seed": "0,1"}, ["model=tiny"])
    ran = [("random", 0), ("random", 1), ("length", 0)]
    for k, (sel, seed) in enumerate(ran):
        _job(sweep / f"{k}_{sel}_{'abcdef'[k] * 6}", [f"selector={sel}", f"seed={seed}", "model=tiny"], num=k,
             selector=sel, seed=seed, metrics={BPB: 1.0 + k / 10})
    # a published copy: no job number, a folder name that names another job; its overrides are what count
    copy = tmp_path / "copies"
    shutil.copytree(sweep, copy)
    for p in sorted(copy.iterdir()):
        if p.is_dir():
            (p / ".hydra" / "hydra.yaml").unlink()
            p.rename(copy / f"x_{p.name}_seed=1,selector=length")
    for root in (sweep, copy):
        rep = Report(root)
        never = [j for j in rep.jobs if j.status == "not started"]
        assert len(rep.jobs) == 4 and len(rep.ok) == 3, root
        assert [(j.selector, j.seed) for j in never] == [("length", 1)], root
        assert never[0].overrides == {"selector": "length", "seed": "1", "model": "tiny"}


def test_a_sweep_over_a_path_override_reports_its_nested_jobs_and_none_not_started(tmp_path):
    """Hydra's default job folder names nest on the "/" of a path override; both jobs are still the sweep's."""
    sweep = tmp_path / "sweep"
    _multirun_yaml(sweep, {}, ["domain.pool_path=/data/my.jsonl", "selector=random,length"])
    for k, sel in enumerate(("random", "length")):
        ovs = ["domain.pool_path=/data/my.jsonl", f"selector={sel}"]
        _job(sweep / f"{k}_domain.pool_path=" / "data" / f"my.jsonl,selector={sel}", ovs, num=k, selector=sel,
             metrics={BPB: 1.0})
    rep = build_report(sweep, tmp_path / "out")
    assert (len(rep.jobs), len(rep.ok)) == (2, 2)
    assert {j.sweep for j in rep.jobs} == {sweep}
    assert "2 jobs: 2 ok, 0 missing/failed, 0 not started." in (tmp_path / "out" / "report.md").read_text()


def test_selector_name_from_results_json_yaml_name_or_old_class_name(tmp_path):
    """Without overrides or Hydra choices: results.json's ``selector`` when it is a conf/selector name, else
    the YAML of the class it (or the resolved config's old module path) names."""
    cases = {"random": "random", "RandomSelector": "random", "SuperfilteringDSelector": "superfiltering_d",
             "length": "length"}
    for k, (recorded, want) in enumerate(cases.items()):
        job = _job(tmp_path / f"j{k}", [], metrics={BPB: 1.0}, results_selector=recorded,
                   config={"domain": {"name": "math"}})
        rep = Report(job.parent)
        assert selector_name(next(j for j in rep.jobs if j.path == job)) == want, recorded
    old = _job(tmp_path / "old", [], metrics={BPB: 1.0}, results_selector="IFDSelector",
               config={"domain": {"name": "math"}, "selector": {"_target_": "baselines.ifd.IFDSelector"}})
    assert selector_name(next(j for j in Report(tmp_path).jobs if j.path == old)) == "ifd"


def test_the_committed_study_still_loads_with_its_selectors():
    """results/math_table/runs holds old-style records (class names in results.json, old module paths)."""
    runs = PROJECT_ROOT / "results" / "math_table" / "runs"
    rep = Report(runs)
    recorded = [d for d in runs.iterdir() if (d / "results.json").is_file()]
    assert len(rep.ok) == len(rep.jobs) == len(recorded) >= 7  # the study grows; every record loads
    # each job is named by its selector's YAML (the study's records hold class names), as its overrides say
    for job in rep.ok:
        overrides = (job.path / ".hydra" / "overrides.yaml").read_text()
        assert f"selector={job.selector}\n" in overrides, (job.path.name, job.selector)
    assert {"random", "instructdiff", "ifd"} <= {j.selector for j in rep.ok}
    assert not [j for j in rep.jobs if j.status == "not started"]


def test_a_secret_override_never_reaches_the_report(tmp_path):
    sweep = tmp_path / "sweep"
    for k, sel in enumerate(("random", "length")):
        _job(sweep / f"{k}_{sel}", [f"selector={sel}", "+wandb.api_key=sk-SECRET123", f"seed={k}"], num=k,
             selector=sel, metrics={BPB: 1.0})
    build_report(sweep, tmp_path / "out")
    for f in (tmp_path / "out").iterdir():
        if f.suffix in (".md", ".csv"):
            assert "SECRET123" not in f.read_text(), f.name


@pytest.mark.slow
def test_instructdiff_report_on_a_folder_of_two_real_single_runs(tmp_path, tiny_model_cache):
    """Two real single runs on the tiny model into outputs/runs/<date>/, then the report of that folder."""
    cache = tmp_path / "cache"
    shutil.copytree(tiny_model_cache / "models", cache / "models")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for sel in ("random", "length"):
        proc = subprocess.run([sys.executable, "-m", "instructdiff", "model=tiny", "logger=none", "eval=quick",
                               "eval.limit=3", "eval.tasks=[id_gsm8k_bpb]", "domain.pool_size=32",
                               f"selector={sel}", f"paths.output_root={tmp_path / 'outputs'}",
                               f"paths.cache_dir={cache}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (day,) = (tmp_path / "outputs" / "runs").iterdir()
    proc = subprocess.run([sys.executable, "-m", "instructdiff.report", str(day), "--out", str(tmp_path / "rep")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 runs ok, 0 missing/failed or not started" in proc.stdout
    rows = [r for r in _csv(tmp_path / "rep" / "report.csv") if r["metric"] == "id_gsm8k_bpb/bits_per_byte"]
    assert {r["selector"] for r in rows} == {"base (no SFT)", "random", "length"}
    paired = _csv(tmp_path / "rep" / "paired.csv")
    assert [(r["selector"], r["reference"], r["n_pairs"]) for r in paired if r["metric"].endswith("bits_per_byte")] \
        == [("length", "random", "1")]
