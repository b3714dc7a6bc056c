"""One line, never a traceback, for a problem in the user's configuration, input or file system.

Such problems surface in two places. Before the run: Hydra itself resolves the run or sweep folder and creates
it, so an unset ``${oc.env:...}`` in a path or ``hydra.run.dir`` naming a file ends in Hydra's traceback before
any of our code runs; the :class:`Preflight` callback checks both first. During the run: :func:`explain` turns
what the pipeline raised into the message the entry point prints (None = a bug, whose traceback stays).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    InterpolationResolutionError,
    InterpolationToMissingValueError,
    MissingMandatoryValue,
)

PREFIX = "instructdiff: error: "
# Checked in this order, so that a problem is named at the key the user set rather than at one that
# interpolates it (paths.cache_dir and hydra.run.dir both build on paths.output_root).
PATH_KEYS = ("paths.output_root", "paths.cache_dir", "paths.run_dir")
_ENV = re.compile(r"Environment variable '([^']+)' not found")
_KEY_AT_START = re.compile(r"([a-z_][a-z0-9_]*)(\.[A-Za-z0-9_]+)+[ =:]")


def _raw(cfg: DictConfig, key: str) -> Any:
    """What ``key`` holds as written (the interpolation, not its value), or None."""
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key, throw_on_resolution_failure=False) if parent_key else cfg
    return OmegaConf.to_container(parent, resolve=False).get(leaf) if isinstance(parent, DictConfig) else None


def interpolation_message(key: str, raw: Any, e: Exception) -> str:
    """``key``'s value cannot be resolved: what it holds, why, and the fix."""
    cause = str(getattr(e, "msg", None) or e).splitlines()[0]
    env = _ENV.search(cause)
    if env:
        var = env.group(1)
        return (f"{key} = {raw!r}: environment variable {var} is not set; export {var}=... or give a default "
                f"in the config: ${{oc.env:{var},<default>}}")
    return f"{key} = {raw!r} cannot be resolved: {cause}; fix the interpolation or set {key} to a plain value"


def missing_message(e: MissingMandatoryValue) -> str:
    key = e.full_key or "a key"
    return f"{key} has no value (??? in the config); give it one on the command line: {key}=..."


def _file_in_the_way(path: Path) -> Path | None:
    """The existing non-directory at ``path`` or at one of its parents, if any."""
    for p in (path, *path.parents):
        if p.exists():
            return None if p.is_dir() else p
    return None


def check_output_paths(cfg: DictConfig, dir_key: str) -> str | None:
    """The first problem with the folders a run writes (``paths.*`` and Hydra's ``dir_key``), or None."""
    for key in (*PATH_KEYS, dir_key):
        try:
            value = OmegaConf.select(cfg, key)
        except InterpolationToMissingValueError:  # e.g. ${hydra:runtime.output_dir}: set only when the job starts
            continue
        except InterpolationResolutionError as e:
            return interpolation_message(key, _raw(cfg, key), e)
        except MissingMandatoryValue as e:
            return missing_message(e)
        if value in (None, ""):
            continue
        blocker = _file_in_the_way(Path(str(value)).expanduser())
        if blocker is not None:
            where = "is a file" if blocker == Path(str(value)).expanduser() else f"lies under the file {blocker}"
            return (f"{key} = {value}: {where}, not a directory; point {key} at a directory "
                    f"(new or existing) or move the file away")
    return None


def _interpolated_leaves(node: Any, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(node, dict):
        return [leaf for k, v in node.items() for leaf in _interpolated_leaves(v, f"{prefix}{k}.")]
    if isinstance(node, list):
        return [leaf for i, v in enumerate(node) for leaf in _interpolated_leaves(v, f"{prefix[:-1]}[{i}].")]
    return [(prefix[:-1], node)] if isinstance(node, str) and "${" in node else []


def check_interpolations(cfg: DictConfig) -> str | None:
    """The first key outside ``hydra`` whose interpolation cannot be resolved (an unset ``${oc.env:...}``, a typo
    in an interpolated key), found before any stage reads it. Values from Hydra's runtime are left to the job."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    raw.pop("hydra", None)
    for key, value in _interpolated_leaves(raw):
        if "${hydra:" in value:
            continue
        try:
            OmegaConf.select(cfg, key)
        except InterpolationToMissingValueError:
            continue
        except InterpolationResolutionError as e:
            return interpolation_message(key, value, e)
    return None


def name_the_key(message: str, cfg: DictConfig | None) -> str:
    """``message`` prefixed with the config key that holds the path it names (``domain.pool_path: ...``)."""
    if cfg is None:
        return message
    try:
        leaves = _path_leaves(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False), "")
    except Exception:  # an unresolvable config: the message alone still names the path
        return message
    for key, value in sorted(leaves, key=lambda kv: -len(kv[1])):
        if key not in message and (f"'{value}'" in message or f" {value} " in f" {message} "):
            return f"{key}: {message}"
    return message


def _path_leaves(node: Any, prefix: str) -> list[tuple[str, str]]:
    # keys that name files or folders; other strings (a domain name "math") would match any path holding them
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            key = f"{prefix}{k}"
            if isinstance(v, (dict, list)):
                out += _path_leaves(v, f"{key}.")
            elif isinstance(v, str) and len(v) > 2 and re.search(r"(path|dir|root|file)$", str(k)):
                out.append((key, v))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _path_leaves(v, f"{prefix}{i}.")
    return out


def _names_a_key(e: BaseException, cfg: DictConfig | None) -> bool:
    """A plain ValueError/TypeError whose message opens with a config key (``score.dtype must be one of ...``):
    the code that raised it checked a user's setting. Library errors and subclasses (JSONDecodeError, ...) do not
    qualify, since they can come from a bug as easily."""
    if type(e) not in (ValueError, TypeError) or cfg is None:
        return False
    m = _KEY_AT_START.match(str(e))
    return bool(m) and m.group(1) in cfg and m.group(1) != "hydra"


def explain(e: BaseException, cfg: DictConfig | None = None) -> str | None:
    """The one-line message for an exception a run raised because of its input, config or file system; None
    for anything else (a bug: its traceback is the useful report)."""
    from instructdiff.atomic import OutputError
    from instructdiff.config_check import ConfigKeyError
    from instructdiff.data import DataError
    from instructdiff.pipeline import StageNotEnabled
    from instructdiff.selection import BudgetError

    if isinstance(e, InterpolationResolutionError):
        key = e.full_key or "a config value"
        return interpolation_message(key, _raw(cfg, key) if cfg is not None else None, e)
    if isinstance(e, MissingMandatoryValue):
        return missing_message(e)
    if isinstance(e, FileNotFoundError):
        return name_the_key(str(e), cfg)
    if isinstance(e, (DataError, StageNotEnabled, ConfigKeyError, BudgetError, OutputError)):
        return str(e)
    if _names_a_key(e, cfg):
        return str(e)
    return None


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # hydra is a dependency; the guard keeps this module importable in bare tools
    _HydraCallback = object  # type: ignore[assignment,misc]


class Preflight(_HydraCallback):
    """Hydra callback (conf/config.yaml hydra.callbacks, listed first): exits with one line before Hydra resolves
    and creates the run or sweep folder. SystemExit, because Hydra turns a callback's Exception into a warning."""

    @staticmethod
    def _check(config: DictConfig, dir_key: str) -> None:
        from hydra.core.hydra_config import HydraConfig

        # hydra.run.dir reads ${hydra:runtime.choices...}, which Hydra makes available only inside run_job
        previous = HydraConfig.instance().cfg
        HydraConfig.instance().set_config(config)
        try:
            problem = check_output_paths(config, dir_key) or check_interpolations(config)
        finally:
            HydraConfig.instance().cfg = previous
        if problem:
            raise SystemExit(PREFIX + problem)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.sweep.dir")
