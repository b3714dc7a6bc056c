"""Peak memory per rank of scoring (or of a gradient signal) against pool size, on synthetic short rows.

    nice -n 10 python scripts/bench_memory.py                          # scoring, 1k / 10k / 100k rows
    python scripts/bench_memory.py --nproc 2 --sizes 1000 10000        # per rank of a 2-process gloo group
    python scripts/bench_memory.py --signal lora_grad_norms --sizes 250 1000 4000
    python scripts/bench_memory.py --signal less_grads --sizes 250 1000 4000

The model is the tiny test model (``--model`` takes any conf/model name); the pool is N synthetic rows
("What is a plus b?" / "It is c.", ~39 tokens), so only the row count changes between sizes. Every size runs in
fresh processes (``--nproc`` > 1: under torch.distributed.run, gloo), and each rank reports

  rows    resident memory (VmRSS) the pool's Row objects add
  render  what rendering them adds (``render_pool``, then ``for_scoring``)
  ready   resident memory with the pool rendered and the model loaded, just before the pass
  peak    the highest resident memory during the pass: the kernel's high-water mark (VmHWM) is reset to the
          current RSS right before it (Linux /proc/self/clear_refs), so an earlier transient peak (tokenising,
          loading) cannot hide what the pass itself holds
  growth  peak − ready: what the pass holds beyond its inputs, writing its table included
  pass    scoring only: the high-water mark just before the table is written, − ready: the pass apart from
          writing its output

Scoring goes through the cache (a ``ScoreStore`` entry served into a temporary directory, checkpoints
included), as the pipeline scores (under several ranks every rank computes its shard together). The last line
printed is one JSON object; ``growth_ratio`` is the growth at the largest size over the growth at the smallest,
``*_bytes_per_row`` the slopes between them.

Measured 2026-12-06 on 2 CPU cores shared with a concurrent study (times are not comparable, memory is), one
process, MiB (issue 15, "memory at scale"; before = the commit 24f9ac5 engine, after = packed token ids, an
integer batch plan and checkpoints written from the preallocated table):

    rows     ready  (before)    peak  (before)   growth  (before)    pass
    1000     404.4   (405.5)   419.8   (421.2)     15.4    (15.6)    15.4
    10000    413.3   (419.8)   431.0   (438.4)     17.7    (18.6)    17.7
    100000   477.7   (550.4)   510.9   (596.8)     33.3    (46.4)    21.8

  slopes, B per extra row: growth 190 (326), pass 68, ready 776 (1,535) = Row objects 458 (458) + rendering
  411 (1,303)

So a rank's peak while scoring N rows is about 404 MB + 0.78 kB·N (the pool as Row objects, and rendered:
4 B a token plus ~250 B of objects a row) + 14 MB + 68 B·N during the pass (the float64 table, 32 B a row; a
bool mask; the int64 batch plan; allocator slack), + 4·L·N + min(4·L·N, 16 MiB) while the table is written
(the ids column of L-character ids as numpy writes it, ``np.array(ids)`` and numpy's chunk copy of it for the
zip stream; L = 16 for content ids). Nothing else is held per row: batches, their tensors and the key's hash
work in bounded windows. ``--nproc 2`` at 1k / 10k rows: 13.6 / 17.0 MB growth on rank 0, 14.5 / 16.0 on rank 1.

Gradient signals, growth at 250 / 1000 / 4000 rows: ``less_grads`` (1 epoch, 1 checkpoint, d = 8192) 131.7 /
149.6 / 243.6 MB, 32.8 kB a row from 1000 to 4000: its output, 8192 float32 projected features a row and
checkpoint (32 KiB); ``lora_grad_norms`` (1 member, 2 epochs) 29.4 / 29.8 / 31.1 MB, 0.47 kB a row: its own
arrays are 40 B a row (outputs 16, a pass's float64 norms 16, an epoch's permutation 8; tracemalloc), the rest
lies in torch / transformers call sites, not in the signal.
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
from dataclasses import replace
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
    from instructdiff.cache_check import serve
    from instructdiff.models import load_model, load_tokenizer, resolve_model
    from instructdiff.render import Renderer, render_pool
    from instructdiff.scoring import ScoreStore

    rank, world = distributed.init()
    torch.set_num_threads(1)
    ref = resolve_model(OmegaConf.load(CONF_DIR / "model" / f"{model}.yaml"), cache)
    tok = load_tokenizer(ref)
    renderer = Renderer(tok, "chat", max_length=1024)
    rows_before_kb = _status_kb("VmRSS")
    rows = synthetic_rows(size)
    rows_kb = _status_kb("VmRSS")
    rendered, dropped = render_pool(renderer, rows)
    if dropped:
        raise RuntimeError(f"{len(dropped)} synthetic rows were dropped by the renderer: {dropped[:3]}")
    rendered = [r.for_scoring("exclude") for r in rendered]
    rendered_kb = _status_kb("VmRSS")
    net = load_model(ref, device="cpu")
    ready_kb = _status_kb("VmRSS")
    # the high-water mark just before the first score table is written: what the pass itself holds, apart from
    # writing its output (the ids column and numpy's copy of it for the zip stream, at most 16 MiB)
    before_write: dict[str, int] = {}
    write = ScoreStore._write

    def noted_write(*args, **kwargs):
        before_write.setdefault("kb", _status_kb("VmHWM"))
        return write(*args, **kwargs)

    ScoreStore._write = staticmethod(noted_write)
    _reset_peak()
    t0 = time.time()
    if signal is None:
        store = distributed.main_first(tempfile.mkdtemp)  # one store for all ranks: rank 0 writes the merged table
        entry = ScoreStore(store).response_entry(
            lambda: net, ref.fingerprint, rendered, renderer.fingerprint,
            {"pad_id": tok.pad_token_id, "max_tokens_per_batch": 2048, "max_batch_size": 32,
             "checkpoint_every": 20}, desc=f"score {size}")
        if distributed.joined():
            # every rank scores its shard together, as the pipeline serves the entry (score_stage.PoolScorer.score);
            # served by rank 0 alone, the others would never join its collectives
            entry = replace(entry, together=True, lock=Path(f"{entry.path}.lock"))
        serve(entry)
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
    mb = lambda kb: round(kb / 1024, 1)  # noqa: E731
    return {"size": size, "rank": rank, "world_size": world, "tokens": sum(r.n_tokens for r in rendered),
            "rows_mb": mb(rows_kb - rows_before_kb), "rendered_mb": mb(rendered_kb - rows_kb),
            "ready_mb": mb(ready_kb), "peak_mb": mb(peak_kb), "growth_mb": mb(peak_kb - ready_kb),
            "pass_growth_mb": mb(before_write["kb"] - ready_kb) if before_write else None,
            "seconds": round(seconds, 1)}


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
        # one write of the whole line: the ranks share the pipe, and print's separate newline could interleave
        os.write(sys.stdout.fileno(), (TAG + json.dumps(res) + "\n").encode())
        from instructdiff import distributed

        distributed.destroy()
        return
    what = args.signal or "scoring"
    print(f"{what}, model {args.model}, {args.nproc} process(es) per size; MB = MiB of resident memory per rank")
    print(f"{'rows':>8} {'rank':>4} {'tokens':>9} {'rows MB':>8} {'render MB':>9} {'ready MB':>9} {'peak MB':>9} "
          f"{'growth MB':>9} {'pass MB':>8} {'seconds':>8}")
    runs: list[dict] = []
    for size in args.sizes:
        for r in run_size(args, size):
            runs.append(r)
            pass_mb = "-" if r["pass_growth_mb"] is None else f"{r['pass_growth_mb']:.1f}"
            print(f"{r['size']:>8} {r['rank']:>4} {r['tokens']:>9} {r['rows_mb']:>8.1f} {r['rendered_mb']:>9.1f} "
                  f"{r['ready_mb']:>9.1f} {r['peak_mb']:>9.1f} {r['growth_mb']:>9.1f} {pass_mb:>8} "
                  f"{r['seconds']:>8.1f}", flush=True)
    first = [r for r in runs if r["size"] == args.sizes[0]]
    last = [r for r in runs if r["size"] == args.sizes[-1]]
    worst = lambda rs, k: max(r[k] for r in rs)  # noqa: E731 - the heaviest rank at one size
    rows = args.sizes[-1] - args.sizes[0]

    def slope(key: str) -> float | None:
        """Bytes per extra row of ``key`` between the smallest and the largest size (heaviest rank)."""
        if not rows or any(r[key] is None for r in first + last):
            return None
        return round((worst(last, key) - worst(first, key)) * 2**20 / rows, 1)

    summary = {
        "what": what, "model": args.model, "nproc": args.nproc, "runs": runs,
        "peak_ratio": round(worst(last, "peak_mb") / worst(first, "peak_mb"), 3),
        # growth below 1 MB is noise of the allocator; the floor keeps the ratio meaningful
        "growth_ratio": round(max(worst(last, "growth_mb"), 1.0) / max(worst(first, "growth_mb"), 1.0), 3),
        "growth_bytes_per_row": slope("growth_mb"),
        "pass_growth_bytes_per_row": slope("pass_growth_mb"),
        "ready_bytes_per_row": slope("ready_mb"),
        "rows_bytes_per_row": slope("rows_mb"),
        "rendered_bytes_per_row": slope("rendered_mb"),
    }
    print(f"peak at {args.sizes[-1]} rows / at {args.sizes[0]}: {summary['peak_ratio']}x; growth during the pass: "
          f"{summary['growth_ratio']}x ({summary['growth_bytes_per_row']} B per extra row; before the table is "
          f"written: {summary['pass_growth_bytes_per_row']} B); before the pass: "
          f"{summary['ready_bytes_per_row']} B per extra row (the pool's Row objects "
          f"{summary['rows_bytes_per_row']} B, their rendering {summary['rendered_bytes_per_row']} B)")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
