"""Multirun glue: short, safe job folder names, the W&B identity of a job (name, group = the sweep, tags = its
overrides), the per-stage metrics a job logs, and the Hydra callback that names the jobs and prints what to do
with a finished sweep.

``conf/config.yaml`` names job folders ``${hydra.job.num}_${instructdiff.job_dir:selector,seed}`` (the resolver
is registered when this module is imported) and registers ``SweepSummary`` under ``hydra.callbacks``;
``pipeline.run`` builds its ``Tracker`` with ``**tracker_identity(cfg, run_dir)`` and logs ``stage_metrics``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from instructdiff.tracking import is_secret_key, mask_secrets

log = logging.getLogger("instructdiff")

# W&B rejects tags longer than this.
MAX_TAG_LEN = 64
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")

# Job folder names: the values of the swept keys (readable) and a hash of all of the job's overrides (unique).
# Hydra's default, the whole override_dirname, nests folders on a "/" in a path, exceeds the 255-byte name limit
# on long lists and writes secrets into the name; the full overrides are in each job's .hydra/overrides.yaml.
JOB_DIR_RESOLVER = "instructdiff.job_dir"
DEFAULT_LABEL_KEYS = ("selector", "seed")
DEFAULT_SUBDIR = "${hydra.job.num}_${" + JOB_DIR_RESOLVER + ":" + ",".join(DEFAULT_LABEL_KEYS) + "}"
MAX_VALUE_LEN = 24
MAX_LABEL_LEN = 96
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def _label_value(value: str) -> str | None:
    """A folder-safe short form of an override value: a path by its file name, a list by its items."""
    value = value.strip().strip("'\"")
    if not value or "${" in value:  # an interpolation (e.g. a hidden secret): nothing readable to show
        return None
    if "/" in value.rstrip("/"):
        value = Path(value.rstrip("/")).name
    value = _UNSAFE.sub("-", value).strip("-")
    return value[:MAX_VALUE_LEN] or None


def job_dir_name(overrides: Sequence[str], label_keys: Sequence[str] = DEFAULT_LABEL_KEYS) -> str:
    """``<selector>_<leaf>=<value>..._<hash>``: the values of ``label_keys`` the job overrides (secret keys
    never; the selector's choice bare, others by the last component of their key) and 6 hex digits of the
    sha256 of all its overrides (secret values masked first), which keeps two jobs apart whatever the label
    leaves out. Only ``[A-Za-z0-9._+=-]``: no "/" (no nesting), no "," or spaces (globs and shells)."""
    given = {}
    for ov in overrides:
        key, sep, value = str(ov).partition("=")
        if sep:
            given[key.lstrip("+~")] = value
    parts = []
    for key in label_keys:
        leaf = key.rsplit(".", 1)[-1]
        value = _label_value(given[key]) if key in given and not is_secret_key(leaf) else None
        if value is not None:
            parts.append(value if key == "selector" else f"{leaf}={value}")
    digest = hashlib.sha256("\n".join(mask_secrets([str(o) for o in overrides])).encode()).hexdigest()[:6]
    label = "_".join(parts)[:MAX_LABEL_LEN].rstrip("_")
    return f"{label}_{digest}" if label else digest


def _job_dir_resolver(*label_keys: str, _root_: DictConfig) -> str:
    # the raw override strings: resolving them would turn a hidden secret's oc.env back into its value
    overrides = OmegaConf.to_container(_root_.hydra.overrides.task, resolve=False)
    return job_dir_name(overrides, label_keys or DEFAULT_LABEL_KEYS)


if not OmegaConf.has_resolver(JOB_DIR_RESOLVER):
    OmegaConf.register_new_resolver(JOB_DIR_RESOLVER, _job_dir_resolver)


def swept_keys(task_overrides: Sequence[str], sweeper_params: dict | None = None) -> list[str]:
    """The keys a multirun sweeps (command-line sweeps like ``seed=0,1`` and the sweeper's ``params`` of a
    preset), the selector first and the seed last, as a reader scans a list of job folders."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = [f"{k}={v}" for k, v in (sweeper_params or {}).items()]
    keys: list[str] = []
    for ov in OverridesParser.create().parse_overrides([*params, *task_overrides]):
        if ov.is_sweep_override() and ov.key_or_group not in keys:
            keys.append(ov.key_or_group)
    return sorted(keys, key=lambda k: (k != "selector", k == "seed"))


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
        # unresolved: a secret hidden as ${oc.env:...} (instructdiff.secret_overrides) stays hidden in the tags
        task = OmegaConf.to_container(hc.overrides.task, resolve=False)
        tags += [t for t in override_tags(task, exclude) if t not in tags]
        # the selector by its one name (its YAML), also when it is the default and no override names it
        choice = hc.runtime.choices.get("selector")
        if choice and not any(t.startswith("selector=") for t in tags):
            tags.append(f"selector={choice}")
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


def find_jobs(sweep_dir: Path) -> list[Path]:
    """Every job folder under ``sweep_dir`` (one holding Hydra's ``.hydra/``) at any depth, so that sweeps
    named by the older layout, where a "/" in an override nested job folders, are found too."""
    jobs = []
    for root, dirs, _ in os.walk(sweep_dir):
        if Path(root, ".hydra").is_dir():
            jobs.append(Path(root))
            dirs.clear()  # a job's own files hold no further jobs
            continue
        dirs[:] = sorted(d for d in dirs if d not in (".submitit", "wandb", ".hydra"))
    return sorted(jobs)


def offline_wandb_runs(sweep_dir: Path, jobs: list[Path] | None = None) -> list[Path]:
    jobs = find_jobs(sweep_dir) if jobs is None else jobs
    return sorted(p for job in jobs for p in job.glob("wandb/offline-run-*") if p.is_dir())


def _sync_command(sweep_dir: Path, runs: list[Path]) -> str:
    if all(r.parent.parent.parent == sweep_dir for r in runs):
        return f"wandb sync {shlex.quote(str(sweep_dir))}/*/wandb/offline-run-*"
    return "wandb sync " + " ".join(shlex.quote(str(r)) for r in runs)


def sweep_summary_lines(sweep_dir: Path) -> list[str]:
    """What a finished sweep left and the commands that use it: the report and the one `wandb sync` line."""
    jobs = find_jobs(sweep_dir) if sweep_dir.is_dir() else []
    done = sum((p / "results.json").is_file() for p in jobs)
    lines = [f"sweep: {sweep_dir} ({len(jobs)} jobs, {done} with results.json, "
             f"{len(jobs) - done} missing/failed)",
             f"report: instructdiff-report {sweep_dir}"]
    runs = offline_wandb_runs(sweep_dir, jobs)
    if runs:
        lines.append(f"W&B: {len(runs)} offline runs; upload them all with: {_sync_command(sweep_dir, runs)}")
    return lines


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra < 1.1 has no callbacks; the pipeline still runs
    Callback = object  # type: ignore[assignment,misc]


class SweepSummary(Callback):
    """Names the job folders by what the sweep varies (before the sweeper composes any job) and prints the
    summary once after every job has returned, in the launching process (so also after a joblib or submitit
    sweep), rather than once per job."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from omegaconf import open_dict, read_write

        if OmegaConf.to_container(config.hydra.sweep, resolve=False).get("subdir") != DEFAULT_SUBDIR:
            return  # the user chose their own layout
        task = OmegaConf.to_container(config.hydra.overrides.task, resolve=False)
        params = config.hydra.sweeper.get("params")
        params = OmegaConf.to_container(params, resolve=False) if params else {}
        keys = swept_keys(task, params) or list(DEFAULT_LABEL_KEYS)
        subdir = "${hydra.job.num}_${" + JOB_DIR_RESOLVER + ":" + ",".join(keys) + "}"
        # Every job is composed again from hydra.overrides.hydra plus its own overrides (and a submitit job
        # from the pickled copy of this config), so the layout travels as a Hydra override; multirun.yaml,
        # written after this, records it.
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.overrides.hydra.append(f"hydra.sweep.subdir={subdir}")
            config.hydra.sweep.subdir = subdir

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            sweep = Path(str(config.hydra.sweep.dir))
        except Exception as e:  # the summary is a convenience: never fail a finished sweep over it
            log.warning("sweep summary unavailable: %s", e)
            return
        for line in sweep_summary_lines(sweep):
            print(line)
