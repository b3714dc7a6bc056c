"""One pool file -> its rows, each with where it came from; and the source records of chosen rows."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from instructdiff.data.errors import DataError, Record
from instructdiff.data.formats import FORMAT_FIELDS, FORMATS, _check_format, detect_format
from instructdiff.data.paths import _display, resolve_data_path
from instructdiff.data.reader import _kind, _scan
from instructdiff.rows import Row

log = logging.getLogger(__name__)


def provenance(row: Row) -> dict[str, Any]:
    """Where ``row`` was read: ``{"file": <absolute path>, "line": <1-based line>}`` for JSON Lines,
    ``{"file": ..., "index": <0-based element>}`` for a .json file; ``{}`` for a row built in code.

    The run's records carry it next to the row's id so that selection.jsonl, subset.jsonl and the input file
    join both ways. Never part of the id or of a cache key (ids hash the text alone).
    """
    if row.file is None:
        return {}
    return {"file": row.file, **({"line": row.line} if row.line is not None else {"index": row.index})}


def _locator(path: Path) -> Callable[[int], dict[str, Any]]:
    """n (the reader's line or element number) -> the provenance fields of that record in ``path``."""
    file = str(path.resolve())
    key = "line" if _kind(path) == "jsonl" else "index"
    return lambda n: {"file": file, key: n}


def _map_source(path: Path, fmt: str) -> Iterator[tuple[str, Row | DataError, dict[str, Any]]]:
    """(location, row or the error for that record, provenance fields); the format is fixed by the first record.

    A row carries its provenance itself (``Row.file``, ``line`` / ``index``); an error's is yielded beside it so
    that a dropped record, too, can be found in its file.
    """
    mapper: Callable[[Record], Row] | None = None if fmt == "auto" else FORMATS[fmt]
    locate = _locator(path)
    for n, where, item in _scan(path):
        if isinstance(item, DataError):
            yield where, item, locate(n)
            continue
        if mapper is None:
            detected = detect_format(item)
            if detected is None:
                # yielded, not raised: with on_error=skip (and in instructdiff-validate) one odd record must
                # not hide the rest of the file; the format is then fixed by the first detectable record
                yield where, DataError(f"cannot detect the format from keys {sorted(item)}; expected the keys of "
                                       "a known format (e.g. instruction + response for 'generic'), or name the "
                                       "format: " + "; ".join(f"{k}: {v}" for k, v in FORMAT_FIELDS.items()),
                                       where=where), locate(n)
                continue
            fmt, mapper = detected, FORMATS[detected]
            log.debug("%s: detected format %r", _display(path), fmt)
        try:
            row = mapper(item)
        except DataError as e:
            yield where, e.at(where, f" [format {fmt!r} reads: {FORMAT_FIELDS.get(fmt, '?')}]"), locate(n)
            continue
        row.meta["origin"] = where
        row.meta["format"] = fmt
        # where to find the untouched record again (subset.jsonl is written in the input's own format)
        position = locate(n)
        row.meta["source_file"] = position["file"]
        row.meta["source_index"] = n
        yield where, replace(row, **position), position


def original_records(rows: list[Row]) -> list[Record]:
    """The source records of ``rows`` exactly as they are in their files, in the order of ``rows``."""
    wanted: dict[str, set[int]] = {}
    for r in rows:
        wanted.setdefault(r.meta["source_file"], set()).add(int(r.meta["source_index"]))
    found: dict[tuple[str, int], Record] = {}
    for file, indices in wanted.items():
        for n, _, item in _scan(Path(file)):
            if n in indices and not isinstance(item, DataError):
                found[(file, n)] = item
    return [found[(r.meta["source_file"], int(r.meta["source_index"]))] for r in rows]


def load_source(path: str | Path, fmt: str = "auto") -> Iterator[Row]:
    """Rows of one file, in file order. ``fmt`` is a key of FORMATS or "auto" (detected from the first record).

    Any bad record raises DataError naming file, line (or element), field and what was expected. Rows with an
    empty response are yielded: dropping them is the pool's policy, not the format's.
    """
    _check_format(fmt)
    resolved = resolve_data_path(path)

    def rows() -> Iterator[Row]:
        for _, item, _ in _map_source(resolved, fmt):
            if isinstance(item, DataError):
                raise item
            yield item

    return rows()
