"""Scoring: response-token NLL/entropy against a by-hand fp64 reference, batching, the cached ScoreStore."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from instructdiff.render import Rendered
from instructdiff.scoring import RESPONSE_SIGNALS, ScoreStore, ScoreTable, length_batches, score_batch

VOCAB = 50
# (prompt length P, completion length T): mixed, including P=1 and T=1 edge cases.
SHAPES = [(1, 4), (3, 1), (5, 7), (2, 9), (7, 3), (4, 4), (6, 2), (3, 8), (1, 1), (8, 5)]


def make_model(seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         initializer_range=0.3,  # peaked, non-uniform next-token distributions
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.eval()
    return model


def make_items(shapes: list[tuple[int, int]] = SHAPES, seed: int = 1) -> list[Rendered]:
    rng = np.random.default_rng(seed)
    items = []
    for k, (p, t) in enumerate(shapes):
        ids = rng.integers(1, VOCAB, size=p + t).tolist()
        items.append(Rendered(f"s{k:02d}", ids[:p], ids[p:]))
    return items


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return make_model()


@pytest.fixture(scope="module")
def items() -> list[Rendered]:
    return make_items()


@torch.no_grad()
def reference(model: LlamaForCausalLM, r: Rendered) -> tuple[float, float, int, float]:
    """One unbatched, unpadded forward of the full model; logits[P-1 .. P+T-2] vs labels ids[P .. P+T-1]."""
    ids = r.prompt_ids + r.completion_ids
    p, t = len(r.prompt_ids), len(r.completion_ids)
    logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits[p - 1 : p + t - 1], dim=-1)
    labels = torch.tensor(ids[p : p + t])
    nll = -logp[torch.arange(t), labels].mean().item()
    token_ent = -(logp.exp() * logp).sum(-1)
    return nll, token_ent.mean().item(), t, token_ent[0].item()


def ref_matrix(model: LlamaForCausalLM, items: list[Rendered]) -> np.ndarray:
    return np.array([reference(model, r) for r in items], dtype=np.float64)


@pytest.fixture(scope="module")
def ref(model: LlamaForCausalLM, items: list[Rendered]) -> np.ndarray:
    return ref_matrix(model, items)


def test_reference_is_not_degenerate(ref: np.ndarray) -> None:
    # Entropies well below log(V) and varying across samples: a constant/uniform stub cannot match.
    assert ref[:, 1].max() < np.log(VOCAB) - 0.2
    assert ref[:, 0].std() > 0.05 and ref[:, 1].std() > 0.05


@pytest.mark.parametrize("chunk", [1024, 3])
def test_score_batch_matches_unbatched_reference(model: LlamaForCausalLM, items: list[Rendered], ref: np.ndarray,
                                                 chunk: int) -> None:
    out = score_batch(model, items, pad_id=0, chunk_positions=chunk)
    assert out.shape == (len(items), 4)
    np.testing.assert_allclose(out[:, 0], ref[:, 0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(out[:, 1], ref[:, 1], atol=1e-5, rtol=0)
    assert out[:, 2].tolist() == [len(r.completion_ids) for r in items]
    np.testing.assert_allclose(out[:, 3], ref[:, 3], atol=1e-5, rtol=0)  # entropy at the first response token


def test_score_batch_independent_of_padding_and_batch_mates(model: LlamaForCausalLM,
                                                            items: list[Rendered]) -> None:
    together = score_batch(model, items, pad_id=0)
    other_pad = score_batch(model, items, pad_id=VOCAB - 1)
    reversed_ = score_batch(model, items[::-1], pad_id=0)[::-1]
    alone = np.stack([score_batch(model, [r], pad_id=0)[0] for r in items])
    for other in (other_pad, reversed_, alone):
        np.testing.assert_allclose(together, other, atol=1e-5, rtol=0)


def test_score_batch_scores_only_the_completion(model: LlamaForCausalLM) -> None:
    # Same completion, different prompts -> different scores; changing a prompt token changes the scores.
    a = Rendered("a", [5, 6, 7], [8, 9, 10, 11])
    b = Rendered("b", [5, 6, 12], [8, 9, 10, 11])
    out = score_batch(model, [a, b], pad_id=0)
    assert abs(out[0, 0] - out[1, 0]) > 1e-4
    # Moving the boundary by one token changes what is scored (T and the values).
    c = Rendered("c", [5, 6, 7, 8], [9, 10, 11])
    out_c = score_batch(model, [c], pad_id=0)[0]
    assert out_c[2] == 3 and abs(out_c[0] - out[0, 0]) > 1e-4
    np.testing.assert_allclose(out_c[:2], reference(model, c)[:2], atol=1e-5)


# ----------------------------------------------------------------------------------------------- length_batches


@pytest.mark.parametrize("max_tokens,max_batch", [(40, 64), (20, 3), (1000, 4), (15, 1), (16, 2)])
def test_length_batches_cover_and_respect_limits(items: list[Rendered], max_tokens: int, max_batch: int) -> None:
    batches = list(length_batches(items, max_tokens, max_batch))
    flat = [k for b in batches for k in b]
    assert sorted(flat) == list(range(len(items)))
    for b in batches:
        assert 1 <= len(b) <= max_batch
        assert max(items[k].n_tokens for k in b) * len(b) <= max_tokens


def test_length_batches_fill_greedily() -> None:
    same = make_items([(2, 3)] * 10)  # every item has 5 tokens
    assert [len(b) for b in length_batches(same, max_tokens=15, max_batch=100)] == [3, 3, 3, 1]
    assert [len(b) for b in length_batches(same, max_tokens=10_000, max_batch=4)] == [4, 4, 2]
    assert list(length_batches([], 100, 4)) == []


def test_length_batches_oversized_item_alone() -> None:
    mixed = make_items([(2, 2), (20, 20), (1, 2)])
    batches = list(length_batches(mixed, max_tokens=10, max_batch=8))
    assert sorted(k for b in batches for k in b) == [0, 1, 2]
    assert [1] in batches  # the 40-token item cannot share a batch


# ----------------------------------------------------------------------------------------------- ScoreStore

SETTINGS = {"max_tokens_per_batch": 1000, "max_batch_size": 2, "pad_id": 0, "checkpoint_every": 1}


class Loader:
    def __init__(self, model: LlamaForCausalLM) -> None:
        self.model = model
        self.calls = 0

    def __call__(self) -> LlamaForCausalLM:
        self.calls += 1
        return self.model


def forward_counter(model: LlamaForCausalLM, fail_after: int | None = None):
    """Counts forward passes (every scoring path embeds the input); raises on pass fail_after+1."""
    state = {"n": 0}

    def hook(module, args):
        state["n"] += 1
        if fail_after is not None and state["n"] > fail_after:
            raise RuntimeError("simulated kill")

    handle = model.get_input_embeddings().register_forward_pre_hook(hook)
    return state, handle


def test_store_miss_then_hit(tmp_path: Path, model: LlamaForCausalLM, items: list[Rendered],
                             ref: np.ndarray) -> None:
    store = ScoreStore(tmp_path)
    loader = Loader(model)
    t1 = store.response_stats(loader, "model-A", items, "render-1", SETTINGS)
    assert loader.calls == 1 and (store.hits, store.misses) == (0, 1)
    assert isinstance(t1, ScoreTable) and t1.ids == [r.id for r in items]
    for k, s in enumerate(RESPONSE_SIGNALS):
        np.testing.assert_allclose(t1.values[s], ref[:, k], atol=1e-5, rtol=0)
    assert t1.get("n_tokens") == {r.id: float(len(r.completion_ids)) for r in items}

    t2 = store.response_stats(loader, "model-A", items, "render-1", SETTINGS)
    assert loader.calls == 1 and (store.hits, store.misses) == (1, 1)
    assert t2.ids == t1.ids
    for s in RESPONSE_SIGNALS:
        assert np.array_equal(t2.values[s], t1.values[s])

    # A fresh store on the same root also hits (the table is on disk), still without loading the model.
    fresh = ScoreStore(tmp_path)
    t3 = fresh.response_stats(loader, "model-A", items, "render-1", SETTINGS)
    assert loader.calls == 1 and (fresh.hits, fresh.misses) == (1, 0)
    assert np.array_equal(t3.values["entropy"], t1.values["entropy"])


def test_store_key_depends_on_model_fingerprint(tmp_path: Path, model: LlamaForCausalLM,
                                                items: list[Rendered]) -> None:
    store = ScoreStore(tmp_path)
    other_model = make_model(seed=7)
    la, lb = Loader(model), Loader(other_model)
    ta = store.response_stats(la, "model-A", items, "render-1", SETTINGS)
    tb = store.response_stats(lb, "model-B", items, "render-1", SETTINGS)
    assert (la.calls, lb.calls) == (1, 1) and (store.hits, store.misses) == (0, 2)
    assert len([p for p in tmp_path.glob("*.npz") if ".partial" not in p.name]) == 2
    assert not np.allclose(ta.values["nll"], tb.values["nll"])
    np.testing.assert_allclose(tb.values["nll"], ref_matrix(other_model, items)[:, 0], atol=1e-5)
    assert store.key("model-A", "p", "r", "response_stats", {}) != store.key("model-B", "p", "r", "response_stats", {})


def test_store_resumes_after_kill(tmp_path: Path, items: list[Rendered]) -> None:
    clean = make_model()
    uninterrupted = ScoreStore(tmp_path / "clean").response_stats(Loader(clean), "m", items, "r", SETTINGS)

    root = tmp_path / "killed"
    dying = make_model()
    state, handle = forward_counter(dying, fail_after=2)
    with pytest.raises(RuntimeError, match="simulated kill"):
        ScoreStore(root).response_stats(Loader(dying), "m", items, "r", SETTINGS)
    handle.remove()
    assert state["n"] == 3
    partials = list(root.glob("*.partial.npz"))
    assert len(partials) == 1
    assert not [p for p in root.glob("*.npz") if ".partial" not in p.name]  # no finished table
    with np.load(partials[0]) as z:
        # two batches of two, checkpointed after each, in the full-length table (no per-row ids: issue 15)
        assert z["filled"].sum() == 4 and len(z["filled"]) == len(items) and "ids" not in z.files
        assert np.isfinite(z["nll"][z["filled"]]).all() and np.isnan(z["nll"][~z["filled"]]).all()

    working = make_model()
    state2, handle2 = forward_counter(working)
    store = ScoreStore(root)
    loader = Loader(working)
    resumed = store.response_stats(loader, "m", items, "r", SETTINGS)
    handle2.remove()
    assert loader.calls == 1 and store.misses == 1
    assert state2["n"] == 3  # only the 6 unscored samples were scored, in batches of two
    assert resumed.ids == uninterrupted.ids
    for s in RESPONSE_SIGNALS:
        np.testing.assert_allclose(resumed.values[s], uninterrupted.values[s], atol=1e-6, rtol=0)
    assert not list(root.glob("*.partial.npz"))
    assert not list(root.glob("*.tmp*"))
    # and the finished table now serves hits
    assert store.response_stats(loader, "m", items, "r", SETTINGS).ids == resumed.ids and loader.calls == 1


# ----------------------------------------------------------------------------------------------- ScoreTable


def test_score_table_aligned() -> None:
    table = ScoreTable(["a", "b", "c"], {"nll": np.array([1.0, 2.0, 3.0])})
    assert table.aligned("nll", ["c", "a"]).tolist() == [3.0, 1.0]
    with pytest.raises(KeyError):
        table.aligned("nll", ["a", "zzz"])


def test_bf16_scoring_agrees_with_fp32_within_tolerance(model: LlamaForCausalLM, items: list[Rendered],
                                                         ref: np.ndarray) -> None:
    """bf16 autocast of the body (LM head and softmax in fp32) stays within 0.05 nats of fp32 on this model;
    the ranking-level fidelity on SmolLM2 is measured by scripts/bench_scoring.py."""
    out = score_batch(model, items, pad_id=0, dtype="bf16")
    assert np.abs(out[:, 0] - ref[:, 0]).max() < 0.05
    assert np.abs(out[:, 1] - ref[:, 1]).max() < 0.05
    assert not np.allclose(out[:, :2], ref[:, :2], atol=1e-7, rtol=0)  # bf16 was really used
    with pytest.raises(ValueError, match="dtype"):
        score_batch(model, items, pad_id=0, dtype="fp8")


def test_per_token_arrays_average_to_the_sample_means(model: LlamaForCausalLM, items: list[Rendered]) -> None:
    means = score_batch(model, items, pad_id=0)
    per = score_batch(model, items, pad_id=0, per_token=True)
    for (nll, ent), row, r in zip(per, means, items, strict=True):
        assert len(nll) == len(ent) == len(r.completion_ids)
        assert nll.mean() == pytest.approx(row[0], abs=1e-5) and ent.mean() == pytest.approx(row[1], abs=1e-5)
        assert ent[0] == pytest.approx(row[3], abs=1e-6)


# ----------------------------------------------------------------------------------------------- blocked head


@pytest.mark.parametrize("vocab_block,chunk", [(7, 4), (50, 1024), (4096, 3), (1, 2)])
def test_blocked_head_equals_materialised_log_softmax(vocab_block: int, chunk: int) -> None:
    """The running (max, Z, S) over vocabulary tiles gives the log-softmax NLL and entropy in fp64, for tiles
    that do not divide the vocabulary, tiles of one token and one tile for all; with a bias and logits spread
    wide enough that the running max moves between tiles."""
    from instructdiff.scoring import head_nll_entropy

    torch.manual_seed(0)
    head = torch.nn.Linear(16, VOCAB, bias=True)
    hidden = 3.0 * torch.randn(11, 16)
    labels = torch.randint(0, VOCAB, (11,))
    nll, ent = head_nll_entropy(head, hidden, labels, chunk_positions=chunk, vocab_block=vocab_block)
    with torch.no_grad():
        logp = torch.log_softmax(head(hidden).double(), dim=-1)
    np.testing.assert_allclose(nll.numpy(), -logp[torch.arange(11), labels].numpy(), atol=2e-5, rtol=0)
    np.testing.assert_allclose(ent.numpy(), -(logp.exp() * logp).sum(-1).numpy(), atol=2e-5, rtol=0)
    assert ent.std() > 0.1  # the rows differ: a constant could not pass


def test_blocked_head_marks_non_finite_rows_nan() -> None:
    from instructdiff.scoring import head_nll_entropy

    head = torch.nn.Linear(8, VOCAB, bias=False)
    hidden = torch.randn(3, 8)
    hidden[1, 0] = float("nan")
    nll, ent = head_nll_entropy(head, hidden, torch.tensor([1, 2, 3]), vocab_block=16)
    assert torch.isnan(nll[1]) and torch.isnan(ent[1])
    assert torch.isfinite(nll[[0, 2]]).all() and torch.isfinite(ent[[0, 2]]).all()


def test_low_precision_weights_equal_autocast_and_restore_fp32(model: LlamaForCausalLM,
                                                                items: list[Rendered]) -> None:
    """Casting the body's Linear weights once gives the bf16-autocast numbers bit for bit; on exit every
    weight is the original fp32 tensor again (the same storage, so not even a rounding trip)."""
    from instructdiff.scoring import low_precision_weights

    before = {n: (p.dtype, p.data_ptr()) for n, p in model.named_parameters()}
    autocast_only = score_batch(model, items, pad_id=0, dtype="bf16")
    with low_precision_weights(model, "bf16"):
        dtypes = {n: p.dtype for n, p in model.named_parameters()}
        precast = score_batch(model, items, pad_id=0, dtype="bf16")
    assert dtypes["model.layers.0.mlp.down_proj.weight"] == torch.bfloat16
    assert dtypes["lm_head.weight"] == torch.float32 and dtypes["model.norm.weight"] == torch.float32
    np.testing.assert_array_equal(precast, autocast_only)
    assert {n: (p.dtype, p.data_ptr()) for n, p in model.named_parameters()} == before
    with low_precision_weights(model, "fp32"):
        assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.slow
def test_compiled_body_matches_eager_and_keeps_one_graph(model: LlamaForCausalLM, items: list[Rendered],
                                                         ref: np.ndarray) -> None:
    """score.compile: the torch.compile'd body gives the fp32 reference's numbers, and a batch of one row
    (padded to two inside score_batch) reuses the dynamic-shape graph instead of compiling a second one."""
    from torch._dynamo.utils import counters

    out = score_batch(model, items, pad_id=0, compile=True)
    np.testing.assert_allclose(out[:, :2], ref[:, :2], atol=1e-5, rtol=0)
    graphs = counters["stats"]["unique_graphs"]
    other_width = score_batch(model, items[2:6], pad_id=0, compile=True)
    single = score_batch(model, items[2:3], pad_id=0, compile=True)
    assert counters["stats"]["unique_graphs"] == graphs
    np.testing.assert_allclose(other_width[:, :2], ref[2:6, :2], atol=1e-5, rtol=0)
    np.testing.assert_allclose(single[0, :2], ref[2, :2], atol=1e-5, rtol=0)
    assert single[0, 2] == len(items[2].completion_ids)
