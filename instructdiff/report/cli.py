"""The ``instructdiff-report`` command: a report of a folder of runs, or ``--verify JOB_DIR``."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

from instructdiff.report.study import Report
from instructdiff.report.write import write_report

DESCRIPTION = ("instructdiff-report <folder> [--out DIR]: tables and plots of a sweep (or of a folder of single "
               "runs), from its run dirs alone.")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="instructdiff-report", description=DESCRIPTION,
        epilog="instructdiff-report --verify JOB_DIR [--verify-out DIR] [--cache-dir DIR] [--tol X]: rerun one "
               "finished job from its recorded config; exit 0 when its selection is identical and its trained "
               "metrics are within the tolerance, 1 when not (instructdiff/verify.py).")
    ap.add_argument("multirun_dir", type=Path, nargs="?",
                    help="a Hydra multirun directory, a folder of several, or a folder of single runs "
                         "(e.g. outputs/runs/<date>)")
    ap.add_argument("--out", type=Path, default=None, help="where to write the report (default: multirun_dir)")
    vg = ap.add_argument_group("reproducibility check (--verify)")
    vg.add_argument("--verify", type=Path, metavar="JOB_DIR", default=None,
                    help="rerun this finished job (a directory with .hydra/ and results.json) and compare")
    vg.add_argument("--verify-out", type=Path, default=None, metavar="DIR",
                    help="empty directory for the rerun and verify.json (default: a new temp dir)")
    vg.add_argument("--cache-dir", type=Path, default=None, metavar="DIR",
                    help="paths.cache_dir of the rerun, e.g. an existing cache to reuse the converted base "
                         "model (default: a fresh empty cache, deleted afterwards)")
    vg.add_argument("--keep-cache", action="store_true", help="keep the fresh cache (in the output dir)")
    vg.add_argument("--tol", type=float, default=None,
                    help="absolute tolerance on each trained metric (default: 1e-3)")
    vg.add_argument("--metric", action="append", default=None,
                    help="compare only this trained metric (repeatable; default: all of them)")
    vg.add_argument("--from-config", action="store_true",
                    help="rerun the recorded .hydra/config.yaml instead of conf/ + .hydra/overrides.yaml")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if args.verify is not None:
        from instructdiff.verify import DEFAULT_TOL, main_verify

        if args.multirun_dir is not None:
            ap.error("--verify takes one job directory; leave out the multirun directory")
        if not args.verify.is_dir():
            ap.error(f"--verify {args.verify} is not a directory")
        tol = DEFAULT_TOL if args.tol is None else args.tol
        if not (tol >= 0 and math.isfinite(tol)):
            ap.error(f"--tol must be a finite number >= 0, got {args.tol}")
        return main_verify(args.verify, args.verify_out, args.cache_dir, tol, args.metric, args.from_config,
                           args.keep_cache)
    if args.multirun_dir is None:
        ap.error("give a multirun directory (or --verify JOB_DIR)")
    if not args.multirun_dir.is_dir():
        ap.error(f"{args.multirun_dir} is not a directory")
    rep = Report(args.multirun_dir)
    if not rep.jobs:
        ap.error(f"no job directories (with a .hydra/ folder) under {args.multirun_dir}")
    path = write_report(rep, args.out)
    missing = len(rep.jobs) - len(rep.ok)
    print(f"report: {path} ({len(rep.ok)} runs ok, {missing} missing/failed or not started; "
          f"{len(rep.plots)} plots)")
    return 0
