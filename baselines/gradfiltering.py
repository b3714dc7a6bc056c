"""GradFiltering / G-SNR (arXiv 2601.13697, Yuan et al.) — **reconstructed**, docs/methods.md §5.

Public (abstract + third-party summaries): a frozen GPT-2 proxy with an ensemble of M LoRA adapters trained on
the pool with different seeds / data orders; per-example gradient norms w.r.t. each member's LoRA parameters
at an early epoch e1 and a late epoch e2; score = normalised gradient drop (early → late) divided by the
late-stage gradient variance across the ensemble; keep the top 5/10/15%. No code is published, so the exact
formula's ε, var-vs-std, M, e1/e2, the LoRA config and the optimiser are the reconstruction of docs/methods.md §5.2
**[recon]**, all options here:

    n_i^(m,e) = ||∇_{LoRA^(m)} L(x_i)||_2          (signal ``lora_grad_norms``, (N, M, 2): e ∈ {e1, e2})
    μ_i^e     = (1/M) Σ_m n_i^(m,e)
    v_i       = (1/M) Σ_m (n_i^(m,e2) − μ_i^{e2})²   (population variance over members)
    drop_i    = (μ_i^{e1} − μ_i^{e2}) / (μ_i^{e1} + ε)
    G-SNR_i   = drop_i / (v_i + ε)                   (denominator=var, default)
              = drop_i / (sqrt(v_i) + ε)             (denominator=std)
    ε = 1e-8; rank by G-SNR descending (ties: smaller id), take the budget.

Defaults M=4, E=3 epochs, e1=1, e2=E, LoRA r=8 / α=16 on the attention projections (q_proj+v_proj, or c_attn
for GPT-2), AdamW lr 1e-4, batch 8. The proxy is ``model`` (paper: GPT-2; null = the target model).
Budget: the common default 10% (the paper reports 5/10/15%). Rows whose score is non-finite (a non-finite
gradient norm) are dropped with reason ``non_finite_score``. M=1 gives v=0, i.e. a pure (scaled) drop ranking.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from instructdiff.selection import Budget, Selection, SelectionContext, Selector

DENOMINATORS = ("var", "std")


def gsnr(norms: np.ndarray, denominator: str = "var", eps: float = 1e-8) -> dict[str, np.ndarray]:
    """norms (M, 2, N) — [:, 0] early, [:, 1] late — → dict of gsnr, drop, var, mu_early, mu_late (each (N,))."""
    norms = np.asarray(norms, dtype=np.float64)
    if norms.ndim != 3 or norms.shape[1] != 2:
        raise ValueError(f"norms must be (M, 2, N), got shape {norms.shape}")
    if denominator not in DENOMINATORS:
        raise ValueError(f"denominator must be one of {DENOMINATORS}, got {denominator!r}")
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        mu_early, mu_late = norms[:, 0].mean(axis=0), norms[:, 1].mean(axis=0)
        var = norms[:, 1].var(axis=0)  # ddof=0: population variance across members
        drop = (mu_early - mu_late) / (mu_early + eps)
        spread = var if denominator == "var" else np.sqrt(var)
        score = drop / (spread + eps)
    return {"gsnr": score, "drop": drop, "var": var, "mu_early": mu_early, "mu_late": mu_late}


def gradfiltering_select(ids: list[str], norms: np.ndarray, tokens: dict[str, int], budget: Budget,
                         denominator: str = "var", eps: float = 1e-8, pool_tokens: int | None = None
                         ) -> tuple[list[str], dict[str, str], dict[str, dict[str, float]], dict[str, Any]]:
    """Rank by G-SNR descending. Returns (selected ids in rank order, dropped id→reason, scores, stats)."""
    parts = gsnr(norms, denominator, eps)
    score = parts["gsnr"]
    if len(score) != len(ids):
        raise ValueError(f"norms cover {len(score)} samples, the pool has {len(ids)}")
    finite = np.isfinite(score)
    dropped = {ids[k]: "non_finite_score" for k in np.flatnonzero(~finite)}
    ranked = sorted(np.flatnonzero(finite).tolist(), key=lambda k: (-score[k], ids[k]))
    total_tokens = pool_tokens if pool_tokens is not None else int(sum(tokens[i] for i in ids))
    chosen = budget.take([ids[k] for k in ranked], tokens, n_pool=len(ids), pool_tokens=total_tokens)
    scores = {i: {name: float(parts[name][k]) for name in ("gsnr", "drop", "var", "mu_early", "mu_late")}
              for k, i in enumerate(ids)}
    sel = [ranked[k] for k in range(len(chosen))]
    stats = {"n_scored": len(ids), "n_non_finite": int((~finite).sum()), "n_members": int(np.shape(norms)[0]),
             "denominator": denominator, "eps": eps, "budget_limit": budget.limit(len(ids), total_tokens),
             "budget_unit": budget.unit, "selected_tokens": int(sum(tokens[i] for i in chosen)),
             "gsnr_selected_min": float(score[sel[-1]]) if sel else None,
             "share_positive_drop": float(np.mean(parts["drop"][finite] > 0)) if finite.any() else None}
    return chosen, dropped, scores, stats


class GradFilteringSelector(Selector):
    uses_models = True  # the selector model's LoRA gradients (ctx.signal)
    # uses_training stays False: the ensemble trains inside the signal, the run's trainer is not used

    def __init__(self, budget: Any = None, model: str | None = None, members: int = 4, epochs: int = 3,
                 early_epoch: int = 1, late_epoch: int | None = None, lora_r: int = 8, lora_alpha: int = 16,
                 lora_dropout: float = 0.0, target_modules: list[str] | None = None,
                 learning_rate: float = 1e-4, batch_size: int = 8, denominator: str = "var",
                 eps: float = 1e-8) -> None:
        super().__init__(budget, model)
        late = int(late_epoch) if late_epoch is not None else int(epochs)
        if int(members) < 1:
            raise ValueError(f"selector.members must be >= 1, got {members}")
        if not 1 <= int(early_epoch) < late <= int(epochs):
            raise ValueError(f"need 1 <= selector.early_epoch < late_epoch <= epochs, got {early_epoch}, "
                             f"{late_epoch}, {epochs}")
        if denominator not in DENOMINATORS:
            raise ValueError(f"selector.denominator must be one of {DENOMINATORS}, got {denominator!r}")
        self.signal_options = {
            "members": int(members), "epochs": int(epochs), "early_epoch": int(early_epoch), "late_epoch": late,
            "lora_r": int(lora_r), "lora_alpha": int(lora_alpha), "lora_dropout": float(lora_dropout),
            "target_modules": None if target_modules is None else [str(t) for t in target_modules],
            "learning_rate": float(learning_rate), "batch_size": int(batch_size),
        }
        self.denominator, self.eps = denominator, float(eps)

    def select(self, ctx: SelectionContext) -> Selection:
        ids = ctx.ids
        ref = ctx.selector_model or ctx.base
        o = self.signal_options
        ctx.log(f"gradfiltering: {o['members']} LoRA members × {o['epochs']} epochs on {ref.name}, gradient norms "
                f"at epochs {o['early_epoch']} and {o['late_epoch']} [recon]")
        arrays = ctx.signal(ref, "lora_grad_norms", **o)
        norms = np.transpose(arrays["grad_norms"], (1, 2, 0))  # (N, M, 2) → (M, 2, N)
        chosen, dropped, scores, stats = gradfiltering_select(ids, norms, ctx.response_tokens, self.budget,
                                                              self.denominator, self.eps, ctx.pool_tokens)
        for k, i in enumerate(ids):
            if "losses" in arrays:
                scores[i]["loss_early"] = float(arrays["losses"][k, :, 0].mean())
                scores[i]["loss_late"] = float(arrays["losses"][k, :, 1].mean())
        stats["selector_model"] = ref.name
        ctx.log(f"gradfiltering: selected {len(chosen)}, {stats['n_non_finite']} non-finite")
        return Selection.build(ids, chosen, dropped, scores, stats)
