"""The score cache: every table of the scoring engine (``instructdiff.scoring``) and every signal
(``instructdiff.signals``), keyed by (model fingerprint, rendered-pool fingerprint, settings), computed once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from instructdiff.cache_check import CORRUPT, BadEntry, Entry, read_npz, serve, write_npz
from instructdiff.faults import crash_point
from instructdiff.render import Rendered
from instructdiff.rows import stable_hash
from instructdiff.scoring import (
    RESPONSE_SIGNALS,
    SCORING_VERSION,
    ScoreTable,
    dist_info,
    length_order,
    report_non_finite,
    score_pass,
)

log = logging.getLogger("instructdiff.scoring")  # the store's lines read as the scoring engine's, as before

# the checkpoint's member that marks the rows already scored (a NaN value may be a scored, non-finite row)
FILLED = "filled"
# rows serialised at a time by ``rows_hash``
_HASH_WINDOW = 1 << 12


def rows_hash(rendered: Sequence[Rendered]) -> str:
    """``stable_hash([(id, prompt length, completion length), ...])`` of the rows, streamed.

    The same digest as hashing the whole list (the cache keys of every table already written stay valid), but
    its JSON text is serialised a window of rows at a time: ``json.dumps`` writes a list as ``[`` + its items
    joined by ``", "`` + ``]``, so the windows' texts without their brackets, joined the same way, are that text.
    """
    digest = hashlib.sha256(b"[")
    for start in range(0, len(rendered), _HASH_WINDOW):
        text = json.dumps([(r.id, r.n_prompt, r.n_completion) for r in rendered[start : start + _HASH_WINDOW]],
                          sort_keys=True, default=str)
        digest.update(((", " if start else "") + text[1:-1]).encode())
    digest.update(b"]")
    return digest.hexdigest()[:16]


class ScoreStore:
    """Signals keyed by (model fingerprint, rendered-pool fingerprint, scoring settings), computed once.

    A finished table is an ``.npz`` cache entry (``instructdiff.cache_check``: its members checksummed, the key's
    inputs recorded), read without a lock and computed under one, so two jobs asking for the same signal
    compute it once; a partial table is checkpointed every few batches and a restarted job resumes from it.
    """

    def __init__(self, root: str | Path) -> None:
        # the folder is made by the first table written: a read-only cache still serves a fully cached run
        self.root = Path(root)
        self.hits = 0
        self.misses = 0
        self.passes: list[dict] = []

    @staticmethod
    def fingerprint(model_fp: str, pool_fp: str, render_fp: str, kind: str, settings: dict) -> dict:
        """The inputs a table is keyed by, recorded in it: a table served for other inputs is refused."""
        return {"model": model_fp, "pool": pool_fp, "render": render_fp, "kind": kind, "settings": settings,
                "v": SCORING_VERSION}

    def key(self, model_fp: str, pool_fp: str, render_fp: str, kind: str, settings: dict) -> str:
        return stable_hash(self.fingerprint(model_fp, pool_fp, render_fp, kind, settings))

    @staticmethod
    def _response_fingerprint(model_fp: str, rendered: Sequence[Rendered], render_fp: str, settings: dict) -> dict:
        pool_fp = rows_hash(rendered)
        return ScoreStore.fingerprint(model_fp, pool_fp, render_fp, "response_stats", settings.get("_key", settings))

    def response_path(self, model_fp: str, rendered: list[Rendered], render_fp: str, settings: dict) -> Path:
        return self.root / f"{stable_hash(self._response_fingerprint(model_fp, rendered, render_fp, settings))}.npz"

    def _opened(self, desc: str, path: Path) -> Callable[[bool], None]:
        def opened(hit: bool) -> None:
            if hit:
                self.hits += 1
                log.info("%s: cache hit %s", desc, path.name)
            else:
                self.misses += 1
        return opened

    def response_entry(self, model_loader, model_fp: str, rendered: list[Rendered], render_fp: str,
                       settings: dict, desc: str = "scoring") -> Entry[ScoreTable]:
        """The cache entry of nll / entropy / n_tokens of every rendered sample; ``model_loader()`` runs only to
        compute it."""
        fingerprint = self._response_fingerprint(model_fp, rendered, render_fp, settings)
        path = self.root / f"{stable_hash(fingerprint)}.npz"

        def read() -> ScoreTable:
            table = _table(read_npz(path, fingerprint))
            # a cached table with NaNs is reported again: this run's user has not seen the first warning
            report_non_finite(table, desc, str(settings.get("dtype", "fp32")))
            return table

        rank, world = dist_info()
        if world > 1:  # every rank computes its shard: no rank may wait on a lock another rank holds
            return Entry(path, read, lambda: self._distributed(model_loader, rendered, settings, path, fingerprint,
                                                               desc, rank, world), None, self._opened(desc, path))

        def compute() -> ScoreTable:
            t0 = time.time()
            table = self._compute(model_loader(), rendered, settings, path, fingerprint, desc)
            n_tok = int(sum(r.n_tokens for r in rendered))
            self.passes.append({"desc": desc, "key": path.stem, "samples": len(rendered), "tokens": n_tok,
                                "seconds": round(time.time() - t0, 3), "non_finite_ids": table.non_finite_ids()})
            return table

        return Entry(path, read, compute, Path(f"{path}.lock"), self._opened(desc, path))

    def response_stats(self, model_loader, model_fp: str, rendered: list[Rendered], render_fp: str,
                       settings: dict, desc: str = "scoring") -> ScoreTable:
        """nll / entropy / n_tokens of every rendered sample; ``model_loader()`` runs only on a miss."""
        return serve(self.response_entry(model_loader, model_fp, rendered, render_fp, settings, desc))[0]

    def _distributed(self, model_loader, rendered: Sequence[Rendered], settings: dict, path: Path,
                     fingerprint: dict, desc: str, rank: int, world: int) -> ScoreTable:
        """torchrun: rank r scores every world-th sample (after a length sort, so shards cost the same),
        rank 0 gathers and writes the table; the merged table equals a single process's."""
        import torch.distributed as dist

        t0 = time.time()
        order = length_order(rendered)
        shard = [rendered[k] for k in order[rank::world].tolist()]
        part_path = path.with_name(f"{path.stem}.rank{rank}of{world}.npz")
        part = self._resume(part_path, fingerprint)
        if part is None or part.ids != [r.id for r in shard]:
            part = self._compute(model_loader(), shard, settings, part_path, fingerprint,
                                 f"{desc} [rank {rank}/{world}]")
        # Rank 0 places every shard's values by the same length order, so no rank gathers an id per row of the
        # others' shards; first every rank checks that all ranks scored the shards it would have given them (the
        # same pool), so a mismatch stops every rank alike instead of leaving the others waiting on rank 0.
        hashes: list = [None] * world
        dist.all_gather_object(hashes, rows_hash(shard))
        expected = [rows_hash([rendered[k] for k in order[r::world].tolist()]) for r in range(world)]
        if hashes != expected:
            bad = [r for r in range(world) if hashes[r] != expected[r]]
            raise RuntimeError(f"{desc}: rank(s) {bad} scored other rows than rank {rank} assigns them (the ranks "
                               "rendered different pools); every rank must read the same pool")
        gathered: list | None = [None] * world if rank == 0 else None
        dist.gather_object(np.stack([part.values[s] for s in RESPONSE_SIGNALS]), gathered, dst=0)
        if rank == 0:
            merged = np.full((len(RESPONSE_SIGNALS), len(rendered)), np.nan)
            for r, columns in enumerate(gathered):
                merged[:, order[r::world]] = columns
            del gathered
            self._write(path, rendered, merged, fingerprint)
            del merged
        dist.barrier()
        part_path.unlink(missing_ok=True)
        self.passes.append({"desc": desc, "key": path.stem, "samples": len(rendered), "world_size": world,
                            "seconds": round(time.time() - t0, 3)})
        return _table(read_npz(path, fingerprint))

    @staticmethod
    def _resume(path: Path, fingerprint: dict) -> ScoreTable | None:
        """A finished (shard) table, or None when there is none or it cannot be trusted (then said)."""
        if not path.exists():
            return None
        try:
            return _table(read_npz(path, fingerprint))
        except Exception as e:  # a damaged checkpoint costs its batches again, never the run
            log.warning("checkpoint %s is unusable (%s: %s): scoring those samples again", path,
                        type(e).__name__, e)
            return None

    @staticmethod
    def _resume_partial(path: Path, fingerprint: dict, n: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(values, filled) of a checkpoint of these very rows, or None when there is none or it cannot be
        trusted (then said)."""
        if not path.exists():
            return None
        try:
            arrays = read_npz(path, fingerprint)
            missing = [s for s in (FILLED, *RESPONSE_SIGNALS) if s not in arrays]
            if missing:
                raise BadEntry(CORRUPT, f"no {missing} array in the checkpoint")
            if any(arrays[s].shape != (n,) for s in (FILLED, *RESPONSE_SIGNALS)):
                raise BadEntry(CORRUPT, f"its arrays are not one value per row ({n} rows)")
            return np.stack([arrays[s].astype(np.float64) for s in RESPONSE_SIGNALS]), arrays[FILLED].astype(bool)
        except Exception as e:  # a damaged checkpoint costs its batches again, never the run
            log.warning("checkpoint %s is unusable (%s: %s): scoring those samples again", path,
                        type(e).__name__, e)
            return None

    @staticmethod
    def _write(path: Path, rendered: Sequence[Rendered], columns: np.ndarray, fingerprint: dict) -> None:
        """The table of ``rendered``: ``columns`` is (signals, rows), one contiguous row per signal, so no member is
        copied whole; the ids column is filled straight from the rows (the ``np.array(ids)`` it always was, without
        an id list beside it)."""
        width = max((len(r.id) for r in rendered), default=1)
        ids = np.fromiter((r.id for r in rendered), dtype=f"U{width}", count=len(rendered))
        write_npz(path, {"ids": ids, **{s: columns[k] for k, s in enumerate(RESPONSE_SIGNALS)}},
                  fingerprint, "a score table")

    def _compute(self, model, rendered: Sequence[Rendered], settings: dict, path: Path, fingerprint: dict,
                 desc: str) -> ScoreTable:
        # Memory (issue 15): one preallocated (signals x rows) float64 table filled by pool position, a bool per row
        # for what is filled and the batch plan as one integer array; checkpoints are written from the table itself,
        # the ids column and the returned id list are made after the pass. Per-row work stays in a batch's window.
        partial = path.with_name(path.stem + ".partial.npz")
        # a checkpoint holds no ids: it is keyed by these rows (ids and lengths, in order) on top of the table's
        # inputs, so its positions are this list's positions (a shard's checkpoint differs from the pool's)
        partial_fp = {"table": fingerprint, "rows": rows_hash(rendered), "layout": "filled-mask"}
        n = len(rendered)
        prev = self._resume_partial(partial, partial_fp, n)
        # positions still to score; None: all of them, in pool order (no index array per row then)
        todo = None if prev is None else np.flatnonzero(~prev[1])
        items = rendered if todo is None else [rendered[k] for k in todo.tolist()]
        pad_id = settings.get("pad_id", 0)
        every = int(settings.get("checkpoint_every", 20))
        # planned before the table is allocated: the plan's sort and the table are never held together
        batches = score_pass(model, items, pad_id, int(settings.get("max_tokens_per_batch", 8192)),
                             int(settings.get("max_batch_size", 64)), dtype=str(settings.get("dtype", "fp32")),
                             compile=bool(settings.get("compile", False)))
        if prev is not None:
            values, filled = prev
            log.info("%s: resuming, %d of %d samples already scored", desc, int(filled.sum()), n)
        else:
            values = np.full((len(RESPONSE_SIGNALS), n), np.nan)
            filled = np.zeros(n, dtype=bool)
        bar = tqdm(total=n, initial=n - len(items), desc=desc, unit="sample", dynamic_ncols=True)
        for n_batch, (batch_idx, vals) in enumerate(batches, 1):
            at = batch_idx if todo is None else todo[batch_idx]
            values[:, at] = vals.T
            filled[at] = True
            bar.update(len(batch_idx))
            if n_batch % every == 0:
                write_npz(partial, {FILLED: filled, **{s: values[k] for k, s in enumerate(RESPONSE_SIGNALS)}},
                          partial_fp, "a score checkpoint")
                crash_point("score.checkpoint")
        bar.close()
        del items, todo, batches
        self._write(path, rendered, values, fingerprint)
        partial.unlink(missing_ok=True)
        table = ScoreTable([r.id for r in rendered], {s: values[k] for k, s in enumerate(RESPONSE_SIGNALS)})
        report_non_finite(table, desc, str(settings.get("dtype", "fp32")))
        return table

    def arrays_entry(self, model_fp: str, pool_fp: str, render_fp: str, kind: str, options: dict,
                     compute: Callable[[], dict[str, np.ndarray]], desc: str) -> Entry[dict[str, np.ndarray]]:
        """The cache entry of a named signal of any shape (activation tags, embeddings, gradient norms…).

        ``compute()`` returns arrays whose first axis is the pool order; they are stored as one ``.npz``.
        """
        fingerprint = self.fingerprint(model_fp, pool_fp, render_fp, kind, options)
        path = self.root / f"{kind}-{stable_hash(fingerprint)}.npz"

        def publish() -> dict[str, np.ndarray]:
            t0 = time.time()
            arrays = compute()
            write_npz(path, arrays, fingerprint, f"the {kind} signal cache")
            self.passes.append({"desc": desc, "key": path.stem.split("-", 1)[1], "kind": kind,
                                "seconds": round(time.time() - t0, 3)})
            return arrays

        return Entry(path, lambda: read_npz(path, fingerprint), publish, Path(f"{path}.lock"),
                     self._opened(desc, path))

    def arrays(self, model_fp: str, pool_fp: str, render_fp: str, kind: str, options: dict,
               compute: Callable[[], dict[str, np.ndarray]], desc: str) -> dict[str, np.ndarray]:
        """A named signal (see ``arrays_entry``), computed once."""
        return serve(self.arrays_entry(model_fp, pool_fp, render_fp, kind, options, compute, desc))[0]

    def stats(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "passes": self.passes}


def _table(arrays: dict[str, np.ndarray]) -> ScoreTable:
    """A ScoreTable from a table's arrays; BadEntry when a signal is missing or its length is not the ids'."""
    missing = [s for s in ("ids", *RESPONSE_SIGNALS) if s not in arrays]
    if missing:
        raise BadEntry(CORRUPT, f"no {missing} array in the table")
    n = len(arrays["ids"])
    if any(arrays[s].shape != (n,) for s in RESPONSE_SIGNALS):
        raise BadEntry(CORRUPT, f"its signals are not one value per id ({n} ids)")
    return ScoreTable([str(i) for i in arrays["ids"]], {s: arrays[s].astype(np.float64) for s in RESPONSE_SIGNALS})
