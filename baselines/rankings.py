"""PPL{Min,Mid,Max} and Entropy{Min,Mid,Max}: InstructDiff's own simple baselines (docs/methods.md §1.6).

Rank every pool row by one response statistic of the selector model (the base model unless
``selector.model`` is set), as scored by the ScoreStore (docs/methods.md §0, response tokens only, chat template):

- ``ppl``:     mean response NLL ``L = -(1/T) Σ_t log p_t(y_t)``; PPL = exp(L) has the same order, so the
               ranking uses L and both are recorded in the scores;
- ``entropy``: mean response token entropy ``H = (1/T) Σ_t -Σ_v p_t(v) log p_t(v)`` (full vocabulary).

``pick`` chooses which part of the ascending ranking fills the budget: ``min`` (the lowest values, default),
``max`` (the highest), ``mid`` (a window centred on the median of the ranking: rows are taken in order of
their rank's distance to the median rank, so the budget — in samples or tokens — grows symmetrically around
it). The paper takes the lowest / middle / highest 10%. Ties break by id; rows with a non-finite value are
dropped (``non_finite_score``) before ranking.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from instructdiff.selection import Budget, Selection, SelectionContext, Selector

PICKS = ("min", "mid", "max")


def pick_order(ids: list[str], values: np.ndarray, pick: str) -> tuple[list[str], dict[str, str], dict[str, int]]:
    """(ids in the order the budget takes them, dropped id→reason, id→ascending rank) for ``pick``."""
    if pick not in PICKS:
        raise ValueError(f"pick must be one of {PICKS}, got {pick!r}")
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    dropped = {ids[k]: "non_finite_score" for k in np.flatnonzero(~finite)}
    ascending = sorted(np.flatnonzero(finite).tolist(), key=lambda k: (values[k], ids[k]))
    rank = {ids[k]: r for r, k in enumerate(ascending)}
    if pick == "min":
        order = ascending
    elif pick == "max":
        order = sorted(ascending, key=lambda k: (-values[k], ids[k]))
    else:
        centre = (len(ascending) - 1) / 2.0  # the median's rank (between two ranks when n is even)
        order = [ascending[r] for r in sorted(range(len(ascending)), key=lambda r: (abs(r - centre), r))]
    return [ids[k] for k in order], dropped, rank


def rank_select(ids: list[str], values: np.ndarray, tokens: dict[str, int], budget: Budget, pick: str = "min",
                pool_tokens: int | None = None) -> tuple[list[str], dict[str, str], dict[str, Any]]:
    """Pure selection step: (selected ids in pick order, dropped id→reason, stats)."""
    order, dropped, rank = pick_order(ids, values, pick)
    total = pool_tokens if pool_tokens is not None else int(sum(tokens[i] for i in ids))
    chosen = budget.take(order, tokens, n_pool=len(ids), pool_tokens=total)
    by_id = dict(zip(ids, np.asarray(values, dtype=np.float64).tolist(), strict=True))
    picked = [by_id[i] for i in chosen]
    stats = {"pick": pick, "n_scored": len(ids), "n_non_finite": len(dropped), "n_ranked": len(order),
             "budget_limit": budget.limit(len(ids), total), "budget_unit": budget.unit,
             "selected_tokens": int(sum(tokens[i] for i in chosen)),
             "selected_rank_min": min((rank[i] for i in chosen), default=None),
             "selected_rank_max": max((rank[i] for i in chosen), default=None),
             "selected_value_min": min(picked, default=None), "selected_value_max": max(picked, default=None)}
    return chosen, dropped, stats


class _RankingSelector(Selector):
    """Rank by one ScoreStore signal of the selector model and take the ``pick`` part of the ranking."""

    signal: str = ""
    uses_models = True

    def __init__(self, budget: Any = None, model: str | None = None, pick: str = "min") -> None:
        super().__init__(budget, model)
        if pick not in PICKS:
            raise ValueError(f"selector.pick must be one of {PICKS}, got {pick!r}")
        self.pick = pick

    def extra_scores(self, value: float) -> dict[str, float]:
        return {}

    def select(self, ctx: SelectionContext) -> Selection:
        ids = ctx.ids
        table = ctx.score(ctx.selector_model, "selector")
        values = table.aligned(self.signal, ids)
        chosen, dropped, stats = rank_select(ids, values, ctx.response_tokens, self.budget, self.pick,
                                             ctx.pool_tokens)
        ctx.log(f"{self.name}: {self.pick} of {stats['n_ranked']} ranked rows by {self.signal}: selected "
                f"{len(chosen)}, {stats['n_non_finite']} non-finite")
        scores = {i: {self.signal: float(v), **self.extra_scores(float(v)),
                      "response_tokens": int(ctx.response_tokens[i])} for i, v in zip(ids, values, strict=True)}
        model_name = ctx.selector_model.name if ctx.selector_model is not None else None
        return Selection.build(ids, chosen, dropped, scores, {**stats, "signal": self.signal,
                                                              "selector_model": model_name})


class PPLSelector(_RankingSelector):
    """PPL{Min,Mid,Max}: rank by response mean NLL (= log PPL) of the selector model."""

    signal = "nll"

    def extra_scores(self, value: float) -> dict[str, float]:
        with np.errstate(over="ignore", invalid="ignore"):
            return {"ppl": float(np.exp(value))}


class EntropySelector(_RankingSelector):
    """Entropy{Min,Mid,Max}: rank by response mean token entropy of the selector model."""

    signal = "entropy"
