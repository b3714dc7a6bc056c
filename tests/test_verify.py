"""``instructdiff-report --verify``: a real tiny job rerun from its recorded config reproduces (exit 0); a
tampered selection or metric does not (exit 1, naming the difference); how the rerun's config is composed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from instructdiff import CONF_DIR
from instructdiff.report import main
from instructdiff.verify import compare_selection, compose_rerun_config, config_drift, read_selection

BPB = "id_gsm8k_bpb/bits_per_byte"
JOB_OVERRIDES = ["model=tiny", "logger=none", "eval=quick", "eval.limit=3", "eval.tasks=[id_gsm8k_bpb]",
                 "domain.pool_size=32", "selector=instructdiff", "selector.budget.fraction=0.2",
                 "trainer.per_device_batch_size=2", "trainer.gradient_accumulation_steps=1",
                 "trainer.learning_rate=3e-3"]


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory, tiny_model_cache) -> tuple[Path, Path]:
    """(job dir, its cache): one InstructDiff job on the tiny model, run through the Hydra entry point so its
    directory is what a real run or multirun job leaves (.hydra/, results.json, selection.jsonl, ...)."""
    root = tmp_path_factory.mktemp("verify_job")
    cache = root / "cache"
    shutil.copytree(tiny_model_cache / "models", cache / "models")
    job = root / "job"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "instructdiff", *JOB_OVERRIDES,
                           f"paths.output_root={root / 'outputs'}", f"paths.cache_dir={cache}",
                           f"hydra.run.dir={job}"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("results.json", "selection.jsonl", "manifest.json", ".hydra/overrides.yaml"):
        assert (job / name).is_file(), name
    assert len(read_selection(job / "selection.jsonl")) >= 2
    return job, cache


def _copy(job: Path, dest: Path) -> Path:
    shutil.copytree(job, dest)
    return dest


def test_rerun_from_a_fresh_cache_reproduces_the_job(finished_job, tmp_path, capsys):
    job, _ = finished_job
    out = tmp_path / "verify"
    assert main(["--verify", str(job), "--verify-out", str(out)]) == 0
    printed = capsys.readouterr().out
    verdict = json.loads((out / "verify.json").read_text())
    assert verdict["passed"] is True and verdict["selection"]["identical"] is True
    assert verdict["selection"]["n_recorded"] == len(read_selection(job / "selection.jsonl"))
    assert verdict["primary_metric"] == BPB
    rows = {r["metric"]: r for r in verdict["metrics"]}
    assert rows[BPB]["within"] and rows[BPB]["abs_diff"] <= 1e-3 and rows[BPB]["primary"]
    recorded = json.loads((job / "results.json").read_text())["eval"]["trained"]["metrics"][BPB]
    assert rows[BPB]["recorded"] == recorded
    # nothing came from the job's cache: the fresh one computed every stage, then was deleted
    assert verdict["rerun_cache_misses"] > 0 and not (out / "cache").exists()
    rerun = json.loads((out / "results.json").read_text())
    assert rerun["cache"]["hits"] == 0 and rerun["run_dir"] == str(out)
    assert verdict["config_source"].endswith(".hydra/overrides.yaml") and verdict["config_drift"] == []
    assert {d["override"].split("=")[0] for d in verdict["dropped_overrides"]} == {
        "logger", "paths.output_root", "paths.cache_dir"}
    assert "selection identical: yes" in printed and "verdict: REPRODUCED" in printed
    assert f"{BPB} *" in printed


def test_swapped_ranks_in_the_record_are_named(finished_job, tmp_path, capsys):
    job, cache = finished_job
    tampered = _copy(job, tmp_path / "job")
    recs = [json.loads(x) for x in (tampered / "selection.jsonl").read_text().splitlines() if x.strip()]
    first = next(r for r in recs if r["rank"] == 0)
    second = next(r for r in recs if r["rank"] == 1)
    first["rank"], second["rank"] = 1, 0
    (tampered / "selection.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "verify"
    assert main(["--verify", str(tampered), "--verify-out", str(out), "--cache-dir", str(cache)]) == 1
    printed = capsys.readouterr().out
    assert (f"selection identical: no, first difference at rank 0: recorded '{second['id']}', "
            f"rerun '{first['id']}' (same ids, different order)") in printed
    assert "verdict: NOT REPRODUCED (selection differs)" in printed
    verdict = json.loads((out / "verify.json").read_text())
    assert verdict["passed"] is False and verdict["selection"]["first_difference"]["rank"] == 0
    assert all(r["within"] for r in verdict["metrics"])  # only the selection was tampered with


def test_a_metric_beyond_the_tolerance_fails(finished_job, tmp_path, capsys):
    job, cache = finished_job

    def tamper(name: str, delta: float) -> Path:
        d = _copy(job, tmp_path / name)
        results = json.loads((d / "results.json").read_text())
        results["eval"]["trained"]["metrics"][BPB] += delta
        (d / "results.json").write_text(json.dumps(results))
        return d

    far = tamper("far", 0.01)
    assert main(["--verify", str(far), "--verify-out", str(tmp_path / "v_far"), "--cache-dir", str(cache)]) == 1
    printed = capsys.readouterr().out
    assert f"verdict: NOT REPRODUCED (1 metric(s) beyond tolerance: {BPB})" in printed
    line = next(x for x in printed.splitlines() if x.strip().startswith(BPB))
    assert line.rstrip().endswith("no") and "0.01" in line
    verdict = json.loads((tmp_path / "v_far" / "verify.json").read_text())
    row = next(r for r in verdict["metrics"] if r["metric"] == BPB)
    assert row["abs_diff"] == pytest.approx(0.01) and row["within"] is False
    assert verdict["selection"]["identical"] is True

    near = tamper("near", 5e-4)  # inside the default 1e-3, outside --tol 1e-4
    assert main(["--verify", str(near), "--verify-out", str(tmp_path / "v_near"), "--cache-dir", str(cache)]) == 0
    assert main(["--verify", str(near), "--verify-out", str(tmp_path / "v_strict"), "--cache-dir", str(cache),
                 "--tol", "1e-4"]) == 1


def test_jobs_that_cannot_be_verified_exit_2(tmp_path, capsys):
    job = tmp_path / "crashed"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("- selector=random\n")
    assert main(["--verify", str(job)]) == 2
    assert "no results.json" in capsys.readouterr().out
    (job / "results.json").write_text("{}")
    (job / "selection.jsonl").write_text("")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    assert main(["--verify", str(job), "--verify-out", str(busy)]) == 2
    assert "not an empty directory" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--verify", str(tmp_path / "nope")])


def _job_dir(root: Path, overrides: list[str] | None, config: dict | None = None) -> Path:
    (root / ".hydra").mkdir(parents=True)
    if overrides is not None:
        (root / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if config is not None:
        (root / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    return root


def test_config_is_recomposed_from_the_overrides_without_paths_logger_or_masked_values(tmp_path):
    job = _job_dir(tmp_path / "job", ["model=tiny", "selector=random", "seed=2", "domain.pool_size=20",
                                      "paths.cache_dir=/old/cache", "logger=wandb", "logger.project=p",
                                      "+model.hf_token=***"])
    cfg, info = compose_rerun_config(job, tmp_path / "rerun", tmp_path / "cache")
    assert cfg.seed == 2 and cfg.domain.pool_size == 20 and cfg.model.name == "tiny"
    assert cfg.selector._target_.endswith("RandomSelector")
    assert cfg.logger.name == "none" and "hf_token" not in cfg.model
    assert cfg.paths.cache_dir == str(tmp_path / "cache") and cfg.paths.run_dir == str(tmp_path / "rerun")
    dropped = {d["override"]: d["why"] for d in info["dropped_overrides"]}
    assert set(dropped) == {"paths.cache_dir=/old/cache", "logger=wandb", "logger.project=p",
                            "+model.hf_token=***"}
    assert dropped["+model.hf_token=***"].startswith("masked")
    assert info["overrides"] == ["model=tiny", "selector=random", "seed=2", "domain.pool_size=20"]


def test_without_overrides_the_recorded_config_is_used_with_masked_values_reset(tmp_path):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        recorded = OmegaConf.to_container(compose("config", overrides=["model=tiny", "selector=random", "seed=3",
                                                                         "logger=wandb"]), resolve=False)
    recorded["domain"]["pool_path"] = "***"
    recorded["logger"]["project"] = "***"
    job = _job_dir(tmp_path / "job", None, recorded)
    cfg, info = compose_rerun_config(job, tmp_path / "rerun", tmp_path / "cache")
    assert info["source"].endswith(".hydra/config.yaml") and info["overrides"] is None
    assert cfg.seed == 3 and cfg.selector._target_.endswith("RandomSelector") and cfg.model.name == "tiny"
    assert cfg.domain.pool_path is None and "domain.pool_path" in info["reset_masked"]
    assert cfg.logger.name == "none" and cfg.paths.run_dir == str(tmp_path / "rerun")
    # --from-config takes the recorded config even where overrides exist
    both = _job_dir(tmp_path / "both", ["seed=9"], recorded)
    assert compose_rerun_config(both, tmp_path / "r2", tmp_path / "c2", from_config=True)[0].seed == 3
    assert compose_rerun_config(both, tmp_path / "r3", tmp_path / "c3")[0].seed == 9


def test_config_drift_ignores_paths_logger_and_masked_values():
    recorded = {"seed": 0, "trainer": {"learning_rate": 1e-3}, "paths": {"cache_dir": "/a"},
                "logger": {"name": "wandb"}, "model": {"token": "***"}, "eval": {"tasks": ["a"]}}
    rerun = {"seed": 0, "trainer": {"learning_rate": 5e-5}, "paths": {"cache_dir": "/b"},
             "logger": {"name": "none"}, "model": {"token": None}, "eval": {"tasks": ["a", "b"]}, "new": 1}
    assert config_drift(recorded, rerun) == [
        {"key": "eval.tasks", "recorded": ["a"], "rerun": ["a", "b"]},
        {"key": "new", "recorded": "<absent>", "rerun": 1},
        {"key": "trainer.learning_rate", "recorded": 1e-3, "rerun": 5e-5}]


def test_selection_comparison_names_the_first_differing_rank(tmp_path):
    assert compare_selection(["a", "b", "c"], ["a", "b", "c"])["identical"]
    diff = compare_selection(["a", "b", "c"], ["a", "c", "b"])
    assert not diff["identical"] and diff["same_set"]
    assert diff["first_difference"] == {"rank": 1, "recorded": "b", "rerun": "c"}
    short = compare_selection(["a", "b"], ["a", "b", "c"])
    assert short["first_difference"] == {"rank": 2, "recorded": None, "rerun": "c"} and not short["same_set"]
    path = tmp_path / "selection.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "x", "status": "selected", "rank": 1}, {"id": "y", "status": "not_selected", "rank": None},
        {"id": "z", "status": "selected", "rank": 0}, {"id": "w", "status": "dropped", "rank": None}]))
    assert read_selection(path) == ["z", "x"]
