"""Reading pool files in their native containers (.jsonl, .json, gzipped or not) into raw records.

Locations are ``file:LINE`` (1-based) for JSON Lines and ``file:element I`` (0-based array index) for JSON
files, so a user can jump straight to the offending record. Per-record problems are yielded, not raised, so a
caller that skips bad rows still sees the rest of the file.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from instructdiff.data.errors import DataError, Record, _a
from instructdiff.data.paths import _display, resolve_data_path


def _kind(path: Path) -> str:
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(".jsonl"):
        return "jsonl"
    if name.endswith(".json"):
        return "json"
    raise DataError(f"unsupported file type {path.name!r}; expected .jsonl, .jsonl.gz, .json or .json.gz",
                    where=_display(path))


_GZIP_MAGIC = b"\x1f\x8b"  # never the start of UTF-8 text (0x8b cannot start a UTF-8 character)


def _read_bytes(path: Path) -> bytes:
    gz = path.name.lower().endswith(".gz")
    opener = gzip.open if gz else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # a truncated or non-gzip .gz lands here
        raise DataError(f"cannot read file: {e}; expected a readable file (gzip-compressed when named .gz)",
                        where=_display(path)) from e
    if not gz and data.startswith(_GZIP_MAGIC):
        raise DataError(f"file is gzip-compressed (starts with bytes 1f 8b) but its name does not end in .gz; "
                        f"expected it named {path.name}.gz (the reader then decompresses it) or decompressed "
                        f"(gunzip)", where=_display(path))
    return data


# A lone UTF-16 surrogate (U+D800..U+DFFF) is a valid JSON escape but not Unicode: it cannot be encoded as
# UTF-8, so a record holding one would crash the content id, subset.jsonl or a printed message. Strict UTF-8
# decoding never produces one and json.loads joins escaped pairs, so after json.loads any surrogate code point
# is a lone one, and it can only come from a "\uD800".."\uDFFF" escape: the (cheap) regex on the raw text
# decides whether a record needs the (exact) walk at all, so valid files pay almost nothing.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _printable(text: str) -> str:
    """``text`` with lone surrogates written as \\udxxx escapes: safe to print, log and write as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _lone_surrogate(record: Record) -> DataError | None:
    """A DataError naming the first string (value or key, in file order) of ``record`` that holds a lone
    surrogate, with its field path (``history[0][1]``, ``meta.note``); None when all text is valid Unicode.

    Any such string makes the record a bad row, wherever it is: a field the format does not read is still
    written back verbatim to subset.jsonl, which must be valid UTF-8.
    """
    stack: list[tuple[str, Any]] = [("", record)]
    while stack:  # iterative depth-first walk: a deeply nested record must not hit the recursion limit
        path, value = stack.pop()
        if isinstance(value, str):
            if (m := _SURROGATE.search(value)) is not None:
                return _surrogate_error("field", path, m)
        elif isinstance(value, dict):
            children = []
            for key, child in value.items():
                sub = f"{path}.{key}" if path else str(key)
                if (m := _SURROGATE.search(key)) is not None:
                    return _surrogate_error("field name", sub, m)
                children.append((sub, child))
            stack.extend(reversed(children))
        elif isinstance(value, list):
            stack.extend(reversed([(f"{path}[{i}]", child) for i, child in enumerate(value)]))
    return None


def _surrogate_error(what: str, path: str, m: re.Match[str]) -> DataError:
    shown = _printable(path)
    char = f"\\u{ord(m.group()):04x}"
    at = f"character {m.start() + 1}" + (" of the name" if what == "field name" else "")
    return DataError(f"{what} '{shown}' contains a lone surrogate {char} at {at} (half of "
                     "a UTF-16 pair: invalid Unicode); expected valid UTF-8 text (a \\ud800-\\udbff escape "
                     "must be directly followed by a \\udc00-\\udfff one)", field=shown)


_ARRAY_START = re.compile(rb"(?:\xef\xbb\xbf)?[ \t\r\n]*\[")  # optional BOM, JSON whitespace, "["


def _not_jsonl(data: bytes) -> str | None:
    """What a .jsonl file holds when it is really one JSON array (the commonest misnaming), else None.

    Only when the first non-blank character is "[" and either the whole file parses as an array (on one
    line or pretty-printed) or its first non-blank line does not parse on its own (a pretty-printed array
    with a syntax error): a JSON Lines file whose lines happen to be arrays keeps its per-line errors.
    """
    if not _ARRAY_START.match(data):  # anchored: valid JSON Lines files cost one byte comparison
        return None
    text = data.decode("utf-8-sig", errors="replace")
    try:
        top = json.loads(text)
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
        try:
            json.loads(text.lstrip().split("\n", 1)[0])
        except (ValueError, RecursionError):
            return "a JSON array spread over several lines"
        return None
    return f"one JSON array of {len(top)} element(s)" if isinstance(top, list) else None


def _scan(path: Path) -> Iterator[tuple[int, str, Record | DataError]]:
    """(line or index, location, record or the error for that entry).

    Per-entry errors are yielded, not raised, so ``on_bad_row: skip`` can step over one broken JSON line; a
    record with text that is not valid Unicode (a lone surrogate, in any field) is such an entry. A JSON file
    that does not parse at all, a .jsonl file that is one JSON array, or gzip data not named .gz cannot be
    partially used and raises.
    """
    shown = _display(path)
    kind = _kind(path)
    data = _read_bytes(path)
    if kind == "jsonl":
        if (array := _not_jsonl(data)) is not None:
            raise DataError(f"file holds {array}, not JSON Lines; expected one JSON object per line: name it "
                            f"{_renamed_json(path)} (a .json file may hold an array of objects) or convert it "
                            "to one object per line", where=shown)
        for n, raw in enumerate(data.splitlines(), start=1):
            where = f"{shown}:{n}"
            try:
                text = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield n, where, DataError(f"invalid UTF-8 ({e.reason} at byte {e.start}); expected UTF-8 text",
                                          where=where)
                continue
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                yield n, where, DataError(f"invalid JSON ({e.msg} at column {e.colno}); expected one JSON "
                                          "object per line", where=where)
                continue
            if not isinstance(obj, dict):
                yield n, where, DataError(f"line holds {_a(obj)}; expected a JSON object", where=where)
            elif "\\u" in text and _SURROGATE_ESCAPE.search(text) and (bad := _lone_surrogate(obj)) is not None:
                yield n, where, bad.at(where)
            else:
                yield n, where, obj
        return
    try:
        text = data.decode("utf-8-sig")
        top = json.loads(text)
    except UnicodeDecodeError as e:
        raise DataError(f"invalid UTF-8 ({e.reason} at byte {e.start}); expected UTF-8 text", where=shown) from e
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON ({e.msg} at line {e.lineno}, column {e.colno}); expected a JSON array of "
                        "objects or an object mapping ids to objects", where=f"{shown}:{e.lineno}") from e
    check = _SURROGATE_ESCAPE.search(text) is not None  # else no record can hold a lone surrogate
    if isinstance(top, list):
        for i, obj in enumerate(top):
            where = f"{shown}:element {i}"
            if not isinstance(obj, dict):
                yield i, where, DataError(f"array element is {_a(obj)}; expected a JSON object", where=where)
            elif check and (bad := _lone_surrogate(obj)) is not None:
                yield i, where, bad.at(where)
            else:
                yield i, where, obj
    elif isinstance(top, dict) and top and all(isinstance(v, dict) for v in top.values()):
        # Keyed by id (PubMedQA: PMID -> record): the key is the record's id, so keep it as "id".
        for i, (key, obj) in enumerate(top.items()):
            where = f"{shown}:element {i} (key {_printable(key) if check else key})"
            rec = {"id": key, **obj} if "id" not in obj else obj
            if check and (bad := _lone_surrogate(rec)) is not None:
                yield i, where, bad.at(where)
            else:
                yield i, where, rec
    else:
        raise DataError("top-level JSON is neither an array of objects nor an object mapping ids to objects",
                        where=shown)


def _renamed_json(path: Path) -> str:
    name = path.name
    for suffix in (".jsonl.gz", ".jsonl"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] + (".json.gz" if suffix.endswith(".gz") else ".json")
    return name


def read_records(path: str | Path) -> Iterator[tuple[int, Record]]:
    """Yield ``(line, record)`` for .jsonl/.jsonl.gz (1-based line) or ``(index, record)`` for .json.

    A .json file may be an array of objects (0-based element index) or an object keyed by id (the key is
    added to the record as ``id`` unless it has one). Invalid JSON raises DataError naming file and line.
    """
    for n, _, item in _scan(resolve_data_path(path)):
        if isinstance(item, DataError):
            raise item
        yield n, item

