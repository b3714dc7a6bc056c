"""The console entry as a user meets it: a broken pool file ends the run with the file and line named, a
non-zero exit status and no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from instructdiff import DATA_DIR


def test_a_broken_pool_line_is_named_without_a_traceback(tmp_path: Path) -> None:
    good = (DATA_DIR / "math" / "gsm8k" / "train.jsonl").read_text().splitlines()[:3]
    pool = tmp_path / "pool.jsonl"
    pool.write_text("\n".join([*good, '{"question": "x", "answer": ', good[0]]) + "\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "instructdiff", "model=tiny", "logger=none",
                           f"domain.pool_path={pool}", "pipeline.stages=[select]",
                           f"paths.output_root={tmp_path / 'out'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"instructdiff: error: {pool}:4: invalid JSON" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def _cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "instructdiff", "model=tiny", "logger=none",
                           f"paths.output_root={tmp_path / 'out'}", *overrides],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_a_budget_key_typo_names_the_right_key_with_or_without_plus(tmp_path: Path) -> None:
    for override in ("selector.budget.fracton=0.1", "+selector.budget.fracton=0.1"):
        proc = _cli(tmp_path, override)
        assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert "selector.budget.fracton is not a key of selector.budget" in proc.stderr
        assert "Did you mean selector.budget.fraction?" in proc.stderr
        assert "Traceback" not in proc.stderr + proc.stdout
    proc = _cli(tmp_path, "selector=random", "+selector.warmup_ratio=0.1")
    assert proc.returncode == 1 and "selector.warmup_ratio is not a key of selector random" in proc.stderr


def test_a_missing_pool_file_is_one_line_naming_the_path(tmp_path: Path) -> None:
    proc = _cli(tmp_path, "domain.pool_path=nowhere/my_pool.jsonl", "pipeline.stages=[select]")
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "instructdiff: error: domain.pool_path: data file 'nowhere/my_pool.jsonl' not found; tried" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_composed_selector_keys_are_checked_before_any_work(make_cfg) -> None:
    """`+` keys, presets and direct run(cfg) calls meet the same check, before data or models are touched."""
    import pytest

    from instructdiff.config_check import ConfigKeyError
    from instructdiff.pipeline import run

    with pytest.raises(ConfigKeyError, match=r"selector\.budget\.fracton .*Did you mean selector\.budget\.fraction"):
        run(make_cfg("+selector.budget.fracton=0.1", "domain.pool_path=/nonexistent.jsonl"))
    with pytest.raises(ConfigKeyError, match=r"selector\.nll_trimm .*Did you mean selector\.nll_trim"):
        run(make_cfg("+selector.nll_trimm=0.1"))


def test_eval_task_typos_are_caught_before_any_work(make_cfg) -> None:
    """A run that evaluates checks its task names first: a typo must not surface after training."""
    import pytest

    from instructdiff.pipeline import run

    with pytest.raises(ValueError, match=r"unknown task 'id_medqa_leter' \(did you mean 'id_medqa_letter'\?\)"):
        run(make_cfg("+eval.task_limits.id_medqa_leter=null", "domain.pool_path=/nonexistent.jsonl"))
    with pytest.raises(ValueError, match=r"unknown eval task\(s\) \['id_gsm8kk'\]"):
        run(make_cfg("eval.tasks=[id_gsm8kk]", "domain.pool_path=/nonexistent.jsonl"))
    # a run without the eval stage does not look at them
    with pytest.raises(FileNotFoundError):
        run(make_cfg("eval.tasks=[id_gsm8kk]", "domain.pool_path=/nonexistent.jsonl",
                     "pipeline.stages=[calibrate,score,select]"))


def test_budgets_that_select_nothing_stop_before_any_model_work(make_cfg, tmp_path: Path) -> None:
    import pytest

    from instructdiff.pipeline import run
    from instructdiff.selection import BudgetError

    for override, given in (("selector.budget.count=0", "count=0"), ("selector.budget.fraction=1e-9", "fraction=1e-09")):
        with pytest.raises(BudgetError, match=rf"selector.budget selects nothing: {given} of a 48-row pool"):
            run(make_cfg(override))
    with pytest.raises(BudgetError, match="whole number"):
        run(make_cfg("selector.budget.count=2.7"))
    cache = Path(make_cfg().paths.cache_dir)
    assert not list((cache / "models").glob("trained-*")) and not (cache / "scores").exists() or \
        not list((cache / "scores").glob("*.npz"))
    # full ignores the budget: its run is not stopped
    full = run(make_cfg("selector=full", "selector.budget.count=0", "pipeline.stages=[select]"))
    assert full["selection"]["counts"]["selected"] == 48
    proc = _cli(tmp_path, "selector.budget.count=0", "pipeline.stages=[select]")
    assert proc.returncode == 1 and "selector.budget selects nothing" in proc.stderr and "Traceback" not in proc.stderr


def test_help_explains_the_tool_its_groups_and_the_most_useful_overrides_before_hydras_text(tmp_path: Path) -> None:
    from instructdiff import CONF_DIR

    proc = subprocess.run([sys.executable, "-m", "instructdiff", "--help"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    assert text.startswith("instructdiff selects the supervised fine-tuning (SFT) data worth training on")
    # every group with every choice in conf/, as Hydra lists them from the config search path
    for group in ("domain", "model", "selector", "trainer", "eval", "logger", "pipeline", "experiment", "profile"):
        choices = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        assert f"\n{group}: {', '.join(choices)}\n" in text, group
    for launcher in (CONF_DIR / "hydra" / "launcher").glob("*.yaml"):
        assert launcher.stem in text
    useful = text.index("== Most useful overrides ==")
    for override in ("selector=random", "domain=medical", "domain.pool_path=my.jsonl", "selector.budget.fraction=0.2",
                     "pipeline.stages=[calibrate,score,select]", "-m selector=instructdiff,random seed=0,1",
                     "+profile=cpu", "experiment=smoke"):
        assert text.index(override, useful) > useful, override
    # then Hydra's own flags, without the 100-line config dump of Hydra's default help
    assert useful < text.index("--multirun,-m : Run multiple jobs") < text.index("Powered by Hydra")
    assert "== Config ==" not in text and "max_tokens_per_batch" not in text
