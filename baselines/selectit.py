"""SelectIT (Liu et al., NeurIPS'24, arXiv 2402.16705; code Blue-Raincoat/SelectIT), docs/methods.md §7.

The selector model rates each row with K rating prompts (``rating_probs`` signal: one forward per prompt, the
softmax probabilities P_1..P_5 of the tokens "1".."5" after "The answer is: "), then

    token level     p'_j   = P_j / Σ_i P_i                                   (paper)
                    p'_j   = softmax_j(P_j / Σ_i P_i)                         (code_softmax: true; the code's
                                                                             extra softmax, flatter p')
                    S_tok  = (argmax_j p'_j + 1) · (1/(C−1)) · Σ_j (p'_max − p'_j),   C = 5 score classes
    sentence level  S      = mean_k S_tok,k / (1 + α · std_k S_tok,k)        (α = 0.2, population std)

and the highest S are taken until the common budget (the paper keeps the top 20%), ties by id. Rows with a
non-finite S (e.g. all five digit probabilities 0) are dropped with ``non_finite_score``.

Left out: the model level (a parameter-share-weighted sum of S over 7B/13B/70B raters) — one rater here,
``selector.model``. The code divides by (K−1) with K the number of prompts (equal to C only when K = 5);
this divides by C−1, the paper's score-class count. The rating prompts are our own five (conf YAML), in the
spirit of the paper's (its nine are not reproduced).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from instructdiff.selection import Selection, SelectionContext, Selector


def normalise_probs(probs: np.ndarray, code_softmax: bool = False) -> np.ndarray:
    """p' over the last axis: P/ΣP (paper), then softmax of that when ``code_softmax`` (reference code)."""
    probs = np.asarray(probs, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = probs / probs.sum(axis=-1, keepdims=True)
    if code_softmax:
        e = np.exp(p)
        p = e / e.sum(axis=-1, keepdims=True)
    return p


def token_scores(p: np.ndarray) -> np.ndarray:
    """S_tok = (argmax + 1) · (1/(C−1)) · Σ_j (p_max − p_j) over the last axis (C classes); NaN where p is."""
    p = np.asarray(p, dtype=np.float64)
    c = p.shape[-1]
    if c < 2:
        raise ValueError("SelectIT needs at least two score classes")
    pmax = p.max(axis=-1)
    spread = (pmax[..., None] - p).sum(axis=-1) / (c - 1)
    arg = np.argmax(np.nan_to_num(p, nan=-np.inf), axis=-1)
    out = (arg + 1) * spread
    return np.where(np.isfinite(p).all(axis=-1), out, np.nan)


def sentence_scores(s_tok: np.ndarray, alpha: float = 0.2) -> np.ndarray:
    """S = mean_k S_tok / (1 + α · std_k S_tok) over the last axis (population std, ddof 0)."""
    s_tok = np.asarray(s_tok, dtype=np.float64)
    return s_tok.mean(axis=-1) / (1.0 + alpha * s_tok.std(axis=-1))


def selectit_scores(probs: np.ndarray, alpha: float = 0.2, code_softmax: bool = False
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(S per row (N,), S_tok per row and prompt (N, K)) from raw digit probabilities (N, K, C)."""
    s_tok = token_scores(normalise_probs(probs, code_softmax))
    return sentence_scores(s_tok, alpha), s_tok


class SelectITSelector(Selector):
    uses_models = True

    def __init__(self, budget: Any = None, model: str | None = None, prompts: list[str] | None = None,
                 alpha: float = 0.2, chat: bool = False, code_softmax: bool = False) -> None:
        super().__init__(budget, model)
        prompts = [str(p) for p in (prompts or [])]
        if not prompts:
            raise ValueError("selector.prompts must list at least one rating instruction")
        if len(set(prompts)) != len(prompts):
            raise ValueError("selector.prompts holds the same rating instruction twice")
        if float(alpha) < 0:
            raise ValueError(f"selector.alpha must be >= 0, got {alpha}")
        self.prompts = prompts
        self.alpha = float(alpha)
        self.chat = bool(chat)
        self.code_softmax = bool(code_softmax)

    def select(self, ctx: SelectionContext) -> Selection:
        ids = ctx.ids
        ref = ctx.selector_model or ctx.base
        probs = np.asarray(ctx.signal(ref, "rating_probs", prompts=self.prompts, chat=self.chat)["probs"])
        if probs.shape != (len(ids), len(self.prompts), 5):
            raise ValueError(f"rating_probs returned shape {probs.shape}, expected {(len(ids), len(self.prompts), 5)}")
        s, s_tok = selectit_scores(probs, self.alpha, self.code_softmax)
        dropped = {ids[k]: "non_finite_score" for k in np.flatnonzero(~np.isfinite(s))}
        ranked = sorted((k for k in range(len(ids)) if ids[k] not in dropped), key=lambda k: (-s[k], ids[k]))
        chosen = self.budget.take([ids[k] for k in ranked], ctx.response_tokens, len(ids), ctx.pool_tokens)
        scores = {}
        for k, i in enumerate(ids):
            scores[i] = {"selectit": float(s[k]), "s_tok_mean": float(np.mean(s_tok[k])),
                         "s_tok_std": float(np.std(s_tok[k])),
                         **{f"s_tok_{j}": float(v) for j, v in enumerate(s_tok[k])},
                         "digit_mass": float(np.mean(probs[k].sum(-1)))}
        by_id = dict(zip(ids, s.tolist(), strict=True))
        stats = {"scoring_model": ref.name, "n_prompts": len(self.prompts), "alpha": self.alpha,
                 "code_softmax": self.code_softmax, "chat": self.chat, "n_scored": len(ids),
                 "n_non_finite": len(dropped), "budget_limit": self.budget.limit(len(ids), ctx.pool_tokens),
                 "budget_unit": self.budget.unit, "selected_tokens": int(sum(ctx.response_tokens[i] for i in chosen)),
                 "selectit_selected_min": by_id[chosen[-1]] if chosen else None,
                 "mean_digit_mass": float(np.mean(probs.sum(-1)))}
        ctx.log(f"selectit: {len(self.prompts)} rating prompts, mean P(digit) mass {stats['mean_digit_mass']:.3g}, "
                f"selected {len(chosen)}")
        return Selection.build(ids, chosen, dropped, scores, stats)
