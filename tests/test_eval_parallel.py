"""Evaluation data-parallel on a 2-process gloo group: lm-eval's own split (``make_lm`` reports the joined group),
the same metrics as one process, each rank running about half of the items, the cache entry published by rank 0
with the group's token count, and every rank holding rank 0's result."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from instructdiff import CONF_DIR
from instructdiff.evaluate import _splits, cached_evaluation, eval_settings
from instructdiff.models import ModelRef, resolve_model

# id_gsm8k_bpb: 6 items (3 per rank); id_gsm8k: 2 generations (1 per rank) in SPLIT, 1 in ALONE (fewer items
# than ranks: rank 0 generates it alone). batch_size 1: no padding, so the group's forward calls and token
# positions add up to exactly one process's.
BASE = {"tasks": ["id_gsm8k_bpb", "id_gsm8k"], "limit": 6, "max_gen_toks": 4, "batch_size": 1,
        "apply_chat_template": "auto", "allow_code_execution": False, "num_fewshot": None, "dtype": "float32",
        "seed": 0, "loglikelihood_only": False}
CONFIGS = {"split": {**BASE, "generation_limit": 2}, "alone": {**BASE, "generation_limit": 1}}
# At batch size 1 every item's log-likelihood is computed alone, so only the order of the aggregating sums
# differs: measured 2026-12-06, |Δ| = 0 on every metric. Batching pads each rank's batches differently: at
# batch_size=4 over 40 items, |Δ| 2.6e-8 on bits per byte and 5.3e-6 on a mean log-likelihood of -984 (5e-9 relative).
TOL = 1e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _evaluate_all(ref: ModelRef, cache: Path) -> dict:
    """cached_evaluation of every config with a real stage runner; this process's forward calls for each."""
    from instructdiff.cost import count_forward_tokens
    from instructdiff.stages import StageRunner

    runner = StageRunner(["eval"], say=lambda _: None)
    seen = {}
    for name, cfg in CONFIGS.items():
        with count_forward_tokens() as counter:
            result = cached_evaluation(runner, cache, ref, name, cfg, device="cpu")
        seen[name] = {"result": result, "calls": counter.calls, "tokens": counter.tokens}
    return seen


def eval_worker(rank: int, world: int, port: int, ref: ModelRef, cache: str, out: str) -> None:
    """One rank of the group (a target of torch.multiprocessing.spawn); what it saw goes to out/rank<r>.json."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "INSTRUCTDIFF_DIST_TIMEOUT_MIN": "2",
                       "TMPDIR": str(Path(out) / f"tmp{rank}")})
    (Path(out) / f"tmp{rank}").mkdir()
    import tempfile

    tempfile.tempdir = None  # read TMPDIR again: rank 1 renders its task files there
    import torch

    torch.set_num_threads(1)
    from instructdiff import distributed

    distributed.init()
    seen = _evaluate_all(ref, Path(cache))
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(seen))
    distributed.destroy()


@pytest.fixture(scope="module")
def tiny_ref(tmp_path_factory) -> ModelRef:
    return resolve_model(OmegaConf.load(CONF_DIR / "model" / "tiny.yaml"), tmp_path_factory.mktemp("tiny"))


@pytest.mark.slow  # 42 s on the 2-core machine under load: one process, then two spawned ranks, two configs each
def test_two_gloo_processes_evaluate_half_each_and_match_one_process(tiny_ref, tmp_path, one_torch_thread):
    one = _evaluate_all(tiny_ref, tmp_path / "one_cache")

    sys.path.insert(0, str(Path(__file__).parent))  # the spawned ranks import this module by name
    mp.spawn(eval_worker, args=(2, _free_port(), tiny_ref, str(tmp_path / "two_cache"), str(tmp_path)),
             nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))

    for name in CONFIGS:
        a, b0, b1 = one[name], r0[name], r1[name]
        assert b0["result"] == b1["result"], "every rank holds rank 0's result"
        m1, m2 = a["result"]["metrics"], b0["result"]["metrics"]
        assert set(m1) == set(m2) == {"id_gsm8k_bpb/bits_per_byte", "id_gsm8k_bpb/loglikelihood",
                                      "id_gsm8k/exact_match", "id_gsm8k/strict_match"}
        for k, v in m1.items():
            assert m2[k] == pytest.approx(v, abs=TOL, rel=TOL), (name, k)
        assert b0["result"]["n_samples"] == a["result"]["n_samples"] == {
            "id_gsm8k_bpb": 6, "id_gsm8k": CONFIGS[name]["generation_limit"]}
        # the items were split, not repeated: the group ran one process's forward calls between its ranks
        assert b0["calls"] + b1["calls"] == a["calls"], name

    # split: each rank ran half the items (3 log-likelihoods and 1 generation of 4 tokens each)
    assert r0["split"]["calls"] == r1["split"]["calls"] == one["split"]["calls"] // 2
    # alone: the log-likelihoods split, the single generation on rank 0 only
    gen_calls = one["alone"]["calls"] - 6  # one process: 6 log-likelihood calls, then the generation's steps
    assert r1["alone"]["calls"] == 3 and r0["alone"]["calls"] == 3 + gen_calls

    # rank 0 published each entry once, with the whole group's token count; rank 1 wrote nothing there
    for name in CONFIGS:
        [entry] = [p for p in (tmp_path / "two_cache" / "eval").iterdir()
                   if p.is_dir() and json.loads((p / "eval_results.json").read_text())["settings"]["generation_limit"]
                   == CONFIGS[name]["generation_limit"]]
        [entry_one] = [p for p in (tmp_path / "one_cache" / "eval").iterdir() if p.name == entry.name]
        cost, cost_one = (json.loads((e / "eval_cost.json").read_text()) for e in (entry, entry_one))
        assert cost["tokens"] == cost_one["tokens"] == one[name]["tokens"]
        assert cost["calls"] == cost_one["calls"]
        assert sorted(p.name for p in entry.iterdir()) == ["eval_cost.json", "eval_results.json", "tasks"]
    assert not list((tmp_path / "tmp1").iterdir()), "rank 1's scratch task files were left behind"


def test_a_group_splits_only_what_every_rank_has_a_share_of() -> None:
    settings = eval_settings(BASE)
    assert _splits(6, settings, 2) and _splits(None, settings, 8)
    assert not _splits(1, settings, 2)  # rank 1 would get no item: lm-eval fails on an empty task
    assert not _splits(6, settings, 1)
    assert not _splits(6, {**settings, "num_fewshot": 2}, 2)  # few-shot draws depend on each rank's item order
