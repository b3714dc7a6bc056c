"""A user's own pool as a first-class domain (conf/domain/custom.yaml): the run is named after the file, runs no
eval and has no query set unless given, and every row keeps the file and line it was read from."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from instructdiff import CONF_DIR
from instructdiff.data import DataError, load_pool, original_records, provenance
from instructdiff.pipeline import run
from instructdiff.resolvers import file_stem
from instructdiff.rows import content_id


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def own_pool(path: Path, n: int = 30) -> Path:
    """n rows of a user's file in the generic format, with blank lines so that line numbers are not row numbers."""
    lines = []
    for i in range(n):
        lines.append(json.dumps({"instruction": f"What is {i} plus {i + 3}?", "input": "",
                                 "response": f"{i} plus {i + 3} is {2 * i + 3}." + " Check: yes." * (i % 4)}))
        if i % 7 == 3:
            lines.append("")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def custom_cfg(**kw) -> dict:
    cfg = OmegaConf.load(CONF_DIR / "domain" / "custom.yaml")
    for key, value in kw.items():
        cfg[key] = value
    return cfg


# --------------------------------------------------------------------------------------------- naming


@pytest.mark.parametrize("path,stem", [
    ("my_pool.jsonl", "my_pool"), ("data/sets/My Pool (v2).jsonl.gz", "My_Pool_v2"), ("/abs/x.json", "x"),
    ("pool.JSON.GZ", "pool"), ("notes.txt", "notes.txt"), ("...jsonl", "custom"), (None, "custom")])
def test_file_stem_names_a_run_safely(path, stem) -> None:
    assert file_stem(path, "custom") == stem


def test_custom_domain_is_named_after_its_file_with_no_eval_and_no_queries(tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["domain=custom", f"domain.pool_path={tmp_path / 'clinic_notes.jsonl'}",
                                           "eval=default"], return_hydra_config=True)
        bare = compose("config", overrides=["domain=custom"])
    assert cfg.domain.name == "clinic_notes" and bare.domain.name == "custom"
    assert "_${domain.name}_" in OmegaConf.to_container(cfg.hydra.run)["dir"]  # the run dir carries the name
    assert list(cfg.eval.tasks) == [] and cfg.domain.query is None and cfg.domain.pool_size is None
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        named = compose("config", overrides=["domain=custom", "domain.pool_path=x.jsonl", "domain.name=study",
                                             "domain.eval_tasks=[id_alpacaeval_bpb]"])
    assert named.domain.name == "study" and list(named.eval.tasks) == ["id_alpacaeval_bpb"]


def test_custom_domain_without_a_file_names_the_key_to_set() -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["domain=custom"])
    with pytest.raises(DataError, match=r"has no data: set domain\.pool_path=FILE"):
        load_pool(cfg.domain, seed=0)


def test_an_own_eval_file_is_refused_not_ignored(tmp_path: Path) -> None:
    cfg = custom_cfg(pool_path=str(own_pool(tmp_path / "p.jsonl")), eval_file=str(tmp_path / "eval.jsonl"))
    with pytest.raises(DataError, match=r"domain\.eval_file .* not supported yet; set domain\.eval_file=null"):
        load_pool(cfg, seed=0)


# ----------------------------------------------------------------------------------------- provenance


def test_every_row_keeps_its_file_and_line_outside_its_id(tmp_path: Path) -> None:
    pool = own_pool(tmp_path / "mine.jsonl")
    rows, report = load_pool(custom_cfg(pool_path=str(pool)), seed=0)
    lines = pool.read_text().splitlines()
    assert len(rows) == 30 and report.not_drawn == 0
    for row in rows:
        assert provenance(row) == {"file": str(pool.resolve()), "line": row.line}
        assert json.loads(lines[row.line - 1])["instruction"] == row.instruction  # 1-based, blank lines counted
        assert row.id == content_id(row.instruction, row.input, row.response)
    assert rows[4].line == 6  # one blank line after the 4th row
    # the same records read from another file are the same rows: same ids, equal, same hash
    copy = tmp_path / "elsewhere.jsonl"
    copy.write_text("\n".join(x for x in lines if x) + "\n")
    again, _ = load_pool(custom_cfg(pool_path=str(copy)), seed=0)
    assert again == rows and {*again} == {*rows} and [r.id for r in again] == [r.id for r in rows]
    assert again[4].line == 5 and again[4].file == str(copy.resolve())
    assert original_records(rows[3:6]) == [json.loads(lines[r.line - 1]) for r in rows[3:6]]


def test_json_rows_keep_their_element_index(tmp_path: Path) -> None:
    path = tmp_path / "arr.json"
    path.write_text(json.dumps([{"instruction": f"t{i}", "output": f"a{i}"} for i in range(4)]))
    rows, _ = load_pool(custom_cfg(pool_path=str(path)), seed=0)
    assert [provenance(r) for r in rows] == [{"file": str(path.resolve()), "index": i} for i in range(4)]
    assert all(r.line is None for r in rows)


def test_not_drawn_rows_are_not_counted_as_dropped(tmp_path: Path) -> None:
    pool = own_pool(tmp_path / "mine.jsonl", n=40)
    with pool.open("a") as fh:
        fh.write('{"instruction": "broken", "response": \n')  # a bad row, skipped
        fh.write(json.dumps({"instruction": "What is 0 plus 3?", "input": "", "response": "0 plus 3 is 3."}) + "\n")
    rows, report = load_pool(custom_cfg(pool_path=str(pool), pool_size=10, on_bad_row="skip"), seed=0)
    n_lines = len(pool.read_text().splitlines())
    assert report.counts() == {"bad_row": 1, "duplicate": 1} and len(report.dropped) == 2
    assert (report.n_read, report.n_available, report.not_drawn, report.n_kept) == (42, 40, 30, 10)
    assert report.n_read == len(report.dropped) + report.not_drawn + report.n_kept
    assert [(d["file"], d["line"]) for d in report.dropped] == [(str(pool.resolve()), n_lines - 1),
                                                               (str(pool.resolve()), n_lines)]
    as_dict = json.loads(json.dumps(report.to_dict()))  # what the manifest carries
    assert as_dict["not_drawn"] == 30 and as_dict["counts"] == {"bad_row": 1, "duplicate": 1}
    assert "not drawn 30" in report.summary() and "dropped 2 " in report.summary()


# -------------------------------------------------------------------------------------------- real runs


def test_own_30_row_file_selects_in_a_run_named_after_it(make_cfg, tmp_path: Path) -> None:
    pool = own_pool(tmp_path / "support_tickets.jsonl")
    cfg = make_cfg("domain=custom", f"domain.pool_path={pool}", "domain.pool_size=null", "selector=instructdiff",
                   "selector.budget.fraction=0.2", "pipeline.stages=[calibrate,score,select]")
    assert list(cfg.domain.eval_tasks) == [] and cfg.domain.query is None
    results = run(cfg)
    assert results["domain"] == "support_tickets" and results["selection"]["n_pool"] == 30
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["config"]["domain"]["name"] == "support_tickets" and manifest["config"]["eval"]["tasks"] == []
    # every chosen record traces back to its line in the input through the row's provenance
    by_id = {r.id: r for r in load_pool(cfg.domain, seed=0)[0]}
    selected = [r for r in _jsonl(tmp_path / "run" / "selection.jsonl") if r["status"] == "selected"]
    chosen = [r["id"] for r in sorted(selected, key=lambda r: r["rank"])]  # subset.jsonl is in rank order
    subset = _jsonl(tmp_path / "run" / "subset.jsonl")
    lines = pool.read_text().splitlines()
    assert len(chosen) == len(subset) == 6
    for row_id, record in zip(chosen, subset, strict=True):
        where = provenance(by_id[row_id])
        assert where["file"] == str(pool.resolve())
        assert {k: record[k] for k in ("instruction", "input", "response")} == json.loads(lines[where["line"] - 1])


@pytest.mark.parametrize("selector", ["rds", "less"])
def test_a_query_selector_without_a_query_set_names_the_key(make_cfg, tmp_path: Path, selector: str) -> None:
    pool = own_pool(tmp_path / "mine.jsonl")
    cfg = make_cfg("domain=custom", f"domain.pool_path={pool}", "domain.pool_size=null", f"selector={selector}",
                   "pipeline.stages=[calibrate,score,select]")
    with pytest.raises(ValueError, match=r"query set") as err:
        run(cfg)
    assert "domain.query" in str(err.value)  # the key to set
    assert not (tmp_path / "cache" / "scores").exists()  # it stopped before any scoring pass


# Hydra resolves hydra.run.dir (and so domain.name) before any instructdiff code runs: the resolver must be
# registered by `import instructdiff`. Remove this marker when instructdiff/__init__.py calls resolvers.register().
def test_cli_run_directory_is_named_after_the_file(tmp_path: Path, tiny_model_cache: Path) -> None:
    pool = own_pool(tmp_path / "field_notes.jsonl")
    cache = tmp_path / "cache"
    shutil.copytree(tiny_model_cache / "models", cache / "models")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "instructdiff", "domain=custom", f"domain.pool_path={pool}",
                           "model=tiny", "logger=none", "selector=random", "pipeline.stages=[select]",
                           f"paths.output_root={out}", f"paths.cache_dir={cache}"],
                          cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    runs = list((out / "runs").glob("*/*_field_notes_random"))
    assert len(runs) == 1 and (runs[0] / "subset.jsonl").exists()
    assert OmegaConf.load(runs[0] / ".hydra" / "config.yaml").domain.name == "field_notes"
