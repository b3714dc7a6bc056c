"""Sweeps whose overrides hold a path or a secret: short, safe job folders that the sweep summary and the
`wandb sync` line find, and the secret in no file under the sweep or the cache and in no line printed, with
the basic launcher and with submitit's (which pickles every job and keeps its logs inside the sweep).

Every sweep here is a real ``python -m instructdiff -m`` process on the tiny model.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from instructdiff import DATA_DIR

SECRET = "SUPERSECRET-7c41e9"


def _launchers() -> list[str]:
    try:
        import hydra_plugins.hydra_submitit_launcher  # noqa: F401
    except ImportError:
        return ["basic"]
    return ["basic", "id_submitit_local"]


def _pool(tmp_path: Path, rows: int = 24) -> Path:
    """A user's own file, in a folder whose path holds "/" (and a space) like any real path."""
    pool = tmp_path / "my data" / "pools" / "my.jsonl"
    pool.parent.mkdir(parents=True)
    lines = (DATA_DIR / "math" / "gsm8k" / "train.jsonl").read_text().splitlines()[:rows]
    pool.write_text("\n".join(lines) + "\n")
    return pool


def _sweep(tmp_path: Path, cache: Path, *overrides: str, launcher: str = "basic") -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "instructdiff", "-m", "model=tiny", "eval=none",
           f"paths.output_root={tmp_path / 'out'}", f"paths.cache_dir={cache}", *overrides]
    if launcher != "basic":
        cmd.insert(4, f"hydra/launcher={launcher}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
           "WANDB_SILENT": "true", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def _files_holding(root: Path, needle: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


@pytest.fixture
def cache(tmp_path, tiny_model_cache) -> Path:
    cache = tmp_path / "cache"
    shutil.copytree(tiny_model_cache / "models", cache / "models")
    return cache


@pytest.mark.slow
@pytest.mark.parametrize("launcher", _launchers())
def test_a_sweep_over_a_path_with_a_secret_finds_every_job_and_writes_the_secret_nowhere(tmp_path, cache, launcher):
    pool = _pool(tmp_path)
    # ppl scores the pool with the model, so the cache gets score tables and a selection to search as well
    proc = _sweep(tmp_path, cache, "logger=wandb", f"domain.pool_path={pool}", "domain.pool_size=null",
                  "selector=random,ppl",
                  f"+wandb.api_key={SECRET}", f"+logger.token={SECRET}", "pipeline.stages=[score,select]",
                  launcher=launcher)
    printed = proc.stdout + proc.stderr
    assert proc.returncode == 0, printed[-4000:]
    (sweep,) = (tmp_path / "out" / "multirun").glob("*/*")

    # short, flat, safe folder names; the full overrides (the pool's path too) in each job's overrides.yaml
    jobs = sorted(p for p in sweep.iterdir() if (p / ".hydra").is_dir())
    assert [re.sub(r"[0-9a-f]{6}$", "<hash>", j.name) for j in jobs] == ["0_random_<hash>", "1_ppl_<hash>"]
    parser = OverridesParser.create()
    for job in jobs:
        overrides = OmegaConf.load(job / ".hydra" / "overrides.yaml")
        values = {o.key_or_group: o.value() for o in parser.parse_overrides(list(overrides))}
        assert values["domain.pool_path"] == str(pool) and values["wandb.api_key"] == "***"
        assert json.loads((job / "results.json").read_text())["run_dir"] == str(job)
    assert f"sweep: {sweep} (2 jobs, 2 with results.json, 0 missing/failed)" in proc.stdout
    sync = f"wandb sync {sweep}/*/wandb/offline-run-*"
    assert f"W&B: 2 offline runs; upload them all with: {sync}" in proc.stdout
    assert len(glob.glob(sync.split(" ", 2)[2])) == 2
    # each job's closing "outputs:" line is the job folder itself, printed as it is (no markup eaten, no line
    # broken at 80 columns); submitit's jobs print into their logs
    job_out = proc.stdout + "".join(p.read_text() for p in sweep.glob(".submitit/*/*_log.out"))
    outputs = re.findall(r"^outputs: (.+)$", job_out, flags=re.M)
    assert sorted(outputs) == [str(j) for j in jobs]

    assert SECRET not in printed
    leaks = _files_holding(sweep, SECRET) + _files_holding(cache, SECRET)
    assert not leaks
    # control: the overrides were copied into the sweep's files (where the value would have been), hidden
    assert "${oc.env:INSTRUCTDIFF_SECRET_WANDB_API_KEY}" in (sweep / "multirun.yaml").read_text()
    if launcher == "id_submitit_local":
        pickles = list((sweep / ".submitit").glob("*/*_submitted.pkl"))
        assert len(pickles) == 2 and all(b"INSTRUCTDIFF_SECRET_WANDB_API_KEY" in p.read_bytes() for p in pickles)
        assert list((sweep / ".submitit").glob("*/*_log.err"))  # submitit's logs were searched too
    assert any((cache / "scores").rglob("*")), "ppl wrote no score table: the cache search found nothing"


BUGGY_PLUGIN = '''
from instructdiff.selection import Selector


class BuggySelector(Selector):
    """A selector plugin with a bug: it fails after the pool is loaded."""

    def select(self, ctx):
        raise RuntimeError("a bug in a selector plugin")
'''


@pytest.mark.slow
def test_the_error_line_of_a_failed_job_holds_no_secret(tmp_path, cache):
    """Hydra prints a failed job's overrides ("Error executing job with overrides: [...]") before its traceback;
    a bug in a user's selector plugin is the kind of failure that keeps that traceback."""
    (tmp_path / "buggy_selector.py").write_text(BUGGY_PLUGIN)
    proc = _sweep(tmp_path, cache, "logger=none", "domain.pool_size=12", "selector=random",
                  "selector._target_=buggy_selector.BuggySelector", f"+wandb.api_key={SECRET}",
                  "pipeline.stages=[select]")
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = next(x for x in proc.stderr.splitlines() if x.startswith("Error executing job with overrides:"))
    assert "+wandb.api_key=" in line and "INSTRUCTDIFF_SECRET_WANDB_API_KEY" in line
    assert "a bug in a selector plugin" in proc.stderr
    assert SECRET not in proc.stdout + proc.stderr
    assert not _files_holding(tmp_path / "out", SECRET) + _files_holding(cache, SECRET)
