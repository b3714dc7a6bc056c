"""A real Hydra multirun over every selector plugin on the tiny model writes every artifact of every job."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from instructdiff import CONF_DIR

SELECTORS = sorted(p.stem for p in (CONF_DIR / "selector").glob("*.yaml"))


@pytest.mark.slow
def test_multirun_over_every_selector(tmp_path, tiny_model_cache):
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(tiny_model_cache / "models", cache / "models")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "instructdiff", "-m", f"selector={','.join(SELECTORS)}", "model=tiny",
           "logger=none", "eval=none", "domain.pool_size=24", "trainer.epochs=1",
           "pipeline.stages=[calibrate,score,select,train]", f"paths.output_root={out}",
           f"paths.cache_dir={cache}", "hydra.sweep.dir=" + str(out / "sweep")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800,
                       env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    jobs = sorted(p for p in (out / "sweep").iterdir() if p.is_dir() and (p / ".hydra").exists())
    assert len(jobs) == len(SELECTORS)
    seen = set()
    for job in jobs:
        for name in ("results.json", "selection.jsonl", "subset.jsonl", "manifest.json"):
            assert (job / name).is_file(), f"{job.name}: {name} missing"
        results = json.loads((job / "results.json").read_text())
        rows = [json.loads(x) for x in (job / "selection.jsonl").read_text().splitlines()]
        assert len({r["id"] for r in rows}) == len(rows) == 24
        n_selected = sum(r["status"] == "selected" for r in rows)
        choice = (job / ".hydra" / "overrides.yaml").read_text()
        selector = next(s for s in SELECTORS if f"selector={s}\n" in choice)
        seen.add(selector)
        expected = 24 if selector == "full" else int(0.1 * 24)
        if selector in {"ifd", "superfiltering", "superfiltering_d", "complexity"}:
            assert 0 < n_selected <= expected, selector  # these may filter below the budget, never above
        else:
            assert n_selected == expected, selector
        assert results["trainings"][-1]["purpose"] == "final"
    assert seen == set(SELECTORS)
