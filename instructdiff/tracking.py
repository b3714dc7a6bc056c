"""Weights & Biases, one run per pipeline call (so one per Hydra multirun job); a no-op for logger=none.

W&B is offline unless the user configures it (``logger.mode`` defaults to ``$WANDB_MODE`` or ``offline``).
Every config that leaves the process (the W&B run config, manifest.json, Hydra's ``.hydra/*.yaml``) goes
through :func:`mask_secrets` first: users put API keys in overrides, and run directories get shared.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MASK = "***"
# A key is secret when one of its words is one of these; words split on _ - . and camelCase, so
# "hf_token", "wandbApiKey" and "db.password" match but "max_tokens_per_batch" and "exclude_keys" do not.
SECRET_WORDS = frozenset({"token", "key", "secret", "password", "passwd", "apikey", "secrets", "credentials"})


def is_secret_key(name: str) -> bool:
    words = re.split(r"[_\-.\s]+|(?<=[a-z0-9])(?=[A-Z])", str(name))
    return any(w.lower() in SECRET_WORDS for w in words if w)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def mask_secrets(obj: Any) -> Any:
    """A copy of ``obj`` (dicts, lists, ``key=value`` override strings) with secret-looking string values masked."""
    if isinstance(obj, dict):
        # only string values: credentials are strings, while e.g. num_key_value_heads=2 is architecture
        return {k: (MASK if is_secret_key(k) and isinstance(v, str) and v else mask_secrets(v))
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(mask_secrets(v) for v in obj)
    if isinstance(obj, str) and "=" in obj and "," in obj:
        # Hydra's override_dirname joins overrides with "," ("seed=1,logger.api_key=abc"): mask each one
        return ",".join(mask_secrets(part) for part in obj.split(","))
    if isinstance(obj, str) and "=" in obj:
        # a Hydra override ("+logger.api_key=abc"): the last path component decides
        name, value = obj.split("=", 1)
        if value and not _is_number(value) and is_secret_key(name.lstrip("+~").rsplit(".", 1)[-1]):
            return f"{name}={MASK}"
    return obj


def mask_hydra_outputs(output_dir: str | Path) -> list[Path]:
    """Rewrite ``<output_dir>/.hydra/{config,hydra,overrides}.yaml`` with secrets masked; returns the files."""
    from omegaconf import OmegaConf

    from instructdiff.atomic import atomic_write_text

    changed = []
    for path in sorted((Path(output_dir) / ".hydra").glob("*.yaml")):
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        masked = mask_secrets(data)
        if masked != data:
            atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(masked)), str(path))
            changed.append(path)
    return changed


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # hydra is a dependency; the guard keeps this module importable in bare tools
    _HydraCallback = object  # type: ignore[assignment,misc]


class MaskSecretsCallback(_HydraCallback):
    """Hydra callback (conf/config.yaml hydra.callbacks): Hydra saves .hydra/*.yaml before the job starts,
    with every override verbatim; this rewrites them masked before the job's own code runs."""

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        try:
            out = config.hydra.runtime.output_dir
        except Exception:  # compose() without a run: nothing was written
            return
        if config.hydra.get("output_subdir") is not None:
            mask_hydra_outputs(out)


class Tracker:
    def __init__(self, logger_cfg: Any, run_dir: Path, config: dict, name: str, group: str | None,
                 tags: list[str]) -> None:
        self.run = None
        self.sync_hint: str | None = None
        if logger_cfg is None or logger_cfg.get("name", "none") == "none":
            return
        if logger_cfg.get("name") != "wandb":
            raise ValueError(f"logger must be wandb or none, got {logger_cfg.get('name')!r}")
        import wandb

        mode = logger_cfg.get("mode", "offline")
        # W&B records the command line in the run's metadata; overrides may carry keys, so it sees them masked
        argv, sys.argv = sys.argv, mask_secrets(list(sys.argv))
        try:
            self.run = self._init(wandb, logger_cfg, run_dir, config, name, group, tags, mode)
        finally:
            sys.argv = argv
        if mode == "offline" and self.run is not None:
            self.sync_hint = f"wandb sync {Path(self.run.dir).parent}"

    @staticmethod
    def _init(wandb: Any, logger_cfg: Any, run_dir: Path, config: dict, name: str, group: str | None,
              tags: list[str], mode: str) -> Any:
        # run name, group and tags are built from the job's overrides, so they are masked like the config
        return wandb.init(
            project=logger_cfg.get("project", "instructdiff"), entity=logger_cfg.get("entity"),
            group=mask_secrets(logger_cfg.get("group") or group), name=mask_secrets(name),
            tags=mask_secrets(list(logger_cfg.get("tags") or []) + list(tags)),
            config=mask_secrets(config), dir=str(run_dir), mode=mode, reinit="finish_previous",
        )

    def log(self, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))})

    def table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Table(columns=columns, data=rows)})

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            for k, v in values.items():
                self.run.summary[k] = v

    def finish(self) -> None:
        """Always called (even on error) so every multirun job is its own W&B run."""
        if self.run is not None:
            self.run.finish()
            self.run = None
