"""``instructdiff-report --verify JOB_DIR``: rerun one finished job from its recorded config and check that it
reproduces.

A job directory (a Hydra run or multirun job) holds ``.hydra/overrides.yaml`` (the job's overrides, secrets
masked), ``.hydra/config.yaml`` (the composed config, secrets masked), ``results.json``, ``selection.jsonl``
and ``manifest.json``. The rerun:

* **config**: today's ``conf/`` composed with the job's overrides through Hydra's compose API, the way the
  job itself was composed. Overrides that only say where outputs go or how the run is tracked
  (``paths.*``, ``hydra.*``, ``logger``) are dropped, and so are masked ones (``key=***``: the secret is not
  in the record; the key keeps its default, e.g. from the environment). Without an overrides file (or with
  ``--from-config``) the recorded ``.hydra/config.yaml`` is used instead, masked values replaced by their
  defaults. Either way ``logger=none``, ``paths.run_dir`` = the output dir, ``paths.cache_dir`` = the cache.
  Where the recomposed config differs from the job's recorded one (manifest.json, else .hydra/config.yaml) in
  anything but paths, logger and masked values (``conf/`` changed since), the differences are listed as
  config drift; ``--from-config`` reruns the recorded config instead.
* **output**: a fresh directory (``--verify-out``, must be empty or absent; default a new temp dir under
  ``$TMPDIR``): the rerun's results.json, selection.jsonl, ... and ``verify.json`` (the verdict).
* **cache**: ``--cache-dir`` (an existing cache, e.g. to reuse the converted base model: whatever it holds is
  served from it), else a fresh empty cache inside the output dir, deleted afterwards unless
  ``--keep-cache``, so nothing the job computed is reused.

The verdict: the selection is identical when the ``selected`` rows of selection.jsonl, ordered by rank, have
the same ids in the same order (else the first differing rank is named); each trained-model metric of
results.json (``eval.trained.metrics``; ``--metric`` picks some) is within ``--tol`` (absolute, default 1e-3:
the bits-per-byte noise floor we accept; for accuracies over fewer than 1000 items it means exactly equal).
Exit status 0 when the selection is identical and every compared metric is within tolerance, 1 otherwise,
2 when the job cannot be verified (no results.json, an output dir that is not empty).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

DEFAULT_TOL = 1e-3
MASK = "***"  # instructdiff.tracking.MASK (not imported: that module pulls in W&B glue)
# Override keys that say where outputs go or how the run is tracked, never what is computed.
DROPPED_KEYS = ("paths", "hydra", "logger")


class VerifyError(Exception):
    """The job cannot be verified (exit status 2)."""


# -- reading the record --------------------------------------------------------------------------------------
def read_selection(path: Path) -> list[str]:
    """Ids of the ``selected`` rows of a selection.jsonl, ordered by rank (file order where rank is missing)."""
    recs = []
    for k, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines()):
        if line.strip():
            rec = json.loads(line)
            if rec.get("status") == "selected":
                rank = rec.get("rank")
                recs.append((rank is None, rank if rank is not None else k, k, rec.get("id")))
    return [r[3] for r in sorted(recs)]


def trained_metrics(results: dict) -> dict[str, float]:
    metrics = ((results.get("eval") or {}).get("trained") or {}).get("metrics") or {}
    out = {}
    for k, v in metrics.items():
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            continue
    return out


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _is_dropped_key(key: str) -> bool:
    return any(key == k or key.startswith((f"{k}.", f"{k}/")) for k in DROPPED_KEYS)


def _masked_paths(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _masked_paths(v, f"{prefix}{k}.")]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _masked_paths(v, f"{prefix}{i}.")]
    return [prefix[:-1]] if node == MASK else []


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def recorded_config(job_dir: Path) -> dict:
    """The job's resolved config as recorded: manifest.json's (resolved at run time), else .hydra/config.yaml
    resolved here as far as it resolves without Hydra."""
    manifest = job_dir / "manifest.json"
    if manifest.is_file():
        try:
            config = json.loads(manifest.read_text()).get("config")
            if isinstance(config, dict) and config:
                return config
        except ValueError:
            pass
    path = job_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        return {}
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(path)
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an env or hydra: interpolation that does not resolve here
        return OmegaConf.to_container(cfg, resolve=False)


def config_drift(recorded: dict, rerun: dict) -> list[dict[str, Any]]:
    """Keys whose value differs between the recorded and the rerun's resolved config, leaving out paths, the
    logger and masked values: what the rerun does differently from what the job did."""
    a, b = _flatten(recorded), _flatten(rerun)
    drift = []
    for key in sorted(set(a) | set(b)):
        if _is_dropped_key(key) or a.get(key) == MASK:
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            drift.append({"key": key, "recorded": a.get(key, "<absent>"), "rerun": b.get(key, "<absent>")})
    return drift


def compose_rerun_config(job_dir: Path, run_dir: Path, cache_dir: Path, from_config: bool = False):
    """(cfg, info): the job's config for a rerun into ``run_dir`` with ``cache_dir`` (see the module doc);
    ``info`` says where it came from, which overrides were dropped and why, and which masked values were reset."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    from instructdiff import CONF_DIR

    job_dir = Path(job_dir)
    ov_path = job_dir / ".hydra" / "overrides.yaml"
    cfg_path = job_dir / ".hydra" / "config.yaml"
    info: dict[str, Any] = {"dropped_overrides": [], "reset_masked": []}
    overrides = None
    if ov_path.is_file() and not from_config:
        overrides = yaml.safe_load(ov_path.read_text()) or []
        if not isinstance(overrides, list):
            raise VerifyError(f"{ov_path}: expected a list of overrides, got {type(overrides).__name__}")
    if overrides is None and not cfg_path.is_file():
        raise VerifyError(f"{job_dir}: neither .hydra/overrides.yaml nor .hydra/config.yaml: not a job directory")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        if overrides is not None:
            kept = []
            for ov in map(str, overrides):
                if _is_dropped_key(_override_key(ov)):
                    info["dropped_overrides"].append({"override": ov, "why": "where outputs go / tracking"})
                elif "=" in ov and ov.split("=", 1)[1] == MASK:
                    info["dropped_overrides"].append({"override": ov, "why": "masked secret: default used"})
                else:
                    kept.append(ov)
            cfg = compose("config", overrides=[*kept, "logger=none"])
            info.update(source=str(ov_path), overrides=kept)
        else:
            default = compose("config", overrides=["logger=none"])
            cfg = OmegaConf.load(cfg_path)
            with open_dict(cfg):
                for key in _masked_paths(OmegaConf.to_container(cfg, resolve=False)):
                    OmegaConf.update(cfg, key, OmegaConf.select(default, key, default=None), merge=False)
                    info["reset_masked"].append(key)
                cfg.logger = default.logger
                if "paths" not in cfg:
                    cfg.paths = default.paths
            info.update(source=str(cfg_path), overrides=None)
    with open_dict(cfg):
        cfg.paths.output_root = str(run_dir)
        cfg.paths.cache_dir = str(cache_dir)
        cfg.paths.run_dir = str(run_dir)
    return cfg, info


# -- comparing -----------------------------------------------------------------------------------------------
def compare_selection(recorded: Sequence[str], rerun: Sequence[str]) -> dict[str, Any]:
    first = next((k for k, (a, b) in enumerate(zip(recorded, rerun, strict=False)) if a != b), None)
    if first is None and len(recorded) != len(rerun):
        first = min(len(recorded), len(rerun))
    out: dict[str, Any] = {"identical": first is None, "n_recorded": len(recorded), "n_rerun": len(rerun),
                           "same_set": set(recorded) == set(rerun)}
    if first is not None:
        out["first_difference"] = {"rank": first,
                                   "recorded": recorded[first] if first < len(recorded) else None,
                                   "rerun": rerun[first] if first < len(rerun) else None}
    return out


def compare_metrics(recorded: dict[str, float], rerun: dict[str, float], tol: float,
                    only: Sequence[str] | None = None) -> list[dict[str, Any]]:
    names = list(only) if only else sorted(set(recorded) | set(rerun))
    rows = []
    for m in names:
        a, b = recorded.get(m), rerun.get(m)
        if a is None or b is None:
            diff, ok, note = None, False, "missing in the " + ("record" if a is None else "rerun")
        elif math.isnan(a) and math.isnan(b):
            diff, ok, note = None, True, "NaN in both"
        else:
            diff = abs(a - b)
            ok, note = bool(diff <= tol), None
        rows.append({"metric": m, "recorded": a, "rerun": b, "abs_diff": diff, "tol": tol, "within": ok,
                     **({"note": note} if note else {})})
    return rows


# -- the whole check -----------------------------------------------------------------------------------------
def _fresh_dir(out: Path | None, job_dir: Path) -> Path:
    if out is None:
        return Path(tempfile.mkdtemp(prefix=f"instructdiff-verify-{job_dir.name[:60]}-")).resolve()
    out = Path(out).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise VerifyError(f"--verify-out {out} is not an empty directory: the rerun needs a fresh one")
    out.mkdir(parents=True, exist_ok=True)
    return out


def verify_job(job_dir: Path | str, out: Path | str | None = None, cache_dir: Path | str | None = None,
               tol: float = DEFAULT_TOL, metrics: Sequence[str] | None = None, from_config: bool = False,
               keep_cache: bool = False, run: Callable[[Any], dict] | None = None) -> dict[str, Any]:
    """Rerun the job in ``job_dir`` and compare (see the module doc); returns the verdict, also written to
    ``<out>/verify.json``. ``run`` is ``instructdiff.pipeline.run`` unless given."""
    from omegaconf import OmegaConf

    from instructdiff.report import eval_tasks, primary_metric

    job_dir = Path(job_dir).resolve()
    if not (job_dir / "results.json").is_file():
        raise VerifyError(f"{job_dir} has no results.json: not a finished job")
    if not (job_dir / "selection.jsonl").is_file():
        raise VerifyError(f"{job_dir} has no selection.jsonl: the job made no selection to compare")
    recorded_results = json.loads((job_dir / "results.json").read_text())
    recorded_sel = read_selection(job_dir / "selection.jsonl")
    out_dir = _fresh_dir(Path(out) if out else None, job_dir)
    fresh_cache = cache_dir is None
    cache = (out_dir / "cache") if fresh_cache else Path(cache_dir).resolve()
    try:
        cfg, info = compose_rerun_config(job_dir, out_dir, cache, from_config)
    except VerifyError:
        raise
    except Exception as e:  # e.g. an override of a key conf/ no longer has
        hint = "" if from_config else "; --from-config reruns the recorded .hydra/config.yaml instead"
        raise VerifyError(f"cannot compose the job's config: {type(e).__name__}: {e}{hint}") from e
    rerun_config = OmegaConf.to_container(cfg, resolve=True)
    recorded_cfg = recorded_config(job_dir)
    drift = config_drift(recorded_cfg, rerun_config) if recorded_cfg else []

    if run is None:
        from instructdiff.pipeline import run
    t0 = time.time()
    try:
        results = run(cfg)
    finally:
        if fresh_cache and not keep_cache:
            shutil.rmtree(cache, ignore_errors=True)
    seconds = time.time() - t0

    rec_m, new_m = trained_metrics(recorded_results), trained_metrics(results)
    primary = primary_metric(rec_m, eval_tasks(recorded_cfg))
    selection = compare_selection(recorded_sel, read_selection(out_dir / "selection.jsonl"))
    rows = compare_metrics(rec_m, new_m, tol, metrics)
    for r in rows:
        r["primary"] = r["metric"] == primary
    verdict = {
        "job_dir": str(job_dir), "rerun_dir": str(out_dir),
        "cache_dir": None if fresh_cache and not keep_cache else str(cache),
        "cache": "fresh (deleted after the rerun)" if fresh_cache and not keep_cache
        else "fresh (kept)" if fresh_cache else "given (--cache-dir): cached work was reused",
        "config_source": info["source"], "overrides": info["overrides"],
        "dropped_overrides": info["dropped_overrides"], "reset_masked": info["reset_masked"],
        "config_drift": drift, "tolerance": tol, "primary_metric": primary, "selection": selection,
        "metrics": rows, "rerun_cache_misses": (results.get("cache") or {}).get("misses"),
        "rerun_seconds": round(seconds, 1),
        "passed": bool(selection["identical"] and all(r["within"] for r in rows)),
    }
    (out_dir / "verify.json").write_text(json.dumps(verdict, indent=2, default=str) + "\n")
    return verdict


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.6g}"


def format_verdict(v: dict[str, Any]) -> list[str]:
    sel = v["selection"]
    lines = [f"verify: {v['job_dir']}",
             f"  rerun: {v['rerun_dir']} (config from {v['config_source']}; cache: {v['cache']})"]
    for d in v["dropped_overrides"]:
        lines.append(f"  dropped override {d['override']} ({d['why']})")
    for k in v["reset_masked"]:
        lines.append(f"  masked value reset to its default: {k}")
    if v["config_drift"]:
        lines.append(f"  config drift: {len(v['config_drift'])} key(s) differ from the recorded config "
                     "(conf/ changed since the job ran; --from-config reruns the recorded config):")
        lines += [f"    {d['key']}: recorded {d['recorded']!r}, rerun {d['rerun']!r}" for d in v["config_drift"]]
    if sel["identical"]:
        lines.append(f"  selection identical: yes ({sel['n_recorded']} selected ids, same order)")
    else:
        fd = sel["first_difference"]
        why = ("same ids, different order" if sel["same_set"] else
               f"different ids ({sel['n_recorded']} recorded, {sel['n_rerun']} in the rerun)")
        lines.append(f"  selection identical: no, first difference at rank {fd['rank']}: recorded "
                     f"{fd['recorded']!r}, rerun {fd['rerun']!r} ({why})")
    if not v["metrics"]:
        lines.append("  metrics: none recorded (eval=none or no train stage): only the selection is compared")
    else:
        w = max(len("metric"), *(len(r["metric"]) + 2 for r in v["metrics"]))
        lines.append(f"  {'metric':<{w}}  {'recorded':>12}  {'rerun':>12}  {'|diff|':>10}  {'tol':>8}  within")
        for r in v["metrics"]:
            name = r["metric"] + (" *" if r.get("primary") else "")
            lines.append(f"  {name:<{w}}  {_num(r['recorded']):>12}  {_num(r['rerun']):>12}  "
                         f"{_num(r['abs_diff']):>10}  {r['tol']:>8g}  {'yes' if r['within'] else 'no'}"
                         + (f" ({r['note']})" if r.get("note") else ""))
        if v["primary_metric"]:
            lines.append("  * primary metric")
    bad = [r["metric"] for r in v["metrics"] if not r["within"]]
    reasons = ([] if sel["identical"] else ["selection differs"]) + (
        [f"{len(bad)} metric(s) beyond tolerance: {', '.join(bad)}"] if bad else [])
    lines.append("verdict: REPRODUCED" if v["passed"] else f"verdict: NOT REPRODUCED ({'; '.join(reasons)})")
    lines.append(f"  written: {Path(v['rerun_dir']) / 'verify.json'}")
    return lines


def main_verify(job_dir: Path, out: Path | None, cache_dir: Path | None, tol: float,
                metrics: Sequence[str] | None, from_config: bool, keep_cache: bool,
                echo: Callable[[str], None] = print) -> int:
    """The ``--verify`` branch of ``instructdiff-report``: 0 reproduced, 1 not, 2 cannot verify."""
    import logging

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not logging.getLogger().handlers:  # the pipeline's progress lines, as under the Hydra entry point
        logging.basicConfig(format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    logging.getLogger("instructdiff").setLevel(logging.INFO)
    try:
        verdict = verify_job(job_dir, out, cache_dir, tol, metrics, from_config, keep_cache)
    except VerifyError as e:
        echo(f"instructdiff-report --verify: error: {e}")
        return 2
    for line in format_verdict(verdict):
        echo(line)
    return 0 if verdict["passed"] else 1
