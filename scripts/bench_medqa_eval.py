#!/usr/bin/env python
"""Benchmark MedQA accuracy by the answer letter (id_medqa_letter) against the full-option task (id_medqa).

Both tasks score the same first ``--n`` MedQA test items by log-likelihood on one model (default: the base
SmolLM2-135M-Instruct). id_medqa scores each of the four options written out ("The answer is B: <text>."),
four continuations of several tokens; id_medqa_letter scores " A" … " D" after "The answer is", one token each,
which lm-eval reads from one forward pass per item. Each of ``--rounds`` rounds runs both tasks on all the items,
in an order flipped per round, so load from other processes falls on both alike; wall times are their means.

Printed: wall seconds, model calls and token positions per task, their ratios, the projected time for all
1,273 items, and each task's accuracy (they measure different things: the ratio is the point). The last line is
one JSON object.

    python scripts/bench_medqa_eval.py              # 128 items (minutes on 2 cores)
    python scripts/bench_medqa_eval.py --n 16       # quick
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

from instructdiff import CONF_DIR, PROJECT_ROOT
from instructdiff.cost import count_forward_tokens
from instructdiff.evaluate import evaluate_model
from instructdiff.models import resolve_model

MEDQA_TEST_ITEMS = 1273
TASKS = {"id_medqa": "acc", "id_medqa_letter": "acc"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=128, help="MedQA test items (the first of the file)")
    ap.add_argument("--rounds", type=int, default=2, help="times both tasks run, in alternating order")
    ap.add_argument("--model", default="smollm2_135m", help="a conf/model name")
    ap.add_argument("--cache-dir", default=str(PROJECT_ROOT / "outputs" / "cache"))
    ap.add_argument("--batch-size", type=int, default=16, help="eval.batch_size (the CPU study profile's)")
    ap.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.n < 1 or args.rounds < 1:
        raise SystemExit(f"--n ({args.n}) and --rounds ({args.rounds}) must be at least 1")
    ref = resolve_model(OmegaConf.load(CONF_DIR / "model" / f"{args.model}.yaml"), Path(args.cache_dir))
    totals = {t: {"wall_s": 0.0, "calls": 0, "tokens": 0} for t in TASKS}
    correct = dict.fromkeys(TASKS, 0.0)
    with tempfile.TemporaryDirectory(prefix="bench-medqa-") as work:
        for k in range(args.rounds):
            for task in (list(TASKS) if k % 2 == 0 else list(TASKS)[::-1]):
                cfg = {"tasks": [task], "limit": args.n, "batch_size": args.batch_size, "loglikelihood_only": True}
                t0 = time.perf_counter()
                with count_forward_tokens() as counter:
                    out = evaluate_model(ref, cfg, Path(work) / f"{task}-{k}", device=args.device)
                totals[task]["wall_s"] += (time.perf_counter() - t0) / args.rounds
                totals[task]["calls"], totals[task]["tokens"] = counter.calls, counter.tokens
                correct[task] = out["metrics"][f"{task}/{TASKS[task]}"]
    full, letter = totals["id_medqa"], totals["id_medqa_letter"]
    result = {
        "n_items": args.n, "model": args.model, "batch_size": args.batch_size, "torch_threads": _threads(),
        **{f"{t}_{k}": v for t, d in totals.items() for k, v in d.items()},
        **{f"{t}_acc": correct[t] for t in TASKS},
        "tokens_ratio_full_over_letter": full["tokens"] / max(letter["tokens"], 1),
        "time_ratio_full_over_letter": full["wall_s"] / max(letter["wall_s"], 1e-9),
        "projected_all_items_s": {t: d["wall_s"] * MEDQA_TEST_ITEMS / args.n for t, d in totals.items()},
    }
    print(f"MedQA, first {args.n} items, {args.model}, batch {args.batch_size}, {_threads()} threads")
    print(f"{'task':<18}{'wall s':>9}{'calls':>8}{'tokens':>10}{'acc':>7}{'all items s':>13}")
    for t, d in totals.items():
        print(f"{t:<18}{d['wall_s']:>9.1f}{d['calls']:>8}{d['tokens']:>10}{correct[t]:>7.3f}"
              f"{result['projected_all_items_s'][t]:>13.0f}")
    print(f"full options / letter: {result['tokens_ratio_full_over_letter']:.2f}x the token positions, "
          f"{result['time_ratio_full_over_letter']:.2f}x the time")
    print(json.dumps(result))
    return result


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    sys.exit(0 if main() else 1)
