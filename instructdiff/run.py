"""Hydra entry point: ``instructdiff [overrides]`` or ``python -m instructdiff [overrides]``."""

from __future__ import annotations

import logging
import os

import hydra
from omegaconf import DictConfig

from instructdiff import CONF_DIR

# Offline first: nothing is fetched from a hub unless the user says so (export HF_HUB_OFFLINE=0).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    from instructdiff.config_check import ConfigKeyError
    from instructdiff.data import DataError
    from instructdiff.pipeline import StageNotEnabled, print_summary, run
    from instructdiff.selection import BudgetError

    logging.getLogger("instructdiff").setLevel(logging.INFO)
    try:
        results = run(cfg)
    except (DataError, StageNotEnabled, ConfigKeyError, BudgetError, FileNotFoundError) as e:
        # the user's data or stage list, not a bug: the message (file:line, field, expected) without a traceback
        raise SystemExit(f"instructdiff: error: {e}") from None
    print_summary(results)
    if results.get("wandb_sync"):
        print(f"W&B run saved offline; upload it with: {results['wandb_sync']}")
    return None


def cli() -> None:
    """The console entry: typos in selector keys fail here with the key's valid names, before Hydra composes."""
    import sys

    from instructdiff.config_check import check_argv

    problem = check_argv(sys.argv[1:])
    if problem:
        raise SystemExit(f"instructdiff: error: {problem}")
    main()


if __name__ == "__main__":
    cli()
