"""LESS (baselines/less.py, instructdiff/signals/less_grads.py), checked by hand.

The blocked random projection against an independent one-shot construction and the JL property; the warm-up slice
and learning-rate schedule; the Adam preconditioning against a hand computation on the tiny model with the real
checkpoint state; the selection rule on hand-made features; the FLOPs rule; and one end-to-end run through the
pipeline, recomputed from the cached signal, then served from the cache.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from instructdiff.cost import ModelParams, signal_cost
from instructdiff.data import load_source
from instructdiff.pipeline import Pipeline
from instructdiff.render import Rendered
from instructdiff.rows import Row
from instructdiff.selection import Budget, Selection
from instructdiff.signals.less_grads import (
    RademacherProjector,
    compute,
    linear_schedule,
    resolve_options,
    warmed_up,
    warmup_ids,
    warmup_rows,
)
from instructdiff_baselines.less import LESSSelector, checkpoint_weights, less_scores, less_select

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ================================================================================================ projection
def one_shot_matrix(n_params: int, dim: int, seed: int, block_rows: int) -> np.ndarray:
    """R·√d built in one go, independently of the projector's code path: the PCG64 raw stream of every block,
    bits unpacked MSB first by NumPy, 1 → +1 and 0 → −1."""
    rows = []
    for b in range(math.ceil(n_params / block_rows)):
        n = min(block_rows, n_params - b * block_rows)
        words = np.random.PCG64(np.random.SeedSequence([seed, b])).random_raw(math.ceil(n * dim / 64))
        bits = np.unpackbits(words.astype("<u8").view(np.uint8))[: n * dim].reshape(n, dim)
        rows.append(bits.astype(np.float64) * 2 - 1)
    return np.vstack(rows)


def test_blockwise_projection_equals_the_one_shot_projection_exactly():
    n_params, dim, block = 2500, 64, 1024  # 3 blocks, the last one partial
    proj = RademacherProjector(n_params, dim, seed=7, block_rows=block)
    full = one_shot_matrix(n_params, dim, 7, block)
    assert torch.equal(proj.matrix(), torch.from_numpy(full) / math.sqrt(dim))
    # integer-valued gradients: every product and partial sum is exact in float32, so blockwise == one shot bitwise
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(-3, 4, size=(5, n_params)).astype(np.float32))
    one_shot = (x.double() @ torch.from_numpy(full)) * (1.0 / math.sqrt(dim))
    assert torch.equal(proj.project(x), one_shot)
    # each sample's projection does not depend on the others in the buffer
    assert torch.equal(proj.project(x[2:3]), one_shot[2:3])
    y = torch.randn(4, n_params)
    torch.testing.assert_close(proj.project(y), y.double() @ torch.from_numpy(full) / math.sqrt(dim),
                               rtol=1e-5, atol=1e-5)


def test_projection_matrix_is_a_function_of_the_seed():
    a, b = RademacherProjector(3000, 128, seed=0), RademacherProjector(3000, 128, seed=0)
    assert torch.equal(a.matrix(), b.matrix())
    other = RademacherProjector(3000, 128, seed=1).matrix()
    assert 0.4 < (other == a.matrix()).double().mean() < 0.6  # independent signs agree half the time
    assert not torch.equal(a.block(0), a.block(1)[: a.block(0).shape[0]])  # blocks are not repeats
    assert set(a.matrix().unique().tolist()) == {-1 / math.sqrt(128), 1 / math.sqrt(128)}
    with pytest.raises(ValueError, match="multiple of 8"):
        RademacherProjector(10, 100)


def test_projection_preserves_inner_products_johnson_lindenstrauss():
    n_params, dim = 3000, 2048
    rng = np.random.default_rng(1)
    base = rng.normal(size=n_params)
    x = np.stack([base * rng.uniform(0, 2) + rng.normal(size=n_params) for _ in range(12)])  # cosines 0 … 0.9
    y = RademacherProjector(n_params, dim, seed=3).project(torch.from_numpy(x).float()).numpy()
    unit = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)  # noqa: E731
    cos_true, cos_proj = unit(x) @ unit(x).T, unit(y) @ unit(y).T
    # JL: the error of a projected cosine has standard deviation ~ sqrt((1 + cos²)/d) ≤ 0.031 here
    err = np.abs(cos_proj - cos_true)[np.triu_indices(12, 1)]
    assert err.max() < 5 * math.sqrt(2 / dim) and err.mean() < 1.5 / math.sqrt(dim)
    assert np.ptp(cos_true[np.triu_indices(12, 1)]) > 0.5  # the pairs span a real range of angles
    ratio = (y ** 2).sum(1) / (x ** 2).sum(1)  # squared norms are kept in expectation (the 1/√d scale)
    assert np.all(np.abs(ratio - 1) < 5 * math.sqrt(2 / dim))


# ==================================================================================== warm-up slice, schedule
def test_warmup_slice_is_seeded_order_free_and_sized():
    ids = [f"id{k:03d}" for k in range(200)]
    s0 = warmup_ids(ids, 0, 0.05, 4)
    assert len(s0) == 10 and s0 == [i for i in ids if i in set(s0)]  # in pool order
    assert set(warmup_ids(list(reversed(ids)), 0, 0.05, 4)) == set(s0)  # order of the pool does not matter
    assert warmup_ids(ids, 0, 0.05, 4) == s0 and set(warmup_ids(ids, 1, 0.05, 4)) != set(s0)
    assert len(warmup_ids(ids[:24], 0, 0.05, 4)) == 4 and len(warmup_ids(ids[:3], 0, 0.05, 4)) == 3
    with pytest.raises(ValueError, match="warm-up slice is empty"):
        warmup_ids([], 0, 0.05, 4)
    with pytest.raises(ValueError, match="warm-up slice is empty"):
        warmup_ids(ids[:10], 0, 0.05, 0)
    rendered = [Rendered(i, [1], [2]) for i in ids[:30]]
    o = resolve_options({"seed": 0, "query_ids": ids[:20]})
    assert {r.id for r in warmup_rows(rendered, o)} <= set(ids[20:30])  # never a query row


def test_linear_schedule_and_epoch_learning_rates_by_hand():
    # T = 6 steps, ⌈0.03·6⌉ = 1 warm-up step: lr·[0, 1, .8, .6, .4, .2]
    np.testing.assert_allclose(linear_schedule(6, 0.03, 1.0), [0, 1, 0.8, 0.6, 0.4, 0.2])
    np.testing.assert_allclose(linear_schedule(4, 0.5, 2.0), [0, 1, 2, 1])
    np.testing.assert_allclose(checkpoint_weights(np.array([3.0, 1.0])), [0.75, 0.25])
    with pytest.raises(ValueError, match="positive sum"):
        checkpoint_weights(np.array([0.0]))


# ============================================================================== the signal on the tiny model
# 3 warm-up rows of the 4 non-query rows, batch 1: 3 steps/epoch, T = 6, lr·[0, 1, .8, .6, .4, .2] → η = .6, .4
TINY = {"query_ids": ["r4", "r5"], "epochs": 2, "warmup_min_rows": 3, "learning_rate": 1e-2,
        "projection_dim": None}


def hand_features(inputs, options):
    """Γ (pool rows) or g (query rows) for every row and checkpoint, from the warm-up's real AdamW state and a
    gradient taken here: full-vocabulary logits of the peft model, labels −100 on the prompt, torch.autograd."""
    out = {}
    with warmed_up(inputs, options) as w:
        model, params = w["peft_model"], w["params"]
        model.eval()
        for c, ck in enumerate(w["checkpoints"]):
            with torch.no_grad():
                for p, value in zip(params, ck.weights, strict=True):
                    p.copy_(value)
            for j, r in enumerate(inputs.rendered):
                ids = torch.tensor([r.prompt_ids + r.completion_ids])
                labels = ids.clone()
                labels[0, : len(r.prompt_ids)] = -100
                logits = model(input_ids=ids).logits[0, :-1]
                loss = torch.nn.functional.cross_entropy(logits, labels[0, 1:], ignore_index=-100)
                g = torch.cat([x.reshape(-1) for x in torch.autograd.grad(loss, params)]).double()
                m = 0.9 * ck.exp_avg.double() + 0.1 * g
                v = 0.999 * ck.exp_avg_sq.double() + 0.001 * g ** 2
                gamma = m / (torch.sqrt(v + 1e-8) if options.get("eps_in_sqrt") else torch.sqrt(v) + 1e-8)
                out[j, c] = {"g": g, "gamma": gamma, "loss": float(loss.detach()), "lr": ck.lr, "steps": ck.steps}
    return out


def test_adam_preconditioned_features_match_a_hand_computation(tiny_inputs):
    before = {k: v.clone() for k, v in tiny_inputs.model.state_dict().items()}
    sig = compute(tiny_inputs, TINY)
    hand = hand_features(tiny_inputs, TINY)
    n_lora = 2 * 8 * ((64 + 64) + (64 + 32))  # 2 layers, r = 8, q_proj 64→64, v_proj 64→32
    assert sig["features"].shape == (6, 2, n_lora) and sig["features"].dtype == np.float32
    assert sig["is_query"].tolist() == [False] * 4 + [True] * 2 and sig["in_warmup"].sum() == 3
    assert not sig["in_warmup"][4:].any()
    np.testing.assert_allclose(sig["checkpoint_lr"], [[0.6e-2, 0.4e-2]] * 6, rtol=1e-12)
    assert sig["checkpoint_epoch"].tolist() == [[1, 2]] * 6 and hand[0, 1]["steps"] == 6
    for (j, c), h in hand.items():
        expected = h["g"] if j >= 4 else h["gamma"]  # queries: plain SGD gradient; pool: Adam-preconditioned
        np.testing.assert_allclose(sig["features"][j, c], (expected / expected.norm()).numpy(), atol=2e-6)
        assert sig["feature_norm"][j, c] == pytest.approx(float(expected.norm()), rel=1e-4)
        assert sig["loss"][j, c] == pytest.approx(h["loss"], rel=1e-5)
        if j < 4:  # the preconditioning changes the direction: a plain gradient would fail the check above
            assert np.abs(sig["features"][j, c] - (h["g"] / h["g"].norm()).numpy()).max() > 1e-2
    assert not torch.equal(hand[0, 0]["gamma"], hand[0, 1]["gamma"])  # two checkpoints, two states
    # the adapters are gone and the base weights untouched; a second run gives the same arrays
    assert not any("lora" in n for n, _ in tiny_inputs.model.named_modules())
    after = tiny_inputs.model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    again = compute(tiny_inputs, TINY)
    for k in sig:
        np.testing.assert_array_equal(sig[k], again[k])


def test_eps_inside_the_square_root_is_the_reference_variant(tiny_inputs):
    opts = {**TINY, "eps_in_sqrt": True}
    sig = compute(tiny_inputs, opts)
    hand = hand_features(tiny_inputs, opts)
    paper = compute(tiny_inputs, TINY)
    for (j, c), h in hand.items():
        if j < 4:
            np.testing.assert_allclose(sig["features"][j, c], (h["gamma"] / h["gamma"].norm()).numpy(), atol=2e-6)
    assert np.abs(sig["features"][:4] - paper["features"][:4]).max() > 1e-3  # ε's place matters
    np.testing.assert_array_equal(sig["features"][4:], paper["features"][4:])  # queries are not preconditioned


def test_projected_features_are_unit_and_follow_the_projection(tiny_inputs):
    opts = {**TINY, "projection_dim": 128, "projection_buffer": 5}  # 12 features, flushed in 3 buffers
    sig = compute(tiny_inputs, opts)
    raw = compute(tiny_inputs, {**TINY, "projection_buffer": 5})
    assert sig["features"].shape == (6, 2, 128)
    np.testing.assert_allclose(np.linalg.norm(sig["features"], axis=2), 1.0, atol=1e-6)
    # projecting the unit raw features with the same matrix gives the same directions
    proj = RademacherProjector(raw["features"].shape[2], 128, seed=0)
    y = proj.project(torch.from_numpy(raw["features"].reshape(12, -1))).numpy()
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    np.testing.assert_allclose(sig["features"].reshape(12, -1), y, atol=1e-5)


# ================================================================================== selection rule, by hand
# C = 2 checkpoints, η = (3, 1) → w = (.75, .25); d = 2. Queries q0 = e1 at both checkpoints, q1 = e2 at both.
Q = np.array([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]])
POOL = {  # id: features; S(z, q0), S(z, q1) → max, mean
    "z0": [[1, 0], [0, 1]],            # .75, .25 → .75, .5
    "z1": [[0, 2], [0, 5]],            # 0, 1 → 1, .5 (scale is irrelevant)
    "z2": [[1, 1], [1, 1]],            # .7071, .7071 → .7071, .7071
    "z3": [[-1, 0], [1, 0]],           # −.5, 0 → 0, −.25
    "z4": [[np.nan, 0], [1, 0]],       # non-finite → dropped
    "z5": [[0, 0], [1, 0]],            # zero gradient at checkpoint 1: no direction → dropped
    "z6": [[1, 0], [1, 0]],            # a query row (scores 1.0) → dropped, never selected
}
P_IDS = list(POOL)


def hand_select(budget: Budget, aggregate: str = "max", lr=(3.0, 1.0)):
    feats = np.array([POOL[i] for i in P_IDS], dtype=np.float64)
    tokens = {i: 10 * (k + 1) for k, i in enumerate(P_IDS)}
    return less_select(P_IDS, feats, Q, np.array(lr), tokens, budget, aggregate, {"z6"})


def test_less_score_is_the_max_over_queries_of_the_lr_weighted_cosine_sum():
    chosen, dropped, scores, stats = hand_select(Budget(fraction=1.0))
    assert chosen == ["z1", "z0", "z2", "z3"]
    got = [scores[i]["less_score"] for i in chosen]
    assert got == pytest.approx([1.0, 0.75, math.sqrt(0.5), 0.0])
    assert [scores[i]["nearest_query"] for i in chosen[:2]] == [1.0, 0.0]
    assert dropped == {"z4": "non_finite_score", "z5": "non_finite_score", "z6": "query_row"}
    assert stats["n_non_finite"] == 2 and stats["n_query_rows_in_pool"] == 1
    assert stats["checkpoint_weights"] == pytest.approx([0.75, 0.25])
    sel = Selection.build(P_IDS, chosen, dropped, scores, stats)
    assert sel.stats["counts"] == {"selected": 4, "not_selected": 0, "dropped": 3}
    assert sel.stats["dropped_reasons"] == {"non_finite_score": 2, "query_row": 1}
    # mean over the queries ranks the balanced row first; ties (z0, z1 at .5) break by id
    chosen, _, scores, _ = hand_select(Budget(fraction=1.0), "mean")
    assert chosen == ["z2", "z0", "z1", "z3"] and scores["z3"]["less_score"] == pytest.approx(-0.25)
    # the checkpoint weights matter: η = (1, 3) lifts z3 to .5 (S(z3, q0) = −.25 + .75)
    _, _, scores, _ = hand_select(Budget(fraction=1.0), lr=(1.0, 3.0))
    assert scores["z3"]["less_score"] == pytest.approx(0.5) and scores["z0"]["less_score"] == pytest.approx(0.75)


def test_less_budget_fill_in_samples_and_tokens():
    assert hand_select(Budget(count=2))[0] == ["z1", "z0"]
    assert hand_select(Budget(count=2), "mean")[0] == ["z2", "z0"]
    assert hand_select(Budget(fraction=0.5))[0] == ["z1", "z0", "z2"]  # ⌊.5·7⌋ = 3 of the 7 pool rows
    # tokens z1 20, z0 10, z2 30 …; pool 280 tokens · 0.15 = 42: z1, z0 (30 < 42), z2 crosses and is kept
    chosen, _, _, stats = hand_select(Budget(fraction=0.15, unit="tokens"))
    assert chosen == ["z1", "z0", "z2"] and stats["selected_tokens"] == 60
    score, nearest = less_scores(np.array([POOL["z4"]], dtype=float), Q, np.array([1.0, 1.0]))
    assert np.isnan(score[0]) and nearest[0] == -1


def test_less_selector_validates_its_options():
    with pytest.raises(ValueError, match="aggregate"):
        LESSSelector(aggregate="median")
    with pytest.raises(ValueError, match="n_queries"):
        LESSSelector(n_queries=0)
    with pytest.raises(ValueError, match="checkpoints"):
        LESSSelector(epochs=4, checkpoints=[5])
    with pytest.raises(ValueError, match="multiple of 8"):
        LESSSelector(projection_dim=100)
    with pytest.raises(ValueError, match="unknown option"):
        resolve_options({"lora_rank": 8})
    sel = LESSSelector(checkpoints=[4, 2])
    assert sel.uses_queries and sel.uses_models and not sel.uses_training
    assert resolve_options(sel.signal_options)["kept_epochs"] == [2, 4]


# ==================================================================================================== FLOPs
def test_less_flops_by_hand():
    # the tiny model's shapes: 2 layers, q_proj 64→64, v_proj 64→32 → LoRA r=8: 3584 parameters; P = 106816
    params = ModelParams(106816, 32768, 106816, True, (("q_proj", 64, 64), ("v_proj", 64, 32)) * 2)
    rendered = [Rendered(f"x{k}", [1] * (5 + k), [2] * (3 + k)) for k in range(30)]  # 8 + 2k tokens
    opts = {"seed": 0, "query_ids": ["x28", "x29"], "epochs": 3, "checkpoints": [1, 3], "projection_dim": 64}
    warm = warmup_rows(rendered, resolve_options(opts))
    assert len(warm) == 4  # max(4, ⌊.05·28⌋)
    t_warm = sum(r.n_tokens for r in warm)
    t_all = sum(8 + 2 * k for k in range(30))
    got = signal_cost("less_grads", opts, rendered, params)
    per_token = 4 * 106816 + 6 * 3584  # forward + activation gradients through the model, LoRA weight gradients
    expected = per_token * t_warm * 3 + 2 * per_token * t_all + 2 * 30 * 2 * 3584 * 64
    assert got["tokens"] == t_all and got["flops_uncached"] == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="seed"):
        signal_cost("less_grads", {}, rendered, params)  # the pipeline records "not estimated", never a guess


# ================================================================================ end to end, tiny model
QUERY_TEXTS = [("Name three primary colours.", "Red, yellow and blue."),
               ("Write a haiku about the sea.", "Grey waves fold and break / salt wind over the harbour"),
               ("What is the boiling point of water at sea level?", "100 degrees Celsius.")]


def _write_jsonl(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"instruction": q, "input": "", "response": a}) + "\n" for q, a in rows))
    return path


def test_less_end_to_end_accounts_for_every_row_and_reuses_its_signal(make_cfg, tmp_path):
    queries = _write_jsonl(tmp_path / "queries.jsonl", QUERY_TEXTS)
    gsm = [(r.instruction, r.response) for r in load_source("math/gsm8k/test.jsonl", "gsm8k")][:13]
    pool = _write_jsonl(tmp_path / "pool.jsonl", [QUERY_TEXTS[0], *gsm])  # one pool row is a query
    common = ["selector=less", f"domain.pool_path={pool}", "domain.pool_format=generic", "domain.pool_size=null",
              f"domain.query.path={queries}", "domain.query.format=generic", "domain.query.rows=null",
              "selector.epochs=2", "selector.projection_dim=512", "selector.budget.count=4",
              "pipeline.stages=[score,select]"]
    pipe = Pipeline(make_cfg(*common), tmp_path / "run")
    results = pipe.run()
    recs = {r["id"]: r for r in map(json.loads, (tmp_path / "run" / "selection.jsonl").read_text().splitlines())}
    assert len(recs) == 14 and pipe.accounting["balanced"]
    copy_id = Row.make(QUERY_TEXTS[0][0], "", QUERY_TEXTS[0][1]).id
    assert recs[copy_id]["status"] == "dropped" and recs[copy_id]["reason"] == "query_row"
    sel = results["selection"]
    assert sel["counts"] == {"selected": 4, "not_selected": 9, "dropped": 1}
    assert sel["n_queries_used"] == 3 and sel["n_warmup"] == 4 and sel["checkpoint_epochs"] == [1, 2]

    # recompute the scores from the cached signal with explicit loops
    (npz,) = (Path(pipe.cfg.paths.cache_dir) / "scores").glob("less_grads-*.npz")
    with np.load(npz) as z:
        arrays = {k: z[k] for k in z.files}
    ids = [str(i) for i in arrays["ids"]]
    assert ids[:14] == [r.id for r in pipe.pool] and len(ids) == 16  # the pool, then the 2 queries not in it
    assert arrays["is_query"].sum() == 3 and arrays["features"].shape == (16, 2, 512)
    assert copy_id not in {ids[k] for k in np.flatnonzero(arrays["in_warmup"])}  # queries never warm up
    eta = arrays["checkpoint_lr"][0]
    qk = np.flatnonzero(arrays["is_query"])
    expected = {}
    for k, i in enumerate(ids[:14]):
        per_query = [sum(eta[c] / eta.sum() * float(arrays["features"][k, c] @ arrays["features"][q, c])
                         for c in range(2)) for q in qk]
        expected[i] = max(per_query)
        if i != copy_id:
            assert recs[i]["scores"]["less_score"] == pytest.approx(expected[i], abs=1e-5)
    ranked = sorted((i for i in expected if i != copy_id), key=lambda i: (-expected[i], i))
    selected = sorted((r for r in recs.values() if r["status"] == "selected"), key=lambda r: r["rank"])
    assert [r["id"] for r in selected] == ranked[:4]

    # FLOPs of the signal, by the rule of test_less_flops_by_hand with the real rows
    (ev,) = [e for e in results["cost"]["events"] if e["what"].startswith("less_grads")]
    rendered = {r.id: r for r in pipe.rendered}
    q_rows = [pipe.renderer(r) for r in load_source(str(queries), "generic")]
    all_rows = [rendered[i] for i in ids[:14]] + [r for r in q_rows if r.id not in rendered]
    t_all = sum(r.n_tokens for r in all_rows)
    t_warm = sum(r.n_tokens for r in all_rows if r.id in {ids[k] for k in np.flatnonzero(arrays["in_warmup"])})
    per_token = 4 * 106816 + 6 * 3584
    assert ev["flops_uncached"] == pytest.approx(per_token * (2 * t_warm + 2 * t_all) + 2 * 16 * 2 * 3584 * 512,
                                                 rel=1e-12)
    assert not ev["cached"] and ev["selection"] and results["cost"]["not_estimated"] == []
    seconds = [p["seconds"] for p in results["cache"]["score_store"]["passes"] if p["kind"] == "less_grads"]
    print(f"less_grads on the tiny model: {seconds[0]:.2f} s for 16 rows × 2 checkpoints")

    # another aggregate: a new selection, but the signal comes from the cache
    second = Pipeline(make_cfg(*common, "selector.aggregate=mean", run_name="mean"), tmp_path / "mean").run()
    assert second["cache"]["score_store"]["misses"] == 0 and second["cache"]["score_store"]["hits"] == 1
    recs2 = {r["id"]: r for r in map(json.loads, (tmp_path / "mean" / "selection.jsonl").read_text().splitlines())}
    for k, i in enumerate(ids[:14]):
        if i != copy_id:
            mean = np.mean([sum(eta[c] / eta.sum() * float(arrays["features"][k, c] @ arrays["features"][q, c])
                                for c in range(2)) for q in qk])
            assert recs2[i]["scores"]["less_score"] == pytest.approx(mean, abs=1e-5)
    assert second["selection"]["counts"]["selected"] == 4
