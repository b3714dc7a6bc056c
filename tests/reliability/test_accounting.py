"""Accounting: for every selector, selected + not selected + dropped = input rows, in selection.jsonl and manifest."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from instructdiff import CONF_DIR
from instructdiff.pipeline import Pipeline, run
from instructdiff.selection import Selection

CORPUS = Path(__file__).parent / "corpus"
SELECTORS = sorted(p.stem for p in (CONF_DIR / "selector").glob("*.yaml"))
N_GOOD = 30


def _pool(tmp_path: Path) -> tuple[Path, int]:
    """The corpus's broken records plus N_GOOD usable ones; returns (file, records in it)."""
    good = b"".join(json.dumps({"instruction": f"Compute {i} times {i + 2}.", "input": f"case {i}",
                                "response": f"{i} * {i + 2} = {i * (i + 2)}." + " Done." * (i % 5)}).encode() + b"\n"
                    for i in range(N_GOOD))
    path = tmp_path / "pool.jsonl"
    path.write_bytes((CORPUS / "mixed_bad.jsonl").read_bytes() + good)
    records = sum(1 for line in path.read_bytes().splitlines() if line.strip())
    return path, records


def check_balanced(job: Path, input_rows: int) -> dict:
    rows = [json.loads(x) for x in (job / "selection.jsonl").read_text().splitlines()]
    status = Counter(r["status"] for r in rows)
    assert set(status) <= {"selected", "not_selected", "dropped"}
    assert sum(status.values()) == input_rows, status  # one line per record read: nothing lost, nothing twice
    assert all(r["reason"] for r in rows if r["status"] == "dropped")
    acc = json.loads((job / "manifest.json").read_text())["accounting"]
    assert acc["balanced"] and acc["input_rows"] == input_rows == acc["listed"]
    assert (acc["selected"], acc["not_selected"], acc["dropped"]) == \
        (status["selected"], status["not_selected"], status["dropped"])
    assert sum(acc["dropped_reasons"].values()) == acc["dropped"]
    return acc


@pytest.mark.slow
def test_every_selector_accounts_for_every_input_row(tmp_path, tiny_model_cache) -> None:
    pool, records = _pool(tmp_path)
    cache = tmp_path / "cache"
    shutil.copytree(tiny_model_cache / "models", cache / "models")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "instructdiff", "-m", f"selector={','.join(SELECTORS)}", "model=tiny",
           "logger=none", "eval=none", f"domain.pool_path={pool}", "domain.pool_size=null", "data.on_error=skip",
           "selector.budget.fraction=0.2", "trainer.epochs=1", "trainer.progress_bar=false",
           "pipeline.stages=[calibrate,score,select]", f"paths.output_root={out}", f"paths.cache_dir={cache}",
           f"hydra.sweep.dir={out / 'sweep'}", "hydra.sweep.subdir=${hydra.job.num}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1500,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    jobs = sorted(p for p in (out / "sweep").iterdir() if p.is_dir() and (p / ".hydra").exists())
    assert len(jobs) == len(SELECTORS)
    for job in jobs:
        acc = check_balanced(job, records)
        assert acc["dropped_reasons"]["bad_row"] == 13 and acc["dropped_reasons"]["duplicate"] == 1, job.name
        assert acc["selected"] > 0, job.name


def test_pool_size_subsample_is_counted_as_not_drawn_not_as_dropped(make_cfg, tmp_path) -> None:
    results = run(make_cfg("selector=random", "domain.pool_size=20", "pipeline.stages=[select]"))
    acc = json.loads((tmp_path / "run" / "manifest.json").read_text())["accounting"]
    assert acc["balanced"] and acc["input_rows"] == 7473  # the whole GSM8K train file was read
    # rows the pool_size draw left out are good rows never drawn into the pool, not bad rows dropped
    assert acc["dropped_reasons"] == {} and acc["dropped"] == 0
    assert acc["not_drawn"] == 7453 == results["selection"]["not_drawn"]
    assert acc["selected"] + acc["not_selected"] == 20 == results["selection"]["n_pool"]


def test_an_unbalanced_selection_is_refused_not_written(make_cfg, tmp_path) -> None:
    cfg = make_cfg("selector=random", "domain.pool_size=10", "pipeline.stages=[select]")
    pipe = Pipeline(cfg, tmp_path / "run")
    pipe.run_dir.mkdir(parents=True)
    pipe.prepare()
    ids = [r.id for r in pipe.pool]
    lossy = Selection.build(ids[:-1], ids[:2], {})  # a selector that forgot one pool row
    with pytest.raises(RuntimeError, match="row accounting does not balance"):
        pipe._write_selection(lossy, pipe.report.dropped + pipe.render_dropped, pipe.rows)
    assert not (pipe.run_dir / "selection.jsonl").exists()
    whole = Selection.build(ids, ids[:2], {})
    pipe._write_selection(whole, pipe.report.dropped + pipe.render_dropped, pipe.rows)
    assert len((pipe.run_dir / "selection.jsonl").read_text().splitlines()) == 10
