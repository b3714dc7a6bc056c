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
  * Signals (``signal_cost``): each signal module declares the passes it makes (``work``, beside the signal);
    they are priced here. The LoRA-gradient ensemble trains; LESS trains a LoRA warm-up, then takes a gradient
    of every row per checkpoint and projects it; SelectIT reads every row once per rating prompt; the MiniLM
    sentence encoder is a different model and is left unestimated (listed in ``not_estimated``, never guessed).

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
    it took × global batch / samples (the last partial batch counts as full). The global batch is the one the
    training recorded (``global_batch_size``: all its processes), else that of one process."""
    max_steps = int(trainer_cfg.get("max_steps", -1) or -1)
    if max_steps <= 0:
        return float(trainer_cfg.get("epochs", 1))
    n = max(int(stats.get("n_samples", 0)), 1)
    batch = int(stats.get("global_batch_size") or int(trainer_cfg.get("per_device_batch_size", 1))
                * int(trainer_cfg.get("gradient_accumulation_steps", 1)))
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
#: the ScoreStore's response NLL / entropy pass (instructdiff.scoring), priced like a signal but not one
RESPONSE_STATS = "response_stats"


def signal_cost(name: str, options: dict, rendered: Sequence[Any], params: ModelParams) -> dict[str, Any]:
    """Estimated from-scratch FLOPs of the signal ``name`` over ``rendered`` rows with the model's ``params``:
    {tokens, flops_uncached (None when not estimated), rule}. The passes are the ones the signal's own module
    declares (``work`` beside its compute function, instructdiff.signals); this prices them by the rules above."""
    from instructdiff.signals import forward_over_all, signal_work

    work = forward_over_all(rendered) if name == RESPONSE_STATS else signal_work(name, options, rendered, params)
    if not work.estimated:
        return {"tokens": work.tokens, "flops_uncached": None, "rule": work.rule}
    flops = forward_flops(params.forward, work.forward_tokens) + work.other_flops
    for t in work.trainings:
        flops += training_flops(params.forward, t.tokens, t.epochs, t.lora_params)
    return {"tokens": work.tokens, "flops_uncached": flops, "rule": work.rule}


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


# -- the run's ledger ---------------------------------------------------------------------------------------
class CostLedger:
    """Every model pass a run asked for, cached or not, with its estimated FLOPs; the passes made while a
    selector runs (``during_selection``) are that selector's selection cost."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.selecting = False
        # this run's wall time inside the selector, and the time recorded when the selection was computed
        self.selection_seconds: float | None = None
        self.selection_seconds_recorded: float | None = None

    def record(self, stage: str, what: str, ref: Any, cached: bool, estimate: Any) -> None:
        """One pass of the model ``ref`` (a ModelRef): ``estimate(ModelParams) -> {tokens, flops_uncached, ...}``
        is its from-scratch cost; ``flops`` (incurred here) is 0 when it came from the cache. An estimate that
        fails is recorded as not estimated, never guessed."""
        import logging

        event: dict[str, Any] = {"stage": stage, "what": what, "model": ref.name, "cached": bool(cached),
                                 "selection": self.selecting}
        try:
            event.update(estimate(model_params(ref.path, ref.trust_remote_code, ref.revision)))
        except Exception as e:  # e.g. a config transformers cannot build: the run goes on, the gap is shown
            logging.getLogger("instructdiff").warning("no FLOPs estimate for %s (%s): %s", what, ref.name, e)
            event.update({"tokens": None, "flops_uncached": None, "rule": f"not estimated: {e}"})
        unc = event["flops_uncached"]
        event["flops"] = None if unc is None else (0.0 if cached else unc)
        self.events.append(event)

    @contextmanager
    def during_selection(self) -> Iterator[dict[str, Any]]:
        """Every pass recorded in the block is selection cost. Yields the record a cached selection keeps,
        ``{"events", "seconds"}``, filled in when the block ends."""
        import time

        record: dict[str, Any] = {}
        start, t0 = len(self.events), time.time()
        self.selecting = True
        try:
            yield record
        finally:
            self.selecting = False
        self.selection_seconds = self.selection_seconds_recorded = round(time.time() - t0, 3)
        record.update(events=self.events[start:], seconds=self.selection_seconds)

    def restore_selection(self, record: dict | None) -> None:
        """A cached selection costs nothing now; its recorded passes still tell what it costs from scratch."""
        self.selection_seconds = 0.0
        self.selection_seconds_recorded = (record or {}).get("seconds")
        for e in (record or {}).get("events", []):
            self.events.append({**e, "cached": True, "selection": True,
                                "flops": None if e.get("flops_uncached") is None else 0.0})

    def summary(self, seconds: dict[str, float]) -> dict[str, Any]:
        """``results.json["cost"]`` (see ``summarize``)."""
        return summarize(self.events, seconds, self.selection_seconds, self.selection_seconds_recorded)
