"""``activations`` signal: per-layer top-k MLP neurons of each sample (MADS activation tags, docs/methods.md §4.2).

For every decoder layer l the MLP's intermediate activation a_l(t) ∈ R^I is captured with a forward pre-hook
on the MLP's output projection, whose input is exactly that intermediate: act(gate(x))·up(x) for SwiGLU
models (Llama, Qwen, SmolLM2, Mistral: ``mlp.down_proj``), gelu(c_fc(x)) for GPT-2 (``mlp.c_proj``).
Over the chosen tokens t of a sample it is aggregated to

    A_{l,j} = mean_t max(a_{l,j}(t), 0)      (aggregate=mean_relu, default)
    A_{l,j} = max_t a_{l,j}(t)               (aggregate=max)

and the k largest A_{l,·} per layer are kept (ties → lower neuron index). **[recon]**: MADS publishes no method
text; the hook point, the aggregation and k are the reconstruction of docs/methods.md §4.2 and are options here.

Options (all part of the cache key):
  tokens      response (default: the completion's tokens) | all (prompt + completion) | prompt (the
              instruction-only variant: a causal model's prompt activations do not depend on the response)
  aggregate   mean_relu (default) | max
  top_k       neurons kept per layer (default 32; clamped to the intermediate size)
  layers      null = every decoder layer, or a list of layer indices (negative counts from the end)
  module      null = detect the MLP output projection, or a module-name suffix such as ``mlp.down_proj``
  max_tokens_per_batch / max_batch_size   padded tokens / rows per forward pass (defaults 4096 / 16)

Returns ``tags`` int32 (N, L, k) — neuron indices, best first — and ``values`` float32 (N, L, k), the
aggregated activations of those neurons (for weighted / thresholded variants), in pool order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from instructdiff.scoring import length_batches
from instructdiff.signals import SignalWork, forward_over_all, forward_over_prompts

#: module-name suffixes whose *input* is the MLP intermediate activation, in order of preference
MLP_OUTPUT_SUFFIXES = ("mlp.down_proj", "mlp.c_proj", "mlp.dense_4h_to_h", "mlp.fc2")
TOKENS = ("response", "all", "prompt")
AGGREGATES = ("mean_relu", "max")


class _StopForward(Exception):
    """Raised after the last hooked layer: the rest of the network is not needed."""


def mlp_output_modules(model: Any, suffix: str | None = None) -> list[tuple[str, torch.nn.Module]]:
    """The per-layer MLP output projections of ``model`` in layer order (first suffix that matches)."""
    named = list(model.named_modules())
    for suf in (suffix,) if suffix else MLP_OUTPUT_SUFFIXES:
        found = [(n, m) for n, m in named if n == suf or n.endswith("." + suf)]
        if found:
            return found
    raise ValueError(f"no MLP output projection found (looked for module names ending in "
                     f"{[suffix] if suffix else list(MLP_OUTPUT_SUFFIXES)}); set the signal option `module`")


def token_mask(batch: list, width: int, tokens: str) -> torch.Tensor:
    """(B, width) bool: the positions whose activations are aggregated."""
    mask = torch.zeros((len(batch), width), dtype=torch.bool)
    for b, r in enumerate(batch):
        p, t = r.n_prompt, r.n_completion
        lo, hi = {"response": (p, p + t), "all": (0, p + t), "prompt": (0, p)}[tokens]
        if hi <= lo:
            raise ValueError(f"sample {r.id} has no {tokens} tokens to aggregate activations over")
        mask[b, lo:hi] = True
    return mask


def aggregate_topk(act: torch.Tensor, mask: torch.Tensor, aggregate: str, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """act (B, T, I), mask (B, T) bool → (indices (B, k), values (B, k)) of the k largest aggregated neurons."""
    act = act.float()
    m = mask.to(act.device)
    if aggregate == "mean_relu":
        w = m.to(act.dtype)[..., None]
        agg = (act.clamp_min(0) * w).sum(1) / w.sum(1)
    elif aggregate == "max":
        agg = act.masked_fill(~m[..., None], float("-inf")).amax(1)
    else:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    # stable descending sort: equal activations keep the lower neuron index first, on every device
    values, idx = torch.sort(agg, dim=1, descending=True, stable=True)
    return idx[:, :k], values[:, :k]


def compute(inputs: Any, options: dict) -> dict[str, np.ndarray]:
    tokens = str(options.get("tokens", "response"))
    aggregate = str(options.get("aggregate", "mean_relu"))
    top_k = int(options.get("top_k", 32))
    if tokens not in TOKENS:
        raise ValueError(f"activations: tokens must be one of {TOKENS}, got {tokens!r}")
    if aggregate not in AGGREGATES:
        raise ValueError(f"activations: aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    if top_k < 1:
        raise ValueError(f"activations: top_k must be >= 1, got {top_k}")
    model, rendered = inputs.model, inputs.rendered
    modules = mlp_output_modules(model, options.get("module"))
    n_layers = len(modules)
    layers = options.get("layers")
    layer_ids = resolve_layers(layers, n_layers)
    n = len(rendered)
    out: dict[str, np.ndarray] = {}  # allocated at the first hook call, when the intermediate size is known
    pad_id = inputs.tokenizer.pad_token_id if inputs.tokenizer.pad_token_id is not None else 0
    device = inputs.device
    state: dict[str, Any] = {}
    last = max(layer_ids)

    def make_hook(slot: int, layer: int):
        def hook(_module, args):
            if not out:
                k = min(top_k, int(args[0].shape[-1]))
                out["tags"] = np.zeros((n, len(layer_ids), k), dtype=np.int32)
                out["values"] = np.zeros((n, len(layer_ids), k), dtype=np.float32)
            idx, val = aggregate_topk(args[0], state["mask"], aggregate, out["tags"].shape[-1])
            out["tags"][state["rows"], slot] = idx.cpu().numpy().astype(np.int32)
            out["values"][state["rows"], slot] = val.cpu().numpy().astype(np.float32)
            if layer == last:
                raise _StopForward
        return hook

    handles = [modules[layer][1].register_forward_pre_hook(make_hook(slot, layer))
               for slot, layer in enumerate(layer_ids)]
    # the transformer body alone: the LM head is not needed
    body = getattr(model, getattr(model, "base_model_prefix", ""), None) or model
    batches = list(length_batches(rendered, int(options.get("max_tokens_per_batch", 4096)),
                                  int(options.get("max_batch_size", 16))))
    try:
        with torch.inference_mode():
            for batch_idx in tqdm(batches, desc="activations", unit="batch", dynamic_ncols=True):
                batch = [rendered[i] for i in batch_idx]
                width = max(r.n_tokens for r in batch)
                ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                attn = torch.zeros((len(batch), width), dtype=torch.long)
                for b, r in enumerate(batch):
                    seq = r.prompt_ids + r.completion_ids
                    ids[b, : len(seq)] = torch.tensor(seq)
                    attn[b, : len(seq)] = 1
                state["mask"] = token_mask(batch, width, tokens)
                state["rows"] = np.asarray(batch_idx)
                try:
                    body(input_ids=ids.to(device), attention_mask=attn.to(device))
                except _StopForward:
                    pass
                else:
                    raise RuntimeError("activations: the hooked MLP modules were not called in the forward pass")
    finally:
        for h in handles:
            h.remove()
    if not out:  # empty pool
        out = {"tags": np.zeros((0, len(layer_ids), top_k), np.int32),
               "values": np.zeros((0, len(layer_ids), top_k), np.float32)}
    return out


def resolve_layers(layers: Any, n_layers: int) -> list[int]:
    """``layers`` option → distinct layer indices in [0, n_layers); None = all, negatives count from the end."""
    if layers is None:
        return list(range(n_layers))
    ids = []
    for x in layers:
        x = int(x)
        if not -n_layers <= x < n_layers:
            raise ValueError(f"activations: layer {x} out of range for a model with {n_layers} layers")
        ids.append(x % n_layers)
    if not ids or len(set(ids)) != len(ids):
        raise ValueError(f"activations: layers must be distinct and non-empty, got {list(layers)}")
    return ids


def work(options: dict, rendered: Sequence[Any], params: Any) -> SignalWork:
    """One forward pass per row: over the prompt alone for tokens=prompt, else over prompt + response."""
    if str(options.get("tokens", "response")) == "prompt":
        return forward_over_prompts(rendered)
    return forward_over_all(rendered)
