"""Copy a finished (or partial) study sweep into results/<name>/: the report, its CSVs and plots, each job's small
records (no weights, no W&B files), the exact commands, the commit, the machine and the wall time.

    python scripts/publish_study.py outputs/studies/math_table results/math_table \\
        --command "instructdiff -m experiment=paper_table +profile=cpu selector=..." --wall "2 h 10 min"

The report is rebuilt from the copied job records, so `instructdiff-report results/<name>/runs` regenerates it
and `instructdiff-report --verify results/<name>/runs/<job>` reruns any job.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
from pathlib import Path

from instructdiff.report import Report, build_report

JOB_FILES = ("results.json", "selection.jsonl", "manifest.json")
HYDRA_FILES = ("overrides.yaml", "config.yaml")
MAX_PLOT_BYTES = 200_000


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal")).split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    return f"{os.cpu_count()} cores of {cpu}{mem}, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=False).stdout.strip()


def copy_jobs(sweep_root: Path, runs: Path) -> list[str]:
    copied = []
    for hydra_dir in sorted(sweep_root.rglob(".hydra")):
        job = hydra_dir.parent
        if not (job / "results.json").exists():
            continue
        dest = runs / f"{job.parent.name}__{job.name}"
        (dest / ".hydra").mkdir(parents=True, exist_ok=True)
        for name in JOB_FILES:
            if (job / name).exists():
                shutil.copy2(job / name, dest / name)
        for name in HYDRA_FILES:
            if (hydra_dir / name).exists():
                shutil.copy2(hydra_dir / name, dest / ".hydra" / name)
        copied.append(dest.name)
    return copied


PROFILE_FEATURES = ("delta_entropy", "delta_nll", "nll_base", "response_tokens")


def _records(job: Path) -> list[dict]:
    return [json.loads(x) for x in (job / "selection.jsonl").read_text().splitlines() if x.strip()]


def _mean_features(rows: list[dict]) -> dict[str, float | None]:
    """The mean of each of ``PROFILE_FEATURES`` over the score dicts that have it (None where none has)."""
    out = {}
    for f in PROFILE_FEATURES:
        vals = [r[f] for r in rows if r.get(f) is not None]
        out[f] = sum(vals) / len(vals) if vals else None
    return out


def pick_profile(runs: Path) -> list[dict]:
    """What each selector's picks look like under InstructDiff's signals: for every seed with an `instructdiff`
    job, the mean ΔH, ΔNLL, base-model NLL and response tokens of each selector's selected rows (same seed,
    same pool), measured with that seed's calibrated model. Rows the selector picked but InstructDiff dropped
    still have their scores (InstructDiff scores every row before trimming). One row per (selector, seed):
    jobs that repeat a run (``full`` at several budget fractions) and several `instructdiff` jobs of one seed
    (one per fraction, the same calibrated model) count once; selectors carry their fraction where the study
    ran several. Jobs are read the way the report reads them (labels, seeds and fractions from their records)."""
    jobs = [j for j in Report(runs).ok if (j.path / "selection.jsonl").exists()]
    several = len({j.fraction for j in jobs if j.selector != "full"}) > 1

    def label(j) -> str:
        return j.label + (f" @{j.fraction:g}" if several and j.selector != "full" and j.fraction is not None else "")

    # A study of InstructDiff's own options (warmup_ratio) has one calibrated model per option value: each then
    # measures its own picks and the other selectors' (random's), and every row names the model it was seen with.
    refs = [j for j in jobs if j.selector == "instructdiff"]
    several_refs = len({j.label for j in refs}) > 1
    out, seen = [], set()
    for ref in refs:
        under = f" (under {ref.label})" if several_refs else ""
        scores = {r["id"]: r["scores"] for r in _records(ref.path)}
        for job in (j for j in jobs if j.seed == ref.seed):
            if several_refs and job.selector == "instructdiff" and job.label != ref.label:
                continue
            name = label(job) + ("" if job.label == ref.label else under)
            if (name, job.seed) in seen:
                continue
            seen.add((name, job.seed))
            picked = [r["id"] for r in _records(job.path) if r["status"] == "selected"]
            out.append({"selector": name, "seed": job.seed, "n": len(picked),
                        **_mean_features([scores[i] for i in picked if i in scores])})
        if ("(whole pool)" + under, ref.seed) in seen:
            continue
        seen.add(("(whole pool)" + under, ref.seed))
        out.append({"selector": "(whole pool)" + under, "seed": ref.seed, "n": len(scores),
                    **_mean_features(list(scores.values()))})
    return out


def write_pick_profile(rows: list[dict], dest: Path) -> None:
    if not rows:
        return
    by_sel: dict[str, list[dict]] = {}
    for r in rows:
        by_sel.setdefault(r["selector"], []).append(r)
    lines = ["# What each selector picked, seen through InstructDiff's signals", "",
             "Mean over the selected rows of each seed, then over seeds (seeds that have an `instructdiff` job; its",
             "calibrated model of that seed measures every selector's picks). ΔH = H_base − H_calibrated and",
             "ΔNLL = NLL_base − NLL_calibrated (mean per response token, nats); InstructDiff trims both ΔNLL tails",
             "and takes the lowest ΔH. `response_tokens` = scored response tokens.", "",
             "| selector | seeds | rows per seed | ΔH | ΔNLL | base NLL | response tokens |", "|---|---|---|---|---|---|---|"]
    order = sorted(by_sel, key=lambda s: (s.startswith("("), s))
    for sel in order:
        rs = by_sel[sel]

        def mean(f: str, rs=rs) -> str:
            vals = [r[f] for r in rs if r[f] is not None]
            return f"{sum(vals) / len(vals):.4f}" if vals else "—"

        lines.append(f"| {sel} | {len({r['seed'] for r in rs})} | {sum(r['n'] for r in rs) / len(rs):.0f} | "
                     f"{mean('delta_entropy')} | "
                     f"{mean('delta_nll')} | {mean('nll_base')} | {mean('response_tokens')} |")
    (dest / "picks.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with open(dest / "picks.csv", "w", encoding="utf-8") as fh:
        fh.write("selector,seed,n," + ",".join(PROFILE_FEATURES) + "\n")
        for r in rows:
            fh.write(",".join(str(r[k]) for k in ("selector", "seed", "n", *PROFILE_FEATURES)) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep_root", type=Path, help="the folder holding the study's multirun dir(s)")
    ap.add_argument("dest", type=Path, help="results/<name>")
    ap.add_argument("--command", action="append", default=[], help="a command the study ran (repeat)")
    ap.add_argument("--wall", default="not measured", help="wall time of the study")
    ap.add_argument("--commit", default=None, help="the commit the study ran on (default: HEAD)")
    ap.add_argument("--note", action="append", default=[], help="a line for STUDY.md (repeat)")
    args = ap.parse_args(argv)
    runs = args.dest / "runs"
    if runs.exists():
        shutil.rmtree(runs)
    jobs = copy_jobs(args.sweep_root, runs)
    if not jobs:
        raise SystemExit(f"no finished job (results.json) under {args.sweep_root}")
    # the report is built from the copied records, so the committed folder regenerates it by itself
    build_report(runs, args.dest)
    write_pick_profile(pick_profile(runs), args.dest)
    heavy = [p for p in args.dest.glob("*.png") if p.stat().st_size > MAX_PLOT_BYTES]
    if heavy:
        raise SystemExit(f"plots over {MAX_PLOT_BYTES // 1000} KB: {[p.name for p in heavy]}")
    commit = args.commit or git("rev-parse", "--short", "HEAD")
    lines = ["# How this study was run", "",
             f"- commit: `{commit}`", f"- machine: {machine()}", f"- wall time: {args.wall}",
             f"- finished jobs: {len(jobs)} (records in `runs/`; no model weights are kept)", "", "Commands:", ""]
    lines += ["```bash", *args.command, "```", ""] if args.command else ["(not recorded)", ""]
    lines += [f"- {n}" for n in args.note]
    lines += ["", "Regenerate the report: `instructdiff-report " + str(runs) + " --out " + str(args.dest) + "`.",
              "Rerun one job and compare: `instructdiff-report --verify " + str(runs) + "/<job>`.", ""]
    (args.dest / "STUDY.md").write_text("\n".join(lines), encoding="utf-8")
    print(f"{args.dest}: {len(jobs)} jobs, report.md, STUDY.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
