"""Peak memory per rank of scoring (or of a gradient signal) against pool size, on synthetic short rows.

    nice -n 10 python scripts/bench_memory.py                          # scoring, 1k / 10k / 100k rows
    python scripts/bench_memory.py --nproc 2 --sizes 1000 10000        # per rank of a 2-process gloo group
    python scripts/bench_memory.py --signal lora_grad_norms --sizes 250 1000 4000
    python scripts/bench_memory.py --signal less_grads --sizes 250 1000

The model is the tiny test model (``--model`` takes any conf/model name); the pool is N synthetic rows
("What is a plus b?" / "It is c."), so only the row count changes between sizes. Every size runs in fresh
processes (``--nproc`` > 1: under torch.distributed.run, gloo), and each rank reports

  ready   resident memory (VmRSS) with the pool rendered and the model loaded, just before the pass
  peak    the highest resident memory during the pass: the kernel's high-water mark (VmHWM) is reset to the
          current RSS right before it (Linux /proc/self/clear_refs), so an earlier transient peak (tokenising,
          loading) cannot hide what the pass itself holds
  growth  peak − ready: what the pass holds beyond its inputs. With a bounded window of per-row tensors it is
          flat in the pool size, apart from the output itself (scoring: 4 float64 per row = 32 B/row)

Scoring goes through the cache (``ScoreStore.response_stats`` into a temporary directory, checkpoints
included), as the pipeline scores. The last line printed is one JSON object; ``growth_ratio`` is the growth
at the largest size over the growth at the smallest, ``growth_bytes_per_row`` the slope between them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TAG = "BENCH_MEMORY "


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} (this benchmark needs Linux)")


def _reset_peak() -> None:
    # "5" resets VmHWM to the current RSS (proc(5), Linux >= 4.0); nothing in Python or psutil offers it
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def synthetic_rows(n: int) -> list:
    from instructdiff.rows import Row

    return [Row.make(f"What is {k} plus {3 * k + 1}?", "", f"It is {4 * k + 1}.") for k in range(n)]


def child(model: str, size: int, cache: str, signal: str | None) -> dict:
    import torch
    from omegaconf import OmegaConf

    from instructdiff import CONF_DIR, distributed
    from instructdiff.models import load_model, load_tokenizer, resolve_model
    from instructdiff.render import Renderer, render_pool
    from instructdiff.scoring import ScoreStore

    rank, world = distributed.init()
    torch.set_num_threads(1)
    ref = resolve_model(OmegaConf.load(CONF_DIR / "model" / f"{model}.yaml"), cache)
    tok = load_tokenizer(ref)
    renderer = Renderer(tok, "chat", max_length=1024)
    rows = synthetic_rows(size)
    rendered, dropped = render_pool(renderer, rows)
    if dropped:
        raise RuntimeError(f"{len(dropped)} synthetic rows were dropped by the renderer: {dropped[:3]}")
    rendered = [r.for_scoring("exclude") for r in rendered]
    net = load_model(ref, device="cpu")
    ready_kb = _status_kb("VmRSS")
    _reset_peak()
    t0 = time.time()
    if signal is None:
        store = distributed.main_first(tempfile.mkdtemp)  # one store for all ranks: rank 0 writes the merged table
        ScoreStore(store).response_stats(
            lambda: net, ref.fingerprint, rendered, renderer.fingerprint,
            {"pad_id": tok.pad_token_id, "max_tokens_per_batch": 2048, "max_batch_size": 32,
             "checkpoint_every": 20}, desc=f"score {size}")
        distributed.barrier()
        if distributed.is_main():
            shutil.rmtree(store)
    else:
        from instructdiff.signals import SignalInputs, get_signal

        options = {"lora_grad_norms": {"members": 1, "epochs": 2},
                   "less_grads": {"epochs": 1, "query_ids": [r.id for r in rows[:8]]}}[signal]
        get_signal(signal)(SignalInputs(net, tok, renderer, rows, rendered, torch.device("cpu"), 0), options)
    seconds = time.time() - t0
    peak_kb = _status_kb("VmHWM")
    return {"size": size, "rank": rank, "world_size": world, "tokens": sum(r.n_tokens for r in rendered),
            "ready_mb": round(ready_kb / 1024, 1), "peak_mb": round(peak_kb / 1024, 1),
            "growth_mb": round((peak_kb - ready_kb) / 1024, 1), "seconds": round(seconds, 1)}


def run_size(args: argparse.Namespace, size: int) -> list[dict]:
    me = [str(Path(__file__).resolve()), "--model", args.model, "--cache-dir", args.cache_dir, "--child", str(size)]
    if args.signal:
        me += ["--signal", args.signal]
    launcher = [sys.executable] if args.nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}"]
    out = subprocess.run([*launcher, *me], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    if out.returncode != 0:
        raise SystemExit(f"pool {size}: the child failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    runs = [json.loads(line[len(TAG):]) for line in out.stdout.splitlines() if line.startswith(TAG)]
    return sorted(runs, key=lambda r: r["rank"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="a conf/model name")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--nproc", type=int, default=1, help="processes (ranks) per size, under torch.distributed.run")
    ap.add_argument("--signal", choices=["lora_grad_norms", "less_grads"], default=None,
                    help="measure this gradient signal instead of scoring (small sizes: it trains per row)")
    ap.add_argument("--cache-dir", default="outputs/cache", help="where the model is built or converted once")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        res = child(args.model, args.child, args.cache_dir, args.signal)
        print(TAG + json.dumps(res), flush=True)
        from instructdiff import distributed

        distributed.destroy()
        return
    what = args.signal or "scoring"
    print(f"{what}, model {args.model}, {args.nproc} process(es) per size; MB = MiB of resident memory per rank")
    print(f"{'rows':>8} {'rank':>4} {'tokens':>9} {'ready MB':>9} {'peak MB':>9} {'growth MB':>9} {'seconds':>8}")
    runs: list[dict] = []
    for size in args.sizes:
        for r in run_size(args, size):
            runs.append(r)
            print(f"{r['size']:>8} {r['rank']:>4} {r['tokens']:>9} {r['ready_mb']:>9.1f} {r['peak_mb']:>9.1f} "
                  f"{r['growth_mb']:>9.1f} {r['seconds']:>8.1f}", flush=True)
    first = [r for r in runs if r["size"] == args.sizes[0]]
    last = [r for r in runs if r["size"] == args.sizes[-1]]
    worst = lambda rs, k: max(r[k] for r in rs)  # noqa: E731 - the heaviest rank at one size
    rows = args.sizes[-1] - args.sizes[0]
    summary = {
        "what": what, "model": args.model, "nproc": args.nproc, "runs": runs,
        "peak_ratio": round(worst(last, "peak_mb") / worst(first, "peak_mb"), 3),
        # growth below 1 MB is noise of the allocator; the floor keeps the ratio meaningful
        "growth_ratio": round(max(worst(last, "growth_mb"), 1.0) / max(worst(first, "growth_mb"), 1.0), 3),
        "growth_bytes_per_row": round((worst(last, "growth_mb") - worst(first, "growth_mb")) * 2**20 / rows, 1)
        if rows else None,
        "ready_bytes_per_row": round((worst(last, "ready_mb") - worst(first, "ready_mb")) * 2**20 / rows, 1)
        if rows else None,
    }
    print(f"peak at {args.sizes[-1]} rows / at {args.sizes[0]}: {summary['peak_ratio']}x; growth during the pass: "
          f"{summary['growth_ratio']}x ({summary['growth_bytes_per_row']} B per extra row); the pool and its "
          f"rendering before the pass: {summary['ready_bytes_per_row']} B per extra row")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
