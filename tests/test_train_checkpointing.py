"""Activation (gradient) checkpointing, on by default since issue 16, saves memory without changing the weights.

The trained-model cache key treats both settings as one (pipeline.trainer_cache_key); this is the measurement
that allows it: on CPU the weights after training are bit-identical with and without recomputation, for a full
fine-tune and for LoRA. A hook count proves the recomputation really ran (the first layer's query projection runs twice).
"""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file

from instructdiff import CONF_DIR
from instructdiff import train as train_module
from instructdiff.data import load_pool
from instructdiff.models import resolve_model
from instructdiff.pipeline import trainer_cache_key


def _train(tmp_path, tiny_model_cache, trainer: str, checkpointing: bool, monkeypatch) -> tuple[dict, int, dict]:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["model=tiny", f"trainer={trainer}", "trainer.max_steps=2",
                                           f"trainer.gradient_checkpointing={str(checkpointing).lower()}",
                                           "trainer.progress_bar=false"])
    rows, _ = load_pool(cfg.domain, 0)
    base = resolve_model(cfg.model, tiny_model_cache)
    layer_forwards = [0]
    real_load = train_module.load_model

    def load_and_count(*args, **kwargs):  # the real model; a hook only counts forwards of the first projection
        model = real_load(*args, **kwargs)
        # q_proj, not the layer: transformers checkpoints the layer's forward (its hooks run once), and the
        # recompute stops once the last saved tensor is back, inside the MLP, before the MLP's hooks run
        model.model.layers[0].self_attn.q_proj.register_forward_hook(
            lambda *_: layer_forwards.__setitem__(0, layer_forwards[0] + 1))
        return model

    monkeypatch.setattr(train_module, "load_model", load_and_count)
    out = tmp_path / f"{trainer}-{checkpointing}"
    render_cfg = {"template": cfg.render.template, "system_prompt": None, "max_length": cfg.domain.get("max_length")}
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    train_module.train_sft(base, rows[:16], trainer_cfg, render_cfg, out, seed=0)
    return load_file(str(out / "model.safetensors")), layer_forwards[0], trainer_cfg


@pytest.mark.parametrize("trainer", ["sft_full", "sft_lora"])
def test_checkpointing_gives_bit_identical_weights(tmp_path, tiny_model_cache, trainer, monkeypatch,
                                                    one_torch_thread):
    kept, forwards_kept, cfg_kept = _train(tmp_path, tiny_model_cache, trainer, False, monkeypatch)
    recomputed, forwards_recomputed, cfg_recomputed = _train(tmp_path, tiny_model_cache, trainer, True,
                                                             monkeypatch)
    # 2 steps x 2 micro-batches: 4 forwards of the layer, and 4 more when the backward recomputes them
    assert forwards_kept == 4
    assert forwards_recomputed == 8
    assert kept.keys() == recomputed.keys()
    differing = [name for name in kept if not kept[name].equal(recomputed[name])]
    assert not differing, differing
    assert trainer_cache_key(cfg_kept) == trainer_cache_key(cfg_recomputed)
