"""Hydra entry point: ``instructdiff [overrides]`` or ``python -m instructdiff [overrides]``."""

from __future__ import annotations

import logging
import os

import hydra
from omegaconf import DictConfig

from instructdiff import CONF_DIR

# registers the job folder resolver used by hydra.sweep.subdir before Hydra resolves it (also in job processes)
from instructdiff import sweep as _sweep  # noqa: F401

# Offline first: nothing is fetched from a hub unless the user says so (export HF_HUB_OFFLINE=0).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    from instructdiff import distributed
    from instructdiff.pipeline import run
    from instructdiff.user_errors import PREFIX, explain

    logging.getLogger("instructdiff").setLevel(logging.INFO)
    try:
        results = run(cfg)
    except distributed.RankFailure as e:
        # another rank failed and reported it in full (its traceback or its one line); this rank names it
        raise SystemExit(PREFIX + str(e)) from None
    except Exception as e:
        # the user's data, config or file system, not a bug: one line (key or file, cause, fix), no traceback
        message = explain(e, cfg)
        if message is None:
            raise
        raise SystemExit(PREFIX + message) from None
    if not distributed.is_main():
        return None  # rank 0 reports for the group
    from instructdiff.run_outputs import print_summary

    print_summary(results)
    if results.get("wandb_sync"):
        print(f"W&B run saved offline; upload it with: {results['wandb_sync']}")
    return None


def cli() -> None:
    """The console entry: secret-looking override values go to the environment (instructdiff.secret_overrides)
    and typos in selector keys fail here with the key's valid names, both before Hydra sees the command line."""
    import sys

    from instructdiff.config_check import check_argv
    from instructdiff.secret_overrides import hide_secret_overrides

    sys.argv[1:] = hide_secret_overrides(sys.argv[1:], os.environ)
    problem = check_argv(sys.argv[1:])
    if problem:
        raise SystemExit(f"instructdiff: error: {problem}")
    sys.argv[1:] = _other_rank_overrides(sys.argv[1:])
    from instructdiff.memory import return_large_blocks_at_once

    return_large_blocks_at_once()  # before any model is loaded: freed activations leave at once
    main()


def _other_rank_overrides(argv: list[str]) -> list[str]:
    """``argv`` for a rank above 0 of a launch of several processes (torchrun, ``accelerate launch``, srun).

    Every rank's Hydra stamps ``hydra.run.dir`` to the microsecond, so each would make a run folder of its own.
    Rank 0's is the run's (instructdiff.pipeline.run hands it to the others); the others' Hydra works in a
    temporary folder removed at exit, writes no ``.hydra/`` record and logs to the console only.
    """
    from instructdiff import distributed

    rank = distributed.launched_rank()
    if rank == 0:
        return argv
    import atexit
    import shutil
    import tempfile

    scratch = tempfile.mkdtemp(prefix=f"instructdiff-rank{rank}-")
    atexit.register(shutil.rmtree, scratch, True)
    extra = [f"hydra.run.dir={scratch}", f"hydra.sweep.dir={scratch}", "hydra.output_subdir=null"]
    if not any(a.lstrip("~+").removeprefix("override ").startswith("hydra/job_logging=") for a in argv):
        extra.append("hydra/job_logging=stdout")
    return [*argv, *extra]


if __name__ == "__main__":
    cli()
