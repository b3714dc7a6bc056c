"""Reading run directories: every job under a folder (multirun sweeps, a folder of single runs, a published
``results/<study>/runs``), the jobs a sweep defined but never started, and what tells the jobs apart.

A job is a directory with a ``.hydra/`` folder (Hydra writes it before the job starts); it is identified by
its ``.hydra/overrides.yaml``, ``.hydra/hydra.yaml`` and ``results.json``, never by its folder name (job
folders may be short hashed names, or nested when an override holds a path). One without ``results.json``
crashed, was interrupted or is still running. A sweep is the nearest folder above a job that holds Hydra's
``multirun.yaml``; the jobs it defined are rebuilt from that file the way Hydra's basic sweeper builds them,
and those matched by no job directory are "not started".
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from instructdiff import CONF_DIR
from instructdiff.rows import stable_hash
from instructdiff.tracking import mask_secrets

# Override keys that only say where things go, never what was run.
IGNORED_KEYS = ("paths.", "logger", "hydra.")
NOT_STARTED_REASON = "never started (the sweep stopped before this job)"


@dataclass
class Job:
    path: Path | None                  # None: a job of the sweep that never got a directory
    sweep: Path
    num: int | None                    # Hydra's job number in its sweep; None for a single run
    overrides: dict[str, str]
    choices: dict[str, Any]
    config: dict[str, Any]
    results: dict | None = None
    reason: str | None = None
    # filled by describe_jobs: what tells this job apart from the others of the sweep(s)
    selector: str = "?"
    domain: str = "?"
    seed: Any = None
    fraction: float | None = None
    params: dict[str, str] = field(default_factory=dict)
    setting: str = ""

    @property
    def status(self) -> str:
        if self.path is None:
            return "not started"
        return "ok" if self.results is not None else "missing/failed"

    @property
    def label(self) -> str:
        if not self.params:
            return self.selector
        return f"{self.selector} [{', '.join(f'{k}={v}' for k, v in sorted(self.params.items()))}]"

    @property
    def name(self) -> str:
        return self.path.name if self.path is not None else f"{self.num}_(never started)"


def load_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def parse_overrides(items: Iterable[str]) -> dict[str, str]:
    """``{key: value}`` of Hydra override strings, secret-looking values masked (a report gets shared)."""
    out = {}
    for ov in items:
        ov = mask_secrets(str(ov))
        if "=" not in ov:
            continue  # "~key" deletions carry no value
        key, value = ov.split("=", 1)
        out[key.lstrip("+~")] = value
    return out


def get(d: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def as_int(value: Any) -> int | None:
    """An int, or None for anything else (a single run's ``hydra.job.num`` is the missing value ``???``)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    return int(value) if isinstance(value, str) and value.strip().isdigit() else None


def find_job_dirs(root: Path) -> list[Path]:
    """Every directory under ``root`` that holds a ``.hydra/`` folder, without descending into jobs (their
    wandb/ folders) or submitit's pickles."""
    jobs = []
    for dirpath, dirnames, _ in os.walk(root):
        if ".hydra" in dirnames and Path(dirpath) != root:
            jobs.append(Path(dirpath))
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if d not in (".submitit", "wandb", ".hydra"))
    return jobs


def sweep_of(job_dir: Path, root: Path) -> Path:
    """The sweep a job belongs to: the nearest folder above it, up to ``root``, holding ``multirun.yaml`` (an
    override holding a path nests job folders several levels deep); else the job's parent folder."""
    for parent in job_dir.parents:
        if (parent / "multirun.yaml").is_file():
            return parent
        if parent == root:
            break
    return job_dir.parent


def _failure_reason(job_dir: Path) -> str:
    """The last error line of the job's Hydra log, else the last step the pipeline logged."""
    last_step = None
    for log in sorted(job_dir.glob("*.log")):
        try:
            lines = log.read_text(errors="replace").splitlines()
        except OSError:
            continue
        errors = [x.strip() for x in lines if re.search(r"(Error|Exception)\b", x)]
        if errors:
            return errors[-1][:300]
        steps = [m.group(1) for x in lines if (m := re.search(r"\]\[instructdiff\]\[\w+\] - (.*)", x))]
        last_step = steps[-1][:200] if steps else last_step
    reason = "no results.json (crashed, interrupted or still running)"
    return f"{reason}; last step logged: {last_step}" if last_step else reason


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def load_job(job_dir: Path, root: Path | None = None) -> Job:
    """One job directory: its overrides, Hydra choices, resolved config and results (None: not finished)."""
    hydra_yaml = load_yaml(job_dir / ".hydra" / "hydra.yaml") or {}
    hydra = hydra_yaml.get("hydra", {}) if isinstance(hydra_yaml, dict) else {}
    overrides = load_yaml(job_dir / ".hydra" / "overrides.yaml") or []
    results = _read_json(job_dir / "results.json")
    results = results if isinstance(results, dict) else None
    manifest = _read_json(job_dir / "manifest.json")
    config = (manifest.get("config") if isinstance(manifest, dict) else None) or {}
    if not config:
        config = load_yaml(job_dir / ".hydra" / "config.yaml") or {}
    job = Job(path=job_dir, sweep=sweep_of(job_dir, Path(root) if root else job_dir.parent),
              num=as_int(get(hydra, "job.num")), overrides=parse_overrides(overrides),
              choices=get(hydra, "runtime.choices") or {}, config=config, results=results)
    if results is None:
        job.reason = _failure_reason(job_dir)
    return job


def expected_jobs(sweep_dir: Path) -> list[list[str]] | None:
    """The override list of every job the sweep in ``sweep_dir`` was to run, in job-number order, rebuilt from
    its multirun.yaml the way Hydra's basic sweeper builds it; None when that cannot be done."""
    cfg = load_yaml(sweep_dir / "multirun.yaml")
    hydra = cfg.get("hydra") if isinstance(cfg, dict) else None
    if not isinstance(hydra, dict) or "BasicSweeper" not in str(get(hydra, "sweeper._target_")):
        return None
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        params = get(hydra, "sweeper.params") or {}
        args = [f"{k}={v}" for k, v in params.items()] + list(get(hydra, "overrides.task") or [])
        parsed = OverridesParser.create().parse_overrides(args)
        return BasicSweeper.split_arguments(parsed, None)[0]
    except Exception:  # a sweep this reader cannot rebuild (another sweeper's syntax): report the jobs that exist
        return None


def not_started_jobs(jobs: list[Job], root: Path) -> list[Job]:
    """Jobs a sweep under ``root`` defined (its multirun.yaml) that no job directory ran. A defined job counts
    as started when a job of that sweep has its job number or exactly its overrides."""
    sweeps = {j.sweep for j in jobs}
    sweeps |= {p.parent for p in root.rglob("multirun.yaml") if ".submitit" not in p.parts}
    out = []
    for sweep in sorted(sweeps):
        expected = expected_jobs(sweep)
        if expected is None:
            continue
        mine = [j for j in jobs if j.sweep == sweep]
        nums = {j.num for j in mine}
        seen = {frozenset(j.overrides.items()) for j in mine}
        mr = load_yaml(sweep / "multirun.yaml") or {}
        choices = get(mr, "hydra.runtime.choices") or {}
        config = {k: v for k, v in mr.items() if k != "hydra"}
        for num, ovs in enumerate(expected):
            overrides = parse_overrides(ovs)
            if num in nums or frozenset(overrides.items()) in seen:
                continue
            out.append(Job(path=None, sweep=sweep, num=num, overrides=overrides, choices=choices,
                           config=config, reason=NOT_STARTED_REASON))
    return out


def _class_name(target: Any) -> str:
    return str(target or "").rsplit(".", 1)[-1]


def _selector_from_target(selector_cfg: dict, class_name: str | None = None) -> str:
    """conf/selector name of a resolved selector config (runs made outside Hydra have no runtime choices), or
    of a selector class name (old results.json files record the class): the YAML whose ``_target_`` names the
    same class. Matched by class name, not module path: old runs record module paths that have since moved."""
    wanted = _class_name(selector_cfg.get("_target_")) or class_name
    if not wanted:
        return "?"
    matches = []
    for p in sorted((CONF_DIR / "selector").glob("*.yaml")):
        conf = load_yaml(p) or {}
        if _class_name(conf.get("_target_")) == wanted:
            matches.append((p.stem, set(conf)))
    if len(matches) > 1 and selector_cfg:  # a class behind several files: the one with the same keys
        same = [name for name, keys in matches if keys == set(selector_cfg)]
        matches = [(same[0], set())] if same else matches
    return matches[0][0] if matches else wanted


def selector_name(job: Job) -> str:
    """The selector's conf/selector name: the ``selector=`` override or Hydra choice; else results.json's
    ``selector`` when it is such a name; else the YAML behind the resolved config's class (old results.json
    files record the class name, e.g. ``RandomSelector``)."""
    name = job.overrides.get("selector") or job.choices.get("selector")
    if name:
        return str(name)
    recorded = (job.results or {}).get("selector")
    if isinstance(recorded, str) and (CONF_DIR / "selector" / f"{recorded}.yaml").is_file():
        return recorded
    selector_cfg = job.config.get("selector") if isinstance(job.config.get("selector"), dict) else {}
    if selector_cfg or recorded:
        return _selector_from_target(selector_cfg, recorded if isinstance(recorded, str) else None)
    return "?"


def _num(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


# Preset overrides: a preset only names a sweep. Jobs of two presets that resolve to the same configuration besides
# the selector and the seed ran the same experiment (conf/experiment/warmup_ratio.yaml's instructdiff jobs and the
# `experiment=paper_table selector=random` jobs run beside them at the same budget), so they share a setting and
# pair; presets that change anything else (e.g. weak_to_strong's scoring model) stay apart under their names.
PRESET_KEYS = ("experiment",)
_NOT_SUBSTANCE = ("seed", "selector", "paths", "logger", "hydra")


def _substance(job: Job) -> str | None:
    """Hash of a finished job's resolved config (its manifest's) less what the report tells jobs apart by anyway
    (selector, seed) and where outputs went; None for a job that did not finish, whose config is Hydra's
    unresolved one or the sweep's."""
    if job.results is None or not job.config:
        return None
    return stable_hash({k: v for k, v in job.config.items() if k not in _NOT_SUBSTANCE})


def preset_labels(jobs: list[Job], key: str) -> dict[int, str | None]:
    """Per job (by ``id``): the ``key`` preset label of its setting, or None to leave the preset out.

    Finished jobs with the same resolved configuration (``_substance``) get one label, the names of every preset
    among them joined by ``+``; an unfinished job gets the label of its preset's class when that is unambiguous,
    else its own preset name. When every job ends up with the same label, the preset tells no jobs
    apart and is left out."""
    own = {id(j): str(j.overrides.get(key, "(default)")) for j in jobs}
    substance = {id(j): _substance(j) for j in jobs}
    names: dict[str, set[str]] = {}
    for j in jobs:
        if substance[id(j)] is not None:
            names.setdefault(substance[id(j)], set()).add(own[id(j)])
    label_of_class = {fp: "+".join(sorted(v)) for fp, v in names.items()}
    labels: dict[int, str | None] = {}
    for j in jobs:
        if substance[id(j)] is not None:
            labels[id(j)] = label_of_class[substance[id(j)]]
            continue
        candidates = {label_of_class[fp] for fp, v in names.items() if own[id(j)] in v}
        labels[id(j)] = candidates.pop() if len(candidates) == 1 else own[id(j)]
    if len(set(labels.values())) <= 1:
        return {i: None for i in labels}
    return labels


def describe_jobs(jobs: list[Job]) -> tuple[list[str], dict[str, str]]:
    """Fill every job's selector, domain, seed, fraction, swept selector options and setting; returns the
    override keys that vary across the jobs and the common ones (``{key: value}``)."""
    varying, common = [], {}
    for k in sorted({k for j in jobs for k in j.overrides if not k.startswith(IGNORED_KEYS)}):
        vals = {j.overrides.get(k) for j in jobs}
        if len(vals) > 1:
            varying.append(k)
        else:
            common[k] = next(iter(vals))
    models = {str(get(j.config, "model.name")) for j in jobs if get(j.config, "model.name")}
    presets = {k: preset_labels(jobs, k) for k in PRESET_KEYS if k in varying}
    for j in jobs:
        j.selector = selector_name(j)
        j.domain = str(get(j.config, "domain.name") or j.overrides.get("domain")
                       or (j.results or {}).get("domain") or "?")
        j.seed = j.overrides.get("seed", get(j.config, "seed"))
        j.seed = int(j.seed) if _num(j.seed) is not None else j.seed
        if j.selector == "full":
            j.fraction = 1.0  # full takes the whole pool whatever its budget says
        elif get(j.config, "selector.budget.count") not in (None, "null"):
            j.fraction = None
        else:
            j.fraction = _num(j.overrides.get("selector.budget.fraction", get(j.config, "selector.budget.fraction")))
        setting = []
        for k in varying:
            if k in ("selector", "seed", "selector.budget.fraction", "domain"):
                continue
            if k.startswith("selector."):
                if k in j.overrides:
                    j.params[k.removeprefix("selector.")] = j.overrides[k]
            elif k in PRESET_KEYS:
                if presets[k][id(j)] is not None:
                    setting.append(f"{k}={presets[k][id(j)]}")
            else:
                setting.append(f"{k}={j.overrides.get(k, '(default)')}")
        if len(models) > 1 and not any(s.startswith("model=") for s in setting):
            setting.insert(0, f"model={get(j.config, 'model.name')}")
        j.setting = ", ".join(setting)
    return varying, common


def eval_tasks(config: dict) -> list[str]:
    """The eval task names of a run's resolved config, in order (``eval.tasks``, else ``domain.eval_tasks``)."""
    for key in ("eval.tasks", "domain.eval_tasks"):
        tasks = get(config, key)
        if isinstance(tasks, list) and tasks:
            return [str(t) for t in tasks]
    return []


def read_selection(job: Job) -> list[dict]:
    """The records of a job's selection.jsonl (unreadable lines are left out); [] without the file."""
    path = job.path / "selection.jsonl" if job.path else None
    if path is None or not path.is_file():
        return []
    recs = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                recs.append(json.loads(line))
            except ValueError:
                continue
    return recs


def load_jobs(root: Path) -> list[Job]:
    """Every job under ``root``, started or not, in (sweep, job number, folder) order."""
    root = Path(root)
    jobs = [load_job(p, root) for p in find_job_dirs(root)]
    jobs += not_started_jobs(jobs, root)
    jobs.sort(key=lambda j: (str(j.sweep), j.num if j.num is not None else 1 << 30, j.name))
    return jobs
