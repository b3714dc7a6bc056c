"""Per-token response NLL and entropy (the arrays behind the per-sample means), NaN-padded to the longest
response: for analyses and selectors that weight tokens (e.g. only the final answer's tokens)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from instructdiff.scoring import score_pass
from instructdiff.signals import SignalInputs, SignalWork, forward_over_all


def compute(inputs: SignalInputs, options: dict) -> dict[str, np.ndarray]:
    # the pipeline passes score.response_end; exclude (the default) leaves the turn's closing tokens out
    rendered = [r.for_scoring(str(options.get("response_end", "include"))) for r in inputs.rendered]
    width = max((r.n_completion for r in rendered), default=0)
    nll = np.full((len(rendered), width), np.nan, dtype=np.float32)
    ent = np.full((len(rendered), width), np.nan, dtype=np.float32)
    pad_id = inputs.tokenizer.pad_token_id or 0
    dtype = str(options.get("dtype", "fp32"))
    batches = score_pass(inputs.model, rendered, pad_id, int(options.get("max_tokens_per_batch", 4096)),
                         int(options.get("max_batch_size", 32)), dtype=dtype, per_token=True)
    with tqdm(total=len(rendered), desc="token_stats", unit="sample") as bar:
        for idx, per in batches:
            for k, (n, h) in zip(idx, per, strict=True):
                nll[k, : len(n)] = n
                ent[k, : len(h)] = h
            bar.update(len(idx))
    lengths = np.array([r.n_completion for r in rendered], dtype=np.int32)
    return {"nll": nll, "entropy": ent, "n_tokens": lengths}


def work(options: dict, rendered: Sequence[Any], params: Any) -> SignalWork:
    return forward_over_all(rendered)
