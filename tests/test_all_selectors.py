"""A real Hydra multirun over every selector plugin on the tiny model writes every artifact of every job."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from instructdiff import CONF_DIR

SELECTORS = sorted(p.stem for p in (CONF_DIR / "selector").glob("*.yaml"))
# Which rows every selector picks on the tiny model, recorded before the architecture refactor (issue 13) so
# that moving code around cannot change a selection unnoticed. Regenerate only for an intended change of a
# method: INSTRUCTDIFF_WRITE_GOLDEN=1 pytest tests/test_all_selectors.py, and say why in the commit.
GOLDEN = Path(__file__).parent / "golden" / "tiny_selections.json"
PINNED = ("id", "status", "reason", "rank")


def _pinned(rows: list[dict]) -> list[dict]:
    return [{**{k: r.get(k) for k in PINNED}, "scores": r.get("scores") or {}} for r in rows]


def _same_score(a, b) -> bool:
    if a is None or b is None:
        return a is b
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6)


def _diff_to_golden(selector: str, got: list[dict], want: list[dict]) -> list[str]:
    problems = []
    if [r["id"] for r in got] != [r["id"] for r in want]:
        return [f"{selector}: row ids or their order differ"]
    for g, w in zip(got, want, strict=True):  # same length: the ids matched above
        for k in PINNED:
            if g[k] != w[k]:
                problems.append(f"{selector} row {g['id']}: {k} {g[k]!r} != pinned {w[k]!r}")
        if set(g["scores"]) != set(w["scores"]):
            problems.append(f"{selector} row {g['id']}: score names {sorted(g['scores'])} != {sorted(w['scores'])}")
        for name in set(g["scores"]) & set(w["scores"]):
            if not _same_score(g["scores"][name], w["scores"][name]):
                problems.append(f"{selector} row {g['id']}: {name} {g['scores'][name]} != pinned {w['scores'][name]}")
    return problems


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
    picked: dict[str, list[dict]] = {}
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
        picked[selector] = _pinned(rows)
        expected = 24 if selector == "full" else int(0.1 * 24)
        if selector in {"ifd", "superfiltering", "superfiltering_d", "complexity"}:
            assert 0 < n_selected <= expected, selector  # these may filter below the budget, never above
        else:
            assert n_selected == expected, selector
        assert results["trainings"][-1]["purpose"] == "final"
    assert seen == set(SELECTORS)
    if os.environ.get("INSTRUCTDIFF_WRITE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(picked, indent=1, sort_keys=True) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert sorted(golden) == sorted(picked), "a selector was added or removed: regenerate the golden file"
    problems = [p for s in SELECTORS for p in _diff_to_golden(s, picked[s], golden[s])]
    assert not problems, "selections moved away from the pinned ones:\n" + "\n".join(problems[:30])
