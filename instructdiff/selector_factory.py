"""Build the configured selector: check its keys, instantiate its ``_target_``, give it its one name.

A selector's name is the file name of its YAML in conf/selector/ (the Hydra choice: ``ifd``,
``superfiltering_d``); results.json, the report and W&B know it by that name. Outside a Hydra run (the
compose API of the tests and of ``instructdiff-report --verify``) there is no choice to read, so the name is
that of the one YAML with the same ``_target_``.

Recorded configs name selector classes by the import paths they had when the job ran; ``LEGACY_TARGETS``
maps the paths renamed since (issue 13: the plugins' import package became ``instructdiff_baselines``) to
today's, so such a config still instantiates (``instructdiff-report --verify --from-config``).
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from omegaconf import DictConfig, OmegaConf

from instructdiff import CONF_DIR
from instructdiff.selection import BudgetError, Selector

log = logging.getLogger("instructdiff")

#: old ``_target_`` prefix -> today's
LEGACY_TARGETS: dict[str, str] = {
    "instructdiff.selector.": "instructdiff_baselines.instructdiff_selector.",
    "baselines.": "instructdiff_baselines.",
}


def _imports(target: str) -> bool:
    module, _, attr = target.rpartition(".")
    try:
        return hasattr(importlib.import_module(module), attr)
    except ImportError:
        return False


def current_target(target: str) -> str:
    """``target``, or today's path of the class when it names one by an old path (``LEGACY_TARGETS``). The old
    path is not tried first: from a checkout's root ``baselines.ifd`` still imports, as a second copy of the
    module beside ``instructdiff_baselines.ifd``."""
    for old, new in LEGACY_TARGETS.items():
        if target.startswith(old) and _imports(new + target[len(old):]):
            log.warning("selector._target_ %s was renamed %s; using the new path", target, new + target[len(old):])
            return new + target[len(old):]
    return target


def yaml_name_of(target: str) -> str | None:
    """The conf/selector YAML whose ``_target_`` is ``target``, when exactly one is."""
    names = [p.stem for p in sorted((CONF_DIR / "selector").glob("*.yaml"))
             if OmegaConf.load(p).get("_target_") == target]
    return names[0] if len(names) == 1 else None


def hydra_choice() -> str | None:
    """The selector the running Hydra job chose (``selector=ifd``), or None outside a Hydra run."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.choices.get("selector") if HydraConfig.initialized() else None


def instantiate_selector(selector_cfg: DictConfig | dict[str, Any], name: str | None = None) -> Selector:
    """The selector of ``selector_cfg`` with ``.name`` set: ``name``, else the Hydra choice, else the YAML with
    the same ``_target_``, else its class name. Unknown keys and impossible budgets fail here, in a second,
    before any data or model work."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from instructdiff.config_check import check_selector_cfg

    keys = selector_cfg if isinstance(selector_cfg, dict) else OmegaConf.to_container(selector_cfg, resolve=False)
    recorded = str(keys.get("_target_"))
    target = current_target(recorded)
    name = name or hydra_choice() or yaml_name_of(target)
    check_selector_cfg({**keys, "_target_": target}, name)
    # the config node itself (not a copy of its keys) is instantiated, so interpolations into the rest of the
    # run's config resolve; a renamed target is passed as an override and the run's config stays as recorded
    renamed = {"_target_": target} if target != recorded else {}
    try:
        selector = instantiate(selector_cfg, _convert_="all", **renamed)
    except InstantiationException as e:
        if isinstance(e.__cause__, BudgetError):  # the user's budget, not a bug: its own message
            raise e.__cause__ from None
        raise
    if not isinstance(selector, Selector):
        raise TypeError(f"selector._target_ must build an instructdiff.selection.Selector, got {type(selector)}")
    if name:
        selector.name = name
    return selector
