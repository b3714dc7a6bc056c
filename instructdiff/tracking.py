"""Weights & Biases, one run per pipeline call (so one per Hydra multirun job); a no-op for logger=none."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


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
        self.run = wandb.init(
            project=logger_cfg.get("project", "instructdiff"), entity=logger_cfg.get("entity"),
            group=logger_cfg.get("group") or group, name=name, tags=list(logger_cfg.get("tags") or []) + tags,
            config=config, dir=str(run_dir), mode=mode, reinit="finish_previous",
        )
        if mode == "offline" and self.run is not None:
            self.sync_hint = f"wandb sync {Path(self.run.dir).parent}"

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
