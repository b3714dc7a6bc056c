"""Worker processes for tests/test_distributed.py (each runs as one rank of a real gloo group).

    python tests/dist_workers.py OUT_DIR CACHE_DIR N_ROWS [hydra overrides...]
    python -m torch.distributed.run --nproc_per_node=2 tests/dist_workers.py OUT_DIR CACHE_DIR N_ROWS ...

trains the tiny model with ``instructdiff.train.train_sft`` on the first N_ROWS pool rows into OUT_DIR/model
and writes OUT_DIR/rank<r>.json (the stats this rank got back). ``helpers_worker`` and ``serve_worker`` are
targets of ``torch.multiprocessing.spawn`` for the rank-helper and cache-serving tests.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def train_main(argv: list[str]) -> None:
    out, cache, n_rows, overrides = Path(argv[0]), Path(argv[1]), int(argv[2]), argv[3:]
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from instructdiff import CONF_DIR, distributed
    from instructdiff.data import load_pool
    from instructdiff.models import resolve_model
    from instructdiff.train import train_sft

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"paths.cache_dir={cache}", *overrides])
    rows, _ = load_pool(cfg.domain, 0)
    base = resolve_model(cfg.model, cache)
    render_cfg = {"template": cfg.render.template, "system_prompt": None, "max_length": cfg.domain.get("max_length")}
    stats = train_sft(base, rows[:n_rows], OmegaConf.to_container(cfg.trainer, resolve=True), render_cfg,
                      out / "model", seed=int(cfg.seed), stage="calibrate")
    rank = distributed.rank()
    (out / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "stats": stats}))
    distributed.destroy()


def helpers_worker(rank: int, world: int, port: int, out: str) -> None:
    """Every rank helper on a 2-process gloo group; what each rank saw goes to out/rank<r>.json."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    from filelock import FileLock, Timeout

    from instructdiff import distributed

    seen: dict = {"init": list(distributed.init()), "is_main": distributed.is_main(),
                  "world_size": distributed.world_size(), "rank": distributed.rank()}
    calls = Path(out) / "main_first_calls.txt"

    def publish() -> dict:
        with open(calls, "a") as fh:
            fh.write(f"{rank}\n")
        return {"written_by": rank}

    seen["main_first"] = distributed.main_first(publish)

    def fail_on_main() -> None:
        raise OSError("disk full on rank 0")

    try:
        distributed.main_first(fail_on_main)
    except BaseException as e:  # noqa: BLE001 - the test asserts on what each rank raised
        seen["main_first_error"] = f"{type(e).__name__}: {e}"
    try:
        with distributed.fail_together("scoring"):
            if rank == 1:
                raise ValueError("bad row 7 on rank 1")
    except BaseException as e:  # noqa: BLE001
        seen["fail_together_error"] = f"{type(e).__name__}: {e}"
    with distributed.fail_together("nothing"):
        pass
    lock = Path(out) / "cache.lock"
    with distributed.main_lock(lock):
        if rank == 1:  # rank 0 holds it for the group: another job (here: rank 1 asking itself) cannot take it
            try:
                FileLock(str(lock), timeout=0).acquire()
                seen["lock_free_inside"] = True
            except Timeout:
                seen["lock_free_inside"] = False
    seen["broadcast"] = distributed.broadcast(f"from rank {rank}")
    distributed.barrier()
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(seen))
    distributed.destroy()


def serve_worker(rank: int, world: int, port: int, out: str) -> None:
    """Cache entries served by a 2-process gloo group (instructdiff.cache_check.serve_in_group); what each rank saw
    goes to out/serve<r>.json and every compute() call to out/computed.txt as "<entry> <rank>". A rank left
    waiting in a collective fails after a minute instead of hanging the test."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "INSTRUCTDIFF_DIST_TIMEOUT_MIN": "1"})
    from filelock import FileLock, Timeout

    from instructdiff import distributed
    from instructdiff.cache_check import BadEntry, Entry, serve

    distributed.init()
    root = Path(out)
    seen: dict = {}

    def entry(name: str, together: bool, read=None, compute=None, lock: bool = True) -> Entry:
        path = root / f"{name}.json"

        def publish() -> dict:
            with open(root / "computed.txt", "a") as fh:
                fh.write(f"{name} {rank}\n")
            value = {"name": name, "by": rank}
            if together:
                distributed.barrier()  # a collective inside compute: both ranks must be in it
                if rank == 1:  # rank 0 holds the entry's lock for the group meanwhile
                    try:
                        FileLock(f"{path}.lock", timeout=0).acquire()
                        seen[f"{name}_lock_free"] = True
                    except Timeout:
                        seen[f"{name}_lock_free"] = False
            if distributed.is_main():
                path.write_text(json.dumps(value))
            return value

        return Entry(path, read or (lambda: json.loads(path.read_text())), compute or publish,
                     root / f"{name}.json.lock" if lock else None, together=together)

    hooks: dict[str, list] = {}

    def opened(name: str):
        return lambda hit: hooks.setdefault(name, []).append(hit)

    # rank 0 computes, both get its value; then both are served the cached entry
    seen["main_first"] = serve(entry("main", False), opened("main"))
    seen["main_again"] = serve(entry("main", False), opened("main"))
    # every rank computes together while rank 0 holds the lock
    seen["together"] = serve(entry("together", True), opened("together"))
    # the entry looks cached to rank 1 but damaged to rank 0: rank 0 decides, so both compute (rank 1 deciding
    # for itself would skip the compute and its collective, and rank 0 would wait in it for ever)
    (root / "split.json").write_text(json.dumps({"name": "split", "by": "old"}))

    def split_read() -> dict:
        if rank == 0:
            raise BadEntry("is corrupt", "damaged as rank 0 sees it")
        return json.loads((root / "split.json").read_text())

    seen["split"] = serve(entry("split", True, read=split_read), opened("split"))

    # an entry served while rank 0 computes another one alone: it must not wait on the waiting rank 1
    def outer() -> dict:
        value = {"inner": serve(entry("inner", False))[0]}
        (root / "outer.json").write_text(json.dumps(value))
        return value

    seen["nested"] = serve(entry("outer", False, compute=outer), opened("outer"))

    # rank 0 failing to compute: its own error there, the message on rank 1
    def fails() -> dict:
        raise OSError("disk full while publishing")

    try:
        serve(entry("fails", False, compute=fails))
    except BaseException as e:  # noqa: BLE001 - the test asserts on what each rank raised
        seen["fails"] = f"{type(e).__name__}: {e}"
    seen["hooks"] = hooks
    distributed.barrier()
    (root / f"serve{rank}.json").write_text(json.dumps(seen))
    distributed.destroy()


if __name__ == "__main__":
    train_main(sys.argv[1:])
