"""What a run leaves in its directory besides results.json: selection.jsonl, subset.jsonl, manifest.json (row
accounting, versions, hashes), and the summary printed at its end."""

from __future__ import annotations

import hashlib
import json
import platform
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from instructdiff import PROJECT_ROOT, __version__
from instructdiff.atomic import atomic_open, atomic_write_json
from instructdiff.data import original_records, provenance
from instructdiff.selection import Selection


def json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def write_json(path: Path, obj: Any) -> None:
    """Publish ``obj`` at ``path`` whole or not at all (temp file + os.replace); clear OutputError on failure."""
    atomic_write_json(path, obj, path.name, default=json_default)


def code_hash() -> str:
    """Hash of the framework's and the plugins' source (recorded in the manifest, not in cache keys)."""
    h = hashlib.sha256()
    for folder in ("instructdiff", "baselines"):
        for p in sorted((PROJECT_ROOT / folder).rglob("*.py")):
            h.update(p.relative_to(PROJECT_ROOT).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _finite_or_none(x: float) -> float | None:
    return float(x) if x is not None and np.isfinite(x) else None


def accounting(prepared: Any, selection: Selection | None) -> dict:
    """selected + not_selected + dropped + not_drawn = input rows, with every drop reason counted.

    ``input_rows`` are the records read from the pool files (blank lines are not records). ``not_drawn``
    counts the good rows the ``domain.pool_size`` subsample left out: they were never in the pool, so they
    are neither dropped (bad rows, each with its reason) nor listed one by one in selection.jsonl (``listed``
    says how many lines it has).
    """
    report, render_dropped, pool = prepared.report, prepared.render_dropped, prepared.pool
    reasons: Counter[str] = Counter(d["reason"].split(":", 1)[0] for d in report.dropped)
    not_drawn = report.not_drawn
    reasons.update(d["reason"].split(" ", 1)[0] for d in render_dropped)
    selected = not_selected = 0
    if selection is None:
        not_selected = len(pool)
    else:
        for status in selection.status.values():
            if status == "selected":
                selected += 1
            elif status == "not_selected":
                not_selected += 1
            else:
                reasons[status.split(":", 1)[1] if ":" in status else status] += 1
    dropped = sum(reasons.values())
    return {"input_rows": report.n_read, "selected": selected, "not_selected": not_selected,
            "dropped": dropped, "dropped_reasons": dict(sorted(reasons.items())), "not_drawn": not_drawn,
            "listed": len(pool) + len(report.dropped) + len(render_dropped),
            "balanced": selected + not_selected + dropped + not_drawn == report.n_read
            and (selection is None or len(selection.status) == len(pool))}


def write_selection(run_dir: Path, prepared: Any, selection: Selection, load_dropped: list[dict],
                    rows: list) -> dict:
    """selection.jsonl holds every row read (dropped ones too); subset.jsonl the chosen rows. Returns the
    row accounting.

    Both are published atomically, and only after the row accounting balances: a run that would lose a
    row raises instead of writing a record that looks complete.
    """
    acc = accounting(prepared, selection)
    if not acc["balanced"]:
        raise RuntimeError(f"row accounting does not balance, refusing to write selection.jsonl: {acc}")
    by_id = {r.id: r for r in rows}
    # Each record ends with where its row was read (file and line, or index in a .json array), so that
    # selection.jsonl, subset.jsonl and the user's input join both ways. Appended after the scores: the
    # fields before them are unchanged from earlier versions.
    with atomic_open(run_dir / "selection.jsonl", "w", "selection.jsonl", encoding="utf-8") as fh:
        rank = {i: k for k, i in enumerate(selection.selected)}
        for r in prepared.pool:
            status = selection.status[r.id]
            rec = {"id": r.id, "status": status.split(":")[0], "reason": status.split(":", 1)[1]
                   if ":" in status else None, "rank": rank.get(r.id),
                   "scores": {k: _finite_or_none(v) for k, v in selection.scores.get(r.id, {}).items()},
                   **provenance(r)}
            fh.write(json.dumps(rec) + "\n")
        for d in load_dropped:
            where = {k: d[k] for k in ("file", "line", "index") if k in d}
            if not where and d.get("id") in by_id:  # dropped by the renderer: only its id was recorded
                where = provenance(by_id[d["id"]])
            fh.write(json.dumps({"id": d.get("id"), "status": "dropped", "reason": d.get("reason"),
                                 "source": d.get("source"), "rank": None, "scores": {}, **where}) + "\n")
    chosen = [by_id[i] for i in selection.selected]
    with atomic_open(run_dir / "subset.jsonl", "w", "subset.jsonl", encoding="utf-8") as fh:
        # the record verbatim, plus one namespaced key: a top-level "id" could clobber the record's own id field
        for row, rec in zip(chosen, original_records(chosen), strict=True):
            fh.write(json.dumps({**rec, "_instructdiff": {"id": row.id, **provenance(row)}},
                                ensure_ascii=False) + "\n")
    return acc


def write_manifest(run_dir: Path, cfg: DictConfig, prepared: Any, pool_seed: int, response_end: str,
                   selection: Selection | None, acc: dict | None) -> None:
    import torch
    import transformers
    import trl

    from instructdiff.tracking import mask_secrets

    p = prepared
    manifest = {
        "instructdiff_version": __version__, "code_hash": code_hash(),
        # keys that look like credentials (token, key, secret, password) are masked: manifests get shared
        "config": mask_secrets(OmegaConf.to_container(cfg, resolve=True)),
        "base_model": {"name": p.base.name, "path": p.base.path, "fingerprint": p.base.fingerprint},
        "data_files": {f: _sha256(f) for f in sorted({r.meta["source_file"] for r in p.rows
                                                         if "source_file" in r.meta})},
        "pool": {"fingerprint": p.pool_fp, "render_fingerprint": p.render_fp,
                 "pool_seed": pool_seed, "pool_size": cfg.domain.get("pool_size"), "seed": int(cfg.seed),
                 "response_end": response_end,
                 "report": p.report.to_dict() if hasattr(p.report, "to_dict") else str(p.report),
                 "n_dropped_by_renderer": len(p.render_dropped)},
        "counts": selection.stats.get("counts") if selection else None,
        "accounting": acc or accounting(p, selection),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "trl": trl.__version__},
    }
    write_json(run_dir / "manifest.json", manifest)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def print_summary(results: dict, echo: Callable[[str], None] = print) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(f"instructdiff · {results['domain']} · {results['selector']} · seed {results['seed']}"))
    table.add_column("metric")
    table.add_column("base", justify="right")
    table.add_column("trained", justify="right")
    ev = results.get("eval", {})
    base_m = ev.get("base", {}).get("metrics", {})
    trained_m = ev.get("trained", {}).get("metrics", {})
    for k in sorted(set(base_m) | set(trained_m)):
        table.add_row(k, _fmt(base_m.get(k)), _fmt(trained_m.get(k)))
    sel = results.get("selection", {})
    console = Console()
    if sel:
        # the whole input's accounting: rows dropped on load or by the renderer never reach the selector's counts
        c = sel.get("accounting") or {**sel.get("counts", {}), "dropped_reasons": sel.get("dropped_reasons")}
        not_drawn = f", {sel['not_drawn']} not drawn into the pool" if sel.get("not_drawn") else ""
        console.print(escape(f"selection: {c.get('selected')} selected, {c.get('not_selected')} not selected, "
                             f"{c.get('dropped')} dropped ({c.get('dropped_reasons')}){not_drawn}"))
    if results.get("scoring_model") and results.get("scoring_model") != results.get("model"):
        console.print(f"scored by: {results['scoring_model']} (selecting for {results.get('model')})")
    console.print(f"time per stage (s): {results.get('seconds')}")
    cost = results.get("cost") or {}
    if cost.get("selection_flops_uncached") is not None:
        console.print(f"estimated FLOPs: selection {cost['selection_flops_uncached']:.3g} from scratch "
                      f"({cost.get('selection_flops', 0):.3g} in this run), training {cost.get('train_flops', 0):.3g}, "
                      f"eval {cost.get('eval_flops', 0):.3g}")
    console.print(f"cache: {results['cache']['hits']} hits, {results['cache']['misses']} misses")
    if ev:
        console.print(table)
    # escaped: a "[select]" in a path is rich markup and vanished; soft_wrap: no line break inside the path
    console.print(escape(f"outputs: {results['run_dir']}"), soft_wrap=True)


def _fmt(v: Any) -> str:
    return "—" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def records_same_work(path: Path, results: dict[str, Any]) -> bool:
    """Whether ``path`` (a run directory's results.json) already records the work of ``results``, a run whose
    every stage was a cache hit: the same stages, and each of its (stage, cache key) pairs among the recorded
    run's. Rerunning a finished sweep into its own folder is then a resume, and the record of the run that
    computed the results (its wall times, its costs, which of its stages computed) is the one worth keeping."""
    events = results.get("cache", {}).get("events", [])
    if results.get("cache", {}).get("misses", 1) != 0 or not events or not path.is_file():
        return False
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        recorded = {(e["stage"], e["key"]) for e in old["cache"]["events"]}
    except (OSError, ValueError, KeyError, TypeError):
        return False  # unreadable or from another version: the new record replaces it
    return old.get("stages") == results.get("stages") and all((e["stage"], e["key"]) in recorded for e in events)
