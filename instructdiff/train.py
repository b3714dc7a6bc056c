"""Supervised fine-tuning with TRL's ``SFTTrainer`` (full or LoRA), loss on the completion only.

The dataset handed to TRL is already tokenized by ``render.Renderer`` (``input_ids`` + ``completion_mask``),
so the trained tokens are exactly the scored tokens. LoRA adapters are merged into the weights before
saving: every later stage (scoring, evaluation) then loads one plain HF directory, whatever the method.
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


def build_dataset(rows: list[Row], renderer: Renderer):
    from datasets import Dataset

    input_ids, completion_mask = [], []
    for row in rows:
        r = renderer(row)
        input_ids.append(r.prompt_ids + r.completion_ids)
        completion_mask.append([0] * len(r.prompt_ids) + [1] * len(r.completion_ids))
    return Dataset.from_dict({"input_ids": input_ids, "completion_mask": completion_mask})


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
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    t0 = time.time()
    tokenizer = load_tokenizer(base)
    renderer = Renderer(tokenizer, **render_cfg)
    dataset = build_dataset(rows, renderer)
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
    args = SFTConfig(
        output_dir=str(tmp / "trainer"),
        num_train_epochs=float(_get(trainer_cfg, "epochs", 3)),
        max_steps=int(_get(trainer_cfg, "max_steps", -1)),
        per_device_train_batch_size=int(_get(trainer_cfg, "per_device_batch_size", 4)),
        gradient_accumulation_steps=int(_get(trainer_cfg, "gradient_accumulation_steps", 1)),
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
        # TRL's SFTConfig turns activation checkpointing on by default: ~30% more compute per step, which
        # only pays off when memory is short, so it is an explicit choice here.
        activation_checkpointing=bool(_get(trainer_cfg, "gradient_checkpointing", False)),
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[_FaultPoint()])
    result = trainer.train()
    trained = trainer.model
    if peft_config is not None:
        trained = trained.merge_and_unload()
    trained = trained.to(torch.float32)
    trained.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(tmp / "trainer", ignore_errors=True)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    stats = {
        "n_samples": len(rows),
        "n_tokens": int(sum(len(x) for x in dataset["input_ids"])),
        "n_loss_tokens": int(sum(sum(m) for m in dataset["completion_mask"])),
        "steps": int(trainer.state.global_step),
        "train_loss": float(result.training_loss),
        "first_logged_loss": losses[0] if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
        "method": method,
        "precision": "bf16" if flags["bf16"] else "fp16" if flags["fp16"] else "fp32",
        "seconds": round(time.time() - t0, 2),
    }
    (tmp / "train_stats.json").write_text(json.dumps(stats, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    del trainer, model, trained
    return stats
