"""Shared fixtures: real Hydra composition of conf/ with the tiny model and per-test output dirs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from instructdiff import CONF_DIR

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Small but real: enough optimiser steps that calibration changes the model (the first warmup step has LR 0).
TINY_OVERRIDES = [
    "model=tiny", "logger=none", "eval=none", "domain.pool_size=48",
    "trainer.epochs=2", "trainer.per_device_batch_size=2", "trainer.gradient_accumulation_steps=1",
    "trainer.learning_rate=3e-3", "trainer.progress_bar=false",
]


@pytest.fixture(scope="session")
def tiny_model_cache(tmp_path_factory) -> Path:
    """The tiny model built once per session; tests copy it into their own cache."""
    from instructdiff.models import resolve_model

    cache = tmp_path_factory.mktemp("tiny_cache")
    resolve_model(OmegaConf.load(CONF_DIR / "model" / "tiny.yaml"), cache)
    return cache


@pytest.fixture
def make_cfg(tmp_path, tiny_model_cache):
    """compose(config, tiny overrides + yours) with run/cache dirs inside tmp_path."""

    cache = tmp_path / "cache"
    if not cache.exists():
        shutil.copytree(tiny_model_cache / "models", cache / "models")

    def _make(*overrides: str, run_name: str = "run"):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose("config", overrides=[
                *TINY_OVERRIDES, f"paths.output_root={tmp_path / 'outputs'}", f"paths.cache_dir={cache}",
                f"paths.run_dir={tmp_path / run_name}", *overrides])

    return _make


@pytest.fixture
def tiny_inputs(tiny_model_cache):
    """SignalInputs of the tiny model over six short rows r0..r5 (the signal tests' shared input)."""
    import torch

    from instructdiff.models import load_model, load_tokenizer, resolve_model
    from instructdiff.render import Renderer
    from instructdiff.rows import Row
    from instructdiff.signals import SignalInputs

    ref = resolve_model(OmegaConf.load(CONF_DIR / "model" / "tiny.yaml"), tiny_model_cache)
    model, tok = load_model(ref, device="cpu"), load_tokenizer(ref)
    renderer = Renderer(tok)
    rows = [Row(f"r{k}", f"What is {k} plus {3 * k}?", "", f"It is {4 * k}." * (1 + k % 3)) for k in range(6)]
    return SignalInputs(model, tok, renderer, rows, [renderer(r) for r in rows], torch.device("cpu"), 0)


@pytest.fixture
def one_torch_thread():
    """The test machine has 2 shared cores: two OpenMP threads contending with other jobs make the tiny model's
    millisecond-sized ops ~40x slower. One thread keeps these tests in seconds; restored afterwards."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
