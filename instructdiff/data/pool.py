"""A domain's pool: its files read, bad rows and duplicates dropped with reasons, the pool_size draw made."""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from instructdiff.data.domain import _plain, _pool_size, _sources, check_unsupported, resolve_on_error
from instructdiff.data.errors import DataError
from instructdiff.data.formats import _check_format
from instructdiff.data.paths import _display, resolve_data_path
from instructdiff.data.source import _map_source
from instructdiff.rows import Row

log = logging.getLogger(__name__)


@dataclass
class SourceCount:
    path: str
    format: str
    n_read: int = 0
    n_kept: int = 0  # after drops, before the pool_size subsample
    duplicate: int = 0
    empty_response: int = 0
    bad_row: int = 0


@dataclass
class PoolReport:
    """What load_pool read, dropped and kept: ``n_read = len(dropped) + not_drawn + n_kept``.

    ``dropped`` lists every record that could not be used (bad, duplicate, empty response), each with its
    reason, its location (``source``: file:line) and its provenance (``file`` and ``line`` or ``index``).
    ``not_drawn`` counts usable rows the ``pool_size`` draw left out: not a fault of the data, so not a drop.
    """

    n_read: int = 0
    n_kept: int = 0  # rows returned (after drops and the pool_size subsample)
    dropped: list[dict[str, Any]] = field(default_factory=list)
    n_available: int = 0  # rows left after drops, before the subsample
    not_drawn: int = 0  # n_available - n_kept: usable rows the pool_size subsample left out
    pool_size: int | None = None  # requested size (None: all)
    n_multi_turn: int = 0  # kept rows carrying earlier turns in meta["history"]
    sources: list[SourceCount] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Drops per reason ("bad_row: ..." messages collapse to "bad_row")."""
        return dict(Counter(d["reason"].split(":", 1)[0] for d in self.dropped))

    def summary(self) -> str:
        drops = ", ".join(f"{n} {reason}" for reason, n in sorted(self.counts().items())) or "none"
        text = (f"read {self.n_read}, dropped {len(self.dropped)} ({drops}), available {self.n_available}, "
                + (f"not drawn {self.not_drawn}, " if self.not_drawn else "") + f"kept {self.n_kept}")
        if self.n_multi_turn:
            text += f", {self.n_multi_turn} multi-turn"
        return text + "".join(f"; {note}" for note in self.notes)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "counts": self.counts()}


def _subsample(rows: list[Row], k: int, seed: int) -> list[Row]:
    """k rows chosen by seed, kept in pool order so sources stay grouped and diffs stay readable."""
    chosen = sorted(random.Random(seed).sample(range(len(rows)), k))
    return [rows[i] for i in chosen]


def drop_reason(row: Row, seen: set[str]) -> str | None:
    """The pool's rule for a well-formed row: ``empty_response``, ``duplicate`` (of an id in ``seen``), or None
    when it is kept, in which case its id joins ``seen``. Shared by the pool, the query sets and the validator
    so that all three agree on what counts as usable."""
    if not row.response.strip():
        return "empty_response"
    if row.id in seen:
        return "duplicate"
    seen.add(row.id)
    return None


def load_pool(domain_cfg: Any, seed: int, on_error: str | None = None) -> tuple[list[Row], PoolReport]:
    """Read a domain's pool, drop duplicates / empty responses / (optionally) bad rows, subsample to pool_size.

    ``on_error`` (raise | skip) overrides ``data.on_error`` and the domain's ``on_bad_row``; see
    :func:`resolve_on_error`. Every record read ends in the returned rows, in ``report.dropped`` with a reason,
    or among the ``report.not_drawn`` rows the pool_size subsample left out.
    """
    on_bad_row = "error" if resolve_on_error(domain_cfg, on_error) == "raise" else "skip"
    cfg = _plain(domain_cfg)
    check_unsupported(cfg)
    name = cfg.get("name", "?")
    size = _pool_size(cfg)
    sources = _sources(cfg)
    for _, fmt in sources:
        _check_format(fmt)

    report = PoolReport(pool_size=size)
    rows: list[Row] = []
    seen: set[str] = set()
    for path, fmt in sources:
        resolved = resolve_data_path(path)
        count = SourceCount(_display(resolved), fmt)
        report.sources.append(count)
        for where, item, position in _map_source(resolved, fmt):
            count.n_read += 1
            if isinstance(item, DataError):
                if on_bad_row == "error":
                    raise item
                count.bad_row += 1
                report.dropped.append({"id": None, "source": where, "reason": f"bad_row: {item.reason}",
                                       "field": item.field, **position})
            elif (reason := drop_reason(item, seen)) is not None:
                setattr(count, reason, getattr(count, reason) + 1)  # SourceCount.empty_response / .duplicate
                report.dropped.append({"id": item.id, "source": where, "reason": reason, **position})
            else:
                rows.append(item)
                count.n_kept += 1
        report.n_read += count.n_read

    report.n_available = len(rows)
    if not rows:
        raise DataError(f"domain {name!r}: no usable rows in {', '.join(p for p, _ in sources)} "
                        f"({report.summary()})")
    if size is not None and size > len(rows):
        report.notes.append(f"pool_size {size} exceeds the {len(rows)} available rows: using all of them")
    elif size is not None:
        rows = _subsample(rows, size, seed)
    report.n_kept = len(rows)
    report.not_drawn = report.n_available - report.n_kept
    report.n_multi_turn = sum(1 for r in rows if r.meta.get("history"))

    if report.dropped:
        first = report.dropped[0]
        log.warning("domain %s: %s (first drop: %s %s)", name, report.summary(), first["source"], first["reason"])
    else:
        log.info("domain %s: %s", name, report.summary())
    return rows, report
