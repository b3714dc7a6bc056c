"""OmegaConf resolvers the YAMLs under conf/ use; registered once per process by :func:`register`.

``${instructdiff.file_stem:${.pool_path},custom}`` (conf/domain/custom.yaml) names a user's own domain after
its pool file, so the run directory, logs and results say ``my_pool``, not a bundled domain's name. Hydra builds
the run directory from ``domain.name`` before any instructdiff code runs, so the name has to come from the
config itself: code that set it later would leave the directory misnamed.
"""

from __future__ import annotations

import re
from pathlib import PurePath

_DATA_SUFFIXES = (".gz", ".jsonl", ".json")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")  # kept out of a directory name: separators, spaces, shell specials


def file_stem(path: str | None, default: str) -> str:
    """``data/My Pool.jsonl.gz`` -> ``My_Pool``: the file name without its data suffixes, safe as a directory
    name; ``default`` when ``path`` is null or leaves nothing."""
    if not path:
        return default
    name = PurePath(str(path)).name
    for suffix in _DATA_SUFFIXES:  # in this order: .jsonl.gz loses .gz, then .jsonl
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return _UNSAFE.sub("_", name).strip("._-") or default


def register() -> None:
    """Register the resolvers (idempotent: every entry point and test may call it)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("instructdiff.file_stem"):
        OmegaConf.register_new_resolver("instructdiff.file_stem", file_stem)
