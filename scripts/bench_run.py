"""Wall time and peak resident memory per stage of a whole `instructdiff` run, against a baseline in the same call.

    python scripts/bench_run.py                                   # the default run vs its own baseline settings
    python scripts/bench_run.py --overrides "domain=medical" --baseline "eval.batch_size=8"

Each run starts from an empty cache (the converted model alone is copied in, so the one-time GGUF conversion is
not timed) and is sampled every 0.2 s: the resident memory of the process and all its children, attributed to
the stage whose "stage k/N: name" line opened last. The table gives, per stage, wall seconds and peak RSS of
the baseline and of the candidate and their ratio, then the run's peak and total. Both runs select the same
rows (the script checks selection.jsonl) unless the baseline overrides change the selection itself.

Why by hand: psutil gives the process tree's RSS; no profiler attributes it to our pipeline's stages.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

STAGE_LINE = re.compile(r"stage (\d+)/(\d+): (\w+)")
# runs of code older than the "stage k/N" lines: the first "[stage] computing|cached" line of each stage
OLD_STAGE_LINE = re.compile(r"\] - \[(\w+)\] (?:computing|cached)")
# The default before issue 16: every decoder layer's activations kept for the backward pass (~1.4 MB per training
# token for SmolLM2-135M) and TRL's LM-head fold over whole [tokens x 32,768] tiles (~1.4 GiB of temporaries); the
# calibration then peaked at 7.45 GiB. Both sides run with the allocator settings of instructdiff.memory, which
# apply to every run, so the baseline's peak is lower than that of the code before issue 16.
DEFAULT_BASELINE = "trainer.gradient_checkpointing=false trainer.lm_head_fold_rows=null"


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_once(overrides: list[str], model_cache: Path | None, workdir: Path) -> dict:
    cache = workdir / "cache"
    if model_cache is not None:
        for entry in model_cache.iterdir():
            if entry.is_dir() and not entry.name.startswith("trained-"):
                shutil.copytree(entry, cache / "models" / entry.name)
    cmd = [sys.executable, "-m", "instructdiff", *overrides, "logger=none", f"paths.cache_dir={cache}",
           f"paths.run_dir={workdir / 'run'}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    ps = psutil.Process(proc.pid)
    stage = ["startup"]
    peaks: dict[str, int] = {}
    opened: dict[str, float] = {"startup": 0.0}
    log: list[str] = []

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            log.append(line)
            m = STAGE_LINE.search(line) or OLD_STAGE_LINE.search(line)
            if m:
                stage[0] = m.group(m.lastindex)
                opened.setdefault(stage[0], time.perf_counter() - start)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while proc.poll() is None:
        rss = _tree_rss(ps) if ps.is_running() else 0
        peaks[stage[0]] = max(peaks.get(stage[0], 0), rss)
        time.sleep(0.2)
    reader.join(timeout=5)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}): {' '.join(cmd)}\n{''.join(log[-40:])}")
    order = sorted(opened, key=opened.get)
    seconds = {s: (opened[order[i + 1]] if i + 1 < len(order) else wall) - opened[s] for i, s in enumerate(order)}
    selection = (workdir / "run" / "selection.jsonl").read_text()
    return {"seconds": seconds, "peak": peaks, "wall": wall, "selection": selection, "order": order}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--overrides", default="", help="overrides of both runs (default: the default run)")
    ap.add_argument("--baseline", default=DEFAULT_BASELINE, help="extra overrides of the baseline run only")
    ap.add_argument("--model-cache", default="outputs/cache/models",
                    help="copy converted models from here (empty string: convert inside the timed run)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary run folders")
    ap.add_argument("--only", choices=["baseline", "candidate"], help="run one side only")
    args = ap.parse_args()
    base = shlex.split(args.overrides)
    model_cache = Path(args.model_cache) if args.model_cache and Path(args.model_cache).is_dir() else None
    runs = {}
    for name, extra in (("baseline", shlex.split(args.baseline)), ("candidate", [])):
        if args.only and args.only != name:
            continue
        work = Path(tempfile.mkdtemp(prefix=f"bench_run_{name}_"))
        print(f"[{name}] instructdiff {' '.join(base + extra)}  (in {work})", flush=True)
        runs[name] = run_once(base + extra, model_cache, work)
        print(f"[{name}] {runs[name]['wall']:.0f} s, peak {max(runs[name]['peak'].values()) / 2**30:.2f} GiB",
              flush=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    gib = 2**30
    stages = [s for s in (runs.get("candidate") or runs["baseline"])["order"]]
    print(f"\n{'stage':<12}" + "".join(f"{n + ' s':>14}{n + ' GiB':>16}" for n in runs) +
          ("   ratio s   ratio GiB" if len(runs) == 2 else ""))
    for s in stages:
        row = f"{s:<12}"
        for r in runs.values():
            row += f"{r['seconds'].get(s, float('nan')):>14.1f}{r['peak'].get(s, 0) / gib:>16.2f}"
        if len(runs) == 2:
            b, c = runs["baseline"], runs["candidate"]
            rs = c["seconds"].get(s, float("nan")) / max(b["seconds"].get(s, float("nan")), 1e-9)
            rm = c["peak"].get(s, 0) / max(b["peak"].get(s, 1), 1)
            row += f"{rs:>10.2f}{rm:>12.2f}"
        print(row)
    total = f"{'whole run':<12}"
    for r in runs.values():
        total += f"{r['wall']:>14.1f}{max(r['peak'].values()) / gib:>16.2f}"
    if len(runs) == 2:
        b, c = runs["baseline"], runs["candidate"]
        total += f"{c['wall'] / b['wall']:>10.2f}{max(c['peak'].values()) / max(b['peak'].values()):>12.2f}"
        same = b["selection"] == c["selection"]
        print(total)
        print(f"\nselection.jsonl identical: {same}")
    else:
        print(total)
    print(json.dumps({n: {"wall_s": round(r["wall"], 1), "peak_gib": round(max(r["peak"].values()) / gib, 3),
                          "seconds": {k: round(v, 1) for k, v in r["seconds"].items()},
                          "peak_gib_per_stage": {k: round(v / gib, 3) for k, v in r["peak"].items()}}
                      for n, r in runs.items()}))


if __name__ == "__main__":
    main()
