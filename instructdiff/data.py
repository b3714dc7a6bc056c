"""Data layer: read raw files in their native formats, map each record to a :class:`Row`, assemble a pool.

Every stage downstream sees only ``Row`` objects, so all knowledge of GSM8K, MedMCQA, LIMA, ... lives here.
Locations in messages and reports are ``file:LINE`` (1-based) for JSON Lines and ``file:element I``
(0-based array index) for JSON files, so a user can jump straight to the offending record.
"""

from __future__ import annotations

import gzip
import json
import logging
import random
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from instructdiff import DATA_DIR, PROJECT_ROOT
from instructdiff.rows import Row

log = logging.getLogger(__name__)

Record = dict[str, Any]


class DataError(ValueError):
    """A file or record that cannot be used.

    Mappers raise it without a location (they see one record); the readers add ``where`` (file and line or
    element) so the final message names file, line, field and what was expected.
    """

    def __init__(self, message: str, *, where: str | None = None, field: str | None = None) -> None:
        super().__init__(f"{where}: {message}" if where else message)
        self.reason = message
        self.where = where
        self.field = field

    def at(self, where: str, hint: str = "") -> DataError:
        """The same error located at ``where`` (keeps an existing location: the innermost one is exact)."""
        if self.where is not None:
            return self
        return DataError(self.reason + hint, where=where, field=self.field)


# --------------------------------------------------------------------------------------------- paths


def _original_cwd() -> Path | None:
    """The directory the user launched from; differs from cwd only when Hydra changed into its run dir."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.utils import get_original_cwd

        return Path(get_original_cwd()) if HydraConfig.initialized() else None
    except Exception:  # hydra missing or not running: cwd is the launch directory
        return None


def resolve_data_path(p: str | Path) -> Path:
    """An existing file for ``p``: absolute as is; relative against DATA_DIR first, then the working dir."""
    path = Path(p).expanduser()
    if path.is_absolute():
        if path.exists():
            return path
        raise FileNotFoundError(f"data file not found: {path}")
    tried = [DATA_DIR / path, Path.cwd() / path]
    launch = _original_cwd()
    if launch is not None and launch != Path.cwd():
        tried.append(launch / path)
    for candidate in tried:
        if candidate.exists():
            return candidate.resolve()
    raise FileNotFoundError(
        f"data file {str(p)!r} not found; tried " + " and ".join(str(c) for c in tried)
        + " (relative paths resolve against the repository's data/ folder, then the working directory)"
    )


def _display(path: Path) -> str:
    """Short path for messages: relative to the repo when inside it."""
    try:
        return str(path.resolve().relative_to(PROJECT_ROOT))
    except ValueError:
        return str(path)


# ------------------------------------------------------------------------------------------- reading


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


# ------------------------------------------------------------------------------------------- mapping

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


def _a(value: Any) -> str:
    """JSON-ish type name with article, for "field 'x' is an integer; expected a string"."""
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "an object", type(None): "null"}
    return names.get(type(value), f"a {type(value).__name__}")


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


def _instruction_style(rec: Record, response_keys: tuple[str, ...], *, history_required: bool = False) -> Row:
    instruction = _str(rec, "instruction", what="the task")
    input_ = _opt_str(rec, "input")
    key = next((k for k in response_keys if k in rec and rec[k] is not None), None)
    if key is None:
        null = next((k for k in response_keys if k in rec), None)  # present, but every one present is null
        if null is not None:
            raise DataError(f"field {null!r} is null; expected a string (the target response)", field=null)
        alias = f" (nor its alias {response_keys[1]!r})" if len(response_keys) > 1 else ""
        raise DataError(f"field {response_keys[0]!r} missing{alias}; expected a string (the target response)",
                        field=response_keys[0])
    response = _str(rec, key, nonempty=False, what="the target response")
    history = _history(rec, required=history_required)
    meta = _extras(rec, {"instruction", "input", key, "history"})
    if history is not None:
        meta["history"] = history
    return Row.make(instruction, input_, response, meta)


def _generic(rec: Record) -> Row:
    return _instruction_style(rec, ("response", "output"))


def _alpaca(rec: Record) -> Row:
    return _instruction_style(rec, ("output",))


def _lima(rec: Record) -> Row:
    return _instruction_style(rec, ("output",), history_required=True)


def _gsm8k(rec: Record) -> Row:
    question = _str(rec, "question", what="the problem")
    answer = _str(rec, "answer", nonempty=False, what="worked solution ending in a '#### <number>' line")
    final = ""
    if answer.strip():  # empty answers are dropped later as empty_response, not a format error
        if "####" not in answer:
            raise DataError("field 'answer' has no '#### <number>' line; expected the GSM8K worked solution "
                            "ending in '#### <final answer>'", field="answer")
        final = answer.rsplit("####", 1)[1].strip()
    meta = {"final_answer": final, **_extras(rec, {"question", "answer"})}
    return Row.make(question, "", answer, meta)


def _mcq_prompt(question: str, options: dict[str, str]) -> str:
    return question.rstrip() + "\n" + "\n".join(f"{letter}. {text.strip()}" for letter, text in options.items())


def _mcq_answer(letter: str, text: str, explanation: str = "") -> str:
    text = text.strip()
    # Options that already end in a full stop would otherwise render as "...end..".
    answer = f"The answer is {letter}: {text}" + ("" if text.endswith(".") else ".")
    return answer + (f"\n\nExplanation: {explanation.strip()}" if explanation.strip() else "")


def _medmcqa(rec: Record) -> Row:
    question = _str(rec, "question", what="the question")
    options = {letter: _str(rec, f"op{letter.lower()}", what=f"option {letter}") for letter in "ABCD"}
    letter = "ABCD"[_int(rec, "cop", 0, 3)]
    explanation = _opt_str(rec, "exp")
    meta = {"final_answer": letter, "answer_text": options[letter], "subject": rec.get("subject_name"),
            **_extras(rec, {"question", "opa", "opb", "opc", "opd", "cop", "exp", "subject_name"})}
    return Row.make(_mcq_prompt(question, options), "", _mcq_answer(letter, options[letter], explanation), meta)


def _medqa(rec: Record) -> Row:
    question = _str(rec, "question", what="the question")
    raw = rec.get("options")
    expected = "an object mapping letters A..D (or A..E) to option strings"
    if raw is None:
        raise _absent(rec, "options", expected)
    if (not isinstance(raw, dict) or sorted(raw) not in (list("ABCD"), list("ABCDE"))
            or not all(isinstance(v, str) and v.strip() for v in raw.values())):
        raise DataError(f"field 'options' is {_preview(raw)}; expected {expected}", field="options")
    options = {k: raw[k] for k in sorted(raw)}
    letter = _str(rec, "answer_idx", what="the correct option letter")
    if letter not in options:
        raise DataError(f"field 'answer_idx' is {letter!r}; expected one of {', '.join(options)}", field="answer_idx")
    meta = {"final_answer": letter, "answer_text": options[letter],
            **_extras(rec, {"question", "options", "answer_idx", "answer"})}
    return Row.make(_mcq_prompt(question, options), "", _mcq_answer(letter, options[letter]), meta)


def _mmlu(rec: Record) -> Row:
    question = _str(rec, "question", what="the question")
    choices = _str_list(rec, "choices", what="2 to 5 options")
    if not 2 <= len(choices) <= 5:
        raise DataError(f"field 'choices' has {len(choices)} options; expected 2 to 5", field="choices")
    options = {"ABCDE"[i]: text for i, text in enumerate(choices)}
    letter = "ABCDE"[_int(rec, "answer", 0, len(choices) - 1)]
    meta = {"final_answer": letter, "answer_text": options[letter], **_extras(rec, {"question", "choices", "answer"})}
    return Row.make(_mcq_prompt(question, options), "", _mcq_answer(letter, options[letter]), meta)


def _pubmedqa(rec: Record) -> Row:
    question = _str(rec, "QUESTION", what="the question")
    contexts = _str_list(rec, "CONTEXTS", what="the abstract's paragraphs")
    long_answer = _str(rec, "LONG_ANSWER", nonempty=False, what="the conclusion")
    decision = _str(rec, "final_decision", what="yes, no or maybe")
    if decision not in ("yes", "no", "maybe"):
        raise DataError(f"field 'final_decision' is {decision!r}; expected yes, no or maybe", field="final_decision")
    response = f"{long_answer.strip()}\n\nThe answer is {decision}." if long_answer.strip() else ""
    meta = {"final_answer": decision,
            **_extras(rec, {"QUESTION", "CONTEXTS", "LONG_ANSWER", "final_decision", "LABELS", "MESHES"})}
    return Row.make(question, "\n\n".join(c.strip() for c in contexts), response, meta)


def _math(rec: Record) -> Row:
    problem = _str(rec, "problem", what="the problem")
    solution = _str(rec, "solution", nonempty=False, what="the worked solution")
    meta = {"final_answer": _opt_str(rec, "answer"), **_extras(rec, {"problem", "solution", "answer"})}
    return Row.make(problem, "", solution, meta)


def _mbpp(rec: Record) -> Row:
    text = _str(rec, "text", what="the task description")
    code = _str(rec, "code", nonempty=False, what="the reference solution")
    tests = _str_list(rec, "test_list", what="assert statements")
    if "task_id" not in rec:
        raise _missing("task_id", "an integer")
    # The tests pin down the function name and signature; without them the task is underspecified.
    instruction = f"{text.strip()}\nYour code should pass these tests:\n" + "\n".join(tests)
    # MBPP ships Windows line endings; training on them would teach the model to emit "\r".
    response = code.replace("\r\n", "\n")
    meta = {"task_id": rec["task_id"], "test_list": tests, "test_setup_code": _opt_str(rec, "test_setup_code"),
            **_extras(rec, {"text", "code", "task_id", "test_list", "test_setup_code"})}
    return Row.make(instruction, "", response, meta)


FORMATS: dict[str, Callable[[Record], Row]] = {
    "generic": _generic,
    "alpaca": _alpaca,
    "codealpaca": _alpaca,
    "chatdoctor": _alpaca,
    "lima": _lima,
    "gsm8k": _gsm8k,
    "math": _math,
    "medmcqa": _medmcqa,
    "medqa": _medqa,
    "mmlu": _mmlu,
    "pubmedqa": _pubmedqa,
    "mbpp": _mbpp,
}

#: Fields each format reads; appended to record errors so the user sees the whole contract at once.
FORMAT_FIELDS: dict[str, str] = {
    "generic": "instruction, optional input, response (or output), optional history",
    "alpaca": "instruction, optional input, output, optional history",
    "codealpaca": "instruction, optional input, output",
    "chatdoctor": "instruction, optional input, output",
    "lima": "instruction, optional input, output, history",
    "gsm8k": "question, answer ending in '#### <number>'",
    "math": "problem, solution, optional answer",
    "medmcqa": "question, opa, opb, opc, opd, cop (0-3), optional exp",
    "medqa": "question, options {A..D}, answer_idx",
    "mmlu": "question, choices [..], answer (index)",
    "pubmedqa": "QUESTION, CONTEXTS, LONG_ANSWER, final_decision",
    "mbpp": "text, code, test_list, task_id",
}

# First match wins: specific formats before the catch-all instruction/response one.
_DETECT: list[tuple[str, tuple[str, ...]]] = [
    ("lima", ("instruction", "output", "history")),
    ("medmcqa", ("question", "opa", "cop")),
    ("medqa", ("question", "options", "answer_idx")),
    ("mmlu", ("question", "choices", "answer")),
    ("gsm8k", ("question", "answer")),
    ("pubmedqa", ("QUESTION", "CONTEXTS")),
    ("mbpp", ("text", "code", "test_list")),
    ("math", ("problem", "solution")),
    ("generic", ("instruction", "response")),
    ("generic", ("instruction", "output")),
]


def detect_format(record: Record) -> str | None:
    """The format whose required keys the record has, or None."""
    return next((name for name, keys in _DETECT if all(k in record for k in keys)), None)


def _check_format(fmt: str) -> None:
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; expected 'auto' or one of {', '.join(FORMATS)}")


def _map_source(path: Path, fmt: str) -> Iterator[tuple[str, Row | DataError]]:
    """(location, row or the error for that record); the chosen format is fixed by the first record."""
    mapper: Callable[[Record], Row] | None = None if fmt == "auto" else FORMATS[fmt]
    for n, where, item in _scan(path):
        if isinstance(item, DataError):
            yield where, item
            continue
        if mapper is None:
            detected = detect_format(item)
            if detected is None:
                # yielded, not raised: with on_error=skip (and in instructdiff-validate) one odd record must
                # not hide the rest of the file; the format is then fixed by the first detectable record
                yield where, DataError(f"cannot detect the format from keys {sorted(item)}; expected the keys of "
                                       "a known format (e.g. instruction + response for 'generic'), or name the "
                                       "format: " + "; ".join(f"{k}: {v}" for k, v in FORMAT_FIELDS.items()),
                                       where=where)
                continue
            fmt, mapper = detected, FORMATS[detected]
            log.debug("%s: detected format %r", _display(path), fmt)
        try:
            row = mapper(item)
        except DataError as e:
            yield where, e.at(where, f" [format {fmt!r} reads: {FORMAT_FIELDS.get(fmt, '?')}]")
            continue
        row.meta["origin"] = where
        row.meta["format"] = fmt
        # where to find the untouched record again (subset.jsonl is written in the input's own format)
        row.meta["source_file"] = str(path.resolve())
        row.meta["source_index"] = n
        yield where, row


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
        for _, item in _map_source(resolved, fmt):
            if isinstance(item, DataError):
                raise item
            yield item

    return rows()


# ---------------------------------------------------------------------------------------------- pool


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
    """What load_pool read, dropped and kept. ``dropped`` lists every dropped record with its location."""

    n_read: int = 0
    n_kept: int = 0  # rows returned (after drops and the pool_size subsample)
    dropped: list[dict[str, Any]] = field(default_factory=list)
    n_available: int = 0  # rows left after drops, before the subsample
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
                f"kept {self.n_kept}")
        if self.n_multi_turn:
            text += f", {self.n_multi_turn} multi-turn"
        return text + "".join(f"; {note}" for note in self.notes)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "counts": self.counts()}


def _plain(cfg: Any) -> dict[str, Any]:
    """DictConfig or mapping -> plain dict, so the rest of the code need not know about OmegaConf."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:
        pass
    if not isinstance(cfg, Mapping):
        raise TypeError(f"domain config must be a mapping, got {type(cfg).__name__}")
    return dict(cfg)


def _sources(cfg: dict[str, Any]) -> list[tuple[str, str]]:
    """(path, format) pairs: a user's ``pool_path`` replaces the domain's default ``pool``."""
    if cfg.get("pool_path"):
        return [(str(cfg["pool_path"]), str(cfg.get("pool_format") or "auto"))]
    out = []
    for i, entry in enumerate(cfg.get("pool") or []):
        if isinstance(entry, str):
            out.append((entry, "auto"))
        elif isinstance(entry, Mapping) and entry.get("path"):
            out.append((str(entry["path"]), str(entry.get("format") or "auto")))
        else:
            raise ValueError(f"domain {cfg.get('name')!r}: pool[{i}] is {entry!r}; expected {{path, format}}")
    if not out:
        raise ValueError(f"domain {cfg.get('name')!r} has no data: set pool (a list of {{path, format}}) or pool_path")
    return out


def _pool_size(cfg: dict[str, Any]) -> int | None:
    size = cfg.get("pool_size")
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"domain {cfg.get('name')!r}: pool_size is {size!r}; expected null or a positive integer")
    return size


def _subsample(rows: list[Row], k: int, seed: int) -> list[Row]:
    """k rows chosen by seed, kept in pool order so sources stay grouped and diffs stay readable."""
    chosen = sorted(random.Random(seed).sample(range(len(rows)), k))
    return [rows[i] for i in chosen]


ON_ERROR = ("raise", "skip")
_ON_ERROR_ALIASES = {"error": "raise"}  # the domain configs' spelling (on_bad_row: error | skip)


def resolve_on_error(domain_cfg: Any, on_error: str | None = None) -> str:
    """``raise`` or ``skip``: ``on_error`` if given, else the run's ``data.on_error``, else the domain's
    ``on_bad_row``, else ``raise``.

    The pipeline hands ``load_pool`` only ``cfg.domain``; when that is a node of a composed config, the run-wide
    ``data.on_error`` is read from its root, so ``instructdiff data.on_error=skip`` works for every domain.
    """
    source = "on_error"
    if on_error is None:
        root_value = _root_on_error(domain_cfg)
        if root_value is not None:
            on_error, source = root_value, "data.on_error"
    if on_error is None:
        get = domain_cfg.get if hasattr(domain_cfg, "get") else (lambda k, d=None: d)
        on_error, source = get("on_bad_row") or "raise", "domain.on_bad_row"
    value = _ON_ERROR_ALIASES.get(str(on_error), str(on_error))
    if value not in ON_ERROR:
        raise ValueError(f"{source} is {on_error!r}; expected raise or skip (domain.on_bad_row also accepts error)")
    return value


def _root_on_error(domain_cfg: Any) -> str | None:
    try:
        from omegaconf import DictConfig, OmegaConf

        if not isinstance(domain_cfg, DictConfig):
            return None
        root = domain_cfg._get_root()
        if root is domain_cfg:
            return None
        return OmegaConf.select(root, "data.on_error", default=None)
    except ImportError:
        return None


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
    or among the ``n_available - n_kept`` rows the pool_size subsample left out.
    """
    on_bad_row = "error" if resolve_on_error(domain_cfg, on_error) == "raise" else "skip"
    cfg = _plain(domain_cfg)
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
        for where, item in _map_source(resolved, fmt):
            count.n_read += 1
            if isinstance(item, DataError):
                if on_bad_row == "error":
                    raise item
                count.bad_row += 1
                report.dropped.append({"id": None, "source": where, "reason": f"bad_row: {item.reason}",
                                       "field": item.field})
            elif (reason := drop_reason(item, seen)) is not None:
                setattr(count, reason, getattr(count, reason) + 1)  # SourceCount.empty_response / .duplicate
                report.dropped.append({"id": item.id, "source": where, "reason": reason})
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
    report.n_multi_turn = sum(1 for r in rows if r.meta.get("history"))

    if report.dropped:
        first = report.dropped[0]
        log.warning("domain %s: %s (first drop: %s %s)", name, report.summary(), first["source"], first["reason"])
    else:
        log.info("domain %s: %s", name, report.summary())
    return rows, report
