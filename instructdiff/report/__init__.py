"""``instructdiff-report <folder> [--out DIR]``: tables and plots of a sweep, or of a folder of single runs,
from its run dirs alone.

Writes into the folder (or ``--out``):

    report.md        what the study found (a paragraph generated from the paired comparison on the primary
                     metric), results per domain (mean ± 95% CI over seeds, gain over full and random), the
                     paired comparison (with each gain's own interval), missing runs, selection overlap, cost
                     per selector, the plots
    report.csv       the results table in long form: one row per (domain, setting, fraction, selector, metric)
    paired.csv       per (domain, setting, fraction, selector, metric, reference random|full): the mean of the
                     per-seed differences selector − reference over runs with the same seed (and so the same
                     pool: it is drawn by ``domain.pool_seed``), its 95% t interval, n, the verdict
                     better | indistinguishable | worse (better/worse only when the interval excludes 0, in the
                     metric's direction), n/a for fewer than 2 pairs, and the same as a percent gain
    runs.csv         one row per job: status (ok | missing/failed | not started), selector, seed, directory
    overlap.csv      Jaccard of the selected id sets between selectors, mean over seeds
    cost.csv         wall time per stage, scoring passes, trainings, cache hits/misses and estimated FLOPs
                     (selection from scratch and in this run, training, evaluation) per selector
    *.png            metric against the data fraction (and any other swept numeric selector option, e.g.
                     warmup_ratio, rounds) with the base model's level, metric against selection FLOPs with the
                     Pareto frontier (``pareto_<domain>.png``), ΔH / ΔNLL histograms per run, overlap heatmaps,
                     cost bars

The package, one job per module: ``load`` (job directories, the jobs a sweep defined, what tells jobs apart),
``stats`` (t intervals, paired differences, verdicts, Pareto frontier), ``study`` (groups over seeds and their
references), ``tables`` (rows and CSVs), ``plots``, ``deltas`` and ``pareto`` (figures), ``markdown``
(report.md), ``write`` (all of it to disk), ``cli`` (the command).

FLOPs come from each run's ``results.json["cost"]`` (instructdiff/cost.py). The selection cost shown is the
from-scratch one (``selection_flops_uncached``): a selector whose scores another job had cached still costs what
computing them costs, so the comparison does not depend on the order the sweep ran in.

Jobs are found by their ``.hydra/`` folder and told apart by their recorded overrides, never by folder names;
jobs a sweep's ``multirun.yaml`` defined that never got a directory are listed as not started. Runs are told
apart by the overrides that vary: ``selector``, ``seed``, ``selector.budget.fraction``, ``selector.<option>``
(shown in the selector's label, e.g. ``instructdiff [warmup_ratio=0.05]``) and anything else (the run's setting).

``instructdiff-report --verify JOB_DIR`` reruns one finished job from its recorded config and says whether it
reproduces (instructdiff/verify.py).
"""

from instructdiff.report.cli import main
from instructdiff.report.fmt import BASE_LABEL
from instructdiff.report.load import Job, eval_tasks, expected_jobs, find_job_dirs, load_job, not_started_jobs
from instructdiff.report.stats import (
    CI_LEVEL,
    LOWER_IS_BETTER,
    PairedDiff,
    jaccard,
    lower_is_better,
    mean_ci,
    paired_diff,
    paired_verdict,
    pareto_front,
    primary_metric,
    relative_gain,
    t_quantile,
)
from instructdiff.report.study import Group, Report
from instructdiff.report.write import build_report

__all__ = [
    "BASE_LABEL", "CI_LEVEL", "LOWER_IS_BETTER", "Group", "Job", "PairedDiff", "Report",
    "build_report", "eval_tasks", "expected_jobs", "find_job_dirs", "jaccard", "load_job", "lower_is_better",
    "main", "mean_ci", "not_started_jobs", "paired_diff", "paired_verdict", "pareto_front", "primary_metric",
    "relative_gain", "t_quantile",
]
