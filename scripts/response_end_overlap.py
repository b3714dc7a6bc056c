"""How much does scoring the end-of-turn tokens move a selection? (score.response_end, docs/methods.md §0.3)

Runs calibrate → score → select twice per selector on the same configuration, once with the turn's closing
tokens left out of the response signals (the default) and once with them counted, and prints the Jaccard
overlap of the two selections and the Spearman correlation of the per-row scores. Everything goes through the
shared cache, so a rerun is instant and the calibration is the default run's.

    python scripts/response_end_overlap.py                       # the default run: math, SmolLM2-135M, seed 0
    python scripts/response_end_overlap.py --selectors instructdiff ifd --override domain=medical
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from scipy.stats import spearmanr

from instructdiff import CONF_DIR
from instructdiff.pipeline import run

SCORE_KEY = {"instructdiff": "delta_nll", "ifd": "ifd"}


def selection(run_dir: Path) -> tuple[list[str], dict[str, dict]]:
    rows = [json.loads(x) for x in (run_dir / "selection.jsonl").read_text().splitlines() if x.strip()]
    chosen = [r["id"] for r in sorted((r for r in rows if r["status"] == "selected"), key=lambda r: r["rank"])]
    return chosen, {r["id"]: r["scores"] for r in rows}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--selectors", nargs="+", default=["instructdiff", "ifd"])
    ap.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for every run")
    ap.add_argument("--out", type=Path, default=None, help="run dirs go here (default: a temp dir)")
    args = ap.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="response_end_"))
    report = {}
    for name in args.selectors:
        runs = {}
        for choice in ("exclude", "include"):
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                cfg = compose("config", overrides=[f"selector={name}", "logger=none",
                                                   "pipeline.stages=[calibrate,score,select]",
                                                   f"score.response_end={choice}", *args.override,
                                                   f"paths.run_dir={out / f'{name}_{choice}'}"])
            run(cfg)
            runs[choice] = selection(out / f"{name}_{choice}")
        (sel_x, scores_x), (sel_i, scores_i) = runs["exclude"], runs["include"]
        a, b = set(sel_x), set(sel_i)
        entry = {"selected": len(a), "jaccard": round(len(a & b) / len(a | b), 4) if a | b else 1.0,
                 "same_order": sel_x == sel_i}
        for key in ("delta_nll", "delta_entropy", SCORE_KEY.get(name)):
            common = [i for i in scores_x if key and scores_x[i].get(key) is not None
                      and scores_i.get(i, {}).get(key) is not None]
            if len(common) > 2:
                rho = spearmanr([scores_x[i][key] for i in common], [scores_i[i][key] for i in common]).statistic
                entry[f"spearman_{key}"] = round(float(rho), 4)
        report[name] = entry
        print(f"{name}: {entry}")
    print(json.dumps({"response_end_overlap": report, "overrides": args.override}))
    return report


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
