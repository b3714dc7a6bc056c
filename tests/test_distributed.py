"""torchrun sharded scoring equals one process; a SIGKILLed scoring run resumes to the same table."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

SIGNALS = ("nll", "entropy", "n_tokens", "first_token_entropy")


def _cmd(cache: Path, out: Path, *extra: str) -> list[str]:
    return ["model=tiny", "logger=none", f"paths.output_root={out}", f"paths.cache_dir={cache}",
            f"hydra.run.dir={out / 'hydra'}", *extra]


def _table(cache: Path) -> dict:
    files = [p for p in (cache / "scores").glob("*.npz") if ".partial" not in p.name and ".rank" not in p.name]
    assert len(files) == 1, files
    with np.load(files[0]) as z:
        return {k: z[k].copy() for k in ("ids", *SIGNALS)}


def _fresh_cache(tmp_path: Path, name: str, tiny_model_cache: Path) -> Path:
    cache = tmp_path / name
    shutil.copytree(tiny_model_cache / "models", cache / "models")
    return cache


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.mark.slow
def test_two_process_gloo_scoring_equals_one_process(tmp_path, tiny_model_cache):
    one = _fresh_cache(tmp_path, "one", tiny_model_cache)
    two = _fresh_cache(tmp_path, "two", tiny_model_cache)
    args = ["domain.pool_size=40"]
    r1 = subprocess.run([sys.executable, "-m", "instructdiff.score_pool", *_cmd(one, tmp_path / "o1", *args)],
                        capture_output=True, text=True, timeout=600, env=_env())
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                         "-m", "instructdiff.score_pool", *_cmd(two, tmp_path / "o2", *args)],
                        capture_output=True, text=True, timeout=600, env=_env())
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert '"world_size": 2' in r2.stdout
    a, b = _table(one), _table(two)
    assert a["ids"].tolist() == b["ids"].tolist() and len(a["ids"]) == 40
    for s in SIGNALS:
        np.testing.assert_allclose(a[s], b[s], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_sigkilled_scoring_resumes_to_identical_output(tmp_path, tiny_model_cache):
    args = ["domain.pool_size=300", "score.max_batch_size=1", "score.checkpoint_every=1"]
    ref = _fresh_cache(tmp_path, "ref", tiny_model_cache)
    r = subprocess.run([sys.executable, "-m", "instructdiff.score_pool", *_cmd(ref, tmp_path / "o1", *args)],
                       capture_output=True, text=True, timeout=600, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]

    cache = _fresh_cache(tmp_path, "killed", tiny_model_cache)
    cmd = [sys.executable, "-m", "instructdiff.score_pool", *_cmd(cache, tmp_path / "o2", *args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    deadline = time.time() + 300
    while not list((cache / "scores").glob("*.partial.npz")) and time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail("scoring finished before it could be killed; make the pool larger")
        time.sleep(0.02)
    time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not [p for p in (cache / "scores").glob("*.npz") if ".partial" not in p.name]

    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout + resumed.stderr
    assert not list((cache / "scores").glob("*.partial.npz"))
    a, b = _table(ref), _table(cache)
    assert a["ids"].tolist() == b["ids"].tolist()
    for s in SIGNALS:
        np.testing.assert_allclose(a[s], b[s], atol=1e-6, rtol=0)
