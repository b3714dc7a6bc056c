"""The worked examples of docs/adding_a_selector.md and docs/adding_a_domain.md work as written.

The files are taken from the guides' marked code blocks (``<!-- file: PATH -->``, ``<!-- append: PATH -->``,
``<!-- run: ... -->``) and placed in temporary copies of conf/, the task folder and data/, never in the
repository; the example selector module is loaded under the import name its YAML names.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from instructdiff import CONF_DIR, DATA_DIR, PROJECT_ROOT

DOCS = PROJECT_ROOT / "docs"
BLOCK = re.compile(r"<!-- (file|append|run): ?([^>]*?) -->\n```\w*\n(.*?)```", re.S)
TINY = ["model=tiny", "logger=none", "trainer.per_device_batch_size=2", "trainer.gradient_accumulation_steps=1",
        "trainer.learning_rate=3e-3", "trainer.progress_bar=false", "trainer.epochs=1"]


def guide_blocks(guide: str) -> list[tuple[str, str, str]]:
    """(kind, path or note, code) of every marked block of ``docs/<guide>``, in order."""
    blocks = BLOCK.findall((DOCS / guide).read_text(encoding="utf-8"))
    assert blocks, f"docs/{guide} has no marked code blocks"
    return blocks


def guide_file(guide: str, path: str) -> str:
    (code,) = [c for kind, p, c in guide_blocks(guide) if kind in ("file", "append") and p == path]
    return code


def _compose(conf: Path, cache: Path, tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose("config", overrides=[*TINY, f"paths.output_root={tmp_path / 'outputs'}",
                                            f"paths.cache_dir={cache}", f"paths.run_dir={tmp_path / 'run'}",
                                            *overrides])


@pytest.fixture
def cache(tmp_path, tiny_model_cache) -> Path:
    shutil.copytree(tiny_model_cache / "models", tmp_path / "cache" / "models")
    return tmp_path / "cache"


# ------------------------------------------------------------------------------------------ the selector guide
@pytest.fixture
def hardest(tmp_path, monkeypatch) -> Path:
    """The guide's selector: its module importable as instructdiff_baselines.hardest, its YAML in a conf copy."""
    guide = "adding_a_selector.md"
    module_file = tmp_path / "hardest.py"
    module_file.write_text(guide_file(guide, "baselines/hardest.py"), encoding="utf-8")
    spec = importlib.util.spec_from_file_location("instructdiff_baselines.hardest", module_file)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "instructdiff_baselines.hardest", module)
    spec.loader.exec_module(module)
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    (conf / "selector" / "hardest.yaml").write_text(guide_file(guide, "conf/selector/hardest.yaml"), encoding="utf-8")
    return conf


def test_selector_guide_unit_test_passes(hardest) -> None:
    namespace: dict = {}
    exec(compile(guide_file("adding_a_selector.md", "tests/test_baselines_hardest.py"), "guide", "exec"), namespace)
    tests = [f for name, f in namespace.items() if name.startswith("test_")]
    assert tests
    for test in tests:
        test()


@pytest.mark.slow
def test_selector_guide_example_composes_and_selects(hardest, cache, tmp_path, monkeypatch, one_torch_thread):
    from instructdiff.selector_factory import instantiate_selector

    cfg = _compose(hardest, cache, tmp_path, "selector=hardest", "eval=none", "domain.pool_size=48",
                   "pipeline.stages=[score,select]")
    assert OmegaConf.to_container(cfg.selector) == {
        "_target_": "instructdiff_baselines.hardest.HardestSelector", "model": None, "min_response_tokens": 8,
        "budget": {"fraction": 0.1, "count": None, "unit": "samples"}}
    selector = instantiate_selector(cfg.selector, name="hardest")
    assert selector.name == "hardest" and selector.uses_models and not selector.uses_training

    # the flags test's recording run, on the guide's selector: its flags match what it calls
    from test_selector_flags import FLAGS, HANDLE_FLAGS, _run_recording

    built, calls = _run_recording(cfg, monkeypatch)
    assert calls == {"score", "budget"}
    assert {f for f in FLAGS if getattr(built, f)} == {"uses_models", "uses_budget"} == {
        *(HANDLE_FLAGS[c] for c in calls if c in HANDLE_FLAGS), "uses_budget"}

    rows = [json.loads(x) for x in (tmp_path / "run" / "selection.jsonl").read_text().splitlines()]
    scored = [r for r in rows if r["scores"]]
    long_enough = [r for r in scored if r["scores"]["response_tokens"] >= 8]
    expected = sorted(long_enough, key=lambda r: (-r["scores"]["nll"], r["id"]))[:4]  # 10% of 48
    selected = sorted((r for r in rows if r["status"] == "selected"), key=lambda r: r["rank"])
    assert [r["id"] for r in selected] == [r["id"] for r in expected]
    assert all(r["reason"] == "too_short" for r in scored if r["scores"]["response_tokens"] < 8)


# -------------------------------------------------------------------------------------------- the domain guide
def _data_copy(root: Path) -> Path:
    """``root/data``: the bundled data by symbolic links, with medical/ a real folder the guide may write into."""
    data = root / "data"
    data.mkdir(parents=True)
    for entry in DATA_DIR.iterdir():
        if entry.name != "medical":
            (data / entry.name).symlink_to(entry)
    (data / "medical").mkdir()
    for entry in (DATA_DIR / "medical").iterdir():
        (data / "medical" / entry.name).symlink_to(entry)
    return data


@pytest.fixture
def pubmedqa(tmp_path, monkeypatch) -> Path:
    """The guide's domain: its data split run in a temporary data/, its task and utils addition in a copy of
    the task folder, its YAML in a copy of conf/. Returns the conf copy."""
    import instructdiff.data.paths
    import instructdiff.evaluate

    guide = "adding_a_domain.md"
    root = tmp_path / "root"
    data = _data_copy(root)
    (script,) = [c for kind, _, c in guide_blocks(guide) if kind == "run"]
    monkeypatch.chdir(root)
    exec(compile(script, "guide", "exec"), {})
    tasks = tmp_path / "tasks"
    shutil.copytree(instructdiff.evaluate.TASKS_SRC, tasks)
    with open(tasks / "utils.py", "a", encoding="utf-8") as fh:
        fh.write(guide_file(guide, "instructdiff/lm_eval_tasks/utils.py"))
    (tasks / "id_pubmedqa_bpb.yaml").write_text(
        guide_file(guide, "instructdiff/lm_eval_tasks/id_pubmedqa_bpb.yaml"), encoding="utf-8")
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    (conf / "domain" / "pubmedqa.yaml").write_text(guide_file(guide, "conf/domain/pubmedqa.yaml"), encoding="utf-8")
    monkeypatch.setattr(instructdiff.evaluate, "TASKS_SRC", tasks)
    monkeypatch.setattr(instructdiff.evaluate, "DATA_DIR", data)
    monkeypatch.setattr(instructdiff.data.paths, "DATA_DIR", data)
    return conf


def test_domain_guide_split_is_disjoint(pubmedqa) -> None:
    from instructdiff.data import load_pool
    from instructdiff.queries import load_queries
    from instructdiff.render import user_message

    split = Path.cwd() / "data" / "medical" / "pubmedqa_split"
    train = [json.loads(x) for x in (split / "train.jsonl").read_text().splitlines()]
    test = [json.loads(x) for x in (split / "test.jsonl").read_text().splitlines()]
    assert len(test) == 500 and len(train) == 500 and not {r["pmid"] for r in train} & {r["pmid"] for r in test}
    domain = OmegaConf.load(pubmedqa / "domain" / "pubmedqa.yaml")
    queries = load_queries(domain)
    assert len(queries) == 32  # rows [468, 500) of the 500-row pool file
    domain.pool_size = None
    pool, _ = load_pool(domain, seed=0)
    test_prompts = {user_message(r) for r in load_pool(OmegaConf.merge(domain, {"pool": [
        {"path": "medical/pubmedqa_split/test.jsonl", "format": "pubmedqa"}]}), seed=0)[0]}
    assert len(pool) == 500 and not {user_message(r) for r in pool + queries} & test_prompts


@pytest.mark.slow
def test_domain_guide_runs_every_stage(pubmedqa, cache, tmp_path, one_torch_thread) -> None:
    from instructdiff.pipeline import run

    cfg = _compose(pubmedqa, cache, tmp_path, "domain=pubmedqa", "selector=rds", "selector.n_queries=8",
                   "domain.pool_size=24", "eval=default", "eval.limit=8")
    assert list(cfg.eval.tasks) == ["id_pubmedqa_bpb"]
    results = run(cfg)
    sel = results["selection"]
    assert results["domain"] == "pubmedqa" and sel["n_queries_loaded"] == 8 and sel["n_queries_used"] >= 1
    for label in ("base", "trained"):
        bpb = results["eval"][label]["metrics"]["id_pubmedqa_bpb/bits_per_byte"]
        assert math.isfinite(bpb) and bpb > 0, (label, bpb)
    assert results["eval"]["trained"]["n_samples"]["id_pubmedqa_bpb"] == 8
    # the 24-row sample less the rows too long for max_length under the tiny tokenizer; 10% of what is left
    assert sum(sel["counts"].values()) == sel["n_pool"] and sel["counts"]["selected"] == int(0.1 * sel["n_pool"])
