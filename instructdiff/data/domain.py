"""What a domain config asks of the data layer: its pool files and formats, the pool size, the bad-row policy,
and the keys a user's own domain (conf/domain/custom.yaml) may set but this version cannot honour yet."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from instructdiff.data.errors import DataError


def _plain(cfg: Any) -> dict[str, Any]:
    """DictConfig or mapping -> plain dict, so the rest of the code need not know about OmegaConf."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:
        pass
    if not isinstance(cfg, Mapping):
        raise TypeError(f"domain config must be a mapping, got {type(cfg).__name__}")
    return dict(cfg)


def _sources(cfg: dict[str, Any]) -> list[tuple[str, str]]:
    """(path, format) pairs: a user's ``pool_path`` replaces the domain's default ``pool``."""
    if cfg.get("pool_path"):
        return [(str(cfg["pool_path"]), str(cfg.get("pool_format") or "auto"))]
    out = []
    for i, entry in enumerate(cfg.get("pool") or []):
        if isinstance(entry, str):
            out.append((entry, "auto"))
        elif isinstance(entry, Mapping) and entry.get("path"):
            out.append((str(entry["path"]), str(entry.get("format") or "auto")))
        else:
            raise ValueError(f"domain {cfg.get('name')!r}: pool[{i}] is {entry!r}; expected {{path, format}}")
    if not out:
        # DataError: the run's entry prints it as one line (domain=custom without its file lands here)
        raise DataError(f"domain {cfg.get('name')!r} has no data: set domain.pool_path=FILE (your .jsonl, .jsonl.gz, "
                        ".json or .json.gz pool, e.g. `instructdiff domain=custom domain.pool_path=my.jsonl`) or "
                        "domain.pool (a list of {path, format})")
    return out


def _pool_size(cfg: dict[str, Any]) -> int | None:
    size = cfg.get("pool_size")
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"domain {cfg.get('name')!r}: pool_size is {size!r}; expected null or a positive integer")
    return size


def check_unsupported(cfg: dict[str, Any]) -> None:
    """Refuse keys that are documented but not implemented, rather than run without them."""
    if cfg.get("eval_file") is not None:
        raise DataError(f"domain.eval_file is {cfg['eval_file']!r}, but an eval file of your own is not supported yet; "
                        "set domain.eval_file=null and name lm-eval tasks instead, e.g. "
                        "domain.eval_tasks=[id_alpacaeval_bpb] (the task files are in instructdiff/lm_eval_tasks/), "
                        "or keep domain.eval_tasks=[] to run no eval")


ON_ERROR = ("raise", "skip")
_ON_ERROR_ALIASES = {"error": "raise"}  # the domain configs' spelling (on_bad_row: error | skip)


def resolve_on_error(domain_cfg: Any, on_error: str | None = None) -> str:
    """``raise`` or ``skip``: ``on_error`` if given, else the run's ``data.on_error``, else the domain's
    ``on_bad_row``, else ``raise``.

    The pipeline hands ``load_pool`` only ``cfg.domain``; when that is a node of a composed config, the run-wide
    ``data.on_error`` is read from its root, so ``instructdiff data.on_error=skip`` works for every domain.
    """
    source = "on_error"
    if on_error is None:
        root_value = _root_on_error(domain_cfg)
        if root_value is not None:
            on_error, source = root_value, "data.on_error"
    if on_error is None:
        get = domain_cfg.get if hasattr(domain_cfg, "get") else (lambda k, d=None: d)
        on_error, source = get("on_bad_row") or "raise", "domain.on_bad_row"
    value = _ON_ERROR_ALIASES.get(str(on_error), str(on_error))
    if value not in ON_ERROR:
        raise ValueError(f"{source} is {on_error!r}; expected raise or skip (domain.on_bad_row also accepts error)")
    return value


def _root_on_error(domain_cfg: Any) -> str | None:
    try:
        from omegaconf import DictConfig, OmegaConf

        if not isinstance(domain_cfg, DictConfig):
            return None
        root = domain_cfg._get_root()
        if root is domain_cfg:
            return None
        return OmegaConf.select(root, "data.on_error", default=None)
    except ImportError:
        return None
