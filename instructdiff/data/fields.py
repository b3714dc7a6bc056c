"""Reading one typed field of a raw record, with the error a user can act on when it is missing or wrong."""

from __future__ import annotations

import json
from typing import Any

from instructdiff.data.errors import DataError, Record, _a

_SMALL = 200  # longest leftover field (chars of JSON) worth carrying in meta; long blobs stay in the file


def _missing(name: str, expected: str) -> DataError:
    return DataError(f"field {name!r} missing; expected {expected}", field=name)


def _absent(rec: Record, name: str, expected: str) -> DataError:
    """The error for a required field that is missing or present with value null (two different fixes)."""
    if name in rec:
        return DataError(f"field {name!r} is null; expected {expected}", field=name)
    return _missing(name, expected)


def _str(rec: Record, name: str, *, nonempty: bool = True, what: str = "") -> str:
    expected = ("a non-empty string" if nonempty else "a string") + (f" ({what})" if what else "")
    if name not in rec or rec[name] is None:
        raise _absent(rec, name, expected)
    value = rec[name]
    if not isinstance(value, str):
        raise DataError(f"field {name!r} is {_a(value)}; expected {expected}", field=name)
    if nonempty and not value.strip():
        raise DataError(f"field {name!r} is empty; expected {expected}", field=name)
    return value


def _opt_str(rec: Record, name: str) -> str:
    """Optional text (Alpaca's ``input``): absent or null is ""; anything else must be a string."""
    value = rec.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"field {name!r} is {_a(value)}; expected a string or no field", field=name)
    return value


def _int(rec: Record, name: str, lo: int, hi: int) -> int:
    expected = f"an integer from {lo} to {hi}"
    if name not in rec or rec[name] is None:
        raise _absent(rec, name, expected)
    value = rec[name]
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise DataError(f"field {name!r} is {value!r}; expected {expected}", field=name)
    return value


def _str_list(rec: Record, name: str, *, what: str) -> list[str]:
    value = rec.get(name)
    expected = f"a non-empty list of strings ({what})"
    if value is None:
        raise _absent(rec, name, expected)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise DataError(f"field {name!r} is {_preview(value)}; expected {expected}", field=name)
    return value




def _preview(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _extras(rec: Record, used: set[str]) -> dict[str, Any]:
    """Unmapped fields small enough to keep (ids, subject, level, ...): provenance without bloating meta."""
    out: dict[str, Any] = {}
    for key, value in rec.items():
        if key in used:
            continue
        if value is None or isinstance(value, (bool, int, float)):
            out[key] = value
        elif len(json.dumps(value, ensure_ascii=False, default=str)) <= _SMALL:
            out[key] = value
    return out


def _history(rec: Record, *, required: bool) -> list[list[str]] | None:
    """Earlier [user, assistant] turns (LLaMA-Factory alpaca format); the row's own pair is the last turn."""
    expected = "a list of [user, assistant] string pairs"
    if "history" not in rec or rec["history"] is None:
        if required:
            raise _absent(rec, "history", expected)
        return None
    value = rec["history"]
    ok = isinstance(value, list) and all(
        isinstance(t, (list, tuple)) and len(t) == 2 and all(isinstance(s, str) for s in t) for t in value)
    if not ok:
        raise DataError(f"field 'history' is {_preview(value)}; expected {expected}", field="history")
    return [list(t) for t in value]
