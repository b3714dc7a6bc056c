"""Bad input: the corpus of broken files through the validator, the loader (raise and skip) and a real run.

corpus/EXPECTED.json pins, per file, how many records it holds, how many are usable and every problem
(line, field, words of the message) in file order; the files are written byte for byte (BOM, CRLF, invalid
UTF-8), so nothing here depends on how an editor saves them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from instructdiff import CONF_DIR
from instructdiff.data import DataError, load_pool, load_source, resolve_on_error
from instructdiff.pipeline import run
from instructdiff.validate import main as validate_main
from instructdiff.validate import validate_file

CORPUS = Path(__file__).parent / "corpus"
EXPECTED = json.loads((CORPUS / "EXPECTED.json").read_text())


def pool_cfg(path: Path, **kw) -> dict:
    return {"name": "t", "pool_path": str(path), "pool_format": "auto", "pool_size": None, **kw}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


# ------------------------------------------------------------------------------------------ validator


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_validator_reports_every_problem_of_each_corpus_file(name: str) -> None:
    want = EXPECTED[name]
    report = validate_file(CORPUS / name)
    assert (report.records, report.usable) == (want["records"], want["usable"])
    got = [(p.where, p.field, str(p)) for p in report.problems]
    assert len(got) == len(want["problems"]), "\n".join(g[2] for g in got)
    for (where, field, text), (line, want_field, words) in zip(got, want["problems"], strict=True):
        assert name in where
        if line is not None:
            assert where.endswith(f"{name}:{line}"), (where, line)
        assert field == want_field and words in text, (text, words)
        assert "expected" in text or "cannot read" in text  # every message says what was expected


def test_validate_cli_lists_all_problems_and_exits_nonzero(capsys) -> None:
    exe = shutil.which("instructdiff-validate")
    assert exe, "pip install -e . registers the instructdiff-validate console script"
    bad = subprocess.run([exe, str(CORPUS / "mixed_bad.jsonl")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    lines = [x for x in bad.stdout.splitlines() if "mixed_bad.jsonl:" in x and "records," not in x]
    assert "19 records, 3 usable, format generic: 16 problem(s)" in bad.stdout
    assert [int(x.split("mixed_bad.jsonl:")[1].split(":")[0]) for x in lines] == \
        [p[0] for p in EXPECTED["mixed_bad.jsonl"]["problems"]]
    good = subprocess.run([exe, str(CORPUS / "bom_crlf.jsonl")], capture_output=True, text=True, timeout=120)
    assert good.returncode == 0 and "3 usable" in good.stdout and "OK" in good.stdout
    # in-process too, with --json: one object per file, problems carry field and expectation separately
    assert validate_main(["--json", str(CORPUS / "mixed_bad.jsonl"), str(CORPUS / "bom_crlf.jsonl")]) == 1
    objs = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [len(o["problems"]) for o in objs] == [16, 0]
    wrong_type = next(p for p in objs[0]["problems"] if p["where"].endswith(":7"))
    assert wrong_type["field"] == "instruction" and wrong_type["expected"].startswith("a non-empty string")


# ------------------------------------------------------------------------------------- loader: raise


def _one_bad_line_file(tmp_path: Path, line_no: int, name: str = "mixed_bad.jsonl") -> Path:
    """The corpus file's (good) first line and its line ``line_no``, so the bad one is line 2."""
    lines = (CORPUS / name).read_bytes().split(b"\n")
    path = tmp_path / "one_bad.jsonl"
    path.write_bytes(lines[0] + b"\n" + lines[line_no - 1] + b"\n")
    return path


MALFORMED = [p for p in EXPECTED["mixed_bad.jsonl"]["problems"]
             if not any(w in p[2] for w in ("response is empty", "duplicate"))]


@pytest.mark.parametrize("line_no, field, words", MALFORMED, ids=[f"line{p[0]}" for p in MALFORMED])
def test_raise_names_file_line_field_and_expectation(tmp_path: Path, line_no: int, field: str | None,
                                                     words: str) -> None:
    path = _one_bad_line_file(tmp_path, line_no)
    with pytest.raises(DataError) as err:
        load_pool(pool_cfg(path), seed=0, on_error="raise")
    msg = str(err.value)
    assert "one_bad.jsonl:2" in msg and words in msg and "expected" in msg
    assert err.value.field == field
    if field:
        assert f"'{field}'" in msg


def test_raise_is_the_default_and_stops_at_the_first_bad_line() -> None:
    with pytest.raises(DataError, match=r"mixed_bad\.jsonl:2: invalid JSON"):
        load_pool(pool_cfg(CORPUS / "mixed_bad.jsonl"), seed=0)


# -------------------------------------------------------------------------------------- loader: skip


def test_skip_drops_and_counts_every_bad_row_with_its_reason() -> None:
    want = EXPECTED["mixed_bad.jsonl"]
    rows, report = load_pool(pool_cfg(CORPUS / "mixed_bad.jsonl"), seed=0, on_error="skip")
    assert len(rows) == want["usable"] and report.n_read == want["records"]
    assert report.counts() == want["dropped"]
    assert len(rows) + len(report.dropped) == report.n_read  # nothing lost between read and kept
    lines = sorted(int(d["source"].rsplit(":", 1)[1]) for d in report.dropped)
    assert lines == [p[0] for p in want["problems"]]
    typed = next(d for d in report.dropped if d["source"].endswith(":8"))
    assert typed["field"] == "response" and "is a list" in typed["reason"]
    extra = next(r for r in rows if r.meta["origin"].endswith(":18"))
    assert extra.meta["tag"] == "extra" and extra.meta["nested"] == {"a": [1, 2]}  # extra fields kept


def test_bom_and_crlf_give_the_same_rows_as_clean_utf8(tmp_path: Path) -> None:
    clean = tmp_path / "clean.jsonl"
    clean.write_bytes((CORPUS / "bom_crlf.jsonl").read_bytes()[3:].replace(b"\r\n", b"\n"))
    assert (CORPUS / "bom_crlf.jsonl").read_bytes().startswith(b"\xef\xbb\xbf")
    messy = list(load_source(CORPUS / "bom_crlf.jsonl"))
    assert [r.id for r in messy] == [r.id for r in load_source(clean)] and len(messy) == 3
    assert not any(r.response.endswith("\r") or r.instruction.startswith("\ufeff") for r in messy)


@pytest.mark.parametrize("name", ["empty.jsonl", "blank_lines.jsonl", "all_empty_responses.jsonl"])
def test_empty_pool_is_an_error_naming_the_file(name: str) -> None:
    with pytest.raises(DataError, match=rf"no usable rows in .*{name}"):
        load_pool(pool_cfg(CORPUS / name), seed=0, on_error="skip")


def test_data_on_error_in_the_run_config_wins_over_the_domain() -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        default = compose("config", overrides=[f"domain.pool_path={CORPUS / 'mixed_bad.jsonl'}"])
        skip = compose("config", overrides=[f"domain.pool_path={CORPUS / 'mixed_bad.jsonl'}", "data.on_error=skip"])
        forced = compose("config", overrides=["domain.on_bad_row=skip", "data.on_error=raise"])
        bad = compose("config", overrides=["data.on_error=ignore"])
    assert default.data.on_error is None and default.domain.on_bad_row == "error"
    assert resolve_on_error(default.domain) == "raise" and resolve_on_error(forced.domain) == "raise"
    with pytest.raises(DataError):
        load_pool(default.domain, seed=0)
    rows, report = load_pool(skip.domain, seed=0)
    assert len(rows) == EXPECTED["mixed_bad.jsonl"]["usable"] and report.counts()["bad_row"] == 13
    with pytest.raises(ValueError, match=r"data\.on_error is 'ignore'; expected raise or skip"):
        resolve_on_error(bad.domain)


# ------------------------------------------------------------------------- text that is not Unicode


SURROGATES = [p for p in EXPECTED["lone_surrogates.jsonl"]["problems"] if "lone surrogate" in p[2]]


def _round_trips(path: Path) -> None:
    """``path`` is strict UTF-8 and every JSON value in it is valid Unicode again once loaded (a lone surrogate
    written by json.dumps as a \\udxxx escape would pass the first check and fail the second)."""
    text = path.read_bytes().decode("utf-8")
    docs = [json.loads(x) for x in text.splitlines() if x.strip()] if path.suffix == ".jsonl" else [json.loads(text)]
    for doc in docs:
        json.dumps(doc, ensure_ascii=False).encode("utf-8")


@pytest.mark.parametrize("line_no, field, words", SURROGATES, ids=[f"line{p[0]}" for p in SURROGATES])
def test_lone_surrogate_is_a_bad_row_naming_file_line_and_field(tmp_path: Path, line_no: int, field: str,
                                                                words: str) -> None:
    # in the instruction, in history, in an unused extra field, nested, or in a field name: all the same rule
    path = _one_bad_line_file(tmp_path, line_no, "lone_surrogates.jsonl")
    with pytest.raises(DataError) as err:
        load_pool(pool_cfg(path), seed=0, on_error="raise")
    msg = str(err.value)
    assert "one_bad.jsonl:2: " in msg and words in msg and "invalid Unicode" in msg
    assert "; expected valid UTF-8 text" in msg
    assert err.value.field == field
    msg.encode("utf-8")  # the message itself can be printed and logged
    rows, report = load_pool(pool_cfg(path), seed=0, on_error="skip")
    assert len(rows) == 1 and report.counts() == {"bad_row": 1} and report.dropped[0]["field"] == field
    json.dumps(report.to_dict(), ensure_ascii=False).encode("utf-8")  # manifest.json carries the report


def test_lone_surrogates_skip_drops_each_record_and_keeps_valid_escapes() -> None:
    want = EXPECTED["lone_surrogates.jsonl"]
    rows, report = load_pool(pool_cfg(CORPUS / "lone_surrogates.jsonl"), seed=0, on_error="skip")
    assert (len(rows), report.n_read) == (want["usable"], want["records"]) and report.counts() == want["dropped"]
    assert [int(d["source"].rsplit(":", 1)[1]) for d in report.dropped] == [p[0] for p in want["problems"]]
    # a complete escaped pair is one character, an escaped backslash is text: both are valid and kept as is
    pair = next(r for r in rows if r.meta["origin"].endswith(":7"))
    assert pair.instruction == "Pair \U0001f600 and an escaped backslash \\ud800 are fine."


def test_validate_cli_lists_lone_surrogates_and_every_later_problem() -> None:
    exe = shutil.which("instructdiff-validate")
    assert exe
    want = EXPECTED["lone_surrogates.jsonl"]
    out = subprocess.run([exe, str(CORPUS / "lone_surrogates.jsonl")], capture_output=True, timeout=120)
    assert out.returncode == 1 and b"Traceback" not in out.stderr, out.stderr
    text = out.stdout.decode("utf-8")  # strict: what is printed is valid UTF-8
    lines = [x for x in text.splitlines() if "lone_surrogates.jsonl:" in x and "records," not in x]
    assert [int(x.split("lone_surrogates.jsonl:")[1].split(":")[0]) for x in lines] == [p[0] for p in want["problems"]]
    assert "field 'history[0][1]' contains a lone surrogate \\udc00" in text
    assert f"{want['records']} records, {want['usable']} usable, format generic: 6 problem(s)" in text


def test_lone_surrogates_in_a_run_stop_it_or_are_dropped_and_every_file_round_trips(make_cfg, tmp_path: Path) -> None:
    pool = tmp_path / "pool.jsonl"
    shutil.copy(CORPUS / "lone_surrogates.jsonl", pool)
    common = [f"domain.pool_path={pool}", "domain.pool_size=null", "selector=random", "selector.budget.fraction=1.0",
              "pipeline.stages=[select]"]
    with pytest.raises(DataError, match=r"pool\.jsonl:2: field 'instruction' contains a lone surrogate \\ud800"):
        run(make_cfg(*common, run_name="strict"))
    run(make_cfg(*common, "data.on_error=skip"))
    run_dir = tmp_path / "run"
    written = [f for f in sorted(run_dir.rglob("*")) if f.is_file() and f.suffix in (".json", ".jsonl")]
    assert {"selection.jsonl", "subset.jsonl", "manifest.json"} <= {f.name for f in written}
    for f in written:
        _round_trips(f)
    source = (CORPUS / "lone_surrogates.jsonl").read_text().splitlines()
    valid = [json.loads(source[n - 1]) for n in (1, 7, 9)]  # every valid record, written back untouched
    key = lambda rec: json.dumps(rec, sort_keys=True)  # noqa: E731
    subset = _jsonl(run_dir / "subset.jsonl")
    own = [{k: v for k, v in rec.items() if k != "_instructdiff"} for rec in subset]
    assert sorted(own, key=key) == sorted(valid, key=key)
    assert sorted(rec["_instructdiff"]["line"] for rec in subset) == [1, 7, 9]  # each traced to its line
    sel = _jsonl(run_dir / "selection.jsonl")
    assert len(sel) == 9 and sum(r["reason"].startswith("bad_row") for r in sel if r["status"] == "dropped") == 6


# ------------------------------------------------------------------------------------ misnamed files


@pytest.mark.parametrize("name, words, fixed", [
    ("array_named.jsonl", "file holds one JSON array of 4 element(s), not JSON Lines", "array_named.json"),
    ("gzip_named.jsonl", "file is gzip-compressed (starts with bytes 1f 8b)", "gzip_named.jsonl.gz"),
])
def test_misnamed_file_is_one_error_saying_what_it_holds_and_the_name_to_use(tmp_path: Path, name: str, words: str,
                                                                            fixed: str) -> None:
    for on_error in ("raise", "skip"):  # the whole file is unusable as named: one error, never one per line
        with pytest.raises(DataError) as err:
            load_pool(pool_cfg(CORPUS / name), seed=0, on_error=on_error)
        assert words in str(err.value) and fixed in str(err.value) and err.value.where.endswith(name)
    report = validate_file(CORPUS / name)
    assert report.records == 0 and len(report.problems) == 2  # that message and "no usable records"
    renamed = tmp_path / fixed  # doing what the message says makes the same bytes load
    shutil.copy(CORPUS / name, renamed)
    assert [r.instruction for r in load_source(renamed)] == [f"Add {i} and {i}." for i in range(1, 5)]


# --------------------------------------------------------------------------------------- real runs


def test_skip_run_lists_every_row_and_drops_too_long_ones(make_cfg, tmp_path: Path) -> None:
    pool = tmp_path / "pool.jsonl"
    long_row = json.dumps({"instruction": "Write a lot.", "response": " ".join(["word"] * 400)}).encode()
    pool.write_bytes((CORPUS / "mixed_bad.jsonl").read_bytes() + long_row + b"\n")
    run(make_cfg(f"domain.pool_path={pool}", "domain.pool_size=null", "domain.max_length=120",
                 "data.on_error=skip", "selector=random", "selector.budget.fraction=0.5", "pipeline.stages=[select]"))
    sel = _jsonl(tmp_path / "run" / "selection.jsonl")
    assert len(sel) == EXPECTED["mixed_bad.jsonl"]["records"] + 1  # every record read has a line
    reasons = [r["reason"] for r in sel if r["status"] == "dropped"]
    assert sum(x.startswith("bad_row") for x in reasons) == 13 and reasons.count("duplicate") == 1
    assert sum(x.startswith("too_long") for x in reasons) == 1
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    acc = manifest["accounting"]
    assert acc["input_rows"] == 20 and acc["balanced"]
    assert acc["dropped_reasons"] == {"bad_row": 13, "duplicate": 1, "empty_response": 2, "too_long": 1}
    assert acc["selected"] + acc["not_selected"] == 3
    listed = manifest["pool"]["report"]["dropped"]
    assert len(listed) == 16 and all(d["reason"] and d["source"] for d in listed)


def test_budget_larger_than_the_pool_selects_everything_and_says_so(make_cfg, tmp_path: Path) -> None:
    results = run(make_cfg("domain.pool_size=12", "selector=random", "selector.budget.count=1000",
                           "pipeline.stages=[select]"))
    assert results["selection"]["counts"] == {"selected": 12, "not_selected": 0, "dropped": 0}
    assert any("exceeds the pool" in n for n in results["selection"]["notes"])


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5])
def test_fraction_outside_0_1_is_refused(make_cfg, fraction: float) -> None:
    with pytest.raises(Exception, match=r"budget\.fraction must be in \(0, 1\]"):
        run(make_cfg("selector=random", f"selector.budget.fraction={fraction}", "pipeline.stages=[select]"))
