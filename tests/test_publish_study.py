"""scripts/publish_study.py's pick profile: one row per (selector, seed), so ``full`` at two budget fractions and
two seeds (4 jobs) counts 2 seeds, and selectors at several fractions carry their fraction."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from instructdiff import PROJECT_ROOT


def _publish_study():
    spec = importlib.util.spec_from_file_location("publish_study", PROJECT_ROOT / "scripts" / "publish_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _job(runs: Path, name: str, selector: str, seed: int, fraction: float, picked: list[int],
         extra: tuple[str, ...] = (), shift: float = 0.0) -> None:
    job = runs / name
    (job / ".hydra").mkdir(parents=True)
    overrides = [f"selector={selector}", f"seed={seed}", f"selector.budget.fraction={fraction}", *extra]
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (job / "manifest.json").write_text(json.dumps({"config": {"domain": {"name": "math"}, "seed": seed}}))
    (job / "results.json").write_text(json.dumps({"domain": "math", "seed": seed, "eval": {}}))
    (job / "selection.jsonl").write_text("".join(json.dumps({
        "id": f"r{k}", "status": "selected" if k in picked else "not_selected",
        "scores": {"delta_entropy": k + seed + shift, "delta_nll": 0.1, "nll_base": 1.0, "response_tokens": 10}}) + "\n"
        for k in range(4)))


def test_pick_profile_counts_seeds_not_jobs(tmp_path):
    runs = tmp_path / "runs"
    for seed in (0, 1):
        for frac, picked in ((0.25, [0]), (0.5, [0, 1])):
            _job(runs, f"s__id_{seed}_{frac}", "instructdiff", seed, frac, picked)
            _job(runs, f"s__full_{seed}_{frac}", "full", seed, frac, [0, 1, 2, 3])
    ps = _publish_study()
    rows = ps.pick_profile(runs)
    assert sorted((r["selector"], r["seed"]) for r in rows) == sorted(
        (s, seed) for seed in (0, 1) for s in ("full", "instructdiff @0.25", "instructdiff @0.5", "(whole pool)"))
    by = {(r["selector"], r["seed"]): r for r in rows}
    assert by[("instructdiff @0.5", 1)]["delta_entropy"] == 1.5 and by[("full", 0)]["n"] == 4
    ps.write_pick_profile(rows, tmp_path)
    md = (tmp_path / "picks.md").read_text()
    assert "| full | 2 | 4 |" in md and "| instructdiff @0.25 | 2 | 1 |" in md


def test_pick_profile_of_a_warmup_study_names_the_calibrated_model_of_each_row(tmp_path):
    """Two warm-up ratios, two calibrated models per seed: each measures its own picks, random's and the pool's."""
    runs = tmp_path / "runs"
    for seed in (0, 1):
        for ratio, shift in (("0.01", 0.0), ("0.5", 10.0)):
            _job(runs, f"s__id_{seed}_{ratio}", "instructdiff", seed, 0.25, [0], (f"selector.warmup_ratio={ratio}",),
                 shift=shift)
        _job(runs, f"r__random_{seed}", "random", seed, 0.25, [3])
    ps = _publish_study()
    by = {(r["selector"], r["seed"]): r for r in ps.pick_profile(runs)}
    low, high = "instructdiff [warmup_ratio=0.01]", "instructdiff [warmup_ratio=0.5]"
    assert set(by) == {(name, seed) for seed in (0, 1) for name in (
        low, high, f"random (under {low})", f"random (under {high})",
        f"(whole pool) (under {low})", f"(whole pool) (under {high})")}
    # random's single pick (row 3) seen through each ratio's scores: 3 + seed, and 10 more under the other model
    assert by[(f"random (under {low})", 1)]["delta_entropy"] == 4
    assert by[(f"random (under {high})", 1)]["delta_entropy"] == 14
    assert by[(high, 0)]["delta_entropy"] == 10
