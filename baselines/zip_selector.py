"""ZIP / Entropy Law (Yin et al., arXiv 2407.06645; code USTC-StarTeam/ZIP ``ZIP.py``): docs/methods.md §7.

Compression ratio of a set of samples S: ``CR(S) = len(text(S)) / len(zlib.compress(text(S), level=9))``
(bytes). A lower CR means less redundancy, i.e. more information per byte. ``text(S)`` is the samples' texts
concatenated in selection order; the text of one sample is its JSON ``{"instruction", "input", "response"}``
plus a newline. (The reference compresses ``str(list_of_ShareGPT_dicts)``, the Python repr, so ids, role keys
and ``source`` fields are compressed too; JSON of the three text fields is this framework's equivalent.)

Greedy selection, until the budget is filled (every item starts with the cached ``CR({c})``):

1. candidates = the ``k1`` items with the lowest cached CR; re-score each as ``CR(final ∪ {c})`` against the
   already selected set and update the cache;
2. keep the ``k2`` candidates with the lowest CR and set their cache to +inf, so the ones not picked in step 3
   are never reconsidered;
3. from those ``k2``, greedily add the item minimising ``CR(round_set ∪ {c})`` (``round_set`` starts empty:
   earlier rounds are not part of it) until ``k3`` items; append them to the final set.

Defaults ``k1=10000, k2=200, k3=100`` (the reference's), each capped by the items still available; ties break
by id. The budget is then applied to the final order (the reference overshoots by < k3; a round stops as soon
as the budget is full, which gives the same prefix). Model-free: no calibration, no scoring.

Differences from the reference code, both only where it misbehaves:
- step 1 draws from items with a finite cache only; the reference's ``topk(k1)`` also draws +inf items once
  fewer than k1 finite ones remain, re-scores them and can select a sample twice;
- when every remaining item has been discarded (each round consumes k2 items to pick k3, so about half the
  pool at the defaults) and the budget is not full, the discarded, unselected items are re-admitted with
  their last cached CR (counted in ``stats["n_readmissions"]``).

Speed: CR(prefix ∪ {c}) is computed without recompressing the prefix: one ``zlib.compressobj`` holds the
prefix, and each candidate is a ``copy()`` of it fed with the candidate's text and flushed, which gives
byte-for-byte the output of compressing the whole string at the same level (tests check this). A synthetic
pool of 10,000 GSM8K rows with a 10% budget (1,000 rows, 10 rounds, 241,500 CR evaluations) took 53 s wall
(35 s CPU, one core) on the shared 2-core development machine; recompressing from scratch would take hours
(a 500 kB prefix costs ~50 ms per zlib.compress at level 9, ~0.27 ms with the copy).
"""

from __future__ import annotations

import json
import time
import zlib
from typing import Any

import numpy as np

from instructdiff.rows import Row
from instructdiff.selection import Selection, SelectionContext, Selector

LEVEL = 9  # zlib level of the reference


def sample_text(row: Row) -> bytes:
    """The bytes compressed for one sample: its JSON (instruction, input, response) and a newline."""
    record = {"instruction": row.instruction, "input": row.input, "response": row.response}
    return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")


def compression_ratio(data: bytes, level: int = LEVEL) -> float:
    """len(data) / len(zlib.compress(data, level)): the reference's information-redundancy measure."""
    return len(data) / len(zlib.compress(data, level))


class CompressedPrefix:
    """A zlib stream that has consumed a prefix; ``ratio_with(x)`` is CR(prefix + x) without recompressing."""

    def __init__(self, level: int = LEVEL) -> None:
        self._comp = zlib.compressobj(level)
        self._out: list[bytes] = []
        self.raw_len = 0
        self.out_len = 0

    def extend(self, data: bytes) -> None:
        chunk = self._comp.compress(data)
        self._out.append(chunk)
        self.out_len += len(chunk)
        self.raw_len += len(data)

    def compressed_with(self, data: bytes) -> bytes:
        """The full compressed stream of prefix + data (for checks; ``ratio_with`` avoids the join)."""
        c = self._comp.copy()
        return b"".join(self._out) + c.compress(data) + c.flush()

    def ratio_with(self, data: bytes) -> float:
        c = self._comp.copy()
        n = self.out_len + len(c.compress(data)) + len(c.flush())
        return (self.raw_len + len(data)) / n


def zip_order(texts: list[bytes], ids: list[str], weights: np.ndarray, need: float, k1: int = 10000,
              k2: int = 200, k3: int = 100, level: int = LEVEL) -> tuple[list[int], dict[str, Any]]:
    """ZIP's greedy order of pool indices, run until the picked ``weights`` sum to at least ``need``.

    ``weights`` are 1 per sample (budget in samples) or response tokens (budget in tokens). Returns the picked
    indices in order and ``info``: ``single_cr`` (CR of each item alone), ``pick_cr`` / ``pick_round`` (CR of
    round_set ∪ {c} when c was picked, its 1-based round), and counters.
    """
    if min(k1, k2, k3) < 1:
        raise ValueError(f"k1, k2, k3 must be >= 1, got {k1}, {k2}, {k3}")
    n = len(texts)
    weights = np.asarray(weights, dtype=np.float64)
    single = np.array([compression_ratio(t, level) for t in texts], dtype=np.float64)
    cache = single.copy()
    available = np.ones(n, dtype=bool)  # finite cache: not picked, not discarded
    picked = np.zeros(n, dtype=bool)
    final: list[int] = []
    final_prefix = CompressedPrefix(level)
    pick_cr: dict[int, float] = {}
    pick_round: dict[int, int] = {}
    used = 0.0
    rounds = readmissions = compressions = 0
    eff: dict[str, int] = {}
    while used < need and len(final) < n:
        pool_idx = np.flatnonzero(available)
        if pool_idx.size == 0:  # every remaining item was discarded by an earlier round: re-admit them
            available = ~picked
            readmissions += 1
            continue
        rounds += 1
        by_cache = sorted(pool_idx.tolist(), key=lambda i: (cache[i], ids[i]))
        cand1 = by_cache[: min(k1, len(by_cache))]
        for i in cand1:  # step 1: CR(final ∪ {c})
            cache[i] = final_prefix.ratio_with(texts[i])
        compressions += len(cand1)
        cand2 = sorted(cand1, key=lambda i: (cache[i], ids[i]))[: min(k2, len(cand1))]
        available[cand2] = False  # step 2: cache -> +inf, never reconsidered
        cache[cand2] = np.inf
        n3 = min(k3, len(cand2))
        eff = {"k1": len(cand1), "k2": len(cand2), "k3": n3}
        round_prefix = CompressedPrefix(level)
        remaining = list(cand2)
        for _ in range(n3):  # step 3: greedy on CR(round_set ∪ {c}), round_set starting empty
            crs = [round_prefix.ratio_with(texts[i]) for i in remaining]
            compressions += len(remaining)
            j = min(range(len(remaining)), key=lambda k: (crs[k], ids[remaining[k]]))
            best = remaining.pop(j)
            round_prefix.extend(texts[best])
            final_prefix.extend(texts[best])
            final.append(best)
            picked[best] = True
            pick_cr[best], pick_round[best] = float(crs[j]), rounds
            used += weights[best]
            if used >= need:
                break
    info = {"single_cr": single, "pick_cr": pick_cr, "pick_round": pick_round, "rounds": rounds,
            "n_readmissions": readmissions, "n_compressions": compressions, "last_round_k": eff}
    return final, info


class ZipSelector(Selector):
    """ZIP greedy compression-ratio selection (see the module docstring); model-free."""


    def __init__(self, budget: Any = None, k1: int = 10000, k2: int = 200, k3: int = 100) -> None:
        super().__init__(budget)
        if min(int(k1), int(k2), int(k3)) < 1:
            raise ValueError(f"selector.k1/k2/k3 must be >= 1, got {k1}/{k2}/{k3}")
        self.k1, self.k2, self.k3 = int(k1), int(k2), int(k3)

    def select(self, ctx: SelectionContext) -> Selection:
        ids = ctx.ids
        tokens = ctx.response_tokens
        limit = self.budget.limit(len(ids), ctx.pool_tokens)
        weights = np.ones(len(ids)) if self.budget.unit == "samples" else np.array([tokens[i] for i in ids])
        texts = [sample_text(r) for r in ctx.pool]
        t0 = time.time()
        order, info = zip_order(texts, ids, weights, limit, self.k1, self.k2, self.k3)
        seconds = time.time() - t0
        chosen = self.budget.take([ids[k] for k in order], tokens, len(ids), ctx.pool_tokens)
        ctx.log(f"zip: {info['rounds']} rounds, {info['n_compressions']} compressions in {seconds:.1f}s, "
                f"selected {len(chosen)}")
        scores: dict[str, dict[str, float]] = {}
        for k, i in enumerate(ids):
            s = {"compression_ratio": float(info["single_cr"][k]), "response_tokens": int(tokens[i])}
            if k in info["pick_cr"]:
                s["zip_round"] = info["pick_round"][k]
                s["round_set_compression_ratio"] = info["pick_cr"][k]
            scores[i] = s
        by_id = {i: k for k, i in enumerate(ids)}
        sel_text = b"".join(texts[by_id[i]] for i in chosen)
        stats = {"n_pool": len(ids), "k1": self.k1, "k2": self.k2, "k3": self.k3, "rounds": info["rounds"],
                 "n_readmissions": info["n_readmissions"], "n_compressions": info["n_compressions"],
                 "zip_seconds": round(seconds, 3), "budget_limit": limit, "budget_unit": self.budget.unit,
                 "selected_tokens": int(sum(tokens[i] for i in chosen)),
                 "selected_compression_ratio": compression_ratio(sel_text) if chosen else None,
                 "pool_compression_ratio": compression_ratio(b"".join(texts))}
        return Selection.build(ids, chosen, {}, scores, stats)
