"""Smoke test of scripts/bench_medqa_eval.py on the tiny model: both tasks run, and the letter task needs fewer
model calls than the full-option task on the same items."""

from __future__ import annotations

import importlib.util
import json

from instructdiff import PROJECT_ROOT


def test_bench_medqa_eval_tiny(tiny_model_cache, capsys):
    spec = importlib.util.spec_from_file_location("bench_medqa_eval", PROJECT_ROOT / "scripts" / "bench_medqa_eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--model", "tiny", "--n", "6", "--rounds", "1", "--batch-size", "4",
                          "--cache-dir", str(tiny_model_cache)])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert result["n_items"] == 6
    for task in ("id_medqa", "id_medqa_letter"):
        assert result[f"{task}_calls"] > 0 and result[f"{task}_wall_s"] > 0
        assert 0.0 <= result[f"{task}_acc"] <= 1.0
    # four multi-token continuations per item against letters, most of which the tiny tokenizer keeps whole
    assert result["tokens_ratio_full_over_letter"] > 1.5
