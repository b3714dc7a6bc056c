"""Typos in selector and budget keys are errors that name the key, the valid keys and the closest match.

Hydra rejects an unknown key given without ``+`` with its own advice to add ``+``; following that advice
used to run with the default value and no warning (``+selector.budget.fracton=0.1``). Both forms end here:
``check_argv`` reads the command line before Hydra composes (so the message is ours, not Hydra's advice to
append), and ``check_selector_cfg`` checks the composed config (``+`` keys, presets, tests calling ``run``).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterable
from typing import Any

from omegaconf import OmegaConf

from instructdiff import CONF_DIR

BUDGET_KEYS = ("fraction", "count", "unit")


class ConfigKeyError(ValueError):
    """An override names a key the config does not have."""


def _message(full_key: str, valid: Iterable[str], where: str) -> str:
    valid = sorted(valid)
    leaf = full_key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, valid, n=1)
    hint = f" Did you mean {full_key.rsplit('.', 1)[0]}.{close[0]}?" if close else ""
    return f"{full_key} is not a key of {where}; valid keys: {', '.join(valid)}.{hint}"


def _selector_class(target: str) -> type:
    """The class ``selector._target_`` names, or ConfigKeyError in one line. Hand-written rather than
    hydra.utils.get_class, which logs a multi-line error of its own before raising."""
    import importlib

    module, _, name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name) if module else None
    except (ImportError, AttributeError) as e:
        cause = f"{type(e).__name__}: {e}"
    else:
        if isinstance(cls, type):
            return cls
        cause = "no module path" if not module else f"{name} is not a class"
    choices = ", ".join(sorted(p.stem for p in (CONF_DIR / "selector").glob("*.yaml")))
    raise ConfigKeyError(f"selector._target_ = {target!r} cannot be imported ({cause}); choose a selector by "
                         f"name (selector=<{choices}>) or give an importable module.Class path")


def selector_keys(target: str) -> set[str] | None:
    """The keys a selector YAML may hold: ``_target_`` and its constructor's parameters, through the base
    classes it passes keywords on to (None: the selector takes any ``**kwargs``)."""
    cls = _selector_class(target)
    params: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        sig = inspect.signature(init)
        if klass is cls and any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            return None
        params |= {n for n, p in sig.parameters.items()
                   if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return params | {"_target_"}


def check_selector_cfg(selector_cfg: Any, name: str | None = None) -> None:
    """Raise ConfigKeyError for a selector or budget key the selector does not have."""
    cfg = selector_cfg if isinstance(selector_cfg, dict) else OmegaConf.to_container(selector_cfg, resolve=False)
    label = f"selector {name}" if name else f"selector {cfg.get('_target_')}"
    valid = selector_keys(str(cfg.get("_target_")))
    if valid is not None:
        for key in cfg:
            if key not in valid:
                raise ConfigKeyError(_message(f"selector.{key}", valid - {"_target_"}, label))
    budget = cfg.get("budget")
    if isinstance(budget, dict):
        for key in budget:
            if key not in BUDGET_KEYS:
                raise ConfigKeyError(_message(f"selector.budget.{key}", BUDGET_KEYS, "selector.budget"))


def _selector_names(overrides: list[str]) -> list[str]:
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and key.lstrip("+") == "selector":
            return [v.strip() for v in value.split(",") if v.strip()]
    return ["instructdiff"]  # conf/config.yaml's default


def check_argv(argv: list[str]) -> str | None:
    """The message for the first selector or budget key on the command line that no chosen selector has."""
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    names = [n for n in _selector_names(overrides) if (CONF_DIR / "selector" / f"{n}.yaml").exists()]
    for item in overrides:
        key = item.partition("=")[0].lstrip("+~")
        if not key.startswith("selector."):
            continue
        path = key.split(".")[1:]
        for name in names:
            yaml = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "selector" / f"{name}.yaml"))
            if path[0] == "budget" and len(path) == 2:
                if path[1] not in BUDGET_KEYS:
                    return _message(key, BUDGET_KEYS, "selector.budget")
                continue
            valid = selector_keys(str(yaml.get("_target_")))
            if len(path) == 1 and valid is not None and path[0] not in valid:
                return _message(key, valid - {"_target_"}, f"selector {name}")
    return None
