"""RDS+ (baselines/rds.py), the domains' query sets, the length baseline's budget, and FLOPs accounting (cost.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from instructdiff import CONF_DIR, DATA_DIR
from instructdiff.cost import count_forward_tokens, forward_flops, model_params, training_cost, training_flops
from instructdiff.data import load_source
from instructdiff.models import ModelRef, load_model
from instructdiff.pipeline import Pipeline
from instructdiff.queries import load_queries
from instructdiff.render import user_message
from instructdiff.rows import Row
from instructdiff.selection import SelectionContext
from instructdiff.signals.rds_embedding import pooling_weights
from instructdiff_baselines.length import LengthSelector
from instructdiff_baselines.rds import RDSSelector, cosine_to_queries, rds_scores

# domain=custom has no query set by design (a user's own pool); every shipped domain has one
DOMAINS = sorted(p.stem for p in (CONF_DIR / "domain").glob("*.yaml") if OmegaConf.load(p).get("query") is not None)
TASKS_DIR = Path(__file__).resolve().parents[1] / "instructdiff" / "lm_eval_tasks"


# ============================================================================== RDS+ on constructed vectors
def test_rds_scores_rank_by_cosine_to_the_nearest_query() -> None:
    queries = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    pool = np.array([[10.0, 1.0, 0.0],    # near query 0 (scale must not matter): cos 0.995
                     [0.0, 0.0, 1.0],     # orthogonal to both: 0
                     [1.0, 1.0, 0.0],     # between: 0.707 to each
                     [-1.0, 0.0, 0.0],    # opposite query 0: max is 0 (query 1)
                     [0.0, 0.0, 0.0],     # no direction: NaN, never ranked
                     [np.nan, 1.0, 0.0]])
    s_max = rds_scores(pool, queries, "max")
    assert s_max[:4] == pytest.approx([10 / np.sqrt(101), 0.0, np.sqrt(0.5), 0.0])
    assert np.isnan(s_max[4]) and np.isnan(s_max[5])
    # mean rewards closeness to the set: the in-between row beats the one glued to a single query
    s_mean = rds_scores(pool, queries, "mean")
    assert s_mean[:4] == pytest.approx([(10 + 1) / np.sqrt(101) / 2, 0.0, np.sqrt(0.5), -0.5])
    assert s_mean[2] > s_mean[0] and s_max[0] > s_max[2]
    assert cosine_to_queries(pool[:1], queries).shape == (1, 2)
    with pytest.raises(ValueError, match="aggregate"):
        rds_scores(pool, queries, "median")
    with pytest.raises(ValueError, match="weighting"):
        RDSSelector(weighting="cls")
    with pytest.raises(ValueError, match="n_queries"):
        RDSSelector(n_queries=0)


def test_position_weights_are_i_over_the_sum_of_positions() -> None:
    assert pooling_weights(4, 6, "position").tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.0, 0.0])
    assert pooling_weights(4, 4, "mean").tolist() == pytest.approx([0.25] * 4)
    assert pooling_weights(0, 3, "position").tolist() == [0.0, 0.0, 0.0]


# ============================================================== RDS+ through the real pipeline (tiny model)
QUERY_TEXTS = [("Name three primary colours.", "Red, yellow and blue."),
               ("Write a haiku about the sea.", "Grey waves fold and break / salt wind over the harbour / "
                                                "gulls cry at the tide"),
               ("What is the boiling point of water at sea level?", "100 degrees Celsius.")]


def _write_jsonl(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"instruction": q, "input": "", "response": a}) + "\n" for q, a in rows))
    return path


def _reference_embedding(model, ids: list[int]) -> np.ndarray:
    """Batch-1, unpadded: h_i of the last layer, weights i / Σ j, written out here independently of the signal."""
    with torch.inference_mode():
        h = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0].double()
    w = torch.arange(1, len(ids) + 1, dtype=torch.float64)
    return (w[:, None] * h).sum(0).numpy() / w.sum().item()


def test_rds_selects_the_pool_rows_nearest_to_the_query_set(make_cfg, tmp_path) -> None:
    queries = _write_jsonl(tmp_path / "queries.jsonl", QUERY_TEXTS)
    # the pool: one exact copy of a query (must be dropped, not selected) and GSM8K rows
    gsm = [(r.instruction, r.response) for r in load_source("math/gsm8k/test.jsonl", "gsm8k")][:13]
    pool = _write_jsonl(tmp_path / "pool.jsonl", [QUERY_TEXTS[0], *gsm])
    cfg = make_cfg("selector=rds", f"domain.pool_path={pool}", "domain.pool_format=generic", "domain.pool_size=null",
                   f"domain.query.path={queries}", "domain.query.format=generic", "domain.query.rows=null",
                   "selector.budget.count=4", "pipeline.stages=[score,select]")
    pipe = Pipeline(cfg, tmp_path / "run")
    results = pipe.run()
    recs = {r["id"]: r for r in map(json.loads, (tmp_path / "run" / "selection.jsonl").read_text().splitlines())}
    copy_id = Row.make(*QUERY_TEXTS[0][:1], "", QUERY_TEXTS[0][1]).id
    assert recs[copy_id]["status"] == "dropped" and recs[copy_id]["reason"] == "query_row"
    assert results["selection"]["n_queries_used"] == 3 and results["selection"]["counts"]["selected"] == 4

    # the expected top 4, from embeddings computed here one row at a time (no batching, no padding, no cache)
    model = load_model(pipe.base, "float32", "cpu")
    by_id = {r.id: r for r in pipe.rendered}
    q_rows = load_queries(cfg.domain)
    q_emb = np.stack([_reference_embedding(model, pipe.renderer(r).prompt_ids + pipe.renderer(r).completion_ids)
                      for r in q_rows])
    cand = [i for i in by_id if i != copy_id]
    emb = np.stack([_reference_embedding(model, by_id[i].prompt_ids + by_id[i].completion_ids) for i in cand])
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    expected_score = (unit(emb) @ unit(q_emb).T).max(axis=1)
    expected = [cand[k] for k in sorted(range(len(cand)), key=lambda k: (-expected_score[k], cand[k]))[:4]]
    selected = sorted((r for r in recs.values() if r["status"] == "selected"), key=lambda r: r["rank"])
    assert [r["id"] for r in selected] == expected
    for k, i in enumerate(cand):
        assert recs[i]["scores"]["rds_score"] == pytest.approx(expected_score[k], abs=1e-5)

    # the query embeddings are a cached signal of their own: a second run computes nothing
    second = Pipeline(make_cfg("selector=rds", f"domain.pool_path={pool}", "domain.pool_format=generic",
                               "domain.pool_size=null", f"domain.query.path={queries}",
                               "domain.query.format=generic", "domain.query.rows=null", "selector.budget.count=4",
                               "selector.aggregate=mean", "pipeline.stages=[score,select]", run_name="mean"),
                      tmp_path / "mean").run()
    assert second["cache"]["score_store"]["misses"] == 0 and second["cache"]["score_store"]["hits"] == 2


def test_rds_without_a_query_set_says_what_to_add() -> None:
    with pytest.raises(ValueError, match="domain.query"):
        load_queries(OmegaConf.create({"name": "mine", "pool_path": "x.jsonl"}))


# ================================================================== query sets: disjoint from the eval items
def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _eval_user_turns(task: str) -> list[str]:
    """The user turns lm-eval feeds for ``task``: its task YAML's data file through its own process_docs."""
    import datasets

    from instructdiff.lm_eval_tasks import utils

    text = (TASKS_DIR / f"{task}.yaml").read_text()
    data_file = re.search(r'data_files: "\{DATA_DIR\}/([^"]+)"', text).group(1)
    process = re.search(r"process_docs: !function utils\.(\w+)", text).group(1)
    ds = datasets.load_dataset("json", data_files=str(DATA_DIR / data_file), split="train")
    return [_norm(d["user"]) for d in getattr(utils, process)(ds)]


@pytest.mark.parametrize("domain", DOMAINS)
def test_query_set_is_disjoint_from_the_eval_items(domain: str) -> None:
    cfg = OmegaConf.load(CONF_DIR / "domain" / f"{domain}.yaml")
    queries = load_queries(cfg)
    assert 16 <= len(queries) <= 300
    eval_turns = [t for task in cfg.eval_tasks for t in _eval_user_turns(task)]
    assert eval_turns, domain
    exact = set(eval_turns)
    for q in queries:
        assert _norm(user_message(q)) not in exact, (domain, q.instruction[:80])
        # also not hidden inside a longer eval prompt (HumanEval wraps its code in an instruction)
        needle = _norm(q.instruction)
        assert not any(needle in t for t in eval_turns), (domain, q.instruction[:80])
    # selector.n_queries takes the first n, in file order: the same queries for every seed
    assert [r.id for r in load_queries(cfg, 8)] == [r.id for r in queries[:8]]


def test_medical_and_code_queries_are_outside_their_pool_files() -> None:
    for domain in ("medical", "code"):
        cfg = OmegaConf.load(CONF_DIR / "domain" / f"{domain}.yaml")
        pool_ids = {r.id for src in cfg.pool for r in load_source(src.path, src.format)}
        assert not pool_ids & {r.id for r in load_queries(cfg)}, domain
    assert {r.meta["task_id"] for r in load_queries(OmegaConf.load(CONF_DIR / "domain" / "code.yaml"))} == set(
        range(511, 601))  # MBPP's validation split, as the YAML says


# ======================================================================= length: budget, both units, orders
@pytest.mark.parametrize("unit", ["samples", "tokens"])
@pytest.mark.parametrize("order", ["longest", "shortest"])
def test_length_selector_respects_the_budget(unit: str, order: str) -> None:
    rng = np.random.default_rng(3)
    pool = [Row.make(f"question {k}", "", f"answer {k}") for k in range(40)]
    tokens = {r.id: int(rng.integers(1, 200)) for r in pool}
    base = ModelRef("none", "/nonexistent", "fp")

    def never(*_a, **_k):
        raise AssertionError("length is model-free")

    ctx = SelectionContext(pool=pool, response_tokens=tokens, rng=rng, seed=0, base=base, score=never,
                           calibrate=never, train=never, log=lambda _m: None)
    sel = LengthSelector(budget={"fraction": 0.25, "unit": unit}, order=order).select(ctx)
    chosen = [tokens[i] for i in sel.selected]
    total = sum(tokens.values())
    if unit == "samples":
        assert len(chosen) == 10
    else:  # the crossing sample is kept: everything before it stays under the limit
        limit = int(0.25 * total)
        assert sum(chosen[:-1]) < limit <= sum(chosen)
    rest = [tokens[i] for i in tokens if i not in set(sel.selected)]
    if order == "longest":
        assert chosen == sorted(chosen, reverse=True) and min(chosen) >= max(rest)
    else:
        assert chosen == sorted(chosen) and max(chosen) <= min(rest)
    assert sel.stats["counts"]["selected"] + sel.stats["counts"]["not_selected"] == 40


# ============================================================================== FLOPs: by hand, tiny model
def test_tiny_model_parameters_and_flops_by_hand(tiny_model_cache) -> None:
    spec = OmegaConf.load(CONF_DIR / "model" / "tiny.yaml")
    (path,) = [p for p in (tiny_model_cache / "models").iterdir() if p.name.startswith("tiny-") and p.is_dir()]
    d, inter, layers, heads, kv, vocab = (spec.hidden_size, spec.intermediate_size, spec.num_hidden_layers,
                                          spec.num_attention_heads, spec.num_key_value_heads, spec.vocab_size)
    head_dim = d // heads
    attn = d * d + 2 * d * kv * head_dim + d * d          # q, k, v, o (no biases)
    mlp = 3 * d * inter                                   # gate, up, down
    per_layer = attn + mlp + 2 * d                        # + two RMSNorm weights
    total = layers * per_layer + d + vocab * d            # + final norm + the (tied) embedding / head
    assert total == 106816                                # 2·(12288 + 24576 + 128) + 64 + 32768
    p = model_params(str(path))
    assert (p.total, p.embedding, p.tied) == (total, vocab * d, True)
    assert p.forward == total                             # tied: the table is the head's matmul
    assert p.lora(8, ["q_proj", "v_proj"]) == layers * 8 * ((d + d) + (d + kv * head_dim))  # 3584
    assert forward_flops(p.forward, 1000) == 2 * 106816 * 1000
    assert training_flops(p.forward, 1000, epochs=2) == 6 * 106816 * 1000 * 2
    assert training_flops(p.forward, 1000, lora_params=3584) == (4 * 106816 + 6 * 3584) * 1000
    assert training_flops(p.forward, 1000, checkpointing=True) == 8 * 106816 * 1000
    # max_steps caps the epochs: 3 steps × batch 4 × accumulation 2 over 48 rows is half an epoch
    got = training_cost(p, {"max_steps": 3, "per_device_batch_size": 4, "gradient_accumulation_steps": 2,
                            "epochs": 5}, {"n_samples": 48, "n_tokens": 9000, "steps": 3, "method": "full"})
    assert got["epochs"] == 0.5 and got["flops_uncached"] == 6 * 106816 * 9000 * 0.5


def test_eval_token_counter_counts_each_position_once(tiny_model_cache) -> None:
    (path,) = [p for p in (tiny_model_cache / "models").iterdir() if p.name.startswith("tiny-") and p.is_dir()]
    model = load_model(ModelRef("tiny", str(path), "fp"), "float32", "cpu")
    with count_forward_tokens() as c:
        with torch.inference_mode():
            model(torch.ones(3, 7, dtype=torch.long))         # 21 positions; the inner decoder is not counted
            model.generate(torch.ones(2, 5, dtype=torch.long), max_new_tokens=4, min_new_tokens=4,
                           do_sample=False, pad_token_id=0)   # prefill 2×5, then 3 cached steps of 2×1
    assert (c.tokens, c.calls) == (21 + 10 + 3 * 2, 1 + 4)
    with torch.inference_mode():
        model(torch.ones(1, 3, dtype=torch.long))
    assert c.tokens == 37  # hooks are removed on exit


def test_results_record_stage_flops_and_a_cached_selection_keeps_its_cost(make_cfg, tmp_path) -> None:
    cfg = make_cfg("selector=rds", "domain.pool_size=16", "selector.n_queries=4",
                   "pipeline.stages=[score,select,train]")
    pipe = Pipeline(cfg, tmp_path / "run")
    first = pipe.run()
    cost = first["cost"]
    ev = {e["what"]: e for e in cost["events"]}
    pool_ev = ev["rds_embedding of tiny"]
    # by hand: 2 · P · (prompt + response tokens of every pool row), P = 106816 (the test above)
    pool_tokens = sum(len(r.prompt_ids) + len(r.completion_ids) for r in pipe.rendered)
    assert pool_ev["tokens"] == pool_tokens and pool_ev["flops_uncached"] == 2 * 106816 * pool_tokens
    assert not pool_ev["cached"] and pool_ev["selection"]
    train = first["trainings"][-1]
    # 6 · P per token, and 2 · P more when activation checkpointing (the default) recomputes the forward
    per_param_token = 6 + (2 if cfg.trainer.gradient_checkpointing else 0)
    assert cost["train_flops"] == per_param_token * 106816 * train["n_tokens"] * cfg.trainer.epochs
    assert cost["selection_flops"] == cost["selection_flops_uncached"] == sum(
        e["flops_uncached"] for e in cost["events"] if e["selection"]) > 0
    assert cost["stages"]["score"]["flops"] == cost["selection_flops"]  # rds only scores, never calibrates
    assert cost["selection_seconds"] > 0 and cost["not_estimated"] == []

    second = Pipeline(make_cfg("selector=rds", "domain.pool_size=16", "selector.n_queries=4",
                               "pipeline.stages=[score,select,train]", run_name="again"), tmp_path / "again").run()
    c2 = second["cost"]
    assert c2["selection_flops"] == 0 and c2["train_flops"] == 0 and c2["selection_seconds"] == 0
    assert c2["selection_flops_uncached"] == cost["selection_flops_uncached"]  # what it costs from scratch
    assert c2["train_flops_uncached"] == cost["train_flops"]
