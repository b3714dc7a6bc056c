"""``instructdiff-validate FILE [FILE ...]``: every problem in a pool file, all at once, before a run.

It reads a file exactly as the pipeline does (``data.source._map_source``: same formats, same detection, same
messages) but never stops at the first bad record. A problem is a record the pipeline would refuse or drop:
malformed JSON or UTF-8, text that is not valid Unicode (a lone ``\\ud800`` surrogate escape, in any field),
a missing, null or wrong-typed field, an empty instruction, an empty response, a duplicate of an earlier row;
or a whole file that is misnamed (a JSON array or gzip data named .jsonl). Each is printed as
``file:line: field 'x': what is wrong; expected what`` and the exit status is 1 when there is any (0 when the
file is clean, 2 for bad usage).

Fields a format does not read are not problems: the mapper keeps small ones as provenance in ``meta`` and
``subset.jsonl`` writes records back untouched (which is why their text, too, must be valid Unicode). Token length depends on the model, so rows over
``domain.max_length`` are only found by a run (reason ``too_long`` in selection.jsonl).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from instructdiff.data import FORMATS, DataError, drop_reason, resolve_data_path
from instructdiff.data.formats import _check_format
from instructdiff.data.source import _map_source


@dataclass
class Problem:
    where: str  # file:line or file:element i
    field: str | None
    problem: str
    expected: str | None

    def __str__(self) -> str:
        # the data layer's messages usually name the field already ("field 'x' is empty")
        # (quoted as is when the path holds a backslash: a key's lone surrogate shown as \udxxx)
        named = self.field and not any(f"field {q}" in self.problem or f"field name {q}" in self.problem
                                       for q in (repr(self.field), f"'{self.field}'"))
        head = f"{self.where}: " + (f"field {self.field!r}: " if named else "")
        return head + self.problem + (f"; expected {self.expected}" if self.expected else "")


@dataclass
class FileReport:
    path: str
    records: int = 0
    usable: int = 0
    format: str | None = None
    problems: list[Problem] = field(default_factory=list)


def _problem(where: str, err: DataError) -> Problem:
    reason = err.reason
    # The data layer phrases every record error as "<what is wrong>; expected <what>" (and appends the
    # format's field list in brackets); split it so the report has the three columns.
    what, sep, expected = reason.partition("; expected ")
    return Problem(err.where or where, err.field, what, expected if sep else None)


def validate_file(path: str | Path, fmt: str = "auto") -> FileReport:
    """Check one pool file; never raises for bad content (a file that cannot be read is one problem)."""
    report = FileReport(str(path))
    try:
        _check_format(fmt)
        resolved = resolve_data_path(path)
        report.path = str(resolved)
        seen: set[str] = set()
        first_seen: dict[str, str] = {}
        for where, item, _ in _map_source(resolved, fmt):
            report.records += 1
            if isinstance(item, DataError):
                report.problems.append(_problem(where, item))
                continue
            report.format = item.meta.get("format")
            reason = drop_reason(item, seen)
            if reason == "empty_response":
                report.problems.append(Problem(where, None, "the response is empty",
                                               "a non-empty response (the row would be dropped)"))
            elif reason == "duplicate":
                report.problems.append(Problem(where, None, f"duplicate of {first_seen[item.id]}",
                                               "each (instruction, input, response) once (the copy is dropped)"))
            else:
                first_seen[item.id] = where
                report.usable += 1
    except DataError as e:  # the whole file is unusable (a .json that does not parse, a bad .gz)
        report.problems.append(_problem(str(path), e))
    except (OSError, ValueError) as e:
        report.problems.append(Problem(str(path), None, str(e), None))
    if report.usable == 0:
        # an empty pool stops the run ("no usable rows"), so it is a problem of the file as a whole
        report.problems.append(Problem(report.path, None, f"no usable records ({report.records} read)",
                                       "at least one valid, non-empty, non-duplicate record"))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="instructdiff-validate",
        description="Report every problem in pool files (.jsonl, .jsonl.gz, .json, .json.gz) at once; "
                    "exit 1 if there is any.")
    parser.add_argument("files", nargs="+", help="pool files; relative paths resolve as domain.pool_path does")
    parser.add_argument("--format", default="auto", choices=["auto", *FORMATS],
                        help="record format (default: detected from the first record, as the pipeline does)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per file instead of text")
    args = parser.parse_args(argv)
    n_problems = 0
    for name in args.files:
        report = validate_file(name, args.format)
        n_problems += len(report.problems)
        if args.json:
            print(json.dumps(asdict(report), ensure_ascii=False))
            continue
        for p in report.problems:
            print(p)
        verdict = "OK" if not report.problems else f"{len(report.problems)} problem(s)"
        print(f"{report.path}: {report.records} records, {report.usable} usable, format "
              f"{report.format or 'unknown'}: {verdict}")
    return 1 if n_problems else 0


if __name__ == "__main__":
    sys.exit(main())
