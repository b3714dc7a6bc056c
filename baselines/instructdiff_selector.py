"""InstructDiff (arXiv 2601.23006), exactly per docs/methods.md §1.

1. Warmup calibration: train the base on a random α·N slice → calibrated model (warmup rows stay in the
   pool, as in the reference code; ``exclude_warmup`` removes them).
2. Score every pool row under base and calibrated model: ΔNLL = L_base − L_cal, ΔH = H_base − H_cal
   (the reference code's sign; the trim is symmetric, so the paper's opposite sign selects the same rows).
3. Drop floor(γ·n) rows from each end of the ΔNLL order (keep all when 2·floor(γ·n) ≥ n).
4. Take the lowest ΔH until the budget.
5. Rounds k ≥ 2 recalibrate with the model trained (from the base) on round k−1's selection and redo 2–4;
   base scores come from the ScoreStore, so they are computed once.
Non-finite Δ values are dropped and counted before any sort (NaN has no order: quirk 5).
"""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np

from instructdiff.selection import Budget, Selection, SelectionContext, Selector


def instructdiff_select(ids: list[str], delta_nll: np.ndarray, delta_entropy: np.ndarray,
                        tokens: dict[str, int], nll_trim: float, budget: Budget,
                        pool_tokens: int | None = None) -> tuple[list[str], dict[str, str], dict[str, Any]]:
    """Pure selection step on Δ scores: returns (selected ids in ΔH order, dropped id→reason, stats)."""
    if not 0.0 <= nll_trim < 0.5:
        raise ValueError(f"nll_trim must be in [0, 0.5), got {nll_trim}")
    delta_nll = np.asarray(delta_nll, dtype=np.float64)
    delta_entropy = np.asarray(delta_entropy, dtype=np.float64)
    dropped: dict[str, str] = {}
    finite = np.isfinite(delta_nll) & np.isfinite(delta_entropy)
    for k in np.flatnonzero(~finite):
        dropped[ids[k]] = "non_finite_score"
    idx = np.flatnonzero(finite)
    # Sort by (value, id) so ties break the same way on every machine.
    by_nll = sorted(idx.tolist(), key=lambda k: (delta_nll[k], ids[k]))
    n = len(by_nll)
    trim = int(math.floor(nll_trim * n))
    if trim > 0 and 2 * trim < n:
        for k in by_nll[:trim]:
            dropped[ids[k]] = "nll_trim_low"
        for k in by_nll[n - trim:]:
            dropped[ids[k]] = "nll_trim_high"
        kept = by_nll[trim: n - trim]
    else:
        trim = 0
        kept = by_nll
    by_entropy = sorted(kept, key=lambda k: (delta_entropy[k], ids[k]))
    ordered = [ids[k] for k in by_entropy]
    total_tokens = pool_tokens if pool_tokens is not None else int(sum(tokens[i] for i in ids))
    chosen = budget.take(ordered, tokens, n_pool=len(ids), pool_tokens=total_tokens)
    stats = {
        "n_scored": len(ids), "n_non_finite": int((~finite).sum()), "n_trimmed_each_side": trim,
        "n_after_trim": len(kept), "budget_limit": budget.limit(len(ids), total_tokens), "budget_unit": budget.unit,
        "selected_tokens": int(sum(tokens[i] for i in chosen)),
        "delta_entropy_selected_max": float(delta_entropy[by_entropy[len(chosen) - 1]]) if chosen else None,
    }
    return chosen, dropped, stats


class InstructDiffSelector(Selector):
    uses_models = True
    uses_training = True

    def __init__(self, budget: Any = None, warmup_ratio: float = 0.1, nll_trim: float = 0.1, rounds: int = 1,
                 exclude_warmup: bool = False, warmup_seed: int | None = None) -> None:
        super().__init__(budget)  # InstructDiff calibrates and scores the target model itself
        if not 0.0 < warmup_ratio <= 1.0:
            raise ValueError(f"selector.warmup_ratio must be in (0, 1], got {warmup_ratio}")
        if int(rounds) < 1:
            raise ValueError(f"selector.rounds must be >= 1, got {rounds}")
        self.warmup_ratio = float(warmup_ratio)
        self.nll_trim = float(nll_trim)
        self.rounds = int(rounds)
        self.exclude_warmup = bool(exclude_warmup)
        self.warmup_seed = warmup_seed

    def warmup_ids(self, ids: list[str], seed: int) -> list[str]:
        k = max(1, int(math.floor(self.warmup_ratio * len(ids) + 0.5)))  # half up, not Python's half-to-even
        rng = random.Random(seed if self.warmup_seed is None else self.warmup_seed)
        return sorted(rng.sample(ids, k), key=ids.index)

    def select(self, ctx: SelectionContext) -> Selection:
        ids = ctx.ids
        warm = self.warmup_ids(ids, ctx.seed)
        ctx.log(f"instructdiff: warmup calibration on {len(warm)} of {len(ids)} samples (α={self.warmup_ratio})")
        calibrated = ctx.calibrate(ctx.rows(warm), "warmup")
        base_table = ctx.score(ctx.base, "base")
        warm_set = set(warm)
        candidates = [i for i in ids if not (self.exclude_warmup and i in warm_set)]
        base_nll, base_h = base_table.aligned("nll", candidates), base_table.aligned("entropy", candidates)
        rounds_stats = []
        chosen: list[str] = []
        dropped: dict[str, str] = {}
        d_nll = d_h = cal_nll = cal_h = None
        for rnd in range(1, self.rounds + 1):
            if rnd > 1:
                ctx.log(f"instructdiff: round {rnd}: recalibrating on round {rnd - 1}'s {len(chosen)} samples")
                calibrated = ctx.train(ctx.rows(chosen), f"round{rnd - 1}")
            cal_table = ctx.score(calibrated, f"calibrated_r{rnd}")
            cal_nll, cal_h = cal_table.aligned("nll", candidates), cal_table.aligned("entropy", candidates)
            d_nll, d_h = base_nll - cal_nll, base_h - cal_h
            chosen, dropped, stats = instructdiff_select(candidates, d_nll, d_h, ctx.response_tokens,
                                                         self.nll_trim, self.budget, ctx.pool_tokens)
            rounds_stats.append({"round": rnd, **stats})
            ctx.log(f"instructdiff: round {rnd}: selected {len(chosen)}, trimmed {stats['n_trimmed_each_side']}"
                    f" per side, {stats['n_non_finite']} non-finite")
        if self.exclude_warmup:
            for i in warm:
                dropped[i] = "warmup_excluded"
        scores = {}
        for k, i in enumerate(candidates):
            scores[i] = {"nll_base": float(base_nll[k]), "entropy_base": float(base_h[k]),
                         "nll_calibrated": float(cal_nll[k]), "entropy_calibrated": float(cal_h[k]),
                         "delta_nll": float(d_nll[k]), "delta_entropy": float(d_h[k]),
                         "response_tokens": int(ctx.response_tokens[i])}
        return Selection.build(ids, chosen, dropped, scores,
                               {"rounds": rounds_stats, "n_warmup": len(warm), "warmup_ids": warm})
