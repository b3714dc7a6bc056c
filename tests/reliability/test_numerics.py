"""Numerics: NaN/inf scores are dropped with a reason before any sort; fp16 overflow is reported by sample id."""

from __future__ import annotations

import json
import logging
import math
import shutil

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from instructdiff.pipeline import run
from instructdiff.render import Rendered
from instructdiff.scoring import RESPONSE_SIGNALS, ScoreStore, score_batch

# selectors ranking rows by the ScoreStore's response statistics (model-free ones never see a NaN)
SCORE_SELECTORS = ["ppl", "entropy", "ifd", "superfiltering", "complexity"]


def _poison_every_table(cache, n: int = 3) -> list[str]:
    """Overwrite the first ``n`` ids of every cached score table with NaN / +inf / -inf, in place on disk."""
    poisoned: list[str] = []
    for path in sorted((cache / "scores").glob("*.npz")):
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k].copy() for k in z.files}
        order = sorted(range(len(arrays["ids"])), key=lambda k: str(arrays["ids"][k]))[:n]
        for j, k in enumerate(order):
            for s in ("nll", "entropy", "first_token_entropy"):
                arrays[s][k] = (math.nan, math.inf, -math.inf)[j % 3]
        np.savez(path, **arrays)
        poisoned = sorted(str(arrays["ids"][k]) for k in order)
    return poisoned


@pytest.mark.parametrize("selector", SCORE_SELECTORS)
def test_non_finite_scores_are_dropped_and_counted_never_ranked(make_cfg, tmp_path, selector: str) -> None:
    stages = "pipeline.stages=[score,select]"
    run(make_cfg(f"selector={selector}", "domain.pool_size=30", stages, run_name="clean"))
    bad = _poison_every_table(tmp_path / "cache")
    shutil.rmtree(tmp_path / "cache" / "selections")  # force the selector to run on the poisoned tables
    results = run(make_cfg(f"selector={selector}", "domain.pool_size=30", stages, run_name="poisoned"))
    rows = {r["id"]: r for r in map(json.loads, (tmp_path / "poisoned" / "selection.jsonl").read_text().splitlines())}
    for i in bad:
        assert rows[i]["status"] == "dropped" and "non_finite" in rows[i]["reason"], (selector, rows[i])
        assert rows[i]["rank"] is None
    ranked = [r for r in rows.values() if r["rank"] is not None]
    assert ranked and all(r["status"] == "selected" for r in ranked)
    # every score that reached selection.jsonl is a real number (NaN is written as null, never as a value)
    assert all(v is None or math.isfinite(v) for r in rows.values() for v in r["scores"].values())
    counts = results["selection"]["counts"]
    assert counts["dropped"] >= len(bad) and sum(counts.values()) == 30
    manifest = json.loads((tmp_path / "poisoned" / "manifest.json").read_text())
    acc = manifest["accounting"]
    assert acc["balanced"] and acc["dropped_reasons"].get("non_finite_score", 0) >= len(bad)


# ------------------------------------------------------------------------------------- fp16 overflow

TRIGGER = 7  # the token whose activation overflows fp16 (max 65504) but not fp32


def _overflowing_model() -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        # After RMSNorm the trigger's one-hot embedding is ~sqrt(32)=5.7 in channel 3; a gain of 2e4 there
        # makes ~1.1e5 going into q/k/v: finite in fp32, inf once autocast casts it to fp16.
        model.model.embed_tokens.weight[TRIGGER].zero_()
        model.model.embed_tokens.weight[TRIGGER, 3] = 1.0
        model.model.layers[0].input_layernorm.weight[3] = 2e4
    return model


ITEMS = [Rendered("clean-a", [3, 4, 5], [6, 8, 9]), Rendered("hot-prompt", [3, TRIGGER, 5], [6, 8, 9]),
         Rendered("hot-completion", [3, 4, 5], [6, 8, TRIGGER]), Rendered("clean-b", [10, 11], [12, 13])]


def test_fp16_overflow_is_detected_and_reported_with_the_sample_ids(tmp_path, caplog) -> None:
    model = _overflowing_model()
    fp32 = score_batch(model, ITEMS, pad_id=0, dtype="fp32")
    assert np.isfinite(fp32).all()  # the model is fine in full precision: the NaNs below are the overflow
    settings = {"max_tokens_per_batch": 1000, "max_batch_size": 4, "pad_id": 0, "checkpoint_every": 1,
                "dtype": "fp16"}
    store = ScoreStore(tmp_path)
    with caplog.at_level(logging.WARNING, logger="instructdiff.scoring"):
        table = store.response_stats(lambda: model, "m", ITEMS, "r", settings, desc="score fp16")
    assert table.non_finite_ids() == ["hot-prompt", "hot-completion"]
    assert store.passes[-1]["non_finite_ids"] == ["hot-prompt", "hot-completion"]
    warning = caplog.text
    assert "overflow of the fp16 range" in warning and "hot-prompt" in warning and "hot-completion" in warning
    assert "clean-a" not in warning
    # the clean samples keep real scores, close to fp32; nothing was clipped to a plausible number
    for k, r in enumerate(ITEMS):
        if r.id.startswith("clean"):
            assert table.values["nll"][k] == pytest.approx(fp32[k, 0], abs=1e-2)
        else:
            assert all(math.isnan(table.values[s][k]) for s in ("nll", "entropy"))
    # a cache hit reports the same ids again (the user of this run has not seen the first warning)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="instructdiff.scoring"):
        store.response_stats(lambda: pytest.fail("a hit must not load the model"), "m", ITEMS, "r", settings,
                             desc="score fp16")
    assert "hot-prompt" in caplog.text and store.hits == 1
    assert set(RESPONSE_SIGNALS) <= set(table.values)
