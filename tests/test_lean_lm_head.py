"""TRL's LM-head fold run a few rows at a time (instructdiff/lean_lm_head.py) gives bit-identical results."""

from __future__ import annotations

import pytest
import torch

kernel = pytest.importorskip("trl.kernels.chunked_logprob")

from instructdiff.lean_lm_head import _PATCHED_MARK, _ROW_ARGS, fold_in_row_blocks, row_blocked  # noqa: E402


def _unpatched(name):
    fold = getattr(kernel, name)
    return getattr(fold, _PATCHED_MARK, fold)


def _problem(n, vocab_start, n_cols, seed):
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(n, 96, generator=g) * 4  # a wide tile, of which the fold sees a strided column window
    tile = full[:, 10:10 + n_cols]
    targets = torch.randint(0, vocab_start + n_cols + 20, (n,), generator=g)
    return full, tile, targets


@pytest.mark.parametrize("n,block", [(200, 64), (130, 7), (5, 64)])
@pytest.mark.parametrize("vocab_start", [0, 40])
def test_forward_fold_is_bit_identical(n, block, vocab_start):
    fold = _unpatched("_forward_tile")
    results = []
    for f in (fold, row_blocked(fold, _ROW_ARGS["_forward_tile"], block)):
        full, tile, targets = _problem(n, vocab_start, 80, seed=n)
        # a running state from an earlier vocabulary chunk, as the caller carries it
        state = [torch.randn(n, generator=torch.Generator().manual_seed(1)) for _ in range(7)]
        state[0] = state[0] + 3
        state[5] = torch.full((n,), float("-inf"))
        f(tile, tile.stride(0), targets, *state, vocab_start, 80, logit_scale=1.0, softcap=1.0, inv_t=1.0,
          HAS_SOFTCAP=False, HAS_ENTROPY=True, HAS_LOG_SUM_SQ_PROBS=True, HAS_MEAN_LOGITS=True, HAS_IS_TOP1=True,
          BLOCK_SIZE=1024)
        results.append(state)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(results[0][1], torch.randn(n, generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("n,block", [(200, 64), (130, 7)])
@pytest.mark.parametrize("softcap", [False, True])
def test_backward_fold_is_bit_identical(n, block, softcap):
    fold = _unpatched("_backward_tile")
    tiles = []
    for f in (fold, row_blocked(fold, _ROW_ARGS["_backward_tile"], block)):
        full, tile, targets = _problem(n, 40, 80, seed=n + 1)
        g = torch.Generator().manual_seed(2)
        log_z, entropy, grad_lp, grad_ent = (torch.randn(n, generator=g) for _ in range(4))
        f(tile, tile.stride(0), targets, log_z + 5, entropy.abs(), grad_lp, grad_ent, 40, 80,
          logit_scale=0.5, softcap=30.0, inv_t=1 / 0.7, HAS_SOFTCAP=softcap, HAS_LOGPROB_GRAD=True,
          HAS_ENTROPY_GRAD=True, BLOCK_SIZE=1024)
        tiles.append(full)
    assert torch.equal(tiles[0], tiles[1])
    # the fold did write its gradient into the tile's window, and only there
    _, before, _ = _problem(n, 40, 80, seed=n + 1)
    assert not torch.equal(tiles[0][:, 10:90], before)
    assert torch.equal(tiles[0][:, :10], _problem(n, 40, 80, seed=n + 1)[0][:, :10])


def test_patch_never_wraps_a_wrapper():
    assert fold_in_row_blocks()
    original = getattr(kernel._forward_tile, _PATCHED_MARK)
    assert getattr(original, _PATCHED_MARK, None) is None
    assert fold_in_row_blocks(16)
    assert getattr(kernel._forward_tile, _PATCHED_MARK) is original


def test_fused_loss_and_gradients_unchanged_through_trl():
    """The whole TRL chunked log-prob function (forward and backward) gives the same bits with the patch."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(150, 32, generator=g)
    weight = torch.randn(300, 32, generator=g)
    targets = torch.randint(0, 300, (150,), generator=g)
    outs = []
    for patched in (False, True):
        saved = {name: getattr(kernel, name) for name in _ROW_ARGS}
        try:
            if patched:
                for name, row_args in _ROW_ARGS.items():
                    setattr(kernel, name, row_blocked(_unpatched(name), row_args, block=16))
            else:
                for name in _ROW_ARGS:
                    setattr(kernel, name, _unpatched(name))
            h = hidden.clone().requires_grad_()
            w = weight.clone().requires_grad_()
            logprobs, entropy, *_ = kernel.ChunkedLogProbFunction.apply(h, w, None, targets, 1.0, 128)
            logprobs.sum().backward()
            outs.append((logprobs.detach(), entropy.detach(), h.grad, w.grad))
        finally:
            for name, fold in saved.items():
                setattr(kernel, name, fold)
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)


def test_none_restores_trl_folds():
    try:
        assert fold_in_row_blocks(None) is False
        assert getattr(kernel._forward_tile, _PATCHED_MARK, None) is None
        assert getattr(kernel._backward_tile, _PATCHED_MARK, None) is None
        assert fold_in_row_blocks(8)
        assert getattr(kernel._backward_tile, _PATCHED_MARK) is _unpatched("_backward_tile")
    finally:
        fold_in_row_blocks()


@pytest.mark.parametrize("bad", ["64", -1, 2.5, True])
def test_bad_row_counts_are_refused_by_name(bad):
    with pytest.raises(ValueError, match="trainer.lm_head_fold_rows"):
        fold_in_row_blocks(bad)


def test_training_gives_bit_identical_weights_and_one_cache_key(tmp_path, tiny_model_cache, one_torch_thread,
                                                                 monkeypatch):
    """A real TRL SFT of the tiny model, with TRL's whole-tile fold and with 3-row blocks: the same weights, and the
    trained-model cache key ignores the setting. The wrapper counts its calls, so the blocked path did run."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    from instructdiff import CONF_DIR, lean_lm_head
    from instructdiff.data import load_pool
    from instructdiff.models import resolve_model
    from instructdiff.pipeline import trainer_cache_key
    from instructdiff.train import train_sft

    calls = [0]
    real_row_blocked = lean_lm_head.row_blocked

    def counting_row_blocked(fold, row_args, block=lean_lm_head.ROW_BLOCK):
        blocked = real_row_blocked(fold, row_args, block)

        def count(*args, **kwargs):
            calls[0] += 1
            return blocked(*args, **kwargs)
        setattr(count, _PATCHED_MARK, fold)
        return count

    monkeypatch.setattr(lean_lm_head, "row_blocked", counting_row_blocked)
    weights, keys = {}, {}
    try:
        for rows in ("null", "3"):
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                cfg = compose("config", overrides=["model=tiny", "trainer.max_steps=2", "trainer.progress_bar=false",
                                                   f"trainer.lm_head_fold_rows={rows}"])
            pool, _ = load_pool(cfg.domain, 0)
            base = resolve_model(cfg.model, tiny_model_cache)
            trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
            render_cfg = {"template": cfg.render.template, "system_prompt": None,
                          "max_length": cfg.domain.get("max_length")}
            train_sft(base, pool[:16], trainer_cfg, render_cfg, tmp_path / rows, seed=0)
            weights[rows] = load_file(str(tmp_path / rows / "model.safetensors"))
            keys[rows] = trainer_cache_key(trainer_cfg)
    finally:
        fold_in_row_blocks()
    assert calls[0] > 0
    differing = [name for name in weights["null"] if not weights["null"][name].equal(weights["3"][name])]
    assert not differing, differing
    assert keys["null"] == keys["3"]
