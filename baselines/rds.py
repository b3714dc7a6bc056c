"""RDS+ (representation-based data selection; Ivison et al. 2025, "Large-Scale Data Selection for Instruction
Tuning", arXiv 2503.01807, §3): keep the pool samples whose embeddings are closest to a few target-domain examples.

    e(x)     = Σ_i w_i h_i(x),  w_i = i / Σ_j j     position-weighted mean of the selector model's final-layer
                                                  hidden states over prompt + response (``rds_embedding`` signal)
    sim(x,q) = e(x)·e(q) / (‖e(x)‖ ‖e(q)‖)          cosine
    s(x)     = max_q sim(x, q)                     (aggregate: max, default) | mean_q sim(x, q) (aggregate: mean)

and the highest s(x) fill the budget (``Budget.take``: samples, or response tokens with the crossing sample kept),
ties by id. The queries are the first ``n_queries`` rows of the domain's ``query`` set (conf/domain/*.yaml,
instructdiff/queries.py), which is disjoint from the domain's eval items.

Taken from the paper: final-layer hidden states of the selector model (the paper uses the base model being
trained, ``selector.model: null`` here), position-weighted mean pooling over the whole sample, cosine similarity,
top-k by score. **Reconstructed**: the paper selects for several target tasks by round-robin over per-task
rankings; with one target domain the per-sample score is an aggregate over that domain's queries, max by default
(the nearest query decides; ``mean`` ranks by closeness to the query set as a whole). How many queries, and that
the chat template is part of the embedded text (the same ids as training), are our choices.

Rows: a non-finite or zero-norm embedding (an empty sample) is dropped ``non_finite_score`` and counted, never
ranked; a pool row that *is* a query (same content id; the math and general query sets are held out from the
pool's source file) is dropped ``query_row``: selecting it would train on the target examples themselves.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from instructdiff.selection import Selection, SelectionContext, Selector
from instructdiff.signals.rds_embedding import WEIGHTINGS

AGGREGATES = ("max", "mean")


def cosine_to_queries(pool: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """(N, Q) cosine similarities; NaN in a row whose embedding is non-finite or zero (no direction)."""
    pool, queries = np.asarray(pool, dtype=np.float64), np.asarray(queries, dtype=np.float64)
    if pool.ndim != 2 or queries.ndim != 2 or pool.shape[1] != queries.shape[1]:
        raise ValueError(f"embeddings must be (N, d) and (Q, d), got {pool.shape} and {queries.shape}")

    def unit(x: np.ndarray) -> np.ndarray:
        norm = np.linalg.norm(x, axis=1, keepdims=True)
        ok = np.isfinite(norm) & (norm > 0)
        return np.where(ok, x / np.where(ok, norm, 1.0), np.nan)

    return unit(pool) @ unit(queries).T


def rds_scores(pool: np.ndarray, queries: np.ndarray, aggregate: str = "max") -> np.ndarray:
    """(N,) score of each pool embedding: max (or mean) cosine over the query embeddings; NaN where undefined."""
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    if len(queries) == 0:
        raise ValueError("RDS needs at least one query embedding")
    sim = cosine_to_queries(pool, queries)
    return sim.max(axis=1) if aggregate == "max" else sim.mean(axis=1)  # a NaN row stays NaN


class RDSSelector(Selector):
    uses_models = True
    uses_queries = True

    def __init__(self, budget: Any = None, model: str | None = None, weighting: str = "position",
                 aggregate: str = "max", n_queries: int | None = 32) -> None:
        super().__init__(budget, model)
        if weighting not in WEIGHTINGS:
            raise ValueError(f"selector.weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if aggregate not in AGGREGATES:
            raise ValueError(f"selector.aggregate must be one of {AGGREGATES}, got {aggregate!r}")
        if n_queries is not None and int(n_queries) < 1:
            raise ValueError(f"selector.n_queries must be >= 1 or null (the whole query set), got {n_queries}")
        self.weighting, self.aggregate = weighting, aggregate
        self.n_queries = None if n_queries is None else int(n_queries)

    def select(self, ctx: SelectionContext) -> Selection:
        ctx.require("rds", "signal", "queries")
        ids = ctx.ids
        ref = ctx.selector_model or ctx.base
        queries = ctx.queries(self.n_queries)
        pool_emb = ctx.signal(ref, "rds_embedding", weighting=self.weighting)["embedding"]
        q = ctx.signal(ref, "rds_embedding", rows=queries, weighting=self.weighting)
        q_ids = [str(i) for i in q["ids"]]
        q_emb = np.asarray(q["embedding"], dtype=np.float64)
        usable = np.isfinite(q_emb).all(axis=1) & (np.linalg.norm(np.nan_to_num(q_emb), axis=1) > 0)
        if not usable.any():
            raise ValueError(f"none of the {len(queries)} query rows has a usable embedding (all too long for "
                             "the renderer, or empty); check domain.query")
        score = rds_scores(pool_emb, q_emb[usable], self.aggregate)
        nearest = np.full(len(ids), -1)
        finite = np.isfinite(score)
        if finite.any():
            nearest[finite] = np.nanargmax(cosine_to_queries(pool_emb[finite], q_emb[usable]), axis=1)
        query_set = set(q_ids)
        dropped: dict[str, str] = {}
        for k, i in enumerate(ids):
            if i in query_set:
                dropped[i] = "query_row"
            elif not finite[k]:
                dropped[i] = "non_finite_score"
        kept = [k for k, i in enumerate(ids) if i not in dropped]
        ranked = [ids[k] for k in sorted(kept, key=lambda k: (-score[k], ids[k]))]
        chosen = self.budget.take(ranked, ctx.response_tokens, len(ids), ctx.pool_tokens)
        used_ids = [i for i, ok in zip(q_ids, usable, strict=True) if ok]
        scores = {i: {"rds_score": float(score[k]),
                      "nearest_query": float(nearest[k]) if nearest[k] >= 0 else float("nan")}
                  for k, i in enumerate(ids)}
        stats = {"scoring_model": ref.name, "weighting": self.weighting, "aggregate": self.aggregate,
                 "n_queries_asked": self.n_queries, "n_queries_loaded": len(queries),
                 "n_queries_used": len(used_ids), "n_queries_too_long": len(queries) - len(q_ids),
                 "query_ids": used_ids, "n_query_rows_in_pool": sum(r == "query_row" for r in dropped.values()),
                 "n_non_finite": sum(r == "non_finite_score" for r in dropped.values()),
                 "budget_limit": self.budget.limit(len(ids), ctx.pool_tokens), "budget_unit": self.budget.unit,
                 "selected_tokens": int(sum(ctx.response_tokens[i] for i in chosen)),
                 "rds_selected_min": float(score[ids.index(chosen[-1])]) if chosen else None}
        ctx.log(f"rds: {len(used_ids)} queries, {stats['n_query_rows_in_pool']} query rows in the pool dropped, "
                f"{stats['n_non_finite']} non-finite; selected {len(chosen)} (scored by {ref.name})")
        return Selection.build(ids, chosen, dropped, scores, stats)
