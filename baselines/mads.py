"""MADS: Model-Aware Diverse core-set Selection (arXiv 2605.30857, Bai et al.) — **reconstructed**, docs/methods.md §4.

Public (abstract + introduction only): the features are a small selector model's neuron activation states,
selection is coverage-based for diversity, the core set is 15% of the pool. No code, no method section, no
hyperparameters. Everything else below is the reconstruction of docs/methods.md §4.2 **[recon]**, each guess an option:

1. Activation tags (signal ``activations``): each sample is forwarded through the selector model; per decoder
   layer l the MLP intermediate activation a_{l,j}(t) (SwiGLU act(gate)·up) is aggregated over the sample's
   tokens, A_{l,j} = mean_t max(a_{l,j}(t), 0) [``aggregate``: mean_relu | max; ``tokens``: response | all |
   prompt], and T(z) = ∪_l {(l, j) : j ∈ top-k of A_{l,·}} [``top_k`` = 32; ``layers``: all or a list].
   ``tag_rule=pool_quantile`` keeps only the top-k entries whose A exceeds τ_l, the ``tag_quantile`` of the
   pool's top-k values at layer l ("strongly activated neurons"), so |T(z)| varies between samples.
2. Coverage selection, InsTag's complexity-first diverse sampling:
   ``order=marginal_gain`` (default): lazy greedy max-coverage — repeatedly add the z maximising the gain
   g(z) = |T(z) \\ C| (ties: larger |T(z)|, then smaller id), C ← C ∪ T(z);
   ``order=size``: scan candidates by |T(z)| descending (then id), add z if it covers ≥ 1 new tag.
   In both, when no remaining candidate adds a new tag and the budget is unmet, C is reset to ∅ and
   selection continues on the remainder (a new coverage "pass").
   ``weighted=true``: g(z) = Σ_{tag ∈ T(z) \\ C} idf(tag), idf = log(N / df) over the N scored candidates
   (with order=size a sample then counts as "adding" only if its new tags carry idf > 0).
Budget: the run's common budget (default 10% so every selector is compared at equal size; the paper uses 15%).
Rows whose activation values are non-finite are dropped (``non_finite_score``) before tagging.
"""

from __future__ import annotations

import heapq
from typing import Any

import numpy as np

from instructdiff.selection import Budget, Selection, SelectionContext, Selector

ORDERS = ("marginal_gain", "size")
TAG_RULES = ("topk", "pool_quantile")


def activation_tags(tags: np.ndarray, values: np.ndarray | None = None, rule: str = "topk",
                    quantile: float = 0.75) -> list[np.ndarray]:
    """(N, L, k) neuron indices (+ values) → per-sample sorted int64 tag codes, code = l · I + j."""
    tags = np.asarray(tags, dtype=np.int64)
    if tags.ndim != 3:
        raise ValueError(f"tags must be (N, L, k), got shape {tags.shape}")
    width = int(tags.max()) + 1 if tags.size else 1
    codes = np.arange(tags.shape[1], dtype=np.int64)[None, :, None] * width + tags
    if rule == "topk":
        keep = np.ones(tags.shape, dtype=bool)
    elif rule == "pool_quantile":
        if values is None:
            raise ValueError("tag_rule=pool_quantile needs the activation values")
        values = np.asarray(values, dtype=np.float64)
        if len(values):
            tau = np.quantile(values.transpose(1, 0, 2).reshape(values.shape[1], -1), quantile, axis=1)
        else:
            tau = np.zeros(values.shape[1])
        keep = values > tau[None, :, None]
    else:
        raise ValueError(f"tag_rule must be one of {TAG_RULES}, got {rule!r}")
    return [np.unique(codes[i][keep[i]]) for i in range(len(tags))]


def mads_select(ids: list[str], tag_sets: list[np.ndarray], tokens: dict[str, int], budget: Budget,
                pool_tokens: int | None = None, n_pool: int | None = None, weighted: bool = False,
                order: str = "marginal_gain") -> tuple[list[str], dict[str, dict[str, float]], dict[str, Any]]:
    """Coverage selection over tag sets. Returns (selected ids in pick order, per-id info, stats).

    per-id info: n_tags for every candidate; gain (marginal gain when picked) and pass (coverage pass index,
    0 before the first reset) for the selected ones.
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    n = len(ids)
    if len(tag_sets) != n:
        raise ValueError("one tag set per id")
    # dense tag indices 0..U-1
    all_tags = np.unique(np.concatenate(tag_sets)) if n else np.zeros(0, np.int64)
    sets = [np.searchsorted(all_tags, np.asarray(t, dtype=np.int64)) for t in tag_sets]
    df = np.bincount(np.concatenate(sets), minlength=len(all_tags)) if n else np.zeros(0)
    weight = np.log(n / df) if weighted and n else None
    size = [len(s) for s in sets]
    covered = np.zeros(len(all_tags), dtype=bool)

    def gain(k: int) -> float:
        new = ~covered[sets[k]]
        return float(weight[sets[k][new]].sum()) if weight is not None else int(new.sum())

    total_tokens = pool_tokens if pool_tokens is not None else int(sum(tokens[i] for i in ids))
    n_pool = n if n_pool is None else n_pool
    limit = budget.limit(n_pool, total_tokens)
    picked: list[int] = []
    used = 0
    info: dict[str, dict[str, float]] = {i: {"n_tags": float(size[k])} for k, i in enumerate(ids)}
    resets: list[int] = []

    def full() -> bool:
        return len(picked) >= limit if budget.unit == "samples" else used >= limit

    def take(k: int, g: float) -> None:
        nonlocal used
        covered[sets[k]] = True
        picked.append(k)
        used += int(tokens[ids[k]])
        info[ids[k]].update(gain=float(g), **{"pass": float(len(resets))})

    def reset() -> None:
        covered[:] = False
        resets.append(len(picked))

    if order == "marginal_gain":
        heap = [(-gain(k), -size[k], ids[k], k) for k in range(n)]
        heapq.heapify(heap)
        added_since_reset = False
        while heap and not full():
            neg_g, neg_s, i, k = heapq.heappop(heap)
            g = gain(k)
            if g != -neg_g and heap and (-g, neg_s, i) > heap[0][:3]:
                heapq.heappush(heap, (-g, neg_s, i, k))  # stale upper bound: re-queue with the true gain
                continue
            if g <= 0 and added_since_reset:
                # coverage saturated: nothing adds a tag; start a new pass on the remainder
                reset()
                heap.append((-g, neg_s, i, k))
                heap = [(-gain(kk), -size[kk], ids[kk], kk) for _, _, _, kk in heap]
                heapq.heapify(heap)
                added_since_reset = False
                continue
            take(k, g)  # g == 0 only right after a reset: the remainder holds no (weighted) tags at all
            added_since_reset = added_since_reset or g > 0
    else:
        remaining = sorted(range(n), key=lambda k: (-size[k], ids[k]))
        while remaining and not full():
            rest, added = [], False
            for k in remaining:
                g = gain(k) if not full() else 0
                if g > 0:
                    take(k, g)
                    added = True
                else:
                    rest.append(k)
            remaining = rest
            if not added:  # even an empty C gains nothing: the remainder has no tags; take it in order
                for k in remaining:
                    if full():
                        break
                    take(k, 0.0)
                break
            if remaining and not full():
                reset()
    chosen = budget.take([ids[k] for k in picked], tokens, n_pool, total_tokens)
    index = {i: k for k, i in enumerate(ids)}
    chosen_tags = np.unique(np.concatenate([sets[index[i]] for i in chosen])) if chosen else []
    stats = {
        "n_candidates": n, "n_distinct_tags": int(len(all_tags)), "n_tags_covered": int(len(chosen_tags)),
        "coverage": float(len(chosen_tags) / len(all_tags)) if len(all_tags) else None,
        "n_resets": len(resets), "reset_at": resets, "order": order, "weighted": weighted,
        "budget_limit": limit, "budget_unit": budget.unit, "selected_tokens": int(sum(tokens[i] for i in chosen)),
        "mean_tags_per_sample": float(np.mean(size)) if n else None,
    }
    return chosen, info, stats


class MADSSelector(Selector):
    uses_models = True  # one forward pass of the selector model (ctx.signal); no calibration or training

    def __init__(self, budget: Any = None, model: str | None = None, tokens: str = "response",
                 aggregate: str = "mean_relu", top_k: int = 32, layers: list[int] | None = None,
                 tag_rule: str = "topk", tag_quantile: float = 0.75, order: str = "marginal_gain",
                 weighted: bool = False) -> None:
        super().__init__(budget, model)
        if order not in ORDERS:
            raise ValueError(f"selector.order must be one of {ORDERS}, got {order!r}")
        if tag_rule not in TAG_RULES:
            raise ValueError(f"selector.tag_rule must be one of {TAG_RULES}, got {tag_rule!r}")
        if not 0.0 <= float(tag_quantile) < 1.0:
            raise ValueError(f"selector.tag_quantile must be in [0, 1), got {tag_quantile}")
        self.signal_options = {"tokens": tokens, "aggregate": aggregate, "top_k": int(top_k),
                               "layers": None if layers is None else [int(x) for x in layers]}
        self.tag_rule, self.tag_quantile = tag_rule, float(tag_quantile)
        self.order, self.weighted = order, bool(weighted)

    def select(self, ctx: SelectionContext) -> Selection:
        ids = ctx.ids
        ref = ctx.selector_model or ctx.base
        ctx.log(f"mads: activation tags of {len(ids)} samples under {ref.name} ({self.signal_options}) [recon]")
        arrays = ctx.signal(ref, "activations", **self.signal_options)
        tags, values = arrays["tags"], arrays["values"]
        finite = np.isfinite(values).reshape(len(ids), -1).all(axis=1)
        dropped = {ids[k]: "non_finite_score" for k in np.flatnonzero(~finite)}
        keep = np.flatnonzero(finite)
        cand = [ids[k] for k in keep]
        tag_sets = activation_tags(tags[keep], values[keep], self.tag_rule, self.tag_quantile)
        chosen, info, stats = mads_select(cand, tag_sets, ctx.response_tokens, self.budget, ctx.pool_tokens,
                                          len(ids), self.weighted, self.order)
        stats.update(n_non_finite=int((~finite).sum()), n_layers=int(tags.shape[1]), top_k=int(tags.shape[2]),
                     tag_rule=self.tag_rule, selector_model=ref.name)
        ctx.log(f"mads: selected {len(chosen)}, covering {stats['n_tags_covered']} of {stats['n_distinct_tags']}"
                f" tags, {stats['n_resets']} coverage reset(s)")
        return Selection.build(ids, chosen, dropped, info, stats)
