"""IFD / Cherry LLM (Li et al., NAACL'24, arXiv 2308.12032; code tianyi-lab/Cherry_LLM), docs/methods.md §2.

    s(A|Q) = mean response-token NLL after the instruction      (ctx.score(ref, …, "conditioned") nll)
    s(A)   = mean NLL of the same response tokens, "direct"     (ctx.score(ref, …, "unconditioned") nll)
    IFD    = s(A|Q) / s(A)

Rows with IFD > 1 are dropped (the instruction does not help: a misaligned pair, maintainers in Cherry_LLM#2);
the rest are ranked by IFD, highest first, until the budget. ``keep_equal_one: true`` (default) keeps IFD = 1 —
the paper's "filter out IFD > 1" and both Cherry scripts (``data_by_IFD.py``: ``if rate > 1: continue``;
``select_from_ifd_json.py``: ``ifd <= 1``); ``false`` keeps IFD < 1 strictly, Superfiltering's rule. Ties
break by id; non-finite IFD (e.g. s(A) = 0) is dropped with ``non_finite_score``.

Direct-answer context: Cherry scores the response after the literal prefix ``"### Response:"`` (plus BOS);
here it is the same chat template with an empty user turn (``Renderer.unconditioned``), so both scores cover
exactly the same response token ids and only the instruction differs. Cherry's truncation-driven skips
(max_length 512) do not arise: the renderer drops over-long rows before selection.

Budget: the common rule over the whole pool (``select_from_ifd_json.py``: ``int(len(data)·rate)``) by default;
``budget_after_filter: true`` applies the fraction to the rows left after the IFD filter, as
``data_by_IFD.py`` does (``int(n_remaining·sample_rate)``; why its 5% run passes sample_rate 0.06). The
selection keeps the IFD rank order (Cherry re-sorts the chosen rows by dataset index; training shuffles anyway).

Pre-experienced model (``pre_experienced: true``, docs/methods.md §2.2, "learning from brief experience"): embed each
prompt-formatted instruction alone with the target model (``embedding`` signal, text=prompt: mean last
hidden state, and the prompt's own mean NLL = log PPL from the same forward pass; ``embed_text: instruction``
embeds the bare instruction without the template, Cherry's "wiz" mode), K-means (sklearn,
k = min(clusters, N), random_state 0, n_init 10); per cluster: a cluster with < n members is kept whole, else
keep the members whose instruction PPL lies in the [25th, 75th] percentile of the cluster's, then n evenly
spaced in dataset order (step = len // n); calibrate the target on those rows
(``ctx.calibrate(rows, "ifd_pre_experienced")``) and score IFD with the calibrated model. The calibration
rows stay in the pool. The maintainers skip this step for strong bases (README "V2"): default off.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from instructdiff.selection import Budget, Selection, SelectionContext, Selector

SCORES = ("loss_ratio", "ppl_ratio")


def ifd_values(nll_cond: np.ndarray, nll_uncond: np.ndarray, score: str = "loss_ratio") -> np.ndarray:
    """IFD per row: ``loss_ratio`` = s(A|Q)/s(A) (Cherry); ``ppl_ratio`` = exp(s(A|Q))/exp(s(A)) (Superfiltering)."""
    nll_cond = np.asarray(nll_cond, dtype=np.float64)
    nll_uncond = np.asarray(nll_uncond, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if score == "loss_ratio":
            return nll_cond / nll_uncond
        if score == "ppl_ratio":
            return np.exp(nll_cond - nll_uncond)
    raise ValueError(f"IFD score must be one of {SCORES}, got {score!r}")


def ifd_rank(ids: list[str], ifd: np.ndarray, keep_equal_one: bool, threshold: float = 1.0
             ) -> tuple[list[str], dict[str, str]]:
    """(ids passing the IFD filter, highest IFD first, ties by id; dropped id → reason)."""
    ifd = np.asarray(ifd, dtype=np.float64)
    dropped: dict[str, str] = {}
    kept: list[int] = []
    for k, v in enumerate(ifd.tolist()):
        if not np.isfinite(v):
            dropped[ids[k]] = "non_finite_score"
        elif v > threshold or (v == threshold and not keep_equal_one):
            dropped[ids[k]] = "ifd_above_1"
        else:
            kept.append(k)
    kept.sort(key=lambda k: (-ifd[k], ids[k]))
    return [ids[k] for k in kept], dropped


def ifd_select(ids: list[str], ifd: np.ndarray, tokens: dict[str, int], budget: Budget,
               keep_equal_one: bool = True, budget_after_filter: bool = False,
               pool_tokens: int | None = None) -> tuple[list[str], dict[str, str], dict[str, Any]]:
    """Pure selection on IFD values: (selected ids in IFD order, dropped id → reason, stats)."""
    ranked, dropped = ifd_rank(ids, ifd, keep_equal_one)
    total_tokens = pool_tokens if pool_tokens is not None else int(sum(tokens[i] for i in ids))
    if budget_after_filter:
        n_ref, tok_ref = len(ranked), int(sum(tokens[i] for i in ranked))
    else:
        n_ref, tok_ref = len(ids), total_tokens
    chosen = budget.take(ranked, tokens, n_pool=n_ref, pool_tokens=tok_ref)
    ifd_by_id = dict(zip(ids, np.asarray(ifd, dtype=np.float64).tolist(), strict=True))
    stats = {
        "n_scored": len(ids), "n_non_finite": sum(r == "non_finite_score" for r in dropped.values()),
        "n_ifd_above_1": sum(r == "ifd_above_1" for r in dropped.values()), "n_after_filter": len(ranked),
        "budget_after_filter": bool(budget_after_filter), "budget_limit": budget.limit(n_ref, tok_ref),
        "budget_unit": budget.unit, "selected_tokens": int(sum(tokens[i] for i in chosen)),
        "ifd_selected_min": ifd_by_id[chosen[-1]] if chosen else None,
        "ifd_selected_max": ifd_by_id[chosen[0]] if chosen else None,
    }
    return chosen, dropped, stats


def middle_ppl_sample(labels: np.ndarray, ppl: np.ndarray, n: int, low_pct: float = 25.0,
                      high_pct: float = 75.0) -> list[int]:
    """Cherry's pre-experienced pick: per cluster (label order), members in dataset order; a cluster with
    fewer than n members is kept whole; else members with PPL in [P_low, P_high] of the cluster's PPLs
    (inclusive), then every (len // n)-th of them, n at most (all of them when fewer than n)."""
    labels = np.asarray(labels)
    ppl = np.asarray(ppl, dtype=np.float64)
    picked: list[int] = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < n:
            picked.extend(members.tolist())
            continue
        vals = ppl[members]
        lo, hi = np.percentile(vals, low_pct), np.percentile(vals, high_pct)
        middle = members[(vals >= lo) & (vals <= hi)]
        if len(middle) < n:
            picked.extend(middle.tolist())
        else:
            picked.extend(middle[:: len(middle) // n][:n].tolist())
    return sorted(picked)


class IFDSelector(Selector):
    uses_models = True

    def __init__(self, budget: Any = None, model: str | None = None, keep_equal_one: bool = True,
                 budget_after_filter: bool = False, pre_experienced: bool = False, clusters: int = 100,
                 per_cluster: int = 10, ppl_percentiles: tuple[float, float] | list[float] = (25.0, 75.0),
                 embed_text: str = "prompt") -> None:
        super().__init__(budget, model)
        if int(clusters) < 1 or int(per_cluster) < 1:
            raise ValueError("selector.clusters and selector.per_cluster must be >= 1")
        lo, hi = (float(x) for x in ppl_percentiles)
        if not 0.0 <= lo <= hi <= 100.0:
            raise ValueError(f"selector.ppl_percentiles must satisfy 0 <= low <= high <= 100, got {ppl_percentiles}")
        self.keep_equal_one = bool(keep_equal_one)
        self.budget_after_filter = bool(budget_after_filter)
        self.pre_experienced = bool(pre_experienced)
        # the pre-experienced step fine-tunes the target, so the trainer config belongs in the selection's cache key
        self.uses_training = self.pre_experienced
        self.clusters = int(clusters)
        self.per_cluster = int(per_cluster)
        self.ppl_percentiles = (lo, hi)
        if embed_text not in ("prompt", "instruction"):
            raise ValueError(f"selector.embed_text must be prompt or instruction, got {embed_text!r}")
        self.embed_text = embed_text

    def pre_experienced_ids(self, ctx: SelectionContext, ref) -> tuple[list[str], dict[str, Any]]:
        from sklearn.cluster import KMeans

        sig = ctx.signal(ref, "embedding", text=self.embed_text)
        emb = np.asarray(sig["embedding"], dtype=np.float64)
        ppl = np.exp(np.asarray(sig["nll"], dtype=np.float64))
        ids = ctx.ids
        finite = np.isfinite(emb).all(axis=1) & np.isfinite(ppl)
        idx = np.flatnonzero(finite)
        k = min(self.clusters, len(idx))
        if k < 1:
            raise ValueError("ifd pre_experienced: no row has a finite instruction embedding")
        labels = KMeans(n_clusters=k, random_state=0, n_init=10).fit(emb[idx]).labels_
        local = middle_ppl_sample(labels, ppl[idx], self.per_cluster, *self.ppl_percentiles)
        chosen = [ids[idx[j]] for j in local]
        return chosen, {"n_clusters": k, "n_calibration": len(chosen), "calibration_ids": chosen,
                        "n_embedding_non_finite": int((~finite).sum())}

    def select(self, ctx: SelectionContext) -> Selection:
        ids = ctx.ids
        ref = ctx.selector_model or ctx.base
        stats: dict[str, Any] = {"scoring_model": ref.name, "keep_equal_one": self.keep_equal_one}
        if self.pre_experienced:
            if ref.fingerprint != ctx.base.fingerprint:
                raise ValueError("ifd: pre_experienced calibrates the target model; leave selector.model null")
            calib, pre_stats = self.pre_experienced_ids(ctx, ref)
            ctx.log(f"ifd: pre-experienced calibration on {len(calib)} rows from {pre_stats['n_clusters']} clusters")
            ref = ctx.calibrate(ctx.rows(calib), "ifd_pre_experienced")
            stats["pre_experienced"] = pre_stats
        cond = ctx.score(ref, "ifd")
        uncond = ctx.score(ref, "ifd", "unconditioned")
        nll_c, nll_u = cond.aligned("nll", ids), uncond.aligned("nll", ids)
        ifd = ifd_values(nll_c, nll_u, "loss_ratio")
        chosen, dropped, sel_stats = ifd_select(ids, ifd, ctx.response_tokens, self.budget, self.keep_equal_one,
                                                self.budget_after_filter, ctx.pool_tokens)
        ctx.log(f"ifd: {sel_stats['n_ifd_above_1']} rows above IFD 1, {sel_stats['n_non_finite']} non-finite, "
                f"selected {len(chosen)}")
        scores = {i: {"nll_conditioned": float(nll_c[k]), "nll_unconditioned": float(nll_u[k]),
                      "ifd": float(ifd[k])} for k, i in enumerate(ids)}
        return Selection.build(ids, chosen, dropped, scores, {**stats, **sel_stats})
