"""``rds_embedding`` signal: position-weighted mean of the final-layer hidden states over a whole sample (RDS+).

Ivison et al. 2025 (arXiv 2503.01807, §3, "RDS+") embed a sample as a weighted mean of the selector model's
last hidden states over all its tokens, later tokens weighing more (the position weighting of Muennighoff's
SGPT, arXiv 2202.08904, §3.1):

    e = Σ_{i=1..L} w_i · h_i ,   w_i = i / Σ_{j=1..L} j   (weighting: position, default)
    e = (1/L) Σ_{i=1..L} h_i                             (weighting: mean; the plain mean-pooling ablation)

over the L tokens of the rendered prompt + response (the same ids training uses), h_i the hidden state after
the final norm (``output_hidden_states[-1]`` of HF models). A causal model's h_i has read tokens 1..i only, so
the late tokens summarise the most; that is why they weigh more.

Options (part of the cache key): ``weighting`` position | mean. Returns ``embedding`` (N, hidden) float32 and
``n_tokens`` (N,) int64 in the order of ``inputs.rows``; an empty sample gets a NaN embedding. The signal runs
over any row list: the pipeline asks for it over the pool and, with ``rows=``, over a domain's query set.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from instructdiff.scoring import _decoder_and_head, pad_right
from instructdiff.signals import SignalWork, forward_over_all
from instructdiff.signals.embedding import _batches

WEIGHTINGS = ("position", "mean")


def pooling_weights(length: int, width: int, weighting: str) -> torch.Tensor:
    """(width,) weights of one right-padded sequence of ``length`` real tokens; they sum to 1, padding gets 0."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"rds_embedding: weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    w = torch.zeros(width, dtype=torch.float64)
    if length:
        w[:length] = torch.arange(1, length + 1, dtype=torch.float64) if weighting == "position" else 1.0
        w /= w.sum()
    return w


@torch.inference_mode()
def pooled_hidden_states(model, sequences: list[list[int]], pad_id: int, weighting: str = "position",
                         desc: str = "rds embedding") -> np.ndarray:
    """(N, hidden) float32 weighted means of the last hidden states of token-id ``sequences``."""
    pooling_weights(0, 0, weighting)  # validate before any work
    device = next(model.parameters()).device
    body, _ = _decoder_and_head(model)
    emb = np.full((len(sequences), int(model.config.hidden_size)), np.nan, dtype=np.float32)
    lengths = [len(s) for s in sequences]
    nonempty = [k for k in range(len(sequences)) if lengths[k]]
    for batch in tqdm([[nonempty[j] for j in b] for b in _batches([lengths[k] for k in nonempty])],
                      desc=desc, leave=False):
        ids, mask = pad_right([sequences[k] for k in batch], pad_id, device)
        width = ids.shape[1]
        if body is not None:  # the decoder alone: the LM head is not needed for an embedding
            hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state
        else:
            hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        w = torch.stack([pooling_weights(lengths[k], width, weighting) for k in batch]).to(device)
        # fp64 accumulation: the weights of a long sample are ~1/L² apart and fp32 sums would blur them
        emb[batch] = torch.einsum("bl,blh->bh", w, hidden.double()).float().cpu().numpy()
    return emb


def compute(inputs, options: dict) -> dict[str, np.ndarray]:
    weighting = options.get("weighting", "position")
    unknown = set(options) - {"weighting"}
    if unknown:
        raise ValueError(f"rds_embedding: unknown option(s) {sorted(unknown)}; known: ['weighting']")
    if [r.id for r in inputs.rendered] != [r.id for r in inputs.rows]:
        raise ValueError("rds_embedding: rendered rows and rows are not aligned")
    seqs = [list(r.prompt_ids) + list(r.completion_ids) for r in inputs.rendered]
    pad_id = inputs.tokenizer.pad_token_id
    emb = pooled_hidden_states(inputs.model, seqs, int(pad_id if pad_id is not None else 0), weighting)
    return {"embedding": emb, "n_tokens": np.array([len(s) for s in seqs], dtype=np.int64)}


def work(options: dict, rendered: Sequence[Any], params: Any) -> SignalWork:
    return forward_over_all(rendered)
