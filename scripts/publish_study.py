"""Copy a finished (or partial) study sweep into results/<name>/: the report, its CSVs and plots, each job's small
records (no weights, no W&B files), the exact commands, the commit, the machine and the wall time.

    python scripts/publish_study.py outputs/studies/math_table results/math_table \\
        --command "instructdiff -m experiment=paper_table +profile=cpu selector=..." --wall "2 h 10 min"

The report is rebuilt from the copied job records, so `instructdiff-report results/<name>/runs` regenerates it
and `instructdiff-report --verify results/<name>/runs/<job>` reruns any job.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
from pathlib import Path

from instructdiff.report import build_report

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
