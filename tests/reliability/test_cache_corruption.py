"""A damaged or misplaced cache entry is reported once and recomputed: never served, never a traceback.

One uncorrupted run (tiny model, 24 rows, InstructDiff through eval on 2 items) fills a cache. Each test copies
that cache, damages one entry one way (cut in half, overwritten with random bytes, one bit flipped; two score
tables swapped), runs again and checks that the warning "cache entry <path> is corrupt: recomputing" (or "... was
made by other settings: recomputing") appears once for that entry, that the stage computes it again, and that
selection.jsonl is byte for byte the uncorrupted run's.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from instructdiff import CONF_DIR
from instructdiff.pipeline import run

ARGS = ["model=tiny", "logger=none", "eval=quick", "eval.limit=2", "eval.tasks=[id_gsm8k_bpb]",
        "domain.pool_size=24", "trainer.max_steps=4", "trainer.per_device_batch_size=2", "trainer.progress_bar=false"]
SELECT = "pipeline.stages=[calibrate,score,select]"
WAYS = ["truncate", "random_bytes", "bit_flip"]


def _cfg(cache: Path, run_dir: Path, *extra: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[*ARGS, f"paths.cache_dir={cache}", f"paths.run_dir={run_dir}",
                                            f"paths.output_root={run_dir.parent / 'outputs'}", *extra])


def damage(path: Path, way: str) -> None:
    data = path.read_bytes()
    if way == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif way == "random_bytes":
        path.write_bytes(random.Random(0).randbytes(len(data)))
    elif way == "bit_flip":  # the middle byte: inside the payload of every kind of entry
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(flipped))
    else:
        raise ValueError(way)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_cache) -> dict:
    """The uncorrupted run: its cache (copied by every test), selection.jsonl and results."""
    tmp = tmp_path_factory.mktemp("cache_reference")
    shutil.copytree(tiny_model_cache / "models", tmp / "cache" / "models")
    results = run(_cfg(tmp / "cache", tmp / "run"))
    manifest = json.loads((tmp / "run" / "manifest.json").read_text())
    return {"cache": tmp / "cache", "selection": (tmp / "run" / "selection.jsonl").read_bytes(),
            "results": results, "base_fp": manifest["base_model"]["fingerprint"]}


def _copy_cache(reference: dict, tmp_path: Path) -> Path:
    shutil.copytree(reference["cache"], tmp_path / "cache")
    return tmp_path / "cache"


def _rerun(cache: Path, tmp_path: Path, caplog, *extra: str) -> tuple[dict, list[str], str]:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="instructdiff"):
        results = run(_cfg(cache, tmp_path / "rerun", *extra))
    warnings = [r.getMessage() for r in caplog.records if "cache entry" in r.getMessage()]
    return results, warnings, caplog.text


def _score_table(cache: Path, model_fp: str) -> Path:
    """The response-statistics table of the model with fingerprint ``model_fp``."""
    for path in sorted((cache / "scores").glob("*.npz")):
        with np.load(path, allow_pickle=False) as z:
            if json.loads(str(z["__cache__"]))["fingerprint"]["model"] == model_fp:
                return path
    raise AssertionError(f"no score table of {model_fp}")


def _assert_recomputed(warnings: list[str], path: Path, problem: str, log: str, stage: str) -> None:
    assert len(warnings) == 1 and warnings[0].startswith(f"cache entry {path} {problem}: recomputing ("), warnings
    assert f"[{stage}] computing" in log


@pytest.mark.parametrize("way", WAYS)
def test_corrupt_score_table_is_rescored(reference, tmp_path, caplog, way) -> None:
    cache = _copy_cache(reference, tmp_path)
    table = _score_table(cache, reference["base_fp"])
    damage(table, way)
    shutil.rmtree(cache / "selections")  # the selector must read the table again
    results, warnings, log = _rerun(cache, tmp_path, caplog, SELECT)
    _assert_recomputed(warnings, table, "is corrupt", log, "score")
    assert results["cache"]["score_store"]["misses"] == 1  # that table alone; the calibrated one was served
    assert (tmp_path / "rerun" / "selection.jsonl").read_bytes() == reference["selection"]
    with np.load(table, allow_pickle=False) as z:  # the rescored table replaced the damaged one
        assert json.loads(str(z["__cache__"]))["fingerprint"]["model"] == reference["base_fp"]


@pytest.mark.parametrize("way", WAYS)
def test_corrupt_selection_is_recomputed(reference, tmp_path, caplog, way) -> None:
    cache = _copy_cache(reference, tmp_path)
    (selection,) = (cache / "selections").glob("*.json")
    damage(selection, way)
    results, warnings, log = _rerun(cache, tmp_path, caplog, SELECT)
    _assert_recomputed(warnings, selection, "is corrupt", log, "select")
    assert "[calibrate] cached" in log and results["cache"]["score_store"]["misses"] == 0
    assert (tmp_path / "rerun" / "selection.jsonl").read_bytes() == reference["selection"]


@pytest.mark.parametrize("way", WAYS)
def test_corrupt_calibrated_model_is_retrained(reference, tmp_path, caplog, way) -> None:
    cache = _copy_cache(reference, tmp_path)
    (warmup,) = [t for t in reference["results"]["trainings"] if t["purpose"] == "calibration-warmup"]
    model_dir = cache / "models" / f"trained-{warmup['key']}"
    damage(model_dir / "model.safetensors", way)
    shutil.rmtree(cache / "selections")  # the selector must ask for its calibrated model again
    results, warnings, log = _rerun(cache, tmp_path, caplog, SELECT)
    _assert_recomputed(warnings, model_dir, "is corrupt", log, "calibrate")
    assert [t["cached"] for t in results["trainings"]] == [False]
    assert (tmp_path / "rerun" / "selection.jsonl").read_bytes() == reference["selection"]


@pytest.mark.parametrize("way", WAYS)
def test_corrupt_eval_result_is_evaluated_again(reference, tmp_path, caplog, way) -> None:
    cache = _copy_cache(reference, tmp_path)
    (event,) = [e for e in reference["results"]["cache"]["events"] if e["what"] == "base model evaluation"]
    result = cache / "eval" / event["key"] / "eval_results.json"
    damage(result, way)
    results, warnings, log = _rerun(cache, tmp_path, caplog)
    _assert_recomputed(warnings, result, "is corrupt", log, "eval")
    assert "[eval] cached, skipping: trained model evaluation" in log
    assert results["eval"] == reference["results"]["eval"]
    assert (tmp_path / "rerun" / "selection.jsonl").read_bytes() == reference["selection"]


def test_swapped_score_tables_are_made_by_other_settings(reference, tmp_path, caplog) -> None:
    cache = _copy_cache(reference, tmp_path)
    tables = sorted(p for p in (cache / "scores").glob("*.npz"))
    assert len(tables) == 2  # base and calibrated model
    a, b = (p.read_bytes() for p in tables)
    tables[0].write_bytes(b)
    tables[1].write_bytes(a)
    shutil.rmtree(cache / "selections")
    results, warnings, log = _rerun(cache, tmp_path, caplog, SELECT)
    assert sorted(w.split(" was made")[0] for w in warnings) == [f"cache entry {p}" for p in tables]
    assert all(" was made by other settings: recomputing" in w for w in warnings)
    assert results["cache"]["score_store"]["misses"] == 2
    assert (tmp_path / "rerun" / "selection.jsonl").read_bytes() == reference["selection"]


def test_entries_written_before_checksums_are_still_served(reference, tmp_path, caplog) -> None:
    """Cache keys did not change: an entry without its record (as every entry was before) passes the structural
    check of its kind and is served, with no warning and nothing recomputed."""
    cache = _copy_cache(reference, tmp_path)
    for path in (cache / "scores").glob("*.npz"):
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files if k != "__cache__"}
        np.savez(path, **arrays)
    for path in [*(cache / "selections").glob("*.json"), *(cache / "eval").glob("*/eval_*.json")]:
        doc = json.loads(path.read_text())
        doc.pop("_cache")
        path.write_text(json.dumps(doc))
    for record in (cache / "models").glob("*/cache_check.json"):
        record.unlink()
    shutil.rmtree(cache / "selections")  # so the score tables and the calibrated model are read too
    results, warnings, log = _rerun(cache, tmp_path, caplog)
    assert warnings == [] and "computing" not in log.replace("[select] computing", "")
    assert results["cache"]["score_store"]["misses"] == 0
    assert (tmp_path / "rerun" / "selection.jsonl").read_bytes() == reference["selection"]


# ------------------------------------------------------------------------------------ read-only cache


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _read_only(cache: Path, argv: list[str]) -> list[str]:
    """``argv`` in a private mount namespace where ``cache`` is a read-only bind mount of itself."""
    script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" "$1" && shift && exec "$@"'
    return ["unshare", "--mount", "sh", "-c", script, "sh", str(cache), *argv]


def test_read_only_cache_serves_a_cached_run_and_names_the_fix_when_it_must_write(reference, tmp_path) -> None:
    cache = _copy_cache(reference, tmp_path)
    probe = subprocess.run(_read_only(cache, ["touch", str(cache / "probe")]), capture_output=True, text=True)
    if "Read-only file system" not in probe.stderr:
        pytest.skip(f"cannot make a read-only mount here (needs unshare and mount): {probe.stderr.strip()[:200]}")

    def cli(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "instructdiff", *ARGS, f"paths.cache_dir={cache}", f"paths.run_dir={run_dir}",
                f"hydra.run.dir={tmp_path / (run_dir.name + '_hydra')}", *extra]
        return subprocess.run(_read_only(cache, argv), capture_output=True, text=True, timeout=600, env=_env())

    cached = cli(tmp_path / "cached")
    assert cached.returncode == 0, cached.stderr[-3000:]
    assert "computing" not in cached.stdout + cached.stderr and "Traceback" not in cached.stderr
    assert (tmp_path / "cached" / "selection.jsonl").read_bytes() == reference["selection"]

    new = cli(tmp_path / "new", "seed=1", SELECT)  # another seed: a calibration the cache does not hold
    assert new.returncode == 1 and "Traceback" not in new.stderr, new.stderr[-3000:]
    (line,) = [x for x in new.stderr.splitlines() if x.startswith("instructdiff: error:")]
    assert f"cannot write the cache (paths.cache_dir) at {cache / 'models'}" in line
    assert "read-only" in line and "set paths.cache_dir to a writable directory" in line


# ----------------------------------------------------------------------------- two runs, one run dir


def test_two_runs_into_one_run_dir_say_computing_only_for_what_they_computed(tmp_path, tiny_model_cache) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(tiny_model_cache / "models", cache / "models")
    argv = [sys.executable, "-m", "instructdiff", *ARGS, "selector=ppl", "pipeline.stages=[score,select]",
            "domain.pool_size=120", f"paths.cache_dir={cache}", f"paths.run_dir={tmp_path / 'run'}"]
    procs = [subprocess.Popen([*argv, f"hydra.run.dir={tmp_path / f'hydra{k}'}"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=_env())
             for k in (0, 1)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(x[-2000:] for x in logs)
    # one table, computed by one of them; the other, whether it waited on the lock or came later, was served it
    assert sum(x.count("[score] computing") for x in logs) == 1
    assert sum(x.count("[score] cached") for x in logs) + sum(x.count("[select] cached") for x in logs) >= 1
    assert all(x.count("[score] computing") + x.count("[score] cached") + x.count("[select] cached") >= 1
               for x in logs)
