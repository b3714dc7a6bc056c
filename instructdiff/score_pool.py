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

from instructdiff import CONF_DIR

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def init_distributed() -> tuple[int, int]:
    """Join the torchrun group if launched by torchrun (WORLD_SIZE > 1); gloo on CPU, NCCL on GPU."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or dist.is_initialized():
        return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


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
    rank, world = init_distributed()
    ref = pipe.base
    model_path = cfg.score.get("model_path")
    if model_path:
        path = Path(model_path).resolve()
        # a trained model's fingerprint is its cache key: the directory name trained-<key>
        fp = path.name.split("trained-", 1)[1] if path.name.startswith("trained-") else stable_hash(str(path))
        ref = ModelRef(path.name, str(path), fp)
    import torch

    if world > 1 and torch.cuda.is_available() and str(cfg.score.device) in ("auto", "cuda"):
        cfg.score.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"  # one GPU per rank
    table = pipe.score(ref, "pool")
    summary = {"rank": rank, "world_size": world, "model": ref.name, "n": len(table.ids),
               "store": pipe.store.stats()}
    if rank == 0:
        print(json.dumps(summary))
    return summary


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        score_pool(cfg)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
