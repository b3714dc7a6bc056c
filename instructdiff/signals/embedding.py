"""Mean-pooled last-layer hidden states of each pool row under a causal LM, and the text's own mean NLL.

Used by IFD's pre-experienced sampling (docs/methods.md §2.2: embed the prompt-formatted instruction alone, cluster,
keep mid-perplexity members) and by Superfiltering.D with ``embedding: proxy``. One forward pass gives both:

    embedding = (1/L) Σ_{i=1..L} h_i                    (h = last hidden state, after the final norm)
    nll       = -(1/(L-1)) Σ_{i=2..L} log p(x_i | x_<i)  (the text's own log-perplexity; PPL = exp(nll))

over the L tokens of the text (Cherry_LLM's ``model(ids, labels=ids)``: every token but the first is scored).

Options (part of the cache key):
  text: prompt (default) — the rendered prompt alone: instruction (+input) in the model's template with the
        generation prompt, no response (Cherry's "instruction only, prompt-formatted", its alpaca mode);
        instruction — the bare user message (instruction, then input), tokenizer special tokens, no template
        (Cherry's default "wiz" mode embeds the raw instruction);
        full — prompt + response tokens (the whole sample).

Returns ``embedding`` (N, hidden) float32, ``nll`` (N,) float64 and ``n_tokens`` (N,); an empty text gets a NaN
embedding, a one-token text a NaN nll.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from instructdiff.render import user_message
from instructdiff.scoring import _decoder_and_head, _head_fp32, pad_right
from instructdiff.signals import SignalWork, forward_over_all, forward_over_prompts

TEXTS = ("prompt", "instruction", "full")
MAX_TOKENS_PER_BATCH = 4096
MAX_BATCH_SIZE = 32
CHUNK_POSITIONS = 1024


def _batches(lengths: list[int], max_tokens: int = MAX_TOKENS_PER_BATCH, max_batch: int = MAX_BATCH_SIZE):
    """Indices grouped by length (padding stays small), ≤ max_tokens padded tokens per batch."""
    order = sorted(range(len(lengths)), key=lambda k: (lengths[k], k))
    batch: list[int] = []
    width = 0
    for k in order:
        w = max(width, lengths[k])
        if batch and (w * (len(batch) + 1) > max_tokens or len(batch) >= max_batch):
            yield batch
            batch, w = [], lengths[k]
        batch.append(k)
        width = w
    if batch:
        yield batch


@torch.inference_mode()
def embed_sequences(model, sequences: list[list[int]], pad_id: int, desc: str = "embedding"
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(mean last hidden state (N, H) float32, mean next-token NLL (N,) float64) of token-id sequences."""
    device = next(model.parameters()).device
    body, head = _decoder_and_head(model)
    hidden_size = int(model.config.hidden_size)
    emb = np.full((len(sequences), hidden_size), np.nan, dtype=np.float32)
    nll = np.full(len(sequences), np.nan, dtype=np.float64)
    lengths = [len(s) for s in sequences]
    nonempty = [k for k in range(len(sequences)) if lengths[k]]
    batches = [[nonempty[j] for j in b] for b in _batches([lengths[k] for k in nonempty])]
    for batch in tqdm(batches, desc=desc, leave=False):
        ids, mask = pad_right([sequences[k] for k in batch], pad_id, device)
        if body is not None:
            hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        else:
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            hidden = out.hidden_states[-1].float()
        m = mask.unsqueeze(-1).float()
        pooled = (hidden * m).sum(1) / m.sum(1)
        emb[batch] = pooled.cpu().numpy()
        # next-token NLL of positions 1..L-1 (logits at i predict token i+1), only where needed
        rows = torch.cat([torch.full((lengths[k] - 1,), b, dtype=torch.long) for b, k in enumerate(batch)])
        cols = torch.cat([torch.arange(lengths[k] - 1) for k in batch])
        if len(rows) == 0:
            continue
        rows, cols = rows.to(device), cols.to(device)
        labels = ids[rows, cols + 1]
        selected = hidden[rows, cols]
        token_nll = torch.empty(len(rows), dtype=torch.float64, device=device)
        for s in range(0, len(rows), CHUNK_POSITIONS):
            chunk = selected[s: s + CHUNK_POSITIONS]
            if head is not None:
                logits = _head_fp32(head, chunk)
            else:  # models without a separable head: recompute the logits of this batch
                logits = out.logits[rows[s: s + CHUNK_POSITIONS], cols[s: s + CHUNK_POSITIONS]].float()
            logp = torch.log_softmax(logits, dim=-1)
            token_nll[s: s + CHUNK_POSITIONS] = -logp.gather(1, labels[s: s + CHUNK_POSITIONS, None]).squeeze(1)
        start = 0
        for k in batch:
            n = lengths[k] - 1
            if n:
                nll[k] = token_nll[start: start + n].mean().item()
            start += n
    return emb, nll


def compute(inputs, options: dict) -> dict[str, np.ndarray]:
    text = options.get("text", "prompt")
    if text not in TEXTS:
        raise ValueError(f"embedding signal: text must be one of {TEXTS}, got {text!r}")
    if [r.id for r in inputs.rendered] != [r.id for r in inputs.rows]:
        raise ValueError("embedding signal: rendered pool and rows are not aligned")
    if text == "prompt":
        seqs = [list(r.prompt_ids) for r in inputs.rendered]
    elif text == "instruction":
        seqs = [list(inputs.tokenizer(user_message(row), add_special_tokens=True)["input_ids"])
                for row in inputs.rows]
    else:
        seqs = [list(r.prompt_ids) + list(r.completion_ids) for r in inputs.rendered]
    pad_id = inputs.tokenizer.pad_token_id
    pad_id = int(pad_id if pad_id is not None else 0)
    emb, nll = embed_sequences(inputs.model, seqs, pad_id, desc=f"embedding ({text})")
    return {"embedding": emb, "nll": nll, "n_tokens": np.array([len(s) for s in seqs], dtype=np.int64)}


def work(options: dict, rendered: Sequence[Any], params: Any) -> SignalWork:
    """text=full: one forward over prompt + response. Otherwise the instruction alone, which is the prompt
    without the chat template around it: the prompt's token count bounds it from above."""
    if options.get("text", "prompt") == "full":
        return forward_over_all(rendered)
    return forward_over_prompts(rendered)
