"""A domain's query set: a few target-domain examples that a representation-based selector (RDS+) matches the pool
against. Named in the domain YAML under ``query`` and never taken from the evaluation items:

    query:
      path: code/mbpp/mbpp.jsonl   # resolved like pool paths (data/ first, then the working directory)
      format: mbpp                 # a key of instructdiff.data.FORMATS, or auto
      rows: [510, 600]             # [start, stop) of the file's records in file order; null = the whole file

Rows come in file order (deterministic, seed-independent: every run and seed matches against the same
queries); empty responses and duplicates are left out. ``tests/test_rds_cost.py`` checks that no query row's
user turn is one of the domain's eval items.
"""

from __future__ import annotations

from itertools import islice
from typing import Any

from instructdiff.data import drop_reason, load_source
from instructdiff.rows import Row


def query_spec(domain_cfg: Any) -> dict[str, Any] | None:
    """The domain's ``query`` mapping as a plain dict, or None when it names none."""
    q = domain_cfg.get("query") if hasattr(domain_cfg, "get") else None
    if q is None:
        return None
    if hasattr(q, "items"):
        q = {k: v for k, v in q.items()}
    if not isinstance(q, dict) or not q.get("path"):
        raise ValueError(f"domain.query must be a mapping with a path (and format, rows), got {q!r}")
    unknown = set(q) - {"path", "format", "rows"}
    if unknown:
        raise ValueError(f"domain.query has unknown key(s) {sorted(unknown)}; known: path, format, rows")
    return q


def load_queries(domain_cfg: Any, n: int | None = None) -> list[Row]:
    """The first ``n`` usable rows (all when None) of the domain's query slice."""
    spec = query_spec(domain_cfg)
    name = domain_cfg.get("name", "?") if hasattr(domain_cfg, "get") else "?"
    if spec is None:
        raise ValueError(f"domain.query is null: domain {name!r} names no query set; add domain.query (path, "
                         "format, rows) with target-domain examples disjoint from its eval items")
    rows = spec.get("rows")
    start, stop = (0, None) if rows is None else (int(rows[0]), None if rows[1] is None else int(rows[1]))
    if start < 0 or (stop is not None and stop <= start):
        raise ValueError(f"domain.query.rows must be [start, stop) with 0 <= start < stop, got {rows}")
    out: list[Row] = []
    seen: set[str] = set()
    for row in islice(load_source(spec["path"], spec.get("format") or "auto"), start, stop):
        if drop_reason(row, seen) is None:
            out.append(row)
        if n is not None and len(out) >= n:
            break
    if not out:
        raise ValueError(f"domain {name!r}: the query slice {rows} of {spec['path']} holds no usable rows")
    return out
