"""Faults: SIGKILL at every stage then a rerun, two jobs on one cache, a full disk, an unwritable output dir.

Every run here is a real ``python -m instructdiff`` process on the tiny model. Kills come two ways: from
outside (the test reads the child's log and SIGKILLs it while TRL is training) and from the documented
``INSTRUCTDIFF_CRASH_AT`` hook (instructdiff/faults.py), which SIGKILLs at the worst moment of a stage, after
computing and before publishing. After each kill the cache and run dir must hold no torn artifact, and the
rerun must end with the same selection as a run that was never interrupted.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from instructdiff.atomic import OutputError

# max_steps: enough steps that a kill at step 5 (calibrate.step / train.step) lands inside training
ARGS = ["model=tiny", "logger=none", "eval=quick", "eval.limit=2", "eval.tasks=[id_gsm8k_bpb]", "domain.pool_size=24",
        "trainer.max_steps=20", "trainer.per_device_batch_size=2", "trainer.progress_bar=false",
        "score.max_batch_size=2", "score.checkpoint_every=1"]
SELECT_ONLY = "pipeline.stages=[calibrate,score,select]"
TO_TRAIN = "pipeline.stages=[calibrate,score,select,train]"


def _env(**extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **extra}
    env.pop("INSTRUCTDIFF_CRASH_AT", None)
    env.update(extra)
    return env


def _cmd(cache: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "instructdiff", *ARGS, f"paths.cache_dir={cache}", f"paths.run_dir={run_dir}",
            f"hydra.run.dir={run_dir.parent / (run_dir.name + '_hydra')}", *extra]


def _cache(tmp: Path, tiny_model_cache: Path, name: str = "cache") -> Path:
    cache = tmp / name
    shutil.copytree(tiny_model_cache / "models", cache / "models")
    return cache


def _run(cmd: list[str], **env: str) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env(**env))
    return r


def _selection(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "selection.jsonl").read_text().splitlines()]


def assert_same_selection(a: list[dict], b: list[dict]) -> None:
    assert [(r["id"], r["status"], r["reason"], r["rank"]) for r in a] == \
        [(r["id"], r["status"], r["reason"], r["rank"]) for r in b]
    for x, y in zip(a, b, strict=True):
        assert x["scores"].keys() == y["scores"].keys()
        for k in x["scores"]:
            # a resumed pass batches the remaining rows differently: float sums agree to ~1e-7
            assert x["scores"][k] == pytest.approx(y["scores"][k], abs=1e-5, nan_ok=True)


def assert_nothing_torn(*roots: Path) -> None:
    """Every published artifact is complete; unpublished temporaries may exist only as *.tmp* names."""
    for root in roots:
        if not root.exists():
            continue
        for p in root.rglob("*"):
            if not p.is_file() or ".tmp" in str(p.relative_to(root)) or p.suffix == ".lock":
                continue
            if p.suffix == ".json":
                json.loads(p.read_text())
            elif p.suffix == ".jsonl":
                [json.loads(x) for x in p.read_text().splitlines()]
            elif p.suffix == ".npz":
                with np.load(p, allow_pickle=False) as z:
                    [z[k] for k in z.files]
        models = root / "models"
        if models.exists():
            for d in models.glob("trained-*"):
                if d.is_dir() and not d.name.endswith(".tmp"):
                    # a trained model dir exists only once complete: stats, weights and tokenizer together
                    assert (d / "train_stats.json").is_file() and (d / "model.safetensors").is_file(), d
                    assert (d / "tokenizer.json").is_file(), d


def _published_models(cache: Path) -> list[Path]:
    return [d for d in (cache / "models").glob("trained-*") if d.is_dir() and not d.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_cache) -> dict:
    """One uninterrupted run through eval: the selection and metrics every faulted run must reproduce."""
    tmp = tmp_path_factory.mktemp("reference")
    cache = _cache(tmp, tiny_model_cache)
    r = _run(_cmd(cache, tmp / "run"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    results = json.loads((tmp / "run" / "results.json").read_text())
    return {"selection": _selection(tmp / "run"), "eval": results["eval"]}


# ------------------------------------------------------------------------------------------------ SIGKILL


@pytest.mark.slow
@pytest.mark.parametrize("stage, stages", [("calibrate", SELECT_ONLY), ("train", TO_TRAIN)])
def test_sigkill_during_training_stages_then_rerun(tmp_path, tiny_model_cache, reference, stage, stages) -> None:
    cache = _cache(tmp_path, tiny_model_cache)
    before = len(_published_models(cache))
    killed = _run(_cmd(cache, tmp_path / "run", stages), INSTRUCTDIFF_CRASH_AT=f"{stage}.step:5")
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    assert f"[fault] SIGKILL at {stage}.step" in killed.stdout
    # the killed training published nothing: calibration left 0 trained models, the final one just the warmup's
    assert len(_published_models(cache)) == before + (0 if stage == "calibrate" else 1)
    assert list(cache.glob("models/trained-*.tmp")), "the kill should have landed mid-training (scratch dir)"
    assert not (tmp_path / "run" / "results.json").exists()
    assert_nothing_torn(cache, tmp_path / "run")

    r = _run(_cmd(cache, tmp_path / "run", stages))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert f"[{stage}] computing" in r.stdout + r.stderr  # redone, not mistaken for finished
    assert_same_selection(_selection(tmp_path / "run"), reference["selection"])
    assert_nothing_torn(cache, tmp_path / "run")


@pytest.mark.slow
@pytest.mark.parametrize("point, stages, left_behind", [
    ("score.checkpoint:3", SELECT_ONLY, "scores/*.partial.npz"),
    ("select.publish", SELECT_ONLY, None),
    ("eval.publish", "pipeline.stages=[calibrate,score,select,train,eval]", None),
])
def test_sigkill_at_publish_points_then_rerun(tmp_path, tiny_model_cache, reference, point, stages,
                                              left_behind) -> None:
    cache = _cache(tmp_path, tiny_model_cache)
    killed = _run(_cmd(cache, tmp_path / "run", stages), INSTRUCTDIFF_CRASH_AT=point)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    assert f"[fault] SIGKILL at {point.split(':')[0]}" in killed.stdout
    assert_nothing_torn(cache, tmp_path / "run")
    assert not (tmp_path / "run" / "results.json").exists()
    if point.startswith("select"):
        assert not list((cache / "selections").glob("*.json"))
    if point.startswith("eval"):
        assert not list((cache / "eval").glob("*/eval_results.json"))
    if left_behind:
        assert list(cache.glob(left_behind)), "the kill should have left a checkpoint to resume from"

    r = _run(_cmd(cache, tmp_path / "run", stages))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    log = r.stdout + r.stderr
    if point.startswith("score"):
        assert "resuming" in log and not list(cache.glob("scores/*.partial.npz"))
    if point.startswith("select"):
        assert "[calibrate] cached" in log and "[select] computing" in log
    assert_same_selection(_selection(tmp_path / "run"), reference["selection"])
    if point.startswith("eval"):
        results = json.loads((tmp_path / "run" / "results.json").read_text())
        assert results["eval"]["base"]["metrics"] == pytest.approx(reference["eval"]["base"]["metrics"])
        assert results["eval"]["trained"]["metrics"] == pytest.approx(reference["eval"]["trained"]["metrics"])
    assert_nothing_torn(cache, tmp_path / "run")


# ------------------------------------------------------------------------------------- shared cache


@pytest.mark.slow
def test_two_jobs_on_one_cache_at_once(tmp_path, tiny_model_cache, reference) -> None:
    cache = _cache(tmp_path, tiny_model_cache)
    procs = [subprocess.Popen(_cmd(cache, tmp_path / f"run{k}", TO_TRAIN), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=_env()) for k in (0, 1)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(x[-2000:] for x in logs)
    for k in (0, 1):
        assert_same_selection(_selection(tmp_path / f"run{k}"), reference["selection"])
    # the locked stages ran once in total: the job that waited found the other's result in the cache
    for stage in ("calibrate", "train"):
        computed = sum(log.count(f"[{stage}] computing") for log in logs)
        cached = sum(log.count(f"[{stage}] cached") for log in logs)
        assert (computed, cached) == (1, 1), stage
    assert_nothing_torn(cache, tmp_path / "run0", tmp_path / "run1")
    assert len(_published_models(cache)) == 2  # warmup + final, one copy each
    tables = [p for p in (cache / "scores").glob("*.npz") if ".partial" not in p.name]
    assert len(tables) == 2 and not [p for p in cache.rglob("*") if ".tmp" in p.name]


# ------------------------------------------------------------------------------ full disk, bad output dir


def _file_size_limit(limit: int):
    def apply() -> None:
        # EFBIG instead of SIGXFSZ: the process sees the failed write, as it sees ENOSPC on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("limit", [3000, 10000])  # fails at the selection cache; at selection.jsonl
def test_full_disk_gives_a_clear_message_and_no_half_written_file(tmp_path, tiny_model_cache, limit) -> None:
    cache = _cache(tmp_path, tiny_model_cache)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "instructdiff", "model=tiny", "logger=none", "eval=none", "selector=random",
           "domain.pool_size=150", "pipeline.stages=[select]", f"paths.cache_dir={cache}", f"paths.run_dir={run_dir}",
           f"hydra.run.dir={tmp_path / 'hydra'}", "hydra.output_subdir=null"]  # Hydra's own files are not ours
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(),
                       preexec_fn=_file_size_limit(limit))
    assert r.returncode == 1
    # one line naming the path and the cause (issue 14: no traceback for a file-system problem)
    assert "instructdiff: error: cannot write" in r.stderr and "disk is full" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    assert_nothing_torn(cache, run_dir)
    leftovers = [p for p in [*cache.rglob("*"), *run_dir.rglob("*")] if ".tmp" in p.name]
    assert not leftovers, leftovers  # the failed temporary is removed, not left to fill the disk further
    # whatever did get published is complete, and a run without the limit finishes from there
    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert len(_selection(run_dir)) == 150


def test_unwritable_run_or_cache_dir_fails_early_with_the_knob(make_cfg, tmp_path) -> None:
    from instructdiff.pipeline import run

    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(OutputError, match=r"paths\.run_dir.*a_file is a file, not a directory"):
        run(make_cfg(f"paths.run_dir={blocker / 'run'}", "pipeline.stages=[select]", "selector=random"))
    with pytest.raises(OutputError, match=r"paths\.cache_dir.*a_file is a file, not a directory"):
        run(make_cfg(f"paths.cache_dir={blocker / 'cache'}", "pipeline.stages=[select]", "selector=random"))
    # /proc refuses new entries even for root
    with pytest.raises(OutputError, match=r"cannot write the run directory"):
        run(make_cfg("paths.run_dir=/proc/instructdiff_run", "pipeline.stages=[select]", "selector=random"))
