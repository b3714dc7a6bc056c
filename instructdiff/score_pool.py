"""Score a pool into the shared ScoreStore, optionally sharded across processes with torchrun.

    python -m instructdiff.score_pool domain=math                       # one process
    torchrun --nproc_per_node=4 -m instructdiff.score_pool domain=math  # 4 shards (gloo on CPU, NCCL on GPU)
    torchrun --nproc_per_node=4 -m instructdiff.score_pool score.model_path=<dir of a trained model>

Takes the same config as ``instructdiff``; the table lands in ``paths.cache_dir/scores`` under the key
the pipeline asks for, so a later ``instructdiff`` run with the same pool, model and rendering finds it
there and skips scoring. The merged table equals what one process computes (tests/test_distributed.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

from instructdiff import CONF_DIR, distributed

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def score_pool(cfg: DictConfig) -> dict:
    """Score the configured pool under the base model (or ``score.model_path``); returns a summary."""
    from instructdiff.models import ModelRef
    from instructdiff.pipeline import Pipeline
    from instructdiff.rows import stable_hash

    pipe = Pipeline(cfg, Path(cfg.paths.cache_dir) / "score_pool")
    pipe.stages = ["score"]
    # Before joining the group: a model converted or built here is written by whichever rank holds the
    # file lock, and transformers' save_pretrained writes nothing on rank > 0 once a group exists.
    pipe.prepare()
    rank, world = distributed.init()
    ref = pipe.base
    model_path = cfg.score.get("model_path")
    if model_path:
        path = Path(model_path).resolve()
        # a trained model's fingerprint is its cache key: the directory name trained-<key>
        fp = path.name.split("trained-", 1)[1] if path.name.startswith("trained-") else stable_hash(str(path))
        ref = ModelRef(path.name, str(path), fp)
    import torch

    if world > 1 and torch.cuda.is_available() and str(cfg.score.device) in ("auto", "cuda"):
        cfg.score.device = f"cuda:{distributed.local_rank() % torch.cuda.device_count()}"  # one GPU per rank
    table = pipe.score(ref, "pool")
    summary = {"rank": rank, "world_size": world, "model": ref.name, "n": len(table.ids),
               "store": pipe.store.stats()}
    if distributed.is_main():
        print(json.dumps(summary))
    return summary


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        score_pool(cfg)
    finally:
        distributed.destroy()


if __name__ == "__main__":
    main()
