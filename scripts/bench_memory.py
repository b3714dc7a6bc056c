"""Peak memory of a scoring pass against pool size: does it grow beyond the model and one batch?

    python scripts/bench_memory.py                 # tiny model, pools of 500 / 2000 / 8000 rows
    python scripts/bench_memory.py --model smollm2_135m --sizes 200 800

Each pool size runs in a fresh subprocess (peak RSS is per process). For every size it prints the peak
RSS before scoring (data + rendered token ids + model) and after, and the growth per 1,000 rows; the
last line is one JSON object. The scoring pass itself keeps per-sample scalars only (4 floats per row)
and one batch of activations, so peak-minus-baseline should stay flat as the pool grows.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(model: str, size: int, cache: str) -> dict:
    from omegaconf import OmegaConf

    from instructdiff import CONF_DIR
    from instructdiff.data import load_source
    from instructdiff.models import load_model, load_tokenizer, resolve_model
    from instructdiff.render import Renderer, render_pool
    from instructdiff.scoring import ScoreStore

    rows = []
    for row in load_source("math/gsm8k/train.jsonl", "gsm8k"):
        rows.append(row)
        if len(rows) >= size:
            break
    while len(rows) < size:  # GSM8K has 7,473 rows: repeat with a suffix so ids stay unique
        base = rows[len(rows) % 7473]
        rows.append(type(base).make(base.instruction + f" ({len(rows)})", base.input, base.response))
    ref = resolve_model(OmegaConf.load(CONF_DIR / "model" / f"{model}.yaml"), cache)
    tok = load_tokenizer(ref)
    renderer = Renderer(tok, "chat", max_length=1024)
    rendered, _ = render_pool(renderer, rows)
    net = load_model(ref)
    before = _peak_mb()
    store = ScoreStore(tempfile.mkdtemp())
    store.response_stats(lambda: net, ref.fingerprint, rendered, renderer.fingerprint,
                         {"pad_id": tok.pad_token_id, "max_tokens_per_batch": 4096, "max_batch_size": 32},
                         desc=f"score {size}")
    after = _peak_mb()
    return {"size": size, "tokens": sum(r.n_tokens for r in rendered), "peak_before_mb": round(before, 1),
            "peak_after_mb": round(after, 1), "scoring_growth_mb": round(after - before, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--sizes", type=int, nargs="+", default=[500, 2000, 8000])
    ap.add_argument("--cache-dir", default="outputs/cache")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.model, args.child, args.cache_dir)))
        return
    results = []
    for size in args.sizes:
        out = subprocess.run([sys.executable, __file__, "--model", args.model, "--cache-dir", args.cache_dir,
                              "--child", str(size)], capture_output=True, text=True, check=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(res)
        print(f"pool {size:>6}: peak before scoring {res['peak_before_mb']:8.1f} MB, after "
              f"{res['peak_after_mb']:8.1f} MB, growth during scoring {res['scoring_growth_mb']:7.1f} MB")
    first, last = results[0], results[-1]
    ratio = last["size"] / first["size"]
    summary = {"model": args.model, "runs": results, "pool_ratio": ratio,
               "scoring_growth_ratio": round(max(last["scoring_growth_mb"], 1.0)
                                             / max(first["scoring_growth_mb"], 1.0), 2),
               "baseline_growth_mb_per_1k_rows": round((last["peak_before_mb"] - first["peak_before_mb"])
                                                       / ((last["size"] - first["size"]) / 1000), 2)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
