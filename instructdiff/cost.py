"""Compute accounting: estimated FLOPs of every stage of a run, and the selection cost of each selector.

Ivison et al. 2025 ("Large-Scale Data Selection for Instruction Tuning", arXiv 2503.01807, §5 and Fig. 1)
compare selectors at equal *total* compute, counting the selection cost as forward/backward passes of the
selector model. The estimates here follow the usual dense-transformer rule (Kaplan et al. 2020, "Scaling Laws
for Neural Language Models", arXiv 2001.08361, §2.1 / Table 1):

    forward  ≈ 2 · P · T              (one multiply-add per parameter per token)
    training ≈ 6 · P · T · epochs     (backward ≈ 2 × forward: activation gradients 2·P·T + weight gradients 2·P·T)
    LoRA     ≈ (4 · P + 6 · P_lora) · T · epochs
               forward through the frozen model and the adapters 2·(P + P_lora), activation gradients through
               both 2·(P + P_lora), weight gradients only for the adapters 2·P_lora. **[ours]**: Hu et al.
               (LoRA, arXiv 2106.09685) give no FLOP count; this split of the backward pass is the standard one
               (Kaplan §2.1; Hoffmann et al. 2022, arXiv 2203.15556, App. F) with the frozen weight gradients
               removed. Activation checkpointing (trainer.gradient_checkpointing) adds one more forward, 2·P·T.

P, T and what is left out:
  * P = every parameter except the input embedding table (``ModelParams.forward``). A lookup costs no FLOPs,
    so Kaplan's non-embedding count is the right base, but the LM head is a real (hidden × vocab) matmul on
    every scored position; at 135M parameters it is ~20% of the compute, so it is counted (Hoffmann et al.
    App. F counts it too). With tied embeddings the head *is* the embedding table: P is then all parameters.
  * T = real tokens (prompt + response) of every sequence passed, padding excluded for scoring and training
    (their token counts are known from the renderer and ``train_stats.json``). Evaluation tokens are measured
    instead, by counting the positions fed to the model during lm-eval (``count_forward_tokens``; the attention
    mask's ones where one is passed, else every position); generation with a KV cache feeds one position a step.
  * The attention-context term 2·n_layer·n_ctx·d_attn per token (Kaplan Table 1) is dropped: under 10% of
    2·P for these models at ≤ 1k-token contexts. Optimiser updates, softmax and norms are not counted.
  * Signals with other costs (``signal_cost``): the LoRA-gradient ensemble trains; LESS trains a LoRA warm-up,
    then takes a gradient of every row per checkpoint and projects it; SelectIT reads every row once per rating
    prompt; the MiniLM sentence encoder is a different model and is left unestimated (listed
    in ``not_estimated``, never guessed).

A cached artifact costs nothing in this run but does not make a selector cheap: every event records its
from-scratch FLOPs (``flops_uncached``) and whether it was computed here (``cached``); ``flops`` counts only the
latter. The Pareto plot of the sweep report uses the from-scratch selection cost.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

FORWARD_FLOPS_PER_PARAM_TOKEN = 2
TRAIN_FLOPS_PER_PARAM_TOKEN = 6
COST_STAGES = ("calibrate", "score", "select", "train", "eval")


@dataclass(frozen=True)
class ModelParams:
    """Parameter counts of a causal LM: ``total`` (unique tensors, a tied head counted once), ``embedding`` (the
    input table), ``forward`` (what a token's forward pass multiplies by: total − the input table, plus the
    head when it is tied to that table) and the Linear layers a LoRA adapter can target (name suffix → list of
    (in, out) shapes)."""

    total: int
    embedding: int
    forward: int
    tied: bool
    linears: tuple[tuple[str, int, int], ...]  # (leaf module name, in_features, out_features)

    def lora(self, r: int, target_modules: Sequence[str]) -> int:
        """Adapter parameters of rank ``r`` on every Linear whose leaf name is in ``target_modules``:
        r·(in + out) each (A is r×in, B is out×r)."""
        targets = set(target_modules)
        found = [(i, o) for name, i, o in self.linears if name in targets]
        if not found:
            raise ValueError(f"no Linear layer named {sorted(targets)} in the model; LoRA targets must be leaf "
                             f"module names such as {sorted({n for n, _, _ in self.linears})}")
        return int(r) * sum(i + o for i, o in found)


def params_of(model: Any) -> ModelParams:
    """``ModelParams`` of a (possibly meta-device) HF causal LM."""
    import torch

    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb
    forward = total if tied else total - emb.numel()
    linears = tuple((n.rsplit(".", 1)[-1], m.in_features, m.out_features) for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and m is not head)
    return ModelParams(int(total), int(emb.numel()), int(forward), bool(tied), linears)


@lru_cache(maxsize=16)
def model_params(path: str, trust_remote_code: bool = False, revision: str | None = None) -> ModelParams:
    """``ModelParams`` of the model at ``path`` from its config alone: the model is built on the meta device,
    so nothing is allocated and no weights are read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return params_of(model)


def forward_flops(params: int, tokens: int) -> float:
    """2·P·T: one forward pass over ``tokens`` tokens."""
    return float(FORWARD_FLOPS_PER_PARAM_TOKEN) * params * tokens


def training_flops(params: int, tokens: int, epochs: float = 1.0, lora_params: int | None = None,
                   checkpointing: bool = False) -> float:
    """Full fine-tuning 6·P·T·epochs, or LoRA (4·P + 6·P_lora)·T·epochs (see the module docstring); activation
    checkpointing recomputes the forward once more (+2·P·T per epoch)."""
    per_token = (TRAIN_FLOPS_PER_PARAM_TOKEN * params if lora_params is None
                 else 4 * params + 6 * int(lora_params))
    if checkpointing:
        per_token += FORWARD_FLOPS_PER_PARAM_TOKEN * params
    return float(per_token) * tokens * float(epochs)


def epochs_done(trainer_cfg: dict, stats: dict) -> float:
    """Passes over the data a training made: ``trainer.epochs``, or with ``max_steps`` > 0 the optimiser steps
    it took × global batch / samples (one process; the last partial batch counts as full)."""
    max_steps = int(trainer_cfg.get("max_steps", -1) or -1)
    if max_steps <= 0:
        return float(trainer_cfg.get("epochs", 1))
    n = max(int(stats.get("n_samples", 0)), 1)
    batch = int(trainer_cfg.get("per_device_batch_size", 1)) * int(trainer_cfg.get("gradient_accumulation_steps", 1))
    return float(int(stats.get("steps", 0)) * batch) / n


def training_cost(params: ModelParams, trainer_cfg: dict, stats: dict) -> dict[str, Any]:
    """FLOPs of one SFT run from its ``train_stats.json`` (``n_tokens`` = prompt + response tokens of the rows)."""
    lora_params = None
    if stats.get("method", trainer_cfg.get("method", "full")) == "lora":
        lora = trainer_cfg.get("lora") or {}
        lora_params = params.lora(int(lora.get("r", 8)), list(lora.get("target_modules", ["q_proj", "v_proj"])))
    epochs = epochs_done(trainer_cfg, stats)
    tokens = int(stats.get("n_tokens", 0))
    flops = training_flops(params.forward, tokens, epochs, lora_params,
                           bool(trainer_cfg.get("gradient_checkpointing", False)))
    return {"tokens": tokens, "epochs": epochs, "lora_params": lora_params, "flops_uncached": flops}


# -- signals ---------------------------------------------------------------------------------------------
def _all(rendered) -> int:
    return int(sum(len(r.prompt_ids) + len(r.completion_ids) for r in rendered))


def _prompt(rendered) -> int:
    return int(sum(len(r.prompt_ids) for r in rendered))


def signal_cost(name: str, options: dict, rendered: Sequence[Any], params: ModelParams) -> dict[str, Any]:
    """Estimated from-scratch FLOPs of the signal ``name`` over ``rendered`` rows with the model's ``params``:
    {tokens, flops_uncached (None when not estimated), rule}."""
    full = _all(rendered)
    if name == "sentence_embedding":  # a separate encoder (all-MiniLM-L6-v2) with its own tokenizer
        return {"tokens": None, "flops_uncached": None, "rule": "not estimated: external sentence encoder"}
    if name == "embedding" and options.get("text", "prompt") != "full":
        # instruction-only text is the prompt without the chat template: the prompt count bounds it from above
        t = _prompt(rendered)
        return {"tokens": t, "flops_uncached": forward_flops(params.forward, t), "rule": "forward over prompts"}
    if name == "activations" and options.get("tokens", "response") == "prompt":
        t = _prompt(rendered)
        return {"tokens": t, "flops_uncached": forward_flops(params.forward, t), "rule": "forward over prompts"}
    if name == "rating_probs":  # one forward of every row per rating prompt (the prompt's own words ignored)
        k = len(options.get("prompts") or [None])
        return {"tokens": full * k, "flops_uncached": forward_flops(params.forward, full * k),
                "rule": f"{k} forward passes (one per rating prompt)"}
    if name == "lora_grad_norms":
        # each member trains `epochs` epochs, then two per-example forward+backward passes (early and late)
        members, epochs = int(options.get("members", 4)), int(options.get("epochs", 3))
        targets = options.get("target_modules") or _attention_targets(params)
        p_lora = params.lora(int(options.get("lora_r", 8)), list(targets))
        flops = members * training_flops(params.forward, full, epochs + 2, p_lora)
        return {"tokens": full, "flops_uncached": flops,
                "rule": f"{members} LoRA members × ({epochs} epochs + 2 gradient passes)"}
    if name == "less_grads":
        # LoRA warm-up on its seeded slice, then one per-sample gradient pass of every row (pool and queries)
        # under each kept checkpoint, each gradient projected to d dims (a P_lora × d matmul: 2·P_lora·d)
        from instructdiff.signals.less_grads import resolve_options, warmup_rows

        o = resolve_options(options)
        p_lora = params.lora(o["lora_r"], list(o["target_modules"] or _attention_targets(params)))
        warm, n_ckpt = warmup_rows(rendered, o), len(o["kept_epochs"])
        flops = (training_flops(params.forward, _all(warm), o["epochs"], p_lora)
                 + n_ckpt * training_flops(params.forward, full, 1, p_lora)
                 + n_ckpt * len(rendered) * 2.0 * p_lora * (o["projection_dim"] or 0))
        return {"tokens": full, "flops_uncached": flops,
                "rule": f"LoRA warm-up ({o['epochs']} epochs × {len(warm)} rows) + {n_ckpt} checkpoints × "
                        f"(gradient pass + projection) of {len(rendered)} rows"}
    return {"tokens": full, "flops_uncached": forward_flops(params.forward, full),
            "rule": "forward over prompt + response"}


def _attention_targets(params: ModelParams) -> list[str]:
    names = {n for n, _, _ in params.linears}
    for targets in (["q_proj", "v_proj"], ["c_attn"], ["query_key_value"], ["Wqkv"]):
        if set(targets) <= names:
            return targets
    raise ValueError("no known attention projection for the LoRA-gradient cost; set target_modules")


# -- measuring evaluation -----------------------------------------------------------------------------------
@dataclass
class TokenCounter:
    """Positions processed by outermost model calls (``tokens``) and how many calls (``calls``)."""

    tokens: int = 0
    calls: int = 0


@contextmanager
def count_forward_tokens() -> Iterator[TokenCounter]:
    """Count the token positions the HF models process while the block runs. lm-eval calls the model itself, so
    this measures what it ran without touching its code: global module hooks track the outermost
    ``PreTrainedModel`` call (the decoder inside ``*ForCausalLM`` is nested, not a second pass) and count the
    input of its first ``nn.Embedding`` call, the token ids (batch × positions, padding included: padded
    positions are computed too; with a KV cache a generation step feeds one position per sequence)."""
    import torch
    from transformers import PreTrainedModel

    counter = TokenCounter()
    state = {"depth": 0, "counted": False}

    def pre(module, args):
        if isinstance(module, PreTrainedModel):
            if state["depth"] == 0:
                state["counted"] = False
                counter.calls += 1
            state["depth"] += 1
        elif (isinstance(module, torch.nn.Embedding) and state["depth"] > 0 and not state["counted"]
              and args and torch.is_tensor(args[0])):
            counter.tokens += int(args[0].numel())
            state["counted"] = True  # later embeddings of the same call (GPT-2's positions) are not tokens

    def post(module, args, output):
        if isinstance(module, PreTrainedModel):
            state["depth"] = max(state["depth"] - 1, 0)

    hooks = [torch.nn.modules.module.register_module_forward_pre_hook(pre),
             torch.nn.modules.module.register_module_forward_hook(post, always_call=True)]
    try:
        yield counter
    finally:
        for h in hooks:
            h.remove()


# -- the run's summary --------------------------------------------------------------------------------------
def _sum(values: Sequence[float | None]) -> float:
    return float(sum(v for v in values if v is not None))


def summarize(events: Sequence[dict], seconds: dict[str, float], selection_seconds: float | None = None,
              selection_seconds_recorded: float | None = None) -> dict[str, Any]:
    """``results.json["cost"]``: per stage the FLOPs incurred in this run (``flops``), what the stage would cost
    from scratch (``flops_uncached``) and its wall time; the selection cost (every pass made inside the selector:
    its calibration, its scoring and signals) as separate numbers; the events themselves; the passes that have
    no estimate (``not_estimated``, left out of the sums rather than guessed)."""
    stages: dict[str, dict[str, Any]] = {}
    for st in COST_STAGES:
        evs = [e for e in events if e["stage"] == st]
        stages[st] = {"flops": _sum([e["flops"] for e in evs]),
                      "flops_uncached": _sum([e["flops_uncached"] for e in evs]),
                      "seconds": float(seconds.get(st, 0.0)), "passes": len(evs),
                      "passes_cached": sum(bool(e["cached"]) for e in evs)}
    sel = [e for e in events if e.get("selection")]
    return {
        "stages": stages,
        "selection_flops": _sum([e["flops"] for e in sel]),
        "selection_flops_uncached": _sum([e["flops_uncached"] for e in sel]),
        # this run's wall time inside the selector (0 for a cached selection), and the time recorded when the
        # selection was computed (its upstream passes may have been cache hits then)
        "selection_seconds": selection_seconds,
        "selection_seconds_recorded": selection_seconds_recorded,
        "train_flops": stages["train"]["flops"], "train_flops_uncached": stages["train"]["flops_uncached"],
        "eval_flops": stages["eval"]["flops"], "eval_flops_uncached": stages["eval"]["flops_uncached"],
        "total_flops": _sum([e["flops"] for e in events]),
        "total_flops_uncached": _sum([e["flops_uncached"] for e in events]),
        "not_estimated": [f"{e['stage']}: {e['what']} ({e.get('rule')})" for e in events
                          if e["flops_uncached"] is None],
        "events": list(events),
        "method": "forward 2·P·T, full SFT 6·P·T·epochs, LoRA (4·P + 6·P_lora)·T·epochs; P = parameters "
                  "without the input embedding table (instructdiff/cost.py)",
    }
