"""MADS (docs/methods.md §4, reconstructed) and GradFiltering / G-SNR (docs/methods.md §5, reconstructed), by hand.

Pure functions on hand-made tag sets / gradient-norm arrays, the two signals on the tiny model (the activation
hook point, padding and token masks against a per-sample manual computation; the LoRA ensemble's shape,
determinism and clean-up) and one end-to-end selection per selector.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from instructdiff.pipeline import run
from instructdiff.selection import Budget
from instructdiff_baselines.gradfiltering import gradfiltering_select, gsnr
from instructdiff_baselines.mads import activation_tags, mads_select

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------------ MADS greedy
# Hand-worked lazy greedy (gain = new tags; ties: larger |T|, then smaller id):
#   1. r1 (gain 5)                                   C = {1..5}
#   2. r2 {7,8,9,10} gain 4 (r3 3, r5/r4/r0 1)        C = {1..5, 7..10}
#   3. gain 1 for r5 (|T|=4), r3 (3), r0 (2) → r5     C = all 10 tags
#   4. nothing adds a tag → reset C = ∅; r3 and r4 gain 3 with |T| 3 → r3 by id
#   5. r4 {4,5,9} gain 3 > r0 {1} gain 1 → r4; 6. r0
HAND = {"r1": [1, 2, 3, 4, 5], "r5": [1, 2, 3, 6], "r3": [6, 7, 8], "r4": [4, 5, 9], "r2": [7, 8, 9, 10],
        "r0": [1, 6]}
HAND_ORDER = ["r1", "r2", "r5", "r3", "r4", "r0"]


def mads(sets: dict[str, list[int]], budget: Budget, **kw):
    ids = sorted(sets)
    return mads_select(ids, [np.array(sets[i]) for i in ids], {i: 1 for i in ids}, budget, **kw)


def test_lazy_greedy_picks_the_hand_computed_sequence_and_resets_once():
    chosen, info, stats = mads(HAND, Budget(count=6))
    assert chosen == HAND_ORDER
    assert stats["n_resets"] == 1 and stats["reset_at"] == [3]
    assert [info[i]["gain"] for i in chosen] == [5, 4, 1, 3, 3, 1]
    assert [info[i]["pass"] for i in chosen] == [0, 0, 0, 1, 1, 1]
    assert info["r5"]["n_tags"] == 4
    # a smaller budget is the prefix of the same greedy order
    assert mads(HAND, Budget(count=3))[0] == HAND_ORDER[:3]
    assert mads(HAND, Budget(fraction=0.5))[0] == HAND_ORDER[:3]
    assert mads(HAND, Budget(count=3))[2]["coverage"] == 1.0


def test_size_order_differs_from_marginal_gain():
    sets = {"a": [1, 2, 3, 4], "b": [1, 2, 3, 5], "c": [6, 7, 8]}
    # size order: a (4), b (4, adds tag 5), c;  marginal gain: a, c (gain 3), b (gain 1)
    assert mads(sets, Budget(count=2), order="size")[0] == ["a", "b"]
    assert mads(sets, Budget(count=2), order="marginal_gain")[0] == ["a", "c"]
    # the size pass skips the samples that add nothing, then resets: d ⊂ a is skipped in pass 0
    sets = {"a": [1, 2, 3, 4], "d": [1, 2], "c": [6, 7, 8]}
    chosen, _, stats = mads(sets, Budget(count=3), order="size")
    assert chosen == ["a", "c", "d"] and stats["reset_at"] == [2]


def test_reset_fires_each_time_coverage_saturates():
    sets = {f"s{k}": [1, 2] for k in range(4)}
    for order in ("marginal_gain", "size"):
        chosen, info, stats = mads(sets, Budget(count=3), order=order)
        assert chosen == ["s0", "s1", "s2"], order
        assert stats["n_resets"] == 2 and stats["reset_at"] == [1, 2], order
        assert [info[i]["gain"] for i in chosen] == [2, 2, 2]


def test_weighted_gain_prefers_rare_tags():
    # df: tag1 3, tag2 2, tag3 2, others 1; N = 4 → idf = log(4/df)
    sets = {"s0": [1, 2, 3], "s1": [1, 2, 4], "s2": [1, 3, 5], "s3": [6, 7]}
    assert mads(sets, Budget(count=1))[0] == ["s0"]  # unweighted: largest set
    chosen, info, _ = mads(sets, Budget(count=2), weighted=True)
    assert chosen[0] == "s3" and info["s3"]["gain"] == pytest.approx(2 * np.log(4))
    # then s1 and s2 both gain idf(1)+idf(2|3)+log4 = log(4/3)+log2+log4, |T| 3 each → s1 by id
    assert chosen[1] == "s1" and info["s1"]["gain"] == pytest.approx(np.log(4 / 3) + np.log(2) + np.log(4))


def test_mads_covers_more_tags_than_random_at_equal_budget():
    rng = np.random.default_rng(0)
    n_tags, n = 120, 60
    p = 1.0 / np.arange(1, n_tags + 1)  # long-tailed tag frequency, as the paper's figure describes
    sets = {f"z{k:02d}": rng.choice(n_tags, size=6, replace=False, p=p / p.sum()).tolist() for k in range(n)}
    chosen, _, stats = mads(sets, Budget(count=8))

    def covered(pick):
        return len(set().union(*(sets[i] for i in pick)))

    assert stats["n_tags_covered"] == covered(chosen)
    ids = sorted(sets)
    random_cov = [covered([ids[k] for k in rng.choice(n, 8, replace=False)]) for _ in range(200)]
    assert covered(chosen) > max(random_cov)


def test_activation_tags_encode_layer_and_neuron_and_threshold_by_pool_quantile():
    tags = np.array([[[3, 1], [0, 2]], [[1, 0], [2, 3]]])  # (N=2, L=2, k=2), neuron width 4
    values = np.array([[[9.0, 1.0], [5.0, 4.0]], [[8.0, 2.0], [7.0, 3.0]]])
    sets = activation_tags(tags, values, "topk")
    assert [s.tolist() for s in sets] == [[1, 3, 4, 6], [0, 1, 6, 7]]  # code = l * 4 + j
    # layer 0 values {9,1,8,2}: 0.5-quantile 5 → keeps 9, 8; layer 1 {5,4,7,3}: quantile 4.5 → keeps 5, 7
    sets = activation_tags(tags, values, "pool_quantile", 0.5)
    assert [s.tolist() for s in sets] == [[3, 4], [1, 6]]


# --------------------------------------------------------------------------------------------- G-SNR formula
# norms[m, e, i]; early mean μ1, late mean μ2, v = population variance of late norms, drop = (μ1-μ2)/μ1
#   i0: early 2,2   late 1,1      drop .5  v 0     → var 5e7   std 5e7
#   i1: early 2,2   late .5,1.5   drop .5  v .25   → var 2     std 1
#   i2: early 4,4   late 1.8,2.2  drop .5  v .04   → var 12.5  std 2.5
#   i3: early 1.1,1.1 late .9,1.1 drop 1/11 v .01  → var 9.09  std .909
#   i4: early 1,1   late 2,2.2    drop -1.1 v .01  → var -110  std -11
#   i5: NaN → dropped
EARLY = [[2, 2], [2, 2], [4, 4], [1.1, 1.1], [1, 1], [np.nan, 1]]
LATE = [[1, 1], [0.5, 1.5], [1.8, 2.2], [0.9, 1.1], [2, 2.2], [1, 1]]
G_IDS = [f"i{k}" for k in range(6)]


def hand_norms() -> np.ndarray:
    norms = np.zeros((2, 2, 6))
    norms[:, 0, :] = np.array(EARLY).T
    norms[:, 1, :] = np.array(LATE).T
    return norms


def test_gsnr_values_by_hand():
    var = gsnr(hand_norms(), "var")
    assert var["gsnr"][:5] == pytest.approx([0.5 / 1e-8, 2.0, 12.5, (1 / 11) / 0.01, -110.0], rel=1e-5)
    assert var["var"][:5] == pytest.approx([0, 0.25, 0.04, 0.01, 0.01])
    std = gsnr(hand_norms(), "std")
    assert std["gsnr"][:5] == pytest.approx([0.5 / 1e-8, 1.0, 2.5, (1 / 11) / 0.1, -11.0], rel=1e-5)
    assert not np.isfinite(var["gsnr"][5])


@pytest.mark.parametrize("denominator,order", [("var", ["i0", "i2", "i3", "i1", "i4"]),
                                               ("std", ["i0", "i2", "i1", "i3", "i4"])])
def test_gradfiltering_ranks_by_gsnr_and_drops_non_finite(denominator, order):
    tokens = {i: 1 for i in G_IDS}
    chosen, dropped, scores, stats = gradfiltering_select(G_IDS, hand_norms(), tokens, Budget(fraction=1.0),
                                                          denominator)
    assert chosen == order
    assert dropped == {"i5": "non_finite_score"} and stats["n_non_finite"] == 1
    assert scores["i1"]["drop"] == pytest.approx(0.5)
    top2 = gradfiltering_select(G_IDS, hand_norms(), tokens, Budget(count=2), denominator)[0]
    assert top2 == order[:2]


# ---------------------------------------------------------------------------------------------------- signals
def manual_topk(inputs, r, layer, tokens, aggregate, k):
    """act(gate)·up of one unpadded sample, computed from the MLP's input, aggregated and ranked."""
    seen = {}
    mlp = inputs.model.model.layers[layer].mlp
    h = mlp.register_forward_hook(lambda mod, args, out: seen.setdefault("x", args[0]))
    with torch.no_grad():
        inputs.model(input_ids=torch.tensor([r.prompt_ids + r.completion_ids]))
        h.remove()
        a = (mlp.act_fn(mlp.gate_proj(seen["x"])) * mlp.up_proj(seen["x"]))[0]
    p = len(r.prompt_ids)
    a = a[p:] if tokens == "response" else a
    agg = a.clamp_min(0).mean(0) if aggregate == "mean_relu" else a.max(0).values
    vals, idx = torch.sort(agg, descending=True, stable=True)
    return idx[:k].numpy(), vals[:k].numpy()


@pytest.mark.parametrize("tokens,aggregate,layers", [("response", "mean_relu", None), ("all", "max", [-1])])
def test_activations_match_a_manual_per_sample_computation(tiny_inputs, tokens, aggregate, layers):
    from instructdiff.signals import get_signal

    out = get_signal("activations")(tiny_inputs, {"tokens": tokens, "aggregate": aggregate, "top_k": 5,
                                                  "layers": layers, "max_batch_size": 4})
    n_layers = 2 if layers is None else 1
    assert out["tags"].shape == (6, n_layers, 5) and out["tags"].dtype == np.int32
    assert out["values"].dtype == np.float32
    for b, r in enumerate(tiny_inputs.rendered):  # batched with padding vs one unpadded sample at a time
        for slot, layer in enumerate([0, 1] if layers is None else [1]):
            idx, vals = manual_topk(tiny_inputs, r, layer, tokens, aggregate, 5)
            np.testing.assert_allclose(out["values"][b, slot], vals, rtol=1e-4, atol=1e-6)
            assert out["tags"][b, slot].tolist() == idx.tolist()


def test_lora_grad_norms_shape_determinism_and_clean_model(tiny_inputs):
    from instructdiff.signals import get_signal
    from instructdiff.signals.lora_grads import detect_target_modules

    before = {k: v.clone() for k, v in tiny_inputs.model.state_dict().items()}
    opts = {"members": 2, "epochs": 2, "batch_size": 4, "learning_rate": 1e-2}
    out = get_signal("lora_grad_norms")(tiny_inputs, opts)
    assert out["grad_norms"].shape == (6, 2, 2) and out["grad_norms"].dtype == np.float32
    assert np.isfinite(out["grad_norms"]).all() and (out["grad_norms"] > 0).all()
    assert not np.array_equal(out["grad_norms"][:, 0], out["grad_norms"][:, 1])  # members differ (seeds)
    assert not np.array_equal(out["grad_norms"][:, :, 0], out["grad_norms"][:, :, 1])  # training moved them
    # the adapters are gone and the base weights untouched
    assert not any("lora" in n for n, _ in tiny_inputs.model.named_modules())
    after = tiny_inputs.model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    again = get_signal("lora_grad_norms")(tiny_inputs, opts)
    np.testing.assert_array_equal(out["grad_norms"], again["grad_norms"])
    assert detect_target_modules(tiny_inputs.model) == ["q_proj", "v_proj"]


def test_lora_targets_detect_gpt2_c_attn():
    from transformers import GPT2Config, GPT2LMHeadModel

    from instructdiff.signals.lora_grads import detect_target_modules

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16))
    assert detect_target_modules(model) == ["c_attn"]


# ----------------------------------------------------------------------------------------------- end to end
def _jsonl(path: Path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.mark.parametrize("overrides", [["selector=mads"],
                                       ["selector=gradfiltering", "selector.members=2", "selector.epochs=2"]])
def test_end_to_end_selection_is_budgeted_complete_and_deterministic(make_cfg, tmp_path, overrides):
    stages = "pipeline.stages=[calibrate,score,select]"
    cfg = make_cfg(*overrides, stages)
    results = run(cfg)
    first = _jsonl(tmp_path / "run" / "selection.jsonl")
    assert len(first) == 48 and all(r["status"] in ("selected", "not_selected", "dropped") for r in first)
    assert sum(r["status"] == "selected" for r in first) == int(0.1 * 48) == results["selection"]["counts"]["selected"]
    assert results["trainings"] == []
    # recompute from scratch (signal and selection caches removed): the same selection
    for sub in ("scores", "selections"):
        shutil.rmtree(Path(cfg.paths.cache_dir) / sub)
    run(make_cfg(*overrides, stages, run_name="again"))
    assert _jsonl(tmp_path / "again" / "selection.jsonl") == first
    selected = [r for r in first if r["status"] == "selected"]
    if overrides[0] == "selector=mads":
        assert results["selection"]["n_tags_covered"] > 0 and all(r["scores"]["gain"] > 0 for r in selected)
    else:
        ranked = sorted(selected, key=lambda r: r["rank"])
        rest = [r["scores"]["gsnr"] for r in first if r["status"] == "not_selected"]
        assert [r["scores"]["gsnr"] for r in ranked] == sorted((r["scores"]["gsnr"] for r in ranked), reverse=True)
        assert min(r["scores"]["gsnr"] for r in selected) >= max(rest)


def test_gradfiltering_seeds_train_their_own_ensembles(make_cfg, tmp_path):
    """The pool is the same for every seed (domain.pool_seed), so the LoRA-ensemble signal must be keyed by the
    run's seed: seed 1 may not be served seed 0's ensemble from the cache."""
    overrides = ["selector=gradfiltering", "selector.members=2", "selector.epochs=2",
                 "pipeline.stages=[calibrate,score,select]"]
    first = run(make_cfg(*overrides, "seed=0", run_name="s0"))
    second = run(make_cfg(*overrides, "seed=1", run_name="s1"))
    assert first["cache"]["score_store"]["misses"] >= 1
    assert second["cache"]["score_store"]["hits"] == 0 and second["cache"]["score_store"]["misses"] >= 1
    g0 = {r["id"]: r["scores"].get("gsnr") for r in _jsonl(tmp_path / "s0" / "selection.jsonl")}
    g1 = {r["id"]: r["scores"].get("gsnr") for r in _jsonl(tmp_path / "s1" / "selection.jsonl")}
    assert g0.keys() == g1.keys() and any(g0[i] != g1[i] for i in g0)
    again = run(make_cfg(*overrides, "seed=1", run_name="s1b"))
    assert again["cache"]["misses"] == 0
