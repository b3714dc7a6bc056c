"""Memory at scale (issue 15): the rendered pool packs its token ids, the scoring pass holds its output and an
integer batch plan per row, and neither changes a token, a batch or a cache key."""

from __future__ import annotations

import copy
import pickle
import random
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import instructdiff.score_store as score_store
import instructdiff.scoring as scoring
from instructdiff.render import Rendered
from instructdiff.rows import stable_hash
from instructdiff.score_store import ScoreStore, rows_hash
from instructdiff.scoring import RESPONSE_SIGNALS, length_batches, length_order

# characters that order differently as bytes, as UTF-16 or with NUL padding if an implementation gets it wrong
ALPHABET = ["a", "b", "ab", "\x00", "\x7f", "\x80", "é", "\uffff", "\ud800", "\udfff", "\U0001f600", "z"]


def random_items(rng: random.Random, n: int) -> list[Rendered]:
    items = []
    for _ in range(n):
        i = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 4)))
        items.append(Rendered(i, [7] * rng.randint(1, 3), [9] * rng.randint(0, 3)))
    return items


def sorted_greedy_plan(items: list[Rendered], max_tokens: int, max_batch: int) -> list[list[int]]:
    """The batch plan as it was written before issue 15 (a Python sort by (length, id), then greedy): the spec."""
    order = sorted(range(len(items)), key=lambda k: (items[k].n_tokens, items[k].id))
    batches, batch, longest = [], [], 0
    for k in order:
        n = items[k].n_tokens
        if batch and (max(longest, n) * (len(batch) + 1) > max_tokens or len(batch) >= max_batch):
            batches.append(batch)
            batch, longest = [], 0
        batch.append(k)
        longest = max(longest, n)
    return batches + ([batch] if batch else [])


def test_length_order_is_pythons_sort_by_length_then_id() -> None:
    """Ties in length fall to the ids, ordered as Python orders str: by code point (non-ASCII, astral and lone
    surrogate characters), a prefix first, and ids that differ only by trailing NULs apart; equal keys keep
    pool order."""
    rng = random.Random(0)
    for _ in range(300):
        items = random_items(rng, rng.randint(0, 60))
        expected = sorted(range(len(items)), key=lambda k: (items[k].n_tokens, items[k].id))
        assert length_order(items).tolist() == expected


def test_length_batches_are_the_plan_of_the_python_sort(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same batches, index for index, across windows of the plan (3 rows a window here)."""
    monkeypatch.setattr(scoring, "_PLAN_WINDOW", 3)
    rng = random.Random(1)
    for _ in range(100):
        items = random_items(rng, rng.randint(0, 40))
        max_tokens, max_batch = rng.randint(1, 20), rng.randint(1, 6)
        assert list(length_batches(items, max_tokens, max_batch)) == sorted_greedy_plan(items, max_tokens, max_batch)


@pytest.mark.parametrize("window", [1, 3, 1 << 14])
def test_rows_hash_is_the_stable_hash_of_the_whole_list(monkeypatch: pytest.MonkeyPatch, window: int) -> None:
    """Streaming the key's JSON text window by window gives the digest of the list serialised at once, so every
    score table cached before keeps its key."""
    monkeypatch.setattr(score_store, "_HASH_WINDOW", window)
    items = random_items(random.Random(2), 10) + [Rendered('q"\\uote', [1, 2], [3]), Rendered("ü", [1], [])]
    for rows in (items, items[:1], []):
        assert rows_hash(rows) == stable_hash([(r.id, len(r.prompt_ids), len(r.completion_ids)) for r in rows])
    assert rows_hash(items) != rows_hash(items[::-1])


def test_rendered_keeps_its_ids_packed_and_gives_lists_back() -> None:
    r = Rendered("x", [5, 2**31 - 1, 0], [-3, 8, 2], n_end=1)
    assert r.prompt_ids == [5, 2**31 - 1, 0] and r.completion_ids == [-3, 8, 2] and r.token_ids == r.prompt_ids + [-3, 8, 2]
    assert type(r.prompt_ids[0]) is int and (r.n_prompt, r.n_completion, r.n_tokens) == (3, 3, 6)
    assert len(r._packed) == 4 * r.n_tokens  # 4 bytes a token
    scored = r.for_scoring("exclude")
    assert scored.completion_ids == [-3, 8] and scored.n_end == 0 and scored.prompt_ids == r.prompt_ids
    assert scored._packed is r._packed  # the cut shares the buffer
    assert r.for_scoring("include") is r
    assert scored == Rendered("x", [5, 2**31 - 1, 0], [-3, 8]) and scored != r
    assert hash(scored) == hash(Rendered("x", [5, 2**31 - 1, 0], [-3, 8]))
    for twin in (pickle.loads(pickle.dumps(scored)), copy.deepcopy(scored), copy.copy(r)):
        assert twin == (scored if twin.n_end == 0 and twin.n_completion == 2 else r)
    assert "completion_ids=[-3, 8]" in repr(scored)
    with pytest.raises(AttributeError, match="immutable"):
        r.n_end = 0
    with pytest.raises(ValueError, match="row y: token ids"):
        Rendered("y", [1], [2**40])
    with pytest.raises(ValueError, match="row z: token ids"):
        Rendered("z", [1.5], [2])
    assert Rendered("n", np.array([1, 2]), (3,)).token_ids == [1, 2, 3]


def test_a_rendered_pool_holds_about_its_packed_tokens() -> None:
    """10,000 rows of 40 tokens: the rows' objects and buffers, not 36 bytes a token (~1.5 kB a row as lists)."""
    tokens = list(range(1000, 1040))
    ids = [f"r{k:06d}" for k in range(10_000)]  # made before, like the pool's rows that hold them
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        pool = [Rendered(i, tokens[:30], tokens[30:]) for i in ids]
        per_row = (tracemalloc.get_traced_memory()[0] - before) / len(pool)
    finally:
        tracemalloc.stop()
    assert 4 * 40 < per_row < 4 * 40 + 150, per_row


def tiny_model() -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=40, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                         tie_word_embeddings=False, pad_token_id=0)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def traced_growth_per_row(root: Path, n: int, model: LlamaForCausalLM) -> float:
    """Bytes of Python and numpy memory the cached scoring pass holds at its peak, a row, over its inputs."""
    items = [Rendered(f"r{k:07d}", [1 + k % 7, 2], [3 + k % 5]) for k in range(n)]
    settings = {"max_tokens_per_batch": 4096, "max_batch_size": 1024, "pad_id": 0, "checkpoint_every": 2}
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        table = ScoreStore(root).response_stats(lambda: model, "m", items, "r", settings)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(table.ids) == n and np.isfinite(table.values["nll"]).all()
    return (peak - start) / n


def test_the_scoring_pass_holds_its_output_and_a_plan_per_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pass's peak over its inputs, a row, between 4,000 and 16,000 rows: the table (4 float64 = 32 B), the
    id list it returns (8 B), the ids column it writes (8 characters = 32 B), the plan (8 B) and a mask; torch's
    batch tensors are not traced (they are one batch's). Before issue 15 it was ~330 B a row. The windows the key
    hash and the plan work in are a constant (4,096 rows), made smaller than these pools so they stay one."""
    monkeypatch.setattr(score_store, "_HASH_WINDOW", 64)
    monkeypatch.setattr(scoring, "_PLAN_WINDOW", 64)
    model = tiny_model()
    small = traced_growth_per_row(tmp_path / "a", 4000, model)
    large = traced_growth_per_row(tmp_path / "b", 16000, model)
    slope = (large * 16000 - small * 4000) / 12000
    assert slope < 32 + 8 + 32 + 8 + 40, (small, large, slope)


def test_a_checkpoint_serves_only_the_rows_it_was_written_for(tmp_path: Path) -> None:
    """A checkpoint holds values by position, no ids: keyed by the rows' ids and lengths, another list of rows
    (a shard of another world size, say) under the same table key starts afresh instead of taking its values."""
    model = tiny_model()
    store = ScoreStore(tmp_path)
    a = [Rendered(f"a{k}", [1, 2], [3 + k]) for k in range(6)]
    b = [Rendered(f"b{k}", [1, 2], [3 + k]) for k in range(6)]
    fingerprint = {"table": "t"}
    path = tmp_path / "t.npz"
    settings = {"max_tokens_per_batch": 100, "max_batch_size": 2, "pad_id": 0, "checkpoint_every": 1}

    state = {"passes": 0, "kill_after": 2}

    def hook(module, args):
        state["passes"] += 1
        if state["passes"] > state["kill_after"]:
            raise RuntimeError("killed")

    handle = model.get_input_embeddings().register_forward_pre_hook(hook)
    try:
        with pytest.raises(RuntimeError, match="killed"):
            store._compute(model, a, settings, path, fingerprint, "a")
        partial = tmp_path / "t.partial.npz"
        with np.load(partial) as z:
            assert int(z["filled"].sum()) == 4 and sorted(z.files) == sorted(["__cache__", "filled", *RESPONSE_SIGNALS])

        state.update(passes=0, kill_after=10**6)
        table_b = store._compute(model, b, settings, path, fingerprint, "b")
        assert state["passes"] == 3  # all six rows, in batches of two: nothing taken from a's checkpoint
        assert table_b.ids == [r.id for r in b] and not partial.exists()

        # and the rows it was written for do resume from it
        with pytest.raises(RuntimeError, match="killed"):
            state.update(passes=0, kill_after=2)
            store._compute(model, a, settings, path, fingerprint, "a")
        state.update(passes=0, kill_after=10**6)
        store._compute(model, a, settings, path, fingerprint, "a")
        assert state["passes"] == 1
    finally:
        handle.remove()
