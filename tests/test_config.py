"""Every config group option composes, every _target_ resolves, the YAMLs document their knobs."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from instructdiff import CONF_DIR
from instructdiff.selection import Selector

GROUPS = ["domain", "model", "selector", "trainer", "eval", "logger", "paths", "pipeline"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _targets(node, path=""):
    if OmegaConf.is_dict(node):
        for k, v in node.items():
            if k == "_target_":
                yield path, v
            else:
                yield from _targets(v, f"{path}.{k}")
    elif OmegaConf.is_list(node):
        for i, v in enumerate(node):
            yield from _targets(v, f"{path}[{i}]")


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_option_composes_and_resolves(group: str, option: str) -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"{group}={option}"])
    OmegaConf.resolve(cfg)  # every interpolation resolves
    for where, target in _targets(cfg):
        obj = target.rsplit(".", 1)
        assert len(obj) == 2, f"{where}: _target_ {target!r} is not a dotted path"
        get_class(target)  # raises if the module or class does not exist


@pytest.mark.parametrize("option", _options("selector"))
def test_every_selector_instantiates(option: str) -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"selector={option}"])
    selector = instantiate(cfg.selector, _convert_="all")
    assert isinstance(selector, Selector)


def test_experiment_presets_compose() -> None:
    presets = _options("experiment")
    assert presets, "conf/experiment/ should hold at least the smoke preset"
    for option in presets:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=[f"experiment={option}"])
        OmegaConf.resolve(cfg)


@pytest.mark.parametrize("path", sorted(p.relative_to(CONF_DIR).as_posix() for p in CONF_DIR.rglob("*.yaml")))
def test_every_yaml_starts_with_a_comment(path: str) -> None:
    """Each config starts with the command that uses it (torchtune's convention)."""
    first = (CONF_DIR / path).read_text().lstrip().splitlines()[0]
    assert first.startswith("#"), f"{path} should start with a comment naming the command that uses it"


def test_lora_trainer_inherits_full_recipe() -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        lora = compose("config", overrides=["trainer=sft_lora"]).trainer
        full = compose("config", overrides=["trainer=sft_full"]).trainer
    assert lora.method == "lora" and full.method == "full"
    assert lora.epochs == full.epochs and lora.lora.r > 0


def test_default_is_instructdiff_on_embedded_model() -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config")
    assert cfg.model.name == "smollm2_135m" and cfg.model.trust_remote_code is False
    assert cfg.selector._target_.endswith("InstructDiffSelector")
    assert list(cfg.pipeline.stages) == ["calibrate", "score", "select", "train", "eval"]


@pytest.mark.parametrize("preset", ["smoke", "smoke_sweep", "paper_table", "warmup_ratio", "data_fraction"])
@pytest.mark.parametrize("profile", [[], ["+profile=cpu"]])
def test_presets_compose_and_build_every_selector(preset, profile):
    """`instructdiff experiment=<preset> selector=X` builds selector X for every X: a preset that set a key only
    one selector has (smoke's selector.warmup_ratio did) broke every other selector with a TypeError."""
    from hydra.utils import instantiate

    from instructdiff.selection import Selector

    for name in sorted(p.stem for p in (CONF_DIR / "selector").glob("*.yaml")):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=[f"experiment={preset}", *profile, f"selector={name}"])
        assert isinstance(instantiate(cfg.selector, _convert_="all"), Selector), name
        if profile:
            assert cfg.domain.pool_size == 200 and cfg.eval.limit >= 500 and cfg.eval.loglikelihood_only
