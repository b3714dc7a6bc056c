"""Multirun glue: the W&B identity of a job (name, group = the sweep, tags = its overrides), the per-stage
metrics a job logs, and the Hydra callback that prints what to do with a finished sweep.

``pipeline.run`` builds its ``Tracker`` with ``**tracker_identity(cfg, run_dir)`` and logs
``stage_metrics(results)``; ``conf/config.yaml`` registers ``SweepSummary`` under ``hydra.callbacks``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

log = logging.getLogger("instructdiff")

# W&B rejects tags longer than this.
MAX_TAG_LEN = 64
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def _hydra_cfg() -> Any | None:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def sweep_dir_of_job(hc: Any) -> Path | None:
    """The multirun directory of the running job, or None outside a multirun."""
    from hydra.types import RunMode

    if hc is None or hc.mode != RunMode.MULTIRUN:
        return None
    out = Path(hc.runtime.output_dir)
    try:
        sweep = Path(str(hc.sweep.dir)).resolve()
    except Exception:  # an unresolvable interpolation in a pickled config: the layout still says it
        return out.parent
    return sweep if out.resolve().is_relative_to(sweep) else out.parent


def sweep_group(sweep_dir: Path) -> str:
    """The sweep's W&B group: its directory name, with the date folder above it when there is one, since the
    default layout names sweeps by time of day inside a folder per date."""
    if _DATE.match(sweep_dir.parent.name):
        return f"{sweep_dir.parent.name}_{sweep_dir.name}"
    return sweep_dir.name


def override_tags(task_overrides: list[str], exclude_keys: list[str] | tuple[str, ...] = ()) -> list[str]:
    """One tag per command-line override, as in ``hydra.job.override_dirname`` (same excluded keys). Taken
    from the override list rather than by splitting override_dirname, whose "," also occurs in list values."""
    tags = []
    for ov in task_overrides:
        key = ov.split("=", 1)[0].lstrip("+~")
        if key in exclude_keys:
            continue
        tags.append(ov[:MAX_TAG_LEN])
    return tags


def tracker_identity(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """``name``, ``group`` and ``tags`` for ``Tracker``: in a multirun the group is the sweep (so W&B shows
    one group per sweep and one run per job); in a single run it stays the domain."""
    tags = [f"domain={cfg.domain.name}", f"model={cfg.model.name}"]
    group = str(cfg.domain.name)
    hc = _hydra_cfg()
    if hc is not None:
        exclude = list(hc.job.config.override_dirname.exclude_keys or [])
        tags += [t for t in override_tags(list(hc.overrides.task), exclude) if t not in tags]
        sweep = sweep_dir_of_job(hc)
        if sweep is not None:
            group = sweep_group(sweep)
    return {"name": run_dir.name, "group": group, "tags": tags}


def stage_metrics(results: dict) -> dict[str, float]:
    """Flat numbers per stage from a run's results dict (eval metrics are logged separately, per model)."""
    out: dict[str, float] = {f"time/{k}": v for k, v in results.get("seconds", {}).items()}
    sel = results.get("selection") or {}
    for k, v in (sel.get("counts") or {}).items():
        out[f"select/{k}"] = v
    if "n_pool" in sel:
        out["select/n_pool"] = sel["n_pool"]
    for t in results.get("trainings", []):
        for k in ("train_loss", "steps", "n_samples", "n_tokens", "seconds"):
            if isinstance(t.get(k), (int, float)):
                out[f"train/{t['purpose']}/{k}"] = t[k]
    cost = results.get("cost") or {}
    for k in ("selection_flops_uncached", "selection_flops", "train_flops", "eval_flops", "total_flops"):
        if isinstance(cost.get(k), (int, float)):  # None = not estimated: left out, never logged as 0
            out[f"cost/{k}"] = cost[k]
    cache = results.get("cache") or {}
    if cache:
        out["cache/hits"] = cache.get("hits", 0)
        out["cache/misses"] = cache.get("misses", 0)
        passes = (cache.get("score_store") or {}).get("passes", [])
        out["score/passes"] = len(passes)
        out["score/tokens"] = sum(p.get("tokens", 0) for p in passes)
    return out


def offline_wandb_runs(sweep_dir: Path) -> list[Path]:
    return sorted(p for p in sweep_dir.glob("*/wandb/offline-run-*") if p.is_dir())


def sweep_summary_lines(sweep_dir: Path) -> list[str]:
    """What a finished sweep left and the commands that use it: the report and the one `wandb sync` line."""
    jobs = [p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()] if sweep_dir.is_dir() else []
    done = sum((p / "results.json").is_file() for p in jobs)
    lines = [f"sweep: {sweep_dir} ({len(jobs)} jobs, {done} with results.json, "
             f"{len(jobs) - done} missing/failed)",
             f"report: instructdiff-report {sweep_dir}"]
    runs = offline_wandb_runs(sweep_dir)
    if runs:
        lines.append(f"W&B: {len(runs)} offline runs; upload them all with: "
                     f"wandb sync {sweep_dir}/*/wandb/offline-run-*")
    return lines


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra < 1.1 has no callbacks; the pipeline still runs
    Callback = object  # type: ignore[assignment,misc]


class SweepSummary(Callback):
    """Printed once after every job of a multirun has returned, in the launching process (so also after a
    joblib or submitit sweep), rather than once per job."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            sweep = Path(str(config.hydra.sweep.dir))
        except Exception as e:  # the summary is a convenience: never fail a finished sweep over it
            log.warning("sweep summary unavailable: %s", e)
            return
        for line in sweep_summary_lines(sweep):
            print(line)
