"""End to end on the tiny model: every artifact written, reruns hit every cache, stages gate correctly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from instructdiff.data import DataError
from instructdiff.pipeline import StageNotEnabled, run


def _jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_end_to_end_writes_every_artifact_and_rerun_hits_every_cache(make_cfg, tmp_path):
    cfg = make_cfg("eval=quick", "eval.limit=3", "eval.tasks=[id_gsm8k_bpb]")
    first = run(cfg)
    run_dir = tmp_path / "run"
    for name in ("results.json", "selection.jsonl", "subset.jsonl", "manifest.json"):
        assert (run_dir / name).is_file(), name

    selection = _jsonl(run_dir / "selection.jsonl")
    pool_ids = [r["id"] for r in selection]
    assert len(pool_ids) == len(set(pool_ids)) == 48  # every pool row accounted for, once
    statuses = {r["status"] for r in selection}
    assert statuses <= {"selected", "not_selected", "dropped"}
    selected = [r for r in selection if r["status"] == "selected"]
    assert len(selected) == int(0.1 * 48)
    assert all(r["reason"] for r in selection if r["status"] == "dropped")
    assert all("delta_entropy" in r["scores"] for r in selection if r["status"] != "dropped")

    subset = _jsonl(run_dir / "subset.jsonl")
    assert len(subset) == len(selected)
    assert set(subset[0]) - {"_instructdiff"} == {"question", "answer"}  # the input's own (GSM8K) format
    by_id = {r["id"]: r for r in selection}
    for rec in subset:  # subset -> selection by id, and both -> the input file's line
        tag = rec["_instructdiff"]
        assert by_id[tag["id"]]["status"] == "selected" and by_id[tag["id"]]["line"] == tag["line"]
        line = Path(tag["file"]).read_text().splitlines()[tag["line"] - 1]
        assert json.loads(line) == {k: v for k, v in rec.items() if k != "_instructdiff"}

    results = json.loads((run_dir / "results.json").read_text())
    assert results["selection"]["counts"]["selected"] == len(selected)
    assert {"base", "trained"} <= set(results["eval"])
    bpb = results["eval"]["trained"]["metrics"]
    assert any(k.startswith("id_gsm8k_bpb") for k in bpb)
    assert [t["purpose"] for t in results["trainings"]] == ["calibration-warmup", "final"]
    assert first["cache"]["misses"] > 0

    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["code_hash"] and manifest["pool"]["fingerprint"] and manifest["base_model"]["fingerprint"]
    assert manifest["config"]["model"]["name"] == "tiny"
    (data_file, digest), = manifest["data_files"].items()
    assert data_file.endswith("gsm8k/train.jsonl")
    assert digest == "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465"  # data/math/SOURCES.md

    second = run(make_cfg("eval=quick", "eval.limit=3", "eval.tasks=[id_gsm8k_bpb]", run_name="rerun"))
    assert second["cache"]["misses"] == 0 and second["cache"]["hits"] >= 3
    assert second["seconds"].get("train") is None and second["seconds"].get("score") is None
    assert _jsonl(tmp_path / "rerun" / "selection.jsonl") == selection


def test_a_rerun_into_its_own_folder_keeps_the_record_of_the_run_that_computed(make_cfg, tmp_path, caplog):
    """Resuming a finished sweep reruns every job as cache hits: the folder keeps the computing run's
    results.json and manifest (its times and costs); a rerun that computed something writes its own."""
    import logging

    overrides = ("eval=quick", "eval.limit=2", "eval.tasks=[id_gsm8k_bpb]", "pipeline.stages=[select,train,eval]",
                 "selector=random")
    run(make_cfg(*overrides))
    record, manifest = (tmp_path / "run" / "results.json").read_bytes(), (tmp_path / "run" / "manifest.json").read_bytes()
    assert json.loads(record)["cache"]["misses"] > 0 and json.loads(record)["seconds"]["train"] > 0
    with caplog.at_level(logging.INFO, logger="instructdiff"):
        again = run(make_cfg(*overrides))
    assert again["cache"]["misses"] == 0  # what the rerun returns is its own account
    assert (tmp_path / "run" / "results.json").read_bytes() == record
    assert (tmp_path / "run" / "manifest.json").read_bytes() == manifest
    assert "kept that record" in caplog.text

    # one more eval item: the trained model's evaluation is computed again, so this run's record replaces it
    changed = run(make_cfg(*overrides[:1], "eval.limit=3", *overrides[2:]))
    assert changed["cache"]["misses"] > 0
    assert json.loads((tmp_path / "run" / "results.json").read_text())["cache"] == changed["cache"]
    # and a cache-hit rerun of other work than the record's (another selector) does not keep it either
    run(make_cfg(*overrides[:1], "eval.limit=3", *overrides[2:-1], "selector=length", run_name="other"))
    (tmp_path / "run" / "results.json").write_text((tmp_path / "other" / "results.json").read_text())
    rerun_random = run(make_cfg(*overrides[:1], "eval.limit=3", *overrides[2:]))
    assert json.loads((tmp_path / "run" / "results.json").read_text())["cache"] == rerun_random["cache"]


def test_calibration_changes_the_model_and_selection_uses_both_models(make_cfg, tmp_path):
    results = run(make_cfg("pipeline.stages=[calibrate,score,select]"))
    rows = [r for r in _jsonl(tmp_path / "run" / "selection.jsonl") if r["status"] != "dropped"]
    deltas = [r["scores"]["delta_nll"] for r in rows]
    assert max(abs(d) for d in deltas) > 1e-4, "the calibrated model should score differently from the base"
    for r in rows:
        s = r["scores"]
        assert s["delta_entropy"] == pytest.approx(s["entropy_base"] - s["entropy_calibrated"])
    chosen = [r["scores"]["delta_entropy"] for r in rows if r["status"] == "selected"]
    rest = [r["scores"]["delta_entropy"] for r in rows if r["status"] == "not_selected"]
    assert max(chosen) <= min(rest)  # lowest ΔH among the rows that survived the trim
    assert "train" not in results["seconds"] and "eval" not in results


def test_selection_only_writes_subset_and_does_not_train(make_cfg, tmp_path):
    results = run(make_cfg("pipeline.stages=[calibrate,score,select]", "selector=random"))
    assert (tmp_path / "run" / "subset.jsonl").is_file()
    assert results["trainings"] == []


def test_train_without_cached_selection_names_the_missing_stage(make_cfg):
    with pytest.raises(StageNotEnabled, match="select"):
        run(make_cfg("pipeline.stages=[train]"))


def test_iterative_rounds_reuse_base_scores(make_cfg):
    results = run(make_cfg("selector.rounds=2", "pipeline.stages=[calibrate,score,select]"))
    passes = results["cache"]["score_store"]["passes"]
    descs = [p["desc"] for p in passes]
    assert descs.count("score base") == 1  # base scored once across both rounds
    assert "score calibrated_r1" in descs and "score calibrated_r2" in descs
    purposes = [t["purpose"] for t in results["trainings"]]
    assert purposes == ["calibration-warmup", "selection-round1"]
    assert [r["round"] for r in results["selection"]["rounds"]] == [1, 2]


def test_bad_pool_line_names_file_and_line(make_cfg, tmp_path):
    pool = tmp_path / "pool.jsonl"
    good = json.dumps({"instruction": "Add 1 and 2.", "input": "", "response": "3"})
    pool.write_text(good + "\n" + '{"instruction": "broken", "response": \n' + good + "\n")
    with pytest.raises(DataError, match=r"pool\.jsonl:2"):
        run(make_cfg(f"domain.pool_path={pool}", "pipeline.stages=[select]", "selector=random"))


def test_user_pool_with_token_budget(make_cfg, tmp_path):
    pool = tmp_path / "mine.jsonl"
    with open(pool, "w") as fh:
        for i in range(30):
            fh.write(json.dumps({"instruction": f"Say {i}", "input": f"ctx {i}", "response": "ok " * (i + 1)}) + "\n")
    results = run(make_cfg(f"domain.pool_path={pool}", "domain.pool_size=null", "selector=random",
                           "selector.budget.unit=tokens", "selector.budget.fraction=0.2",
                           "pipeline.stages=[select]"))
    assert results["selection"]["n_pool"] == 30
    subset = _jsonl(tmp_path / "run" / "subset.jsonl")
    assert set(subset[0]) == {"instruction", "input", "response", "_instructdiff"}
    lines = pool.read_text().splitlines()
    for rec in subset:  # every chosen row traced back to its line in the user's file
        assert rec["_instructdiff"]["file"] == str(pool.resolve())
        own = {k: v for k, v in rec.items() if k != "_instructdiff"}
        assert json.loads(lines[rec["_instructdiff"]["line"] - 1]) == own


def test_the_summary_counts_rows_the_renderer_dropped(make_cfg, tmp_path, capsys):
    """A row too long to render is dropped before the selector sees it: the summary line and results.json still
    account for it, as selection.jsonl and the manifest do."""
    from instructdiff.run_outputs import print_summary

    pool = tmp_path / "mine.jsonl"
    rows = [{"instruction": f"Say {i}", "input": "", "response": "ok " * 4} for i in range(9)]
    rows.append({"instruction": "Say it all", "input": "", "response": "word " * 400})
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = run(make_cfg(f"domain.pool_path={pool}", "domain.pool_size=null", "domain.max_length=128",
                           "selector=random", "selector.budget.fraction=0.2", "pipeline.stages=[select]"))
    acc = results["selection"]["accounting"]
    assert (acc["selected"], acc["not_selected"], acc["dropped"], acc["balanced"]) == (1, 8, 1, True)
    assert acc["dropped_reasons"] == {"too_long": 1}
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["accounting"] == acc
    capsys.readouterr()
    print_summary(results)
    assert "1 selected, 8 not selected, 1 dropped ({'too_long': 1})" in capsys.readouterr().out.replace("\n", " ")


def test_wandb_offline_run_is_written(make_cfg, tmp_path):
    results = run(make_cfg("logger=wandb", "pipeline.stages=[select]", "selector=random"))
    assert "wandb sync" in results["wandb_sync"]
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))


def test_cli_entry_point_runs(tmp_path, tiny_model_cache):
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(tiny_model_cache / "models", cache / "models")
    out = subprocess.run(
        [sys.executable, "-m", "instructdiff", "model=tiny", "logger=none", "eval=none", "selector=random",
         "domain.pool_size=20", "pipeline.stages=[select]", f"paths.output_root={tmp_path / 'o'}",
         f"paths.cache_dir={cache}"],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "selection: 2 selected" in out.stdout
    assert len(list((tmp_path / "o" / "runs").rglob("subset.jsonl"))) == 1


def test_complexity_aware_training_shortens_easy_and_medium_rows(make_cfg, tmp_path, monkeypatch):
    import instructdiff.pipeline as pipeline_module

    trained_on = []
    real = pipeline_module.Pipeline.train_model

    def spy(self, rows, purpose, stage):
        trained_on.append((purpose, rows))
        return real(self, rows, purpose, stage)

    monkeypatch.setattr(pipeline_module.Pipeline, "train_model", spy)
    results = run(make_cfg("selector=random", "selector.budget.fraction=0.5", "trainer.complexity_aware=true",
                           "trainer.epochs=1", "pipeline.stages=[calibrate,score,select,train]"))
    info = results["complexity_aware"]
    assert info["easy"] + info["medium"] + info["hard"] == 24
    assert info["answer_only"] == info["easy"] + info["medium"] > 0 and info["hard"] > 0
    (purpose, rows), = trained_on
    short = [r for r in rows if r.response.startswith("####")]
    assert len(short) == info["answer_only"]  # only the final answer, e.g. "#### 72"
    assert all("\n" not in r.response for r in short)
    assert sum(r.response.count("\n") > 0 for r in rows) == info["hard"]


def test_second_selector_asking_the_same_signal_computes_nothing(make_cfg):
    first = run(make_cfg("selector=ppl", "pipeline.stages=[score,select]"))
    assert first["cache"]["score_store"]["misses"] == 1
    second = run(make_cfg("selector=entropy", "pipeline.stages=[score,select]", run_name="second"))
    store = second["cache"]["score_store"]
    assert store["misses"] == 0 and store["hits"] == 1 and store["passes"] == []


def test_per_token_signal_is_served_and_cached(make_cfg):
    from instructdiff.pipeline import Pipeline

    cfg = make_cfg("pipeline.stages=[score]")
    pipe = Pipeline(cfg, __import__("pathlib").Path(cfg.paths.run_dir))
    pipe.prepare()
    arrays = pipe.signal(pipe.base, "token_stats")
    means = pipe.score(pipe.base, "base")
    ids = [r.id for r in pipe.pool]
    lengths = arrays["n_tokens"]
    # score.response_end=exclude (default): the scored tokens are the trained ones minus the turn's closing ones
    by_id = {r.id: r for r in pipe.rendered}
    assert lengths.tolist() == [pipe.response_tokens[i] - by_id[i].n_end for i in ids]
    assert all(by_id[i].n_end > 0 for i in ids)
    import numpy as np

    np.testing.assert_allclose(np.nanmean(arrays["nll"], axis=1), means.aligned("nll", ids), atol=1e-4)
    again = pipe.signal(pipe.base, "token_stats")
    assert pipe.store.hits >= 1 and np.array_equal(again["nll"], arrays["nll"], equal_nan=True)


@pytest.mark.slow
def test_compiled_scoring_has_its_own_cache_key_and_the_same_scores(make_cfg):
    """score.compile=true scores into new tables (a compiled body is a different computation under bf16),
    equal to the eager fp32 ones within float noise; the eager key is what it was before the option."""
    eager = run(make_cfg("selector=ppl", "pipeline.stages=[score,select]"))
    compiled = run(make_cfg("selector=ppl", "pipeline.stages=[score,select]", "score.compile=true",
                            run_name="compiled"))
    assert eager["cache"]["score_store"]["misses"] == 1
    assert compiled["cache"]["score_store"]["misses"] == 1 and compiled["cache"]["score_store"]["hits"] == 0
    again = run(make_cfg("selector=ppl", "pipeline.stages=[score,select]", run_name="again"))
    assert again["cache"]["score_store"] == {"hits": 0, "misses": 0, "passes": []}  # eager selection cached
    tables = sorted(Path(make_cfg().paths.cache_dir).glob("scores/*.npz"))
    assert len(tables) == 2
    a, b = (np.load(t) for t in tables)
    assert list(a["ids"]) == list(b["ids"])
    np.testing.assert_allclose(a["nll"], b["nll"], atol=1e-5)
    np.testing.assert_allclose(a["entropy"], b["entropy"], atol=1e-5)


def test_bf16_scores_are_not_served_an_fp32_selection(make_cfg):
    """The selection cache is keyed by the scoring numerics: after an fp32 run, score.dtype=bf16 scores the
    pool again and selects from its own numbers instead of returning the cached fp32 selection."""
    run(make_cfg("selector=ppl", "pipeline.stages=[score,select]"))
    bf16 = run(make_cfg("selector=ppl", "pipeline.stages=[score,select]", "score.dtype=bf16", run_name="bf16"))
    assert bf16["cache"]["score_store"]["misses"] == 1 and bf16["cache"]["score_store"]["hits"] == 0
    fp32_again = run(make_cfg("selector=ppl", "pipeline.stages=[score,select]", run_name="again"))
    assert fp32_again["cache"]["score_store"] == {"hits": 0, "misses": 0, "passes": []}  # selection cached


def test_seeds_share_one_pool_and_one_base_scoring_pass(make_cfg, tmp_path):
    """domain.pool_seed draws the pool; the run's seed does not: seeds 0 and 1 of a sweep score the base once."""
    stages = "pipeline.stages=[calibrate,score,select]"
    first = run(make_cfg("seed=0", stages, run_name="s0"))
    second = run(make_cfg("seed=1", stages, run_name="s1"))
    base_events = [[e for e in r["cache"]["events"] if e["stage"] == "score" and "base model" in e["what"]]
                   for r in (first, second)]
    assert [e["hit"] for e in base_events[0]] == [False]
    assert [e["hit"] for e in base_events[1]] == [True]  # the base pass of seed 0 served seed 1
    calibrated = [e for e in second["cache"]["events"] if e["stage"] == "score" and "base model" not in e["what"]]
    assert calibrated and not any(e["hit"] for e in calibrated)  # seed 1 calibrates on its own warmup slice
    m0, m1 = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("s0", "s1"))
    assert m0["pool"]["fingerprint"] == m1["pool"]["fingerprint"]
    assert (m0["pool"]["pool_seed"], m0["pool"]["seed"]) == (0, 0) and (m1["pool"]["pool_seed"], m1["pool"]["seed"]) == (0, 1)
    assert first["pool_seed"] == second["pool_seed"] == 0
    ids0 = {r["id"] for r in _jsonl(tmp_path / "s0" / "selection.jsonl")}
    assert ids0 == {r["id"] for r in _jsonl(tmp_path / "s1" / "selection.jsonl")}
    # another pool_seed is another pool (and another base pass)
    third = run(make_cfg("seed=0", "domain.pool_seed=1", stages, run_name="p1"))
    m2 = json.loads((tmp_path / "p1" / "manifest.json").read_text())
    assert m2["pool"]["fingerprint"] != m0["pool"]["fingerprint"] and m2["pool"]["pool_seed"] == 1
    assert ids0 != {r["id"] for r in _jsonl(tmp_path / "p1" / "selection.jsonl")}
    assert not [e for e in third["cache"]["events"] if e["stage"] == "score" and "base model" in e["what"]][0]["hit"]


def test_response_end_is_its_own_selection_and_changes_the_scores(make_cfg, tmp_path):
    stages = "pipeline.stages=[calibrate,score,select]"
    run(make_cfg(stages, run_name="excl"))
    again = run(make_cfg(stages, "score.response_end=include", run_name="incl"))
    select_events = [e for e in again["cache"]["events"] if e["stage"] == "select"]
    assert select_events and not select_events[0]["hit"]  # never served the other choice's selection
    excl = {r["id"]: r for r in _jsonl(tmp_path / "excl" / "selection.jsonl")}
    incl = {r["id"]: r for r in _jsonl(tmp_path / "incl" / "selection.jsonl")}
    assert excl.keys() == incl.keys()
    diffs = [abs(excl[i]["scores"]["nll_base"] - incl[i]["scores"]["nll_base"]) for i in excl
             if excl[i]["scores"].get("nll_base") is not None and incl[i]["scores"].get("nll_base") is not None]
    assert diffs and min(diffs) > 0  # every row's mean NLL moves when its closing tokens are (not) counted
    manifest = json.loads((tmp_path / "incl" / "manifest.json").read_text())
    assert manifest["pool"]["response_end"] == "include"
    with pytest.raises(ValueError, match="score.response_end"):
        run(make_cfg(stages, "score.response_end=maybe", run_name="bad"))


def test_each_stage_opens_once_with_its_place_among_the_enabled_stages(make_cfg, tmp_path, caplog):
    """The stage runner logs "stage k/N: <name>" the first time a stage runs (k: its place in calibrate, score,
    select, train, eval among this run's N stages); a cached rerun opens only the stages it asks for."""
    import logging

    from instructdiff.pipeline import Pipeline, Prepared

    def stage_lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith("stage ")]

    cfg = make_cfg("pipeline.stages=[calibrate,score,select]")
    pipe = Pipeline(cfg, tmp_path / "run")
    prepared = pipe.prepare()
    assert isinstance(prepared, Prepared) and prepared.pool == pipe.pool and prepared.base == pipe.base
    with caplog.at_level(logging.INFO, logger="instructdiff"):
        run(cfg)
    # the selector opens select, then asks for its calibration and scores inside it
    assert stage_lines() == ["stage 3/3: select", "stage 1/3: calibrate", "stage 2/3: score"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="instructdiff"):
        run(make_cfg("pipeline.stages=[calibrate,score,select]", run_name="again"))
    assert stage_lines() == ["stage 3/3: select"]  # the cached selection needs nothing else


def test_a_stage_time_leaves_out_the_stages_timed_inside_it():
    import time

    from instructdiff.stages import Timer

    timer = Timer()
    with timer.stage("select"):
        time.sleep(0.05)
        with timer.stage("score"):
            time.sleep(0.2)
    assert timer.seconds["score"] >= 0.2
    assert 0.05 <= timer.seconds["select"] < 0.2  # its own time: with the score stage's it would be >= 0.25


def test_the_framework_imports_no_selector_plugin():
    """instructdiff/ is the framework, baselines/ its plugins: no module of the first imports the second (the
    complexity-aware training rows are found through conf/selector/complexity.yaml instead)."""
    import ast

    from instructdiff import PROJECT_ROOT

    plugins = ("baselines", "instructdiff_baselines")
    found = []
    for path in sorted((PROJECT_ROOT / "instructdiff").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            found += [f"{path.name}: {n}" for n in names if n.split(".")[0] in plugins]
    assert found == []
