"""Data layer: format mappers, readers, error messages and pool assembly (offline, small temp files)."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from instructdiff import CONF_DIR, DATA_DIR
from instructdiff.data import (
    FORMATS,
    DataError,
    PoolReport,
    detect_format,
    load_pool,
    load_source,
    read_records,
    resolve_data_path,
)
from instructdiff.rows import Row, content_id


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def first_record(rel: str) -> dict[str, Any]:
    return next(read_records(DATA_DIR / rel))[1]


def one_row(tmp_path: Path, record: dict[str, Any], fmt: str) -> Row:
    rows = list(load_source(write_jsonl(tmp_path / "one.jsonl", [record]), fmt))
    assert len(rows) == 1
    return rows[0]


def pool_cfg(paths: list[Path], **kw: Any) -> dict[str, Any]:
    cfg = {"name": "t", "pool": [{"path": str(p), "format": "generic"} for p in paths], "pool_path": None,
           "pool_format": "auto", "pool_size": None, "on_bad_row": "error"}
    return {**cfg, **kw}


def gen(i: int, response: str | None = None) -> dict[str, str]:
    return {"instruction": f"task {i}", "input": f"ctx {i}", "response": f"answer {i}" if response is None else response}


# ----------------------------------------------------------------------------- formats on real records


def test_gsm8k_first_record(tmp_path: Path) -> None:
    rec = first_record("math/gsm8k/train.jsonl")
    row = one_row(tmp_path, rec, "gsm8k")
    assert row.instruction == rec["question"] and row.input == ""
    assert row.response == rec["answer"] and row.response.endswith("#### 72")  # verbatim, marker line kept
    assert row.meta["final_answer"] == "72"


def test_medmcqa_first_record(tmp_path: Path) -> None:
    rec = first_record("medical/medeval/medmcqa_test.jsonl")
    row = one_row(tmp_path, rec, "medmcqa")
    assert row.instruction.startswith(rec["question"] + "\nA. " + rec["opa"])
    assert "\nD. " + rec["opd"] in row.instruction
    assert row.response == "The answer is A: " + rec["opa"] + "."  # cop 0, exp null: no explanation
    assert row.meta["final_answer"] == "A" and row.meta["subject"] == "Physiology"
    assert row.meta["id"] == rec["id"]  # small unmapped fields are kept


def test_medmcqa_explanation_and_letter(tmp_path: Path) -> None:
    rec = {**first_record("medical/medeval/medmcqa_test.jsonl"), "cop": 2, "exp": "Because."}
    row = one_row(tmp_path, rec, "medmcqa")
    assert row.response == f"The answer is C: {rec['opc']}.\n\nExplanation: Because."
    assert row.meta["final_answer"] == "C"


def test_medqa_first_record(tmp_path: Path) -> None:
    rec = first_record("medical/medeval/medqa_test.jsonl")
    row = one_row(tmp_path, rec, "medqa")
    assert row.instruction.startswith(rec["question"] + "\nA. ")
    assert row.response == f"The answer is B: {rec['options']['B']}."
    assert row.meta["final_answer"] == "B" and row.meta["meta_info"] == "step1"


@pytest.mark.parametrize("rel, fmt", [("general/alpaca_gpt4_demo/alpaca_en_demo.json", "alpaca"),
                                      ("code/codealpaca/code_alpaca_2k.json", "codealpaca"),
                                      ("medical/chatdoctor/chatdoctor5k.json", "chatdoctor")])
def test_alpaca_style_first_record_keeps_input(tmp_path: Path, rel: str, fmt: str) -> None:
    rec = first_record(rel)
    row = one_row(tmp_path, rec, fmt)
    assert (row.instruction, row.input, row.response) == (rec["instruction"], rec["input"], rec["output"])


def test_codealpaca_input_is_its_own_field(tmp_path: Path) -> None:
    row = one_row(tmp_path, first_record("code/codealpaca/code_alpaca_2k.json"), "codealpaca")
    assert row.input == "dataList = [3, 9, 3, 5, 7, 9, 5]"
    assert row.input not in row.instruction


def test_lima_keeps_history_and_counts_multi_turn(tmp_path: Path) -> None:
    records = json.loads((DATA_DIR / "general/lima/lima.json").read_text(encoding="utf-8"))
    multi = next(r for r in records if r["history"])
    path = write_jsonl(tmp_path / "lima.jsonl", [records[0], multi])
    rows = list(load_source(path, "lima"))
    assert rows[0].meta["history"] == [] and rows[0].response == records[0]["output"]
    assert rows[1].meta["history"] == multi["history"] and rows[1].instruction == multi["instruction"]
    _, report = load_pool(pool_cfg([], pool_path=str(path), pool_format="lima"), seed=0)
    assert report.n_multi_turn == 1


def test_mbpp_first_record(tmp_path: Path) -> None:
    rec = first_record("code/mbpp/mbpp.jsonl")
    row = one_row(tmp_path, rec, "mbpp")
    assert row.instruction.startswith(rec["text"])
    assert all(t in row.instruction for t in rec["test_list"])  # the asserts are the spec
    assert row.response == rec["code"].replace("\r\n", "\n") and "\r" not in row.response
    assert row.meta["task_id"] == 1 and row.meta["test_list"] == rec["test_list"]


def test_generic_accepts_output_alias_and_optional_input(tmp_path: Path) -> None:
    row = one_row(tmp_path, {"instruction": "Say hi", "output": "hi", "tag": "x"}, "generic")
    assert (row.instruction, row.input, row.response) == ("Say hi", "", "hi")
    assert row.meta["tag"] == "x"


@pytest.mark.parametrize("rel, fmt", [
    ("math/gsm8k/train.jsonl", "gsm8k"), ("medical/medeval/medmcqa_test.jsonl", "medmcqa"),
    ("medical/medeval/medqa_test.jsonl", "medqa"), ("general/lima/lima.json", "lima"),
    ("code/mbpp/mbpp.jsonl", "mbpp"), ("code/codealpaca/code_alpaca_2k.json", "generic"),
    ("medical/medeval/mmlu_medical_test.jsonl", "mmlu"), ("medical/pubmedqa/ori_pqal.json", "pubmedqa"),
    ("math/math500/test.jsonl", "math"),
])
def test_auto_detects_bundled_formats(rel: str, fmt: str) -> None:
    assert detect_format(first_record(rel)) == fmt
    assert fmt in FORMATS


def test_pubmedqa_keyed_json_keeps_key_as_id(tmp_path: Path) -> None:
    raw = json.loads((DATA_DIR / "medical/pubmedqa/ori_pqal.json").read_text(encoding="utf-8"))
    key = next(iter(raw))
    path = tmp_path / "pq.json"
    path.write_text(json.dumps({key: raw[key]}), encoding="utf-8")
    (row,) = load_source(path, "auto")
    assert row.meta["id"] == key and row.meta["final_answer"] == raw[key]["final_decision"]
    assert row.input.startswith(raw[key]["CONTEXTS"][0])


def test_reads_gzipped_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(json.dumps(gen(1)) + "\n\n" + json.dumps(gen(2)) + "\n")  # blank line is skipped
    assert [n for n, _ in read_records(path)] == [1, 3]
    assert [r.instruction for r in load_source(path, "generic")] == ["task 1", "task 2"]


# ------------------------------------------------------------------------------------------------- ids


def test_ids_are_stable_content_hashes(tmp_path: Path) -> None:
    row = one_row(tmp_path, first_record("math/gsm8k/train.jsonl"), "gsm8k")
    assert row.id == content_id(row.instruction, row.input, row.response) == "82dca8b204c1e024"
    same = one_row(tmp_path, {"instruction": row.instruction, "response": row.response}, "generic")
    assert same.id == row.id  # format and file do not enter the id
    other = one_row(tmp_path, {"instruction": row.instruction, "input": "x", "response": row.response}, "generic")
    assert other.id != row.id  # input is part of the content


# ----------------------------------------------------------------------------------------- bad input


def test_broken_json_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(gen(1)) + "\n" + json.dumps(gen(2)) + "\n{\"instruction\": oops\n")
    with pytest.raises(DataError, match=r"broken\.jsonl:3: invalid JSON"):
        list(read_records(path))
    with pytest.raises(DataError, match=r"broken\.jsonl:3"):
        list(load_source(path, "generic"))


def test_broken_json_file_names_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('[\n {"instruction": "a", "response": "b"},\n {"instruction": }\n]')
    with pytest.raises(DataError, match=r"broken\.json:3: invalid JSON"):
        list(read_records(path))


def test_missing_response_names_field_and_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "pool.jsonl", [gen(1), {"instruction": "no answer"}])
    with pytest.raises(DataError) as err:
        list(load_source(path, "generic"))
    msg = str(err.value)
    assert "pool.jsonl:2" in msg and "'response' missing" in msg and "expected a string" in msg
    assert err.value.field == "response"


def test_wrong_type_and_json_array_element(tmp_path: Path) -> None:
    path = tmp_path / "pool.json"
    path.write_text(json.dumps([gen(1), gen(2), {"instruction": "x", "response": 5}]))
    with pytest.raises(DataError, match=r"pool\.json:element 2: field 'response' is an integer; expected a string"):
        list(load_source(path, "generic"))


@pytest.mark.parametrize("record, fmt, pattern", [
    ({"question": "q", "answer": "no marker"}, "gsm8k", r"'answer' has no '#### <number>' line"),
    ({"question": "q", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 4}, "medmcqa",
     r"'cop' is 4; expected an integer from 0 to 3"),
    ({"question": "q", "options": {"A": "a", "B": "b"}, "answer_idx": "A"}, "medqa", r"field 'options'"),
    ({"instruction": "i", "output": "o", "history": [["only user"]]}, "lima", r"field 'history'"),
    ({"instruction": "", "response": "o"}, "generic", r"field 'instruction' is empty"),
])
def test_format_contract_violations(tmp_path: Path, record: dict[str, Any], fmt: str, pattern: str) -> None:
    with pytest.raises(DataError, match=r"one\.jsonl:1: .*" + pattern):
        one_row(tmp_path, record, fmt)


@pytest.mark.parametrize("record, fmt, field, expected", [
    ({"instruction": None, "response": "o"}, "generic", "instruction", "a non-empty string (the task)"),
    ({"instruction": "i", "response": None}, "generic", "response", "a string (the target response)"),
    ({"instruction": "i", "output": None}, "alpaca", "output", "a string (the target response)"),
    ({"question": "q", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": None}, "medmcqa", "cop",
     "an integer from 0 to 3"),
    ({"question": "q", "choices": None, "answer": 0}, "mmlu", "choices", "a non-empty list of strings"),
    ({"question": "q", "options": None, "answer_idx": "A"}, "medqa", "options", "an object mapping letters"),
    ({"instruction": "i", "output": "o", "history": None}, "lima", "history", "a list of [user, assistant]"),
])
def test_null_required_field_is_reported_as_null_not_missing(tmp_path: Path, record: dict[str, Any], fmt: str,
                                                             field: str, expected: str) -> None:
    with pytest.raises(DataError) as err:
        one_row(tmp_path, record, fmt)
    msg = str(err.value)
    assert f"one.jsonl:1: field '{field}' is null; expected {expected}" in msg and "missing" not in msg
    assert err.value.field == field


def test_null_optional_fields_and_absent_fields_keep_their_behaviour(tmp_path: Path) -> None:
    row = one_row(tmp_path, {"instruction": "i", "input": None, "response": None, "output": "o"}, "generic")
    assert (row.input, row.response) == ("", "o")  # optional input null is "", a null response falls to its alias
    with pytest.raises(DataError, match=r"field 'response' missing \(nor its alias 'output'\)"):
        one_row(tmp_path, {"instruction": "i"}, "generic")


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_lone_surrogate_anywhere_in_a_record_is_a_data_error(tmp_path: Path, suffix: str) -> None:
    good = json.dumps(gen(1))
    bad = '{"instruction": "t", "response": "r", "extra": {"deep": [1, "x\\udfff"]}}'
    path = tmp_path / f"pool{suffix}"
    path.write_text(good + "\n" + bad + "\n" if suffix == ".jsonl" else f"[{good}, {bad}]", encoding="ascii")
    where = "pool.jsonl:2" if suffix == ".jsonl" else "pool.json:element 1"
    for read in (read_records, lambda p: load_source(p, "auto")):
        with pytest.raises(DataError) as err:
            list(read(path))
        assert f"{where}: field 'extra.deep[1]' contains a lone surrogate \\udfff" in str(err.value)
        assert err.value.field == "extra.deep[1]"


def test_keyed_json_with_a_lone_surrogate_in_a_key_names_it_printably(tmp_path: Path) -> None:
    path = tmp_path / "keyed.json"
    path.write_text('{"k\\ud800": {"instruction": "a", "response": "b"}}', encoding="ascii")
    with pytest.raises(DataError) as err:
        list(load_source(path))
    assert "keyed.json:element 0 (key k\\ud800): field 'id' contains a lone surrogate" in str(err.value)
    str(err.value).encode("utf-8")


def test_valid_escapes_load_unchanged(tmp_path: Path) -> None:
    # a complete escaped pair is one character; an escaped backslash before "ud800" is text; neither is an error
    path = tmp_path / "ok.jsonl"
    path.write_text('{"instruction": "\\ud83d\\ude00 \\\\ud800", "response": "r", "note": "\\u00e9"}\n',
                    encoding="ascii")
    (row,) = load_source(path)
    assert row.instruction == "\U0001f600 \\ud800" and row.meta["note"] == "\u00e9"
    assert row.id == content_id("\U0001f600 \\ud800", "", "r")


def test_jsonl_file_of_arrays_keeps_per_line_errors(tmp_path: Path) -> None:
    # only a file that is one JSON array is called misnamed; JSON Lines whose lines are arrays are bad lines
    path = tmp_path / "arrays.jsonl"
    path.write_text('[1, 2]\n["a"]\n' + json.dumps(gen(3)) + "\n")
    with pytest.raises(DataError, match=r"arrays\.jsonl:1: line holds a list; expected a JSON object"):
        list(read_records(path))
    rows, report = load_pool(pool_cfg([path], on_bad_row="skip"), seed=0)
    assert [r.instruction for r in rows] == ["task 3"] and report.counts() == {"bad_row": 2}


@pytest.mark.parametrize("content", ["[\n  {\"instruction\": \"a\", \"response\": \"b\"},\n", " [{\"a\": 1}]\n"])
def test_json_array_in_a_jsonl_file_is_one_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "arr.jsonl.gz"  # truncated or complete, plain or gzipped
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(content)
    with pytest.raises(DataError, match=r"arr\.jsonl\.gz: file holds .*JSON array.*name it arr\.json\.gz"):
        list(read_records(path))


def test_unknown_format_and_undetectable_keys(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "odd.jsonl", [{"prompt": "p", "completion": "c"}])
    with pytest.raises(ValueError, match="unknown data format 'nope'"):
        load_source(path, "nope")
    with pytest.raises(DataError, match=r"odd\.jsonl:1: cannot detect the format"):
        list(load_source(path, "auto"))


def test_on_bad_row_skip_counts_instead_of_raising(tmp_path: Path) -> None:
    path = tmp_path / "pool.jsonl"
    path.write_text(json.dumps(gen(1)) + "\n" + json.dumps({"instruction": "no answer"}) + "\n{oops\n"
                    + json.dumps(gen(4)) + "\n")
    with pytest.raises(DataError, match=r"pool\.jsonl:2"):
        load_pool(pool_cfg([path]), seed=0)
    rows, report = load_pool(pool_cfg([path], on_bad_row="skip"), seed=0)
    assert [r.instruction for r in rows] == ["task 1", "task 4"]
    assert [d["source"].rsplit(":", 1)[1] for d in report.dropped] == ["2", "3"]
    assert report.dropped[0]["reason"].startswith("bad_row: field 'response' missing")
    assert report.counts() == {"bad_row": 2} and report.sources[0].bad_row == 2
    assert (report.n_read, report.n_kept) == (4, 2)


# ---------------------------------------------------------------------------------------------- pool


def test_duplicates_and_empty_responses_dropped_with_reasons(tmp_path: Path, caplog) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [gen(1), gen(2, ""), gen(1), gen(3, "  \n")])
    b = write_jsonl(tmp_path / "b.jsonl", [gen(3), gen(2)])
    with caplog.at_level(logging.WARNING, logger="instructdiff.data"):
        rows, report = load_pool(pool_cfg([a, b]), seed=0)
    assert [r.instruction for r in rows] == ["task 1", "task 3", "task 2"]
    assert rows[0].meta["origin"].endswith("a.jsonl:1")  # the first copy is the one kept
    by_source = {d["source"].rsplit("/", 1)[-1]: d["reason"] for d in report.dropped}
    assert by_source == {"a.jsonl:2": "empty_response", "a.jsonl:3": "duplicate", "a.jsonl:4": "empty_response"}
    assert report.dropped[1]["id"] == rows[0].id
    assert report.counts() == {"empty_response": 2, "duplicate": 1}
    assert (report.n_read, report.n_available, report.n_kept) == (6, 3, 3)
    assert [(s.n_read, s.n_kept) for s in report.sources] == [(4, 1), (2, 2)]
    assert "1 duplicate" in caplog.text and "2 empty_response" in caplog.text


def test_duplicate_across_sources(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [gen(1)])
    b = write_jsonl(tmp_path / "b.json", [])
    b.write_text(json.dumps([gen(1), gen(2)]))
    rows, report = load_pool(pool_cfg([a, b]), seed=0)
    assert len(rows) == 2 and report.dropped[0]["source"].endswith("b.json:element 0")


def test_pool_size_subsample_is_deterministic_and_ordered(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [gen(i) for i in range(50)])
    cfg = pool_cfg([path], pool_size=10)
    ids = [r.id for r in load_pool(cfg, seed=1)[0]]
    assert ids == [r.id for r in load_pool(cfg, seed=1)[0]]
    assert ids != [r.id for r in load_pool(cfg, seed=2)[0]]
    rows, report = load_pool(cfg, seed=1)
    order = [int(r.instruction.split()[1]) for r in rows]
    assert len(rows) == 10 == report.n_kept and order == sorted(order)
    assert report.n_available == 50 and report.pool_size == 10


def test_pool_size_larger_than_pool_uses_all_and_says_so(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [gen(i) for i in range(5)])
    rows, report = load_pool(pool_cfg([path], pool_size=99), seed=0)
    assert len(rows) == 5 and "exceeds the 5 available rows" in report.summary()


@pytest.mark.parametrize("bad", [0, -1, "10", True])
def test_pool_size_must_be_positive_int(tmp_path: Path, bad: Any) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [gen(1)])
    with pytest.raises(ValueError, match="pool_size"):
        load_pool(pool_cfg([path], pool_size=bad), seed=0)


def test_pool_path_overrides_pool(tmp_path: Path) -> None:
    default = write_jsonl(tmp_path / "default.jsonl", [gen(1)])
    mine = write_jsonl(tmp_path / "mine.jsonl", [{"instruction": "mine", "output": "yes"}])
    rows, report = load_pool(OmegaConf.create(pool_cfg([default], pool_path=str(mine))), seed=0)
    assert [r.instruction for r in rows] == ["mine"] and rows[0].meta["format"] == "generic"
    assert [s.path.rsplit("/", 1)[-1] for s in report.sources] == ["mine.jsonl"]


def test_empty_pool_is_an_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [gen(1, "")])
    with pytest.raises(DataError, match="no usable rows"):
        load_pool(pool_cfg([path]), seed=0)


def test_report_serialises() -> None:
    report = PoolReport(n_read=2, n_kept=1, dropped=[{"id": "x", "source": "f:2", "reason": "duplicate"}])
    assert json.loads(json.dumps(report.to_dict()))["counts"] == {"duplicate": 1}


# --------------------------------------------------------------------------------------------- paths


def test_resolve_data_path_prefers_data_dir_then_cwd(tmp_path: Path, monkeypatch) -> None:
    assert resolve_data_path("math/gsm8k/train.jsonl") == (DATA_DIR / "math/gsm8k/train.jsonl").resolve()
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "local.jsonl", [gen(1)])
    assert resolve_data_path("local.jsonl") == (tmp_path / "local.jsonl").resolve()
    with pytest.raises(FileNotFoundError) as err:
        resolve_data_path("nowhere.jsonl")
    assert str(DATA_DIR / "nowhere.jsonl") in str(err.value) and str(tmp_path / "nowhere.jsonl") in str(err.value)


# ------------------------------------------------------------------------------------- domain configs

DOMAINS = {
    "math": ("####", ["id_gsm8k_bpb", "id_gsm8k"]),
    "medical": (None, ["id_medqa_letter", "id_medqa_bpb"]),
    "general": (None, ["id_alpacaeval_bpb", "id_ifeval"]),
    "code": (None, ["id_mbpp_bpb", "id_humaneval", "id_mbpp"]),
}


@pytest.mark.parametrize("domain", sorted(DOMAINS))
def test_domain_yaml_loads_a_pool(domain: str) -> None:
    path = CONF_DIR / "domain" / f"{domain}.yaml"
    assert path.read_text().startswith(f"# instructdiff domain={domain}")
    cfg = OmegaConf.load(path)
    marker, tasks = DOMAINS[domain]
    assert cfg.name == domain and cfg.pool_path is None and cfg.pool_format == "auto"
    assert cfg.on_bad_row == "error" and cfg.answer_marker == marker and list(cfg.eval_tasks) == tasks
    # 200 rows: the README's default run (and its stated CPU time) is sized on this
    assert cfg.max_length == 1024 and cfg.license_note and cfg.pool_size == 200
    rows, report = load_pool(cfg, seed=0)
    assert len(rows) == cfg.pool_size == report.n_kept and report.n_available > cfg.pool_size
    assert all(r.response.strip() for r in rows) and len({r.id for r in rows}) == len(rows)
