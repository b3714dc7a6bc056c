"""LESS (Xia et al. 2024, "LESS: Selecting Influential Data for Targeted Instruction Tuning", arXiv 2402.04333;
reference code princeton-nlp/LESS; the math and every CPU sizing in docs/less.md): keep the pool rows whose
Adam-preconditioned LoRA gradients point where the gradients of the target domain's query rows point.

    Γ̃_i(z)  unit, d-dim random projection of z's Adam-preconditioned LoRA gradient under warm-up checkpoint i
    ∇̃_i(q)  the same for query row q's plain (SGD) gradient           (both: signal ``less_grads``)
    w_i     = η_i / Σ_j η_j                  η_i = mean learning rate of warm-up epoch i (the reference
                                              normalises its checkpoint weights to sum 1)
    S(z, q) = Σ_i w_i · cos(Γ̃_i(z), ∇̃_i(q))
    s(z)    = max_q S(z, q)                  (aggregate: max, default: the best-matched query example)
            = mean_q S(z, q)                 (aggregate: mean: the reference's per-task mean; with one target
                                              task, max over tasks of the task mean is this mean)

and the highest s(z) fill the budget (``Budget.take``), ties by id. The warm-up (a seeded 5% slice of the pool,
4 epochs of LoRA) runs inside the signal, once for pool and query rows together, so both are measured against
the same checkpoints; the whole signal is one ScoreStore entry keyed by every option, the seed and the query ids.

Rows: a pool row whose feature is non-finite under some checkpoint (a NaN/inf gradient, or a zero one: no
direction) is dropped ``non_finite_score`` and counted, never ranked; a pool row that *is* a query row (same
content id) is dropped ``query_row``, as in rds: selecting it would train on the target examples themselves.
Query rows with an unusable feature are left out of the max/mean and counted.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from instructdiff.selection import Budget, Selection, SelectionContext, Selector

AGGREGATES = ("max", "mean")


def _unit(x: np.ndarray) -> np.ndarray:
    """Unit vectors along the last axis; NaN where the vector is non-finite or zero."""
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    ok = np.isfinite(norm) & (norm > 0)
    return np.where(ok, x / np.where(ok, norm, 1.0), np.nan)


def checkpoint_weights(lr: np.ndarray) -> np.ndarray:
    """w_i = η_i / Σ η_j; an error when the η are not positive (e.g. one warm-up step, which has lr 0)."""
    lr = np.asarray(lr, dtype=np.float64)
    if lr.ndim != 1 or not len(lr) or not np.isfinite(lr).all() or (lr < 0).any() or lr.sum() <= 0:
        raise ValueError(f"LESS needs non-negative checkpoint learning rates with a positive sum, got {lr.tolist()}"
                         " (a warm-up of a single optimiser step runs at lr 0: more rows or epochs)")
    return lr / lr.sum()


def influence(pool: np.ndarray, queries: np.ndarray, lr: np.ndarray) -> np.ndarray:
    """(N, Q) S(z, q) = Σ_i w_i cos(pool[z, i], queries[q, i]) for pool (N, C, d), queries (Q, C, d), η (C,)."""
    pool, queries = np.asarray(pool, dtype=np.float64), np.asarray(queries, dtype=np.float64)
    if pool.ndim != 3 or queries.ndim != 3 or pool.shape[1:] != queries.shape[1:]:
        raise ValueError(f"features must be (N, C, d) and (Q, C, d), got {pool.shape} and {queries.shape}")
    w = checkpoint_weights(lr)
    if len(w) != pool.shape[1]:
        raise ValueError(f"{len(w)} checkpoint learning rates for {pool.shape[1]} checkpoints")
    up, uq = _unit(pool), _unit(queries)
    return sum(w[i] * (up[:, i] @ uq[:, i].T) for i in range(len(w)))  # a NaN feature gives a NaN row


def less_scores(pool: np.ndarray, queries: np.ndarray, lr: np.ndarray, aggregate: str = "max"
                ) -> tuple[np.ndarray, np.ndarray]:
    """(score (N,), index of the best-matched query (N,), −1 where the score is NaN)."""
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    if len(queries) == 0:
        raise ValueError("LESS needs at least one query feature")
    sim = influence(pool, queries, lr)
    score = sim.max(axis=1) if aggregate == "max" else sim.mean(axis=1)  # a NaN row stays NaN
    nearest = np.full(len(score), -1)
    finite = np.isfinite(score)
    if finite.any():
        nearest[finite] = np.argmax(sim[finite], axis=1)
    return score, nearest


def less_select(ids: list[str], pool: np.ndarray, queries: np.ndarray, lr: np.ndarray, tokens: dict[str, int],
                budget: Budget, aggregate: str = "max", query_row_ids: Any = (), pool_tokens: int | None = None
                ) -> tuple[list[str], dict[str, str], dict[str, dict[str, float]], dict[str, Any]]:
    """Rank the pool by s(z), drop query rows and non-finite scores, take the budget.

    Returns (selected ids in rank order, dropped id → reason, per-row scores, stats)."""
    if len(pool) != len(ids):
        raise ValueError(f"features cover {len(pool)} rows, the pool has {len(ids)}")
    score, nearest = less_scores(pool, queries, lr, aggregate)
    query_rows = set(query_row_ids)
    dropped: dict[str, str] = {}
    for k, i in enumerate(ids):
        if i in query_rows:
            dropped[i] = "query_row"
        elif not np.isfinite(score[k]):
            dropped[i] = "non_finite_score"
    kept = [k for k, i in enumerate(ids) if i not in dropped]
    ranked = [ids[k] for k in sorted(kept, key=lambda k: (-score[k], ids[k]))]
    total_tokens = pool_tokens if pool_tokens is not None else int(sum(tokens[i] for i in ids))
    chosen = budget.take(ranked, tokens, len(ids), total_tokens)
    scores = {i: {"less_score": float(score[k]),
                  "nearest_query": float(nearest[k]) if nearest[k] >= 0 else float("nan")}
              for k, i in enumerate(ids)}
    by_id = {i: k for k, i in enumerate(ids)}
    stats = {"aggregate": aggregate, "n_scored": len(ids), "checkpoint_lr": [float(x) for x in lr],
             "checkpoint_weights": checkpoint_weights(lr).tolist(),
             "n_query_rows_in_pool": sum(r == "query_row" for r in dropped.values()),
             "n_non_finite": sum(r == "non_finite_score" for r in dropped.values()),
             "budget_limit": budget.limit(len(ids), total_tokens), "budget_unit": budget.unit,
             "selected_tokens": int(sum(tokens[i] for i in chosen)),
             "less_selected_min": float(score[by_id[chosen[-1]]]) if chosen else None}
    return chosen, dropped, scores, stats


class LESSSelector(Selector):
    uses_models = True    # the selector model's LoRA gradients rank the pool
    uses_queries = True   # matched against domain.query
    # uses_training stays False: the warm-up is the signal's own LoRA run, the run's trainer is not used

    def __init__(self, budget: Any = None, model: str | None = None, n_queries: int | None = 16,
                 aggregate: str = "max", warmup_fraction: float = 0.05, warmup_min_rows: int = 4, epochs: int = 4,
                 checkpoints: list[int] | None = None, batch_size: int = 1, learning_rate: float = 2e-5,
                 warmup_ratio: float = 0.03, max_grad_norm: float | None = 1.0, lora_r: int = 8,
                 lora_alpha: float = 32, lora_dropout: float = 0.1, target_modules: list[str] | None = None,
                 projection_dim: int | None = 8192, projection_seed: int = 0, projection_buffer: int = 64,
                 eps_in_sqrt: bool = False) -> None:
        super().__init__(budget, model)
        from instructdiff.signals.less_grads import resolve_options

        if aggregate not in AGGREGATES:
            raise ValueError(f"selector.aggregate must be one of {AGGREGATES}, got {aggregate!r}")
        if n_queries is not None and int(n_queries) < 1:
            raise ValueError(f"selector.n_queries must be >= 1 or null (the whole query set), got {n_queries}")
        self.aggregate = aggregate
        self.n_queries = None if n_queries is None else int(n_queries)
        options = {
            "warmup_fraction": float(warmup_fraction), "warmup_min_rows": int(warmup_min_rows),
            "epochs": int(epochs), "checkpoints": None if checkpoints is None else [int(e) for e in checkpoints],
            "batch_size": int(batch_size), "learning_rate": float(learning_rate),
            "warmup_ratio": float(warmup_ratio), "max_grad_norm": None if not max_grad_norm else float(max_grad_norm),
            "lora_r": int(lora_r), "lora_alpha": float(lora_alpha), "lora_dropout": float(lora_dropout),
            "target_modules": None if target_modules is None else [str(t) for t in target_modules],
            "projection_dim": None if projection_dim is None else int(projection_dim),
            "projection_seed": int(projection_seed), "projection_buffer": int(projection_buffer),
            "eps_in_sqrt": bool(eps_in_sqrt),
        }
        resolve_options(options)  # a bad option fails here, before any model is loaded
        self.signal_options = options

    def select(self, ctx: SelectionContext) -> Selection:
        ctx.require("less", "signal", "queries")
        ids = ctx.ids
        ref = ctx.selector_model or ctx.base
        queries = ctx.queries(self.n_queries)
        in_pool = set(ids)
        extra = [q for q in queries if q.id not in in_pool]
        o = self.signal_options
        ctx.log(f"less: LoRA warm-up ({o['epochs']} epochs on {o['warmup_fraction']:.0%} of the pool) and gradient "
                f"features of {len(ids)} pool + {len(extra)} query rows on {ref.name}")
        # one call: pool and query rows meet the same warm-up checkpoints; the seed keys the cache (the
        # ScoreStore key holds no seed of its own)
        arrays = ctx.signal(ref, "less_grads", rows=ctx.pool + extra, query_ids=[q.id for q in queries],
                            seed=int(ctx.seed), **o)
        sig_ids = [str(i) for i in arrays["ids"]]
        pos = {i: k for k, i in enumerate(sig_ids)}
        missing = [i for i in ids if i not in pos]
        if missing:
            raise RuntimeError(f"less_grads holds no features for {len(missing)} pool rows (first {missing[0]})")
        feats = arrays["features"]
        is_query = np.asarray(arrays["is_query"], dtype=bool)
        lr = np.asarray(arrays["checkpoint_lr"][0], dtype=np.float64)
        q_idx = np.flatnonzero(is_query)
        usable = np.isfinite(feats[q_idx]).all(axis=(1, 2))
        if not usable.any():
            raise ValueError(f"none of the {len(queries)} query rows has a usable gradient feature (too long for "
                             "the renderer, or non-finite); check domain.query")
        q_used = q_idx[usable]
        pool_idx = np.array([pos[i] for i in ids])
        chosen, dropped, scores, stats = less_select(ids, feats[pool_idx], feats[q_used], lr, ctx.response_tokens,
                                                     self.budget, self.aggregate, {q.id for q in queries},
                                                     ctx.pool_tokens)
        in_warmup = np.asarray(arrays["in_warmup"], dtype=bool)
        for k, i in enumerate(ids):
            scores[i]["in_warmup"] = float(in_warmup[pool_idx[k]])
        stats.update({
            "scoring_model": ref.name, "n_queries_asked": self.n_queries, "n_queries_loaded": len(queries),
            "n_queries_used": int(len(q_used)), "n_queries_unusable": len(queries) - int(len(q_used)),
            "query_ids": [sig_ids[k] for k in q_used],
            "checkpoint_epochs": [int(e) for e in arrays["checkpoint_epoch"][0]],
            "n_warmup": int(in_warmup.sum()), "warmup_ids": [sig_ids[k] for k in np.flatnonzero(in_warmup)],
            "projection_dim": o["projection_dim"], "eps_in_sqrt": o["eps_in_sqrt"]})
        ctx.log(f"less: {stats['n_queries_used']} queries, {stats['n_query_rows_in_pool']} query rows in the pool "
                f"dropped, {stats['n_non_finite']} non-finite; selected {len(chosen)} (scored by {ref.name})")
        return Selection.build(ids, chosen, dropped, scores, stats)
