"""Response-token mean NLL and mean entropy of every pool sample under one model, cached per sample id.

Math (docs/methods.md §0): for response tokens y_1..y_T after prompt x,
    nll     = -(1/T) Σ_t log p_t(y_t)
    entropy =  (1/T) Σ_t [-Σ_v p_t(v) log p_t(v)]      (full vocabulary)
Logits at position i predict token i+1, so with P prompt tokens the response positions are P-1 … P+T-2.

Only the response positions go through the LM head, and the head, log-sum-exp and entropy run in fp32 over
vocabulary tiles (``head_nll_entropy``): the vocabulary projection dominates memory (T×V), and fp16/bf16
log-softmax loses the precision that differences of entropies need (docs/methods.md §1.4 quirk 4).
"""

from __future__ import annotations

import json
import logging
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from instructdiff.render import Rendered

log = logging.getLogger(__name__)

# first_token_entropy: entropy of the distribution over the first response token (logits at the last
# prompt position, raw, no generation processors) — the complexity signal of docs/methods.md §6.
RESPONSE_SIGNALS = ("nll", "entropy", "n_tokens", "first_token_entropy")
SCORING_VERSION = 2
DTYPES = ("fp32", "bf16", "fp16")
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ScoreTable:
    """Per-sample values of one scoring pass, aligned with ``ids``; NaN marks a sample that failed."""

    ids: list[str]
    values: dict[str, np.ndarray]

    def get(self, signal: str) -> dict[str, float]:
        return dict(zip(self.ids, self.values[signal].tolist(), strict=True))

    def non_finite_ids(self, signals: tuple[str, ...] = ("nll", "entropy")) -> list[str]:
        """Ids whose ``signals`` hold NaN or inf (a failed or overflowed sample), in table order."""
        bad = np.zeros(len(self.ids), dtype=bool)
        for s in signals:
            bad |= ~np.isfinite(self.values[s])
        return [self.ids[k] for k in np.flatnonzero(bad).tolist()]

    def aligned(self, signal: str, ids: list[str]) -> np.ndarray:
        index = {i: k for k, i in enumerate(self.ids)}
        missing = [i for i in ids if i not in index]
        if missing:
            raise KeyError(f"{len(missing)} ids have no {signal!r} score (first: {missing[0]})")
        return self.values[signal][[index[i] for i in ids]]


# rows of the batch plan turned into Python ints at a time
_PLAN_WINDOW = 1 << 12


def length_order(items: Sequence[Rendered]) -> np.ndarray:
    """Indices of ``items`` sorted by (n_tokens, id), exactly as ``sorted`` with that key orders them, held as
    one integer array rather than a Python list and a key tuple per row (issue 15: ~110 B a row).

    Ties in length are broken by id so the batches (and so the float summation order) do not depend on the pool's
    order. numpy orders the ids as bytes: UTF-8 keeps code-point order, and the ids' byte lengths, the last key,
    separate ids that differ only by trailing NULs, which numpy's fixed-width strings pad with.
    """
    n = len(items)
    if n == 0:
        return np.empty(0, dtype=np.intp)
    lengths = np.fromiter((r.n_tokens for r in items), dtype=np.int32, count=n)
    # passes over the ids (lengths, then the bytes) so no list of encoded ids is ever held
    id_lengths = np.fromiter((len(r.id.encode("utf-8", "surrogatepass")) for r in items), dtype=np.int32, count=n)
    width = int(id_lengths.max())
    id_bytes = np.fromiter((r.id.encode("utf-8", "surrogatepass") for r in items), dtype=f"S{max(width, 1)}",
                           count=n)
    return np.lexsort((id_lengths, id_bytes, lengths))


def length_batches(items: Sequence[Rendered], max_tokens: int, max_batch: int,
                   order: np.ndarray | None = None) -> Iterator[list[int]]:
    """Indices grouped by similar length so padding is small; each batch holds ≤ max_tokens padded tokens.

    Only the order array (``length_order(items)``, made here unless given) is held for the whole pool; each
    batch's index list is made when it is yielded."""
    order = length_order(items) if order is None else order
    batch: list[int] = []
    longest = 0
    for start in range(0, len(order), _PLAN_WINDOW):
        for k in order[start : start + _PLAN_WINDOW].tolist():
            n = items[k].n_tokens
            if batch and (max(longest, n) * (len(batch) + 1) > max_tokens or len(batch) >= max_batch):
                yield batch
                batch, longest = [], 0
            batch.append(k)
            longest = max(longest, n)
    if batch:
        yield batch


def dist_info() -> tuple[int, int]:
    """(rank, world size) of an initialised torch.distributed group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _decoder_and_head(model):
    """The transformer body and the vocabulary projection, so logits are computed only where needed."""
    body = getattr(model, model.base_model_prefix, None)
    head = model.get_output_embeddings()
    if body is None or head is None or getattr(model.config, "final_logit_softcapping", None):
        return None, None
    return body, head


@contextmanager
def low_precision_weights(model, dtype: str) -> Iterator[None]:
    """For dtype bf16/fp16: the body's Linear weights cast once for the whole pass, restored on exit.

    Autocast would cast every weight again at every forward call (1.37 s → 1.09 s for one SmolLM2 batch on CPU);
    a weight already in the autocast dtype is used as is, so the numbers are bit-identical to plain
    autocast. The LM head is left in fp32 (it feeds the fp32 log-softmax). A no-op for fp32.
    """
    if dtype not in _AUTOCAST:
        yield
        return
    target = _AUTOCAST[dtype]
    head = model.get_output_embeddings()
    head_weight = getattr(head, "weight", None)
    swapped: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (isinstance(module, torch.nn.Linear) and module is not head and weight is not head_weight
                and weight.dtype == torch.float32):
            swapped.append((weight, weight.data))
            weight.data = weight.data.to(target)
    try:
        yield
    finally:
        for weight, original in swapped:
            weight.data = original


_COMPILED_BODIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled_body(model):
    """``torch.compile`` (inductor, dynamic shapes) of the model's transformer body, made once per model.

    Inductor fuses the norms, rotary embedding, SiLU and residual adds that eager mode runs as separate
    memory-bound kernels (over half of the bf16 body's time on CPU). The first batch pays the compile (about
    2 minutes for SmolLM2-135M on 2 CPU cores), so it pays off on large pools, not on the 200-row defaults.
    """
    if model not in _COMPILED_BODIES:
        body, _ = _decoder_and_head(model)
        if body is None:
            raise ValueError(f"score.compile: {type(model).__name__} has no separable transformer body")
        _COMPILED_BODIES[model] = torch.compile(body, dynamic=True)
    return _COMPILED_BODIES[model]


def pad_right(sequences: list[list[int]], pad_id: int, device: torch.device | str = "cpu"
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), both (len(sequences), longest), right-padded with ``pad_id``: the batch layout
    every forward pass of the engine and of the signals uses."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for b, seq in enumerate(sequences):
        ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[b, : len(seq)] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def score_batch(model, batch: list[Rendered], pad_id: int, chunk_positions: int = 1024,
                dtype: str = "fp32", per_token: bool = False, compile: bool = False):
    """(len(batch), 4) array of nll, entropy, n_tokens, first_token_entropy for each rendered sample.

    dtype=bf16 (or fp16) runs the transformer body under autocast (AMX on recent CPUs, tensor cores on GPUs);
    the LM head, log-softmax and entropy stay in fp32 either way. A sample whose activations overflow the
    autocast range comes out NaN (never clipped to a plausible number); ``ScoreStore`` reports its id.
    compile=True runs the body through ``torch.compile`` (see ``compiled_body``).
    """
    if dtype not in DTYPES:
        raise ValueError(f"score.dtype must be one of {DTYPES}, got {dtype!r}")
    device = next(model.parameters()).device
    target_pos: list[torch.Tensor] = []
    for r in batch:
        p, t = r.n_prompt, r.n_completion
        if p == 0:
            raise ValueError(f"sample {r.id} has an empty prompt: its first response token has no context")
        target_pos.append(torch.arange(p - 1, p + t - 1))
    ids, _ = pad_right([r.token_ids for r in batch], pad_id, device)
    rows = torch.cat([torch.full((len(tp),), b, dtype=torch.long) for b, tp in enumerate(target_pos)])
    cols = torch.cat(target_pos)
    labels = ids[rows, cols + 1]

    body, head = _decoder_and_head(model)
    if compile and body is not None:
        body = compiled_body(model)
        if len(batch) == 1:
            # compiled graphs specialise on batch size 1 (a second compile of minutes); a copy of the lone row
            # keeps the one dynamic-shape graph, and only row 0's outputs are read
            ids = ids.repeat(2, 1)
    # No attention mask: the batch is right-padded, so under causal attention a real token never sees a pad
    # (pads only follow it) and its positions are 0..n-1 either way; the outputs at real positions are the
    # masked ones exactly, and SDPA keeps its is_causal fast path (~11% of the body's time on CPU).
    with torch.autocast(device.type, dtype=_AUTOCAST.get(dtype, torch.bfloat16), enabled=dtype in _AUTOCAST):
        if body is not None:
            hidden = body(input_ids=ids).last_hidden_state
            selected = hidden[rows.to(device), cols.to(device)].float()
            logits_fn = head
        else:
            full_logits = model(input_ids=ids).logits
            selected = full_logits[rows.to(device), cols.to(device)].float()
            logits_fn = None

    if logits_fn is not None:
        token_nll, token_ent = head_nll_entropy(logits_fn, selected, labels, chunk_positions)
    else:
        token_nll, token_ent = _nll_entropy_from_logits(selected, labels, chunk_positions)

    if per_token:
        # (nll, entropy) per response token of each sample, for signals that need more than the means
        bounds = np.cumsum([0] + [len(tp) for tp in target_pos])
        nll_np, ent_np = token_nll.cpu().numpy(), token_ent.cpu().numpy()
        return [(nll_np[bounds[b]:bounds[b + 1]], ent_np[bounds[b]:bounds[b + 1]]) for b in range(len(batch))]
    out = np.empty((len(batch), len(RESPONSE_SIGNALS)), dtype=np.float64)
    start = 0
    for b, tp in enumerate(target_pos):
        n = len(tp)
        out[b, 0] = token_nll[start : start + n].double().mean().item() if n else float("nan")
        out[b, 1] = token_ent[start : start + n].double().mean().item() if n else float("nan")
        out[b, 2] = n
        out[b, 3] = token_ent[start].item() if n else float("nan")
        start += n
    return out


def score_pass(model, items: Sequence[Rendered], pad_id: int, max_tokens: int, max_batch: int, dtype: str = "fp32",
               compile: bool = False, per_token: bool = False) -> Iterator[tuple[list[int], object]]:
    """One scoring pass over ``items``: (indices into items, ``score_batch`` output) per length bucket.

    The batch plan is made here, at the call (its sort's temporaries are freed before the caller allocates
    its output); the batches run as the result is iterated. The pass owns the low-precision weight cast, so every
    caller (the store, the per-token signal, the benchmark) casts once per pass and none can forget to restore
    the fp32 weights.
    """
    order = length_order(items)

    def run() -> Iterator[tuple[list[int], object]]:
        with low_precision_weights(model, dtype):
            for idx in length_batches(items, max_tokens, max_batch, order):
                yield idx, score_batch(model, [items[k] for k in idx], pad_id, dtype=dtype, per_token=per_token,
                                       compile=compile)

    return run()


def _head_fp32(head, hidden: torch.Tensor) -> torch.Tensor:
    """The vocabulary projection in fp32 whatever the weights' dtype (logits feed log-softmax)."""
    weight = head.weight
    bias = getattr(head, "bias", None)
    return torch.nn.functional.linear(hidden.float(), weight.float(), None if bias is None else bias.float())


@torch.inference_mode()
def head_nll_entropy(head, hidden: torch.Tensor, labels: torch.Tensor, chunk_positions: int = 1024,
                     vocab_block: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position NLL of ``labels`` and full-vocabulary entropy of softmax(head(hidden)), in fp32.

    The logits are never materialised for the whole vocabulary: each (positions × vocab_block) tile is
    projected, folded into a running max m, Z = Σ e^(z−m) and S = Σ e^(z−m)(z−m), and discarded, so the
    tile stays in cache instead of a T×V matrix streaming through memory several times (log-softmax, exp,
    product, sum). Then log Z_full = m + log Z, nll = log Z_full − z_label and H = log Z − S/Z, which is
    −Σ p log p with p = e^(z−m)/Z. Measured on SmolLM2-135M (V = 49,152, 2 CPU cores): 0.74 s against
    1.07 s for the materialised log-softmax on 2,124 positions. Hand-written because neither torch nor a
    kept library offers a blocked entropy on CPU. Non-finite logits propagate to NaN, never to a number.
    """
    weight = head.weight.float()
    bias = getattr(head, "bias", None)
    bias = None if bias is None else bias.float()
    n, vocab = hidden.shape[0], weight.shape[0]
    token_nll = torch.empty(n, dtype=torch.float32, device=hidden.device)
    token_ent = torch.empty(n, dtype=torch.float32, device=hidden.device)
    for s in range(0, n, chunk_positions):
        x = hidden[s : s + chunk_positions].float()
        y = labels[s : s + chunk_positions]
        # NaN, not empty: a label outside the vocabulary must not read as a score
        label_logit = torch.full((len(x),), float("nan"), dtype=torch.float32, device=x.device)
        m = z_sum = s_sum = None
        for v0 in range(0, vocab, vocab_block):
            z = torch.nn.functional.linear(x, weight[v0 : v0 + vocab_block],
                                           None if bias is None else bias[v0 : v0 + vocab_block])
            in_block = (y >= v0) & (y < v0 + z.shape[1])
            if in_block.any():
                label_logit[in_block] = z[in_block, y[in_block] - v0]
            block_max = z.amax(dim=1)
            if m is None:
                new_m, rescale = block_max, None
            else:
                new_m = torch.maximum(m, block_max)
                rescale = torch.exp(m - new_m)
            z.sub_(new_m[:, None])
            e = torch.exp(z)
            block_z = e.sum(dim=1)
            block_s = torch.linalg.vecdot(e, z, dim=1)
            if rescale is None:
                z_sum, s_sum = block_z, block_s
            else:
                # moving the reference from m to new_m: e^(z−m) = e^(z−new_m)·e^(new_m−m), and (z−m) gains (new_m−m)
                s_sum = rescale * (s_sum + (m - new_m) * z_sum) + block_s
                z_sum = rescale * z_sum + block_z
            m = new_m
        log_z = torch.log(z_sum)
        token_nll[s : s + chunk_positions] = m + log_z - label_logit
        token_ent[s : s + chunk_positions] = log_z - s_sum / z_sum
    return token_nll, token_ent


def _nll_entropy_from_logits(logits: torch.Tensor, labels: torch.Tensor, chunk_positions: int
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The same quantities from logits a model computed itself (no separable LM head), chunked fp32."""
    token_nll = torch.empty(len(logits), dtype=torch.float32, device=logits.device)
    token_ent = torch.empty(len(logits), dtype=torch.float32, device=logits.device)
    for s in range(0, len(logits), chunk_positions):
        logp = torch.log_softmax(logits[s : s + chunk_positions].float(), dim=-1)
        token_nll[s : s + chunk_positions] = -logp.gather(1, labels[s : s + chunk_positions, None]).squeeze(1)
        token_ent[s : s + chunk_positions] = -(logp.exp() * logp).sum(-1)
    return token_nll, token_ent


def report_non_finite(table: ScoreTable, desc: str, dtype: str) -> list[str]:
    """Log (and return) the ids of samples whose NLL or entropy is NaN/inf.

    They stay NaN in the table: a clipped or default value would be ranked as if it were a measurement.
    Selectors drop them with reason ``non_finite_score`` before sorting; the ids here tell the user which
    samples to inspect, and under reduced precision that the autocast range overflowed.
    """
    bad = table.non_finite_ids()
    if bad:
        cause = (f"overflow of the {dtype} range in the transformer body (score.dtype=fp32 avoids it)"
                 if dtype in _AUTOCAST else "non-finite model outputs")
        shown = ", ".join(bad[:20]) + (f", ... ({len(bad) - 20} more)" if len(bad) > 20 else "")
        log.warning("%s: %d of %d samples have non-finite scores: %s; sample ids: %s (kept as NaN, dropped "
                    "and counted by the selectors)", desc, len(bad), len(table.ids), cause, shown)
    return bad


def save_scores_json(path: Path, table: ScoreTable) -> None:
    with open(path, "w") as fh:
        for k, i in enumerate(table.ids):
            fh.write(json.dumps({"id": i, **{s: float(table.values[s][k]) for s in RESPONSE_SIGNALS}}) + "\n")


def __getattr__(name: str):
    # the store is the cache around this engine (instructdiff.score_store); kept importable from here
    if name == "ScoreStore":
        from instructdiff.score_store import ScoreStore

        return ScoreStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
