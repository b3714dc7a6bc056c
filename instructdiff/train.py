"""Supervised fine-tuning with TRL's ``SFTTrainer`` (full or LoRA), loss on the completion only.

The dataset handed to TRL is already tokenized by ``render.Renderer`` (``input_ids`` + ``completion_mask``),
so the trained tokens are exactly the scored tokens. LoRA adapters are merged into the weights before
saving: every later stage (scoring, evaluation) then loads one plain HF directory, whatever the method.

Launched as several processes (torchrun, ``accelerate launch``, SLURM tasks) every rank trains its share of
each global batch: data-parallel (DDP) by default, or sharded (FSDP, ``trainer.strategy=fsdp``) for a model
whose weights, gradients and optimiser state do not fit one device. The global batch is
per_device_batch_size × gradient_accumulation_steps × processes; rank 0 alone writes the model directory.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from instructdiff import distributed
from instructdiff.lean_lm_head import ROW_BLOCK, fold_in_row_blocks
from instructdiff.models import ModelRef, load_model, load_tokenizer
from instructdiff.render import Renderer
from instructdiff.rows import Row

log = logging.getLogger(__name__)


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    return cfg.get(key, default) if hasattr(cfg, "get") else default


def precision_flags(precision: str) -> dict[str, bool]:
    """bf16 on a GPU that supports it, fp32 elsewhere (CPU autocast to bf16 trains poorly at these sizes)."""
    on_cuda = torch.cuda.is_available()
    if precision == "auto":
        precision = "bf16" if on_cuda and torch.cuda.is_bf16_supported() else "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"trainer.precision must be auto|fp32|bf16|fp16, got {precision!r}")
    if precision == "fp16" and not on_cuda:
        raise ValueError("trainer.precision=fp16 needs a CUDA GPU")
    return {"bf16": precision == "bf16", "fp16": precision == "fp16", "use_cpu": not on_cuda}


STRATEGIES = ("auto", "ddp", "fsdp")


def parallel_args(strategy: str, method: str, gradient_checkpointing: bool) -> dict[str, Any]:
    """The TrainingArguments that pick the data-parallel engine for ``trainer.strategy``.

    auto and ddp leave it to Accelerate, which wraps the model in DDP when the launcher started several
    processes (and does nothing for one). fsdp shards parameters, gradients and optimiser state across the
    ranks (FSDP2 through Accelerate, one unit per decoder layer from the model's ``_no_split_modules``), and
    the full state dict is gathered to rank 0 for saving.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"trainer.strategy must be one of {'|'.join(STRATEGIES)}, got {strategy!r}")
    if strategy != "fsdp":
        return {"activation_checkpointing": gradient_checkpointing}
    if method != "full":
        raise ValueError(f"trainer.strategy=fsdp shards a full fine-tune; trainer.method={method!r} is not "
                         "supported with it (the adapters would have to be merged from shards): use "
                         "trainer.strategy=ddp, or trainer=sft_full with fsdp")
    # FSDP re-gathers a layer's shards once when it recomputes activations itself; the trainer-level switch
    # would wrap the already-sharded layers and gather them twice (transformers' fsdp_config docs)
    return {"fsdp": True, "activation_checkpointing": False,
            "fsdp_config": {"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                            "state_dict_type": "FULL_STATE_DICT", "reshard_after_forward": True,
                            "activation_checkpointing": gradient_checkpointing}}


def build_dataset(rows: list[Row], renderer: Renderer, n_filler: int = 0):
    """Token ids and completion masks of ``rows``, then ``n_filler`` rows that train on nothing (see
    ``EvenShardSampler``): copies of the shortest row with an all-zero mask (no loss, no token counted)."""
    from datasets import Dataset

    input_ids, completion_mask = [], []
    for row in rows:
        r = renderer(row)
        input_ids.append(r.prompt_ids + r.completion_ids)
        completion_mask.append([0] * r.n_prompt + [1] * r.n_completion)
    if n_filler:
        shortest = min(input_ids, key=len)
        input_ids += [list(shortest)] * n_filler
        completion_mask += [[0] * len(shortest)] * n_filler
    return Dataset.from_dict({"input_ids": input_ids, "completion_mask": completion_mask})


class EvenShardSampler(torch.utils.data.Sampler):
    """The one-process order of the ``n`` real rows, then the filler rows ``n … n+n_filler−1``.

    Accelerate deals each global batch out to the ranks and, when an epoch does not divide into
    per-device batch × processes, tops the last batches up with rows from the epoch's start: those rows
    train twice, so an N-process run would no longer equal one process (measured on 17 tiny-model rows:
    per-step loss off by up to 0.034). Filling with rows that carry no loss tokens instead keeps every
    optimiser step's rows and token count those of the one-process run. The order of the real rows is
    Accelerate's own ``SeedableRandomSampler`` over ``n`` rows, the sampler a one-process run shuffles with.
    """

    def __init__(self, n: int, n_filler: int, data_seed: int) -> None:
        from accelerate.data_loader import SeedableRandomSampler

        self.real = SeedableRandomSampler(range(n), data_seed=data_seed)
        self.filler = list(range(n, n + n_filler))

    def set_epoch(self, epoch: int) -> None:
        self.real.set_epoch(epoch)

    def __iter__(self):
        yield from self.real
        yield from self.filler

    def __len__(self) -> int:
        return len(self.real) + len(self.filler)


def train_sft(base: ModelRef, rows: list[Row], trainer_cfg: Any, render_cfg: dict, out_dir: Path,
              seed: int, stage: str = "train") -> dict:
    """Fine-tune ``base`` on ``rows`` and save the merged model to ``out_dir``; returns training stats.
    ``stage`` (calibrate | train) names the fault-injection point ``<stage>.step`` (instructdiff/faults.py)."""
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from instructdiff.faults import crash_point

    class _FaultPoint(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            crash_point(f"{stage}.step")

    if not rows:
        raise ValueError("cannot train on an empty selection")
    # joined before TRL builds its Accelerator, which then reuses this group and its timeout
    _, world = distributed.init()
    strategy = str(_get(trainer_cfg, "strategy", "auto"))
    if strategy == "fsdp" and world == 1:
        raise ValueError("trainer.strategy=fsdp shards the model across processes, and this run is one process: "
                         "launch it with torchrun --nproc_per_node=N (N GPUs), or use trainer.strategy=auto")
    # same numbers, ~1.4 GiB less at the default run's peak (instructdiff/lean_lm_head.py); a bad value fails
    # here, before the model is loaded
    fold_in_row_blocks(_get(trainer_cfg, "lm_head_fold_rows", ROW_BLOCK))
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if distributed.is_main() and tmp.exists():
        shutil.rmtree(tmp)
    distributed.barrier()
    t0 = time.time()
    per_device = int(_get(trainer_cfg, "per_device_batch_size", 4))
    accumulation = int(_get(trainer_cfg, "gradient_accumulation_steps", 1))
    n_filler = -len(rows) % (per_device * world) if world > 1 else 0
    tokenizer = load_tokenizer(base)
    renderer = Renderer(tokenizer, **render_cfg)
    dataset = build_dataset(rows, renderer, n_filler)
    model = load_model(base, dtype="float32", device="cpu")
    model.train()

    method = _get(trainer_cfg, "method", "full")
    peft_config = None
    if method == "lora":
        from peft import LoraConfig

        lora = _get(trainer_cfg, "lora", {})
        peft_config = LoraConfig(r=int(lora.get("r", 8)), lora_alpha=int(lora.get("alpha", 16)),
                                 lora_dropout=float(lora.get("dropout", 0.05)),
                                 target_modules=list(lora.get("target_modules", ["q_proj", "v_proj"])),
                                 task_type="CAUSAL_LM")
    elif method != "full":
        raise ValueError(f"trainer.method must be 'full' or 'lora', got {method!r}")

    flags = precision_flags(str(_get(trainer_cfg, "precision", "auto")))
    # TRL's SFTConfig turns activation checkpointing on by default: ~30% more compute per step, which only
    # pays off when memory is short, so it is an explicit choice here.
    parallel = parallel_args(strategy, method, bool(_get(trainer_cfg, "gradient_checkpointing", False)))
    args = SFTConfig(
        output_dir=str(tmp / "trainer"),
        num_train_epochs=float(_get(trainer_cfg, "epochs", 3)),
        max_steps=int(_get(trainer_cfg, "max_steps", -1)),
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        learning_rate=float(_get(trainer_cfg, "learning_rate", 5e-5)),
        lr_scheduler_type=str(_get(trainer_cfg, "lr_scheduler", "cosine")),
        warmup_steps=float(_get(trainer_cfg, "warmup_ratio", 0.05)),
        weight_decay=float(_get(trainer_cfg, "weight_decay", 0.0)),
        max_grad_norm=float(_get(trainer_cfg, "max_grad_norm", 1.0)),
        logging_steps=int(_get(trainer_cfg, "logging_steps", 10)),
        seed=int(seed),
        data_seed=int(seed),
        save_strategy="no",
        report_to="none",
        completion_only_loss=True,
        max_length=None,  # the renderer already dropped over-long rows; never truncate silently here
        dataloader_num_workers=0,
        disable_tqdm=not bool(_get(trainer_cfg, "progress_bar", True)),
        **flags,
        **parallel,
    )

    class _Trainer(SFTTrainer):
        def _get_train_sampler(self, train_dataset=None):
            if world == 1:
                return super()._get_train_sampler(train_dataset)
            return EvenShardSampler(len(rows), n_filler, int(seed))

    trainer = _Trainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                       peft_config=peft_config, callbacks=[_FaultPoint()])
    if strategy == "fsdp" and not trainer.is_fsdp_enabled:
        # Accelerate shards only across accelerators; elsewhere it would quietly train unsharded (DDP)
        raise ValueError(f"trainer.strategy=fsdp: Accelerate did not shard this run ({world} process(es) on "
                         f"{args.device.type}); FSDP needs several GPU processes (torchrun --nproc_per_node=N "
                         "on N GPUs); on CPU or one GPU use trainer.strategy=auto")
    result = trainer.train()
    losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    stats = {
        "n_samples": len(rows),
        "n_tokens": int(sum(len(x) for x in dataset["input_ids"][:len(rows)])),
        "n_loss_tokens": int(sum(sum(m) for m in dataset["completion_mask"])),
        "steps": int(trainer.state.global_step),
        "train_loss": float(result.training_loss),
        "first_logged_loss": losses[0][1] if losses else None,
        "last_logged_loss": losses[-1][1] if losses else None,
        # the mean training loss over each logging window, as [step, loss]: what a 1- and an N-process run
        # with the same global batch are compared on (tests/test_distributed.py)
        "loss_curve": [[int(step), float(loss)] for step, loss in losses],
        "method": method,
        "precision": "bf16" if flags["bf16"] else "fp16" if flags["fp16"] else "fp32",
        "strategy": strategy,
        "world_size": world,
        "global_batch_size": per_device * accumulation * world,
    }
    _save_model(trainer, tokenizer, peft_config is not None, tmp)
    stats["seconds"] = round(time.time() - t0, 2)
    if distributed.is_main():
        shutil.rmtree(tmp / "trainer", ignore_errors=True)
        (tmp / "train_stats.json").write_text(json.dumps(stats, indent=2))  # last: it marks the model done
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    # no rank reads the model before rank 0 has published it; every rank returns rank 0's numbers
    distributed.barrier()
    stats = distributed.broadcast(stats)
    del trainer, model
    return stats


def _save_model(trainer: Any, tokenizer: Any, merge_lora: bool, tmp: Path) -> None:
    """Rank 0 writes the trained model (LoRA merged) and its tokenizer to ``tmp`` as fp32 safetensors."""
    if trainer.is_fsdp_enabled:
        # a collective: every rank hands its shards over, rank 0 receives the full state dict and writes it
        trainer.save_model(str(tmp))
        if distributed.is_main():
            (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; nothing here loads pickles
    elif distributed.is_main():
        trained = trainer.model
        if merge_lora:
            trained = trained.merge_and_unload()
        trained.to(torch.float32).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
