"""The whole pipeline under ``torchrun --nproc_per_node=2 -m instructdiff`` (gloo on CPU) against one process: one
run directory, one set of cache entries, one W&B run and the same selection; and a failure on one rank only ends
both ranks with its message instead of leaving the other waiting."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

# Calibration on 6 of 24 rows for 2 epochs at a high learning rate, so ΔNLL / ΔH are far from zero and the ranking
# is decided by them, not by float noise. eval=quick with 2 items runs lm-eval for real, on rank 0.
RUN = ["model=tiny", "eval=quick", "eval.limit=2", "domain.pool_size=24", "selector.warmup_ratio=0.25",
       "trainer.epochs=2", "trainer.learning_rate=3e-3", "trainer.gradient_accumulation_steps=2",
       "trainer.logging_steps=1", "trainer.progress_bar=false"]
# the same global batch of 4: 2 rows per device × 2 accumulation × 1 process = 1 × 2 × 2 processes
ONE_PROCESS = ["trainer.per_device_batch_size=2"]
TWO_PROCESSES = ["trainer.per_device_batch_size=1"]
# Sharded scoring batches rows differently (float summation order; tests/test_distributed.py allows 1e-5) and DDP
# training matches one process per step. Measured here (2026-12-06): scores within 7.2e-8, loss per step 4.8e-7.
SCORE_TOL = 1e-5
LOSS_TOL = 1e-5
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]


def _fresh_cache(tmp_path: Path, name: str, tiny_model_cache: Path) -> Path:
    cache = tmp_path / name
    shutil.copytree(tiny_model_cache / "models", cache / "models")
    return cache


def _launch(launcher: list[str], tmp_path: Path, name: str, cache: Path, *overrides: str,
            env: dict | None = None, timeout: int = 600) -> tuple[subprocess.CompletedProcess, Path, Path]:
    """Run from an empty working directory (it must stay empty) with a private TMPDIR; (result, outputs, tmp)."""
    out, cwd, tmp = tmp_path / f"{name}_out", tmp_path / f"{name}_cwd", tmp_path / f"{name}_tmp"
    cwd.mkdir()
    tmp.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
           "WANDB_SILENT": "true", "TMPDIR": str(tmp), **(env or {})}
    result = subprocess.run([*launcher, *RUN, f"paths.output_root={out}", f"paths.cache_dir={cache}", *overrides],
                            cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert not list(cwd.iterdir()), f"{name} wrote into its working directory: {list(cwd.iterdir())}"
    return result, out, tmp


def _only_run_dir(out: Path) -> Path:
    runs = [p for p in (out / "runs").glob("*/*") if p.is_dir()]
    assert len(runs) == 1, f"expected one run directory, found {runs}"
    return runs[0]


def _cache_shape(cache: Path) -> Counter:
    """Every path in the cache with its hash keys blanked: which entries exist, not which inputs made them."""
    return Counter(re.sub(r"[0-9a-f]{16}", "<key>", p.relative_to(cache).as_posix()) for p in cache.rglob("*"))


def _selection(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "selection.jsonl").read_text().splitlines()]


@pytest.mark.slow  # about 45 s on an idle 2-core machine: two whole pipelines
def test_two_process_pipeline_equals_one_process(tmp_path, tiny_model_cache):
    one_cache = _fresh_cache(tmp_path, "one_cache", tiny_model_cache)
    two_cache = _fresh_cache(tmp_path, "two_cache", tiny_model_cache)
    one, one_out, _ = _launch([sys.executable, "-m", "instructdiff"], tmp_path, "one", one_cache,
                              "logger=none", *ONE_PROCESS)
    assert one.returncode == 0, one.stderr[-3000:]
    two, two_out, two_tmp = _launch([*TORCHRUN, "-m", "instructdiff"], tmp_path, "two", two_cache,
                                    "logger=wandb", *TWO_PROCESSES)
    assert two.returncode == 0, two.stderr[-3000:]

    # one run directory (rank 1's Hydra worked in a temporary folder, removed at exit), one summary, one W&B run
    run_one, run_two = _only_run_dir(one_out), _only_run_dir(two_out)
    assert not list(two_tmp.glob("instructdiff-*")), f"rank 1 left {list(two_tmp.iterdir())}"
    assert two.stdout.count("outputs: ") == 1 and two.stdout.count("W&B run saved offline") == 1
    assert sorted(p.name for p in run_two.iterdir()) == sorted(
        [".hydra", "manifest.json", "results.json", "run.log", "selection.jsonl", "subset.jsonl", "wandb"])
    assert len([p for p in (run_two / "wandb").iterdir() if p.name.startswith("offline-run-")]) == 1
    assert len(list(two_out.rglob("offline-run-*"))) == 1

    # every stage ran, in both processes' group
    results = json.loads((run_two / "results.json").read_text())
    assert results["stages"] == ["calibrate", "score", "select", "train", "eval"]
    for stage in ("calibrate", "score", "select", "train", "eval"):
        assert any(e["stage"] == stage and not e["hit"] for e in results["cache"]["events"]), stage
    assert results["eval"]["trained"]["metrics"], "lm-eval ran no task"
    trainings = {t["purpose"]: t for t in results["trainings"]}
    trainings_one = {t["purpose"]: t for t in json.loads((run_one / "results.json").read_text())["trainings"]}
    assert trainings.keys() == trainings_one.keys() == {"calibration-warmup", "final"}
    for purpose, t in trainings.items():
        assert (t["world_size"], t["global_batch_size"]) == (2, 4)
        assert (trainings_one[purpose]["world_size"], trainings_one[purpose]["global_batch_size"]) == (1, 4)
        steps, loss = zip(*t["loss_curve"], strict=True)
        steps_one, loss_one = zip(*trainings_one[purpose]["loss_curve"], strict=True)
        assert steps == steps_one and len(steps) >= 2
        np.testing.assert_allclose(loss, loss_one, atol=LOSS_TOL, rtol=0)

    # one set of cache entries: the same entries as one process makes, no shard, lock or temporary left over
    assert _cache_shape(two_cache) == _cache_shape(one_cache)
    assert not [p for p in two_cache.rglob("*") if re.search(r"\.rank\d|\.partial|\.tmp", p.name)]

    # the same selection: ids, order, status, reason and rank equal, scores within the sharding tolerance
    a, b = _selection(run_one), _selection(run_two)
    assert [(r["id"], r["status"], r["reason"], r["rank"]) for r in a] == \
        [(r["id"], r["status"], r["reason"], r["rank"]) for r in b]
    assert sum(r["status"] == "selected" for r in a) >= 2
    assert any(abs(r["scores"]["delta_entropy"]) > 100 * SCORE_TOL for r in a), "calibration changed nothing"
    for ra, rb in zip(a, b, strict=True):
        assert ra["scores"].keys() == rb["scores"].keys()
        for k, v in ra["scores"].items():
            assert v == pytest.approx(rb["scores"][k], abs=SCORE_TOL), (ra["id"], k)
    assert (run_one / "subset.jsonl").read_bytes() == (run_two / "subset.jsonl").read_bytes()


RANK_ONE_ONLY = '''import os, runpy, sys
if os.environ.get("RANK") == "1":
    {action}
runpy.run_module("instructdiff", run_name="__main__")
'''


def _rank_one_only(tmp_path: Path, action: str) -> Path:
    """A launch script that does ``action`` on rank 1 only, then runs ``python -m instructdiff`` as every rank."""
    script = tmp_path / "rank_one_only.py"
    script.write_text(RANK_ONE_ONLY.format(action=action))
    return script


def test_a_config_error_on_rank_one_ends_both_ranks_with_its_message(tmp_path, tiny_model_cache):
    missing = tmp_path / "missing_pool.jsonl"
    script = _rank_one_only(tmp_path, f"sys.argv.append('domain.pool_path={missing}')")
    cache = _fresh_cache(tmp_path, "cache", tiny_model_cache)
    r, out, _ = _launch([*TORCHRUN, str(script)], tmp_path, "fail", cache, "logger=none", *TWO_PROCESSES,
                        timeout=300)
    assert r.returncode != 0
    # rank 1's own one-line report, and rank 0 stopping with it rather than waiting for rank 1
    assert re.search(r"instructdiff: error: domain.pool_path: .*missing_pool\.jsonl", r.stderr), r.stderr[-3000:]
    assert ("instructdiff: error: reading the pool failed on rank 1: FileNotFoundError" in r.stderr), \
        r.stderr[-3000:]
    # one line each, no traceback from either rank (torchrun's own report of the failed ranks follows them)
    assert not re.search(r'File ".*/instructdiff/\w+\.py"', r.stderr), r.stderr[-3000:]
    run_dir = _only_run_dir(out)
    assert not (run_dir / "results.json").exists() and not (run_dir / "selection.jsonl").exists()


@pytest.mark.slow
def test_a_rank_killed_inside_ddp_training_ends_the_other(tmp_path, tiny_model_cache):
    """A rank that dies where the others wait in a collective (a DDP step) cannot tell them: torchrun stops them."""
    script = _rank_one_only(tmp_path, "os.environ['INSTRUCTDIFF_CRASH_AT'] = 'calibrate.step'")
    cache = _fresh_cache(tmp_path, "cache", tiny_model_cache)
    r, out, _ = _launch([*TORCHRUN, str(script)], tmp_path, "killed", cache, "logger=none", *TWO_PROCESSES,
                        timeout=300)
    assert r.returncode != 0
    assert re.search(r"rank\s*:\s*1 .*\n.*exitcode\s*:\s*-9", r.stderr) or "exitcode  : -9" in r.stderr, \
        r.stderr[-3000:]
    assert not (_only_run_dir(out) / "results.json").exists()
    assert not list((cache / "models").glob("trained-*/train_stats.json"))
