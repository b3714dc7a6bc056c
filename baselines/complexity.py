"""Complexity-aware fine-tuning (Goncharov et al., arXiv 2506.21220; code LabARSS/complexity-aware-fine-tuning):
docs/methods.md §6, the entropy split used as a selector.

1. ``h`` = entropy (nats, full vocabulary) of the selector model's distribution over the FIRST response token:
   raw logits at the last prompt position of a plain forward pass (the ScoreStore's ``first_token_entropy``;
   the reference reads ``generate(...).scores``, which are logits after the generation config's processors —
   docs/methods.md §6.4 — so the raw forward pass is used instead).
2. ``norm = h / max(h)`` over the valid pool (rows with a non-finite ``h`` are dropped first,
   ``non_finite_score``).
3. Pool quartiles ``Q25``, ``Q75`` of ``norm`` (linear interpolation, as pandas/numpy ``quantile``):
   easy ``norm < Q25``; medium ``Q25 <= norm < Q75``; hard ``norm >= Q75``. (The reference notebook's medium
   filter has no upper bound, so its "medium" draws hard items too; that bug is not reproduced.)
4. The budget is filled from ``bands`` in their order of preference (default ``[hard]``), each band ordered by
   ``order_within_band``: ``random`` (seeded by the run's seed; the paper draws 1000 per band with seed 42),
   ``highest`` or ``lowest`` entropy first (ties by id). Rows of the other bands are not selected; when the
   requested bands hold less than the budget the selection is smaller (``stats["budget_shortfall"]``).

The paper then trains easy + medium with plain SFT and hard with distilled chain-of-thought; this selector only
does the split and the pick. Each row's band is in its scores as ``band`` (0 easy, 1 medium, 2 hard).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from instructdiff.rows import Row
from instructdiff.selection import Budget, Selection, SelectionContext, Selector

BANDS = ("easy", "medium", "hard")  # band code = index
ORDERS = ("random", "highest", "lowest")


def complexity_bands(h: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(normalised entropy, band code per row, Q25, Q75) for finite entropies ``h``."""
    h = np.asarray(h, dtype=np.float64)
    if h.size == 0:
        return h, np.zeros(0, dtype=np.int64), float("nan"), float("nan")
    if not np.isfinite(h).all():
        raise ValueError("complexity_bands needs finite entropies; drop the others first")
    top = float(h.max())
    norm = h / top if top > 0 else np.zeros_like(h)
    q25, q75 = (float(q) for q in np.quantile(norm, [0.25, 0.75]))
    band = np.where(norm < q25, 0, np.where(norm < q75, 1, 2)).astype(np.int64)
    return norm, band, q25, q75


def _check_bands(bands: Any) -> list[str]:
    bands = [bands] if isinstance(bands, str) else list(bands)
    bad = [b for b in bands if b not in BANDS]
    if not bands or bad or len(set(bands)) != len(bands):
        raise ValueError(f"bands must be a non-empty list of distinct names from {BANDS}, got {bands}")
    return bands


def complexity_select(ids: list[str], h: np.ndarray, tokens: dict[str, int], budget: Budget,
                      bands: Any = ("hard",), order_within_band: str = "random",
                      random_keys: np.ndarray | None = None, pool_tokens: int | None = None,
                      ) -> tuple[list[str], dict[str, str], dict[str, dict[str, float]], dict[str, Any]]:
    """Pure selection step: (selected ids, dropped id→reason, scores id→{norm_entropy, band}, stats).

    ``random_keys`` (one float per row, pool order) orders rows within a band when order_within_band=random.
    """
    bands = _check_bands(bands)
    if order_within_band not in ORDERS:
        raise ValueError(f"order_within_band must be one of {ORDERS}, got {order_within_band!r}")
    if order_within_band == "random" and random_keys is None:
        raise ValueError("order_within_band=random needs random_keys")
    h = np.asarray(h, dtype=np.float64)
    finite = np.isfinite(h)
    dropped = {ids[k]: "non_finite_score" for k in np.flatnonzero(~finite)}
    valid = np.flatnonzero(finite)
    norm, band, q25, q75 = complexity_bands(h[valid])
    scores = {ids[k]: {"norm_entropy": float(norm[j]), "band": int(band[j])} for j, k in enumerate(valid)}
    ordered: list[str] = []
    for name in bands:
        members = [j for j in range(len(valid)) if band[j] == BANDS.index(name)]
        if order_within_band == "random":
            key = lambda j: (float(random_keys[valid[j]]), ids[valid[j]])  # noqa: E731
        elif order_within_band == "highest":
            key = lambda j: (-norm[j], ids[valid[j]])  # noqa: E731
        else:
            key = lambda j: (norm[j], ids[valid[j]])  # noqa: E731
        ordered.extend(ids[valid[j]] for j in sorted(members, key=key))
    total = pool_tokens if pool_tokens is not None else int(sum(tokens[i] for i in ids))
    chosen = budget.take(ordered, tokens, n_pool=len(ids), pool_tokens=total)
    limit = budget.limit(len(ids), total)
    used = len(chosen) if budget.unit == "samples" else int(sum(tokens[i] for i in chosen))
    chosen_set = set(chosen)
    stats = {"n_scored": len(ids), "n_non_finite": len(dropped), "q25": q25, "q75": q75,
             "max_entropy": float(h[valid].max()) if valid.size else None,
             "band_counts": {b: int((band == c).sum()) for c, b in enumerate(BANDS)},
             "selected_per_band": {b: sum(1 for j, k in enumerate(valid) if band[j] == c and ids[k] in chosen_set)
                                   for c, b in enumerate(BANDS)},
             "bands": bands, "order_within_band": order_within_band, "budget_limit": limit,
             "budget_unit": budget.unit, "selected_tokens": int(sum(tokens[i] for i in chosen)),
             "budget_shortfall": max(0, limit - used), "band_codes": {b: c for c, b in enumerate(BANDS)}}
    return chosen, dropped, scores, stats


class ComplexitySelector(Selector):
    """First-answer-token entropy quartile bands (see the module docstring)."""

    uses_models = True

    def __init__(self, budget: Any = None, model: str | None = None, bands: Any = ("hard",),
                 order_within_band: str = "random") -> None:
        super().__init__(budget, model)
        self.bands = _check_bands(bands)
        if order_within_band not in ORDERS:
            raise ValueError(f"selector.order_within_band must be one of {ORDERS}, got {order_within_band!r}")
        self.order_within_band = order_within_band

    def select(self, ctx: SelectionContext) -> Selection:
        ids = ctx.ids
        h = ctx.score(ctx.selector_model, "selector").aligned("first_token_entropy", ids)
        keys = ctx.rng.random(len(ids))
        chosen, dropped, band_scores, stats = complexity_select(
            ids, h, ctx.response_tokens, self.budget, self.bands, self.order_within_band, keys, ctx.pool_tokens)
        ctx.log(f"complexity: Q25={stats['q25']:.4g} Q75={stats['q75']:.4g} bands {stats['band_counts']}; "
                f"selected {len(chosen)} from {self.bands}")
        scores = {i: {"first_token_entropy": float(v), **band_scores.get(i, {}),
                      "response_tokens": int(ctx.response_tokens[i])} for i, v in zip(ids, h, strict=True)}
        stats["selector_model"] = ctx.selector_model.name if ctx.selector_model is not None else None
        return Selection.build(ids, chosen, dropped, scores, stats)


def complexity_aware_rows(rows: list[Row], ctx: SelectionContext, domain: Any) -> tuple[list[Row], dict[str, Any]]:
    """Complexity-aware training (docs/methods.md §6.3), whatever the selector: easy and medium rows train on
    the final answer only, hard rows on the full chain of thought. Bands are the pool quartiles of the base
    model's first-answer-token entropy; ``domain.answer_marker`` splits reasoning from the answer.

    The pipeline calls this for ``trainer.complexity_aware=true`` (it finds it through
    conf/selector/complexity.yaml, so the framework names no plugin); returns the rows to train on and the counts
    that go to results.json."""
    marker = domain.get("answer_marker")
    if not marker:
        raise ValueError(f"trainer.complexity_aware needs domain.answer_marker (the string before the final "
                         f"answer, e.g. GSM8K's '####'); domain {domain.get('name')} has none")
    h = ctx.score(ctx.base, "base").aligned("first_token_entropy", ctx.ids)
    finite = np.isfinite(h)
    _, codes, q25, q75 = complexity_bands(h[finite])
    band_of = dict(zip([i for i, ok in zip(ctx.ids, finite, strict=True) if ok], codes.tolist(), strict=True))
    out, counts = [], {"easy": 0, "medium": 0, "hard": 0, "no_band": 0, "answer_only": 0, "no_marker": 0}
    for r in rows:
        band = band_of.get(r.id)
        counts[BANDS[band] if band is not None else "no_band"] += 1
        if band is None or BANDS[band] == "hard":
            out.append(r)
            continue
        cut = r.response.rfind(marker)
        if cut < 0:
            counts["no_marker"] += 1  # nothing to shorten: trained on the full response, and counted
            out.append(r)
            continue
        counts["answer_only"] += 1
        out.append(replace(r, response=r.response[cut:].strip()))
    ctx.log(f"complexity-aware training: {counts}")
    return out, {**counts, "q25": q25, "q75": q75}
