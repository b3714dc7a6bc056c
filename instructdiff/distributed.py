"""Rank helpers for a run launched as several processes (torchrun, ``accelerate launch``, SLURM tasks).

Every stage runs on every rank; what differs is who writes. The rules the pipeline follows:

* ``is_main()`` (global rank 0) alone writes run-dir files, cache entries and W&B;
* ``main_first(fn)``: rank 0 computes ``fn()`` and its result is sent to every rank, the others wait;
* ``fail_together(what)``: a block every rank runs; if it raised on any rank, every rank raises
  ``RankFailure`` with the failing rank's message, instead of the others hanging in their next collective;
* ``main_lock(path)``: a file lock (shared with other jobs on the cache) held by rank 0 for the whole group.

Launched as one process (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) every helper is a no-op, so the same code
runs both ways. ``init()`` joins the group: torchrun and ``accelerate launch`` export RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; the tasks of an srun step (the Hydra submitit launcher with
``tasks_per_node`` > 1, conf/hydra/launcher/id_submitit_slurm.yaml) get them from their SLURM_* variables
(rendezvous on the job's first node, a port derived from the job id).
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

#: minutes a collective may wait before the group gives up; a rank waits in one while rank 0 holds a cache
#: lock another job is training under, so the torch default (30 min for gloo, 10 for NCCL) is too short
TIMEOUT_ENV = "INSTRUCTDIFF_DIST_TIMEOUT_MIN"
DEFAULT_TIMEOUT_MIN = 180.0


class RankFailure(RuntimeError):
    """Raised on every rank when one rank failed inside ``main_first`` or ``fail_together``."""


#: > 0 while rank 0 runs the body of ``main_first``: the other ranks wait in its broadcast, so a helper called in
#: there (a cache entry served inside another) must act as for one process, never wait on them
_alone = 0


def _dist():
    import torch.distributed as dist

    return dist if not _alone and dist.is_available() and dist.is_initialized() else None


def world_size() -> int:
    """Processes in the run: the joined group's size, else the launcher's WORLD_SIZE, else 1."""
    dist = _dist()
    if dist:
        return dist.get_world_size()
    _export_slurm_env()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """Global rank: the joined group's, else the launcher's RANK, else 0."""
    dist = _dist()
    if dist:
        return dist.get_rank()
    _export_slurm_env()
    return int(os.environ.get("RANK", "0"))


def launched_rank() -> int:
    """The global rank the launcher gave this process (RANK, or the task's in a multi-task srun step), read before
    any group exists and without importing torch: the command line asks before Hydra starts. 0 when alone."""
    _export_slurm_env()
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """Rank on this node (which GPU this process drives)."""
    _export_slurm_env()
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_distributed() -> bool:
    return world_size() > 1


def joined() -> bool:
    """Whether this process has joined a group of several processes (``init()`` ran under a launcher). Before
    ``init()`` a launched rank is on its own: what it does then touches no other rank."""
    dist = _dist()
    return bool(dist) and dist.get_world_size() > 1


def is_main() -> bool:
    return rank() == 0


def _export_slurm_env() -> None:
    """Give each task of a multi-task srun step torch's env:// variables (srun exports only SLURM_* ones).

    Only inside a step of several tasks (SLURM_STEP_NUM_TASKS > 1, set by srun, not by sbatch's batch script):
    a single ``instructdiff`` typed into an allocation of many tasks stays one process. torchrun's own
    variables win when present. The rendezvous is the job's first node on a port drawn from the job id
    (the same in every task), or MASTER_PORT when the job sets it.
    """
    if "RANK" in os.environ or int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) <= 1:
        return
    import random

    # submitit parses SLURM's compressed node lists (gpu[01-04,07]); its task fields are the SLURM_* ones
    try:
        from submitit.slurm.slurm import SlurmJobEnvironment
    except ImportError:
        raise RuntimeError(f"this process is one of {os.environ['SLURM_STEP_NUM_TASKS']} srun tasks, and reading "
                           "SLURM's node list for the rendezvous needs submitit: pip install -e '.[slurm]' "
                           "(or start the ranks with torchrun instead of srun)") from None

    job = SlurmJobEnvironment()
    world = int(os.environ["SLURM_STEP_NUM_TASKS"])
    nodes = int(os.environ.get("SLURM_STEP_NUM_NODES", job.num_nodes))
    os.environ.update({
        "MASTER_ADDR": job.hostnames[0],
        "MASTER_PORT": os.environ.get("MASTER_PORT") or str(random.Random(job.job_id).randint(20000, 60000)),
        "RANK": str(job.global_rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(job.local_rank),
        "LOCAL_WORLD_SIZE": str(world // max(nodes, 1)),
    })


def init(backend: str | None = None) -> tuple[int, int]:
    """Join the process group if launched as several processes; (rank, world size). gloo on CPU, NCCL on GPU.

    Idempotent, and a no-op for one process. Called before Accelerate or TRL create their own state, they
    reuse this group (and its timeout, ``INSTRUCTDIFF_DIST_TIMEOUT_MIN``, default 180 minutes).
    """
    import torch
    import torch.distributed as dist

    _export_slurm_env()
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank() % torch.cuda.device_count())
    minutes = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_MIN))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=minutes))
    log.info("joined the process group: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return dist.get_rank(), dist.get_world_size()


def destroy() -> None:
    """Leave the process group (end of a run); a no-op when none was joined."""
    dist = _dist()
    if dist:
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank reaches this point (no-op for one process)."""
    dist = _dist()
    if dist:
        dist.barrier()


def broadcast(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (any picklable object)."""
    dist = _dist()
    if not dist:
        return obj
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def main_first(fn: Callable[[], T]) -> T:
    """Rank 0 runs ``fn()`` and every rank returns its result; the others wait meanwhile.

    For work that must happen once and be published: a run directory, a cache entry, a selection. If ``fn``
    raises on rank 0, rank 0 re-raises it and every other rank raises ``RankFailure`` with its message, so
    no rank is left waiting. The result travels by pickle: return a path or a small object, not a model.
    Inside ``fn`` the helpers act as for one process (the others are waiting, not listening).
    """
    global _alone
    dist = _dist()
    if not dist:
        return fn()
    outcome: tuple[bool, Any] = (True, None)
    error: BaseException | None = None
    if dist.get_rank() == 0:
        _alone += 1
        try:
            outcome = (True, fn())
        except BaseException as e:  # noqa: BLE001 - re-raised below, after every rank has heard of it
            error, outcome = e, (False, _describe(e))
        finally:
            _alone -= 1
    ok, value = broadcast(outcome)
    if error is not None:
        raise error
    if not ok:
        raise RankFailure(f"rank 0 failed: {value}")
    return value


@contextmanager
def fail_together(what: str) -> Iterator[None]:
    """Every rank runs the block; if it raised on any rank, it raises on every rank.

    The failing rank re-raises its own exception; the others raise ``RankFailure`` naming the lowest failing
    rank and its message. The ranks compare notes once, at the end of the block, so the block must not itself
    wait on the other ranks (a collective inside it would hang on the rank that skipped it by failing):
    use it around per-rank work such as loading, rendering or a shard of scoring. A failure inside DDP
    training (collectives every step) ends that rank's process, and torchrun then stops the others.
    """
    dist = _dist()
    if not dist:
        yield
        return
    error: BaseException | None = None
    try:
        yield
    except BaseException as e:  # noqa: BLE001 - re-raised below, after every rank has heard of it
        error = e
    notes: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(notes, None if error is None else _describe(error))
    if error is not None:
        raise error
    failed = [(r, msg) for r, msg in enumerate(notes) if msg is not None]
    if failed:
        r, msg = failed[0]
        raise RankFailure(f"{what} failed on rank {r}: {msg}")


@contextmanager
def main_lock(path: str | Path,
              take: Callable[[Path], AbstractContextManager[Any]] | None = None) -> Iterator[None]:
    """A file lock at ``path`` that rank 0 takes for the whole group; ``take(path)`` opens it (default
    ``FileLock``; the cache passes its own, which names the path and the fix when the lock cannot be made).

    Every rank taking the lock would deadlock: rank 1 would wait for the lock while rank 0, holding it, waits
    for rank 1 in the block's first collective. Other jobs sharing the cache see one holder, as before. Rank 0
    takes it inside ``main_first``, so a lock it cannot take (an unwritable cache) stops every rank with its
    message instead of leaving them waiting.
    """
    from filelock import FileLock

    opener = take or (lambda p: FileLock(str(p)))
    with ExitStack() as held:
        def acquire() -> None:
            held.enter_context(opener(Path(path)))

        main_first(acquire)  # the others start once rank 0 holds the lock
        yield
        barrier()  # rank 0 keeps it until every rank has finished the block
