"""The score cache: every table of the scoring engine (``instructdiff.scoring``) and every signal
(``instructdiff.signals``), keyed by (model fingerprint, rendered-pool fingerprint, settings), computed once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
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
    report_non_finite,
    score_pass,
)

log = logging.getLogger("instructdiff.scoring")  # the store's lines read as the scoring engine's, as before


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
    def _response_fingerprint(model_fp: str, rendered: list[Rendered], render_fp: str, settings: dict) -> dict:
        pool_fp = stable_hash([(r.id, len(r.prompt_ids), len(r.completion_ids)) for r in rendered])
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
            n_tok = int(sum(len(r.completion_ids) + len(r.prompt_ids) for r in rendered))
            self.passes.append({"desc": desc, "key": path.stem, "samples": len(rendered), "tokens": n_tok,
                                "seconds": round(time.time() - t0, 3), "non_finite_ids": table.non_finite_ids()})
            return table

        return Entry(path, read, compute, Path(f"{path}.lock"), self._opened(desc, path))

    def response_stats(self, model_loader, model_fp: str, rendered: list[Rendered], render_fp: str,
                       settings: dict, desc: str = "scoring") -> ScoreTable:
        """nll / entropy / n_tokens of every rendered sample; ``model_loader()`` runs only on a miss."""
        return serve(self.response_entry(model_loader, model_fp, rendered, render_fp, settings, desc))[0]

    def _distributed(self, model_loader, rendered: list[Rendered], settings: dict, path: Path, fingerprint: dict,
                     desc: str, rank: int, world: int) -> ScoreTable:
        """torchrun: rank r scores every world-th sample (after a length sort, so shards cost the same),
        rank 0 gathers and writes the table; the merged table equals a single process's."""
        import torch.distributed as dist

        t0 = time.time()
        order = sorted(range(len(rendered)), key=lambda k: (rendered[k].n_tokens, rendered[k].id))
        shard = [rendered[k] for k in order[rank::world]]
        part_path = path.with_name(f"{path.stem}.rank{rank}of{world}.npz")
        part = self._resume(part_path, fingerprint)
        if part is None or len(part.ids) != len(shard):
            part = self._compute(model_loader(), shard, settings, part_path, fingerprint,
                                 f"{desc} [rank {rank}/{world}]")
        gathered: list = [None] * world
        dist.all_gather_object(gathered, (part.ids, np.stack([part.values[s] for s in RESPONSE_SIGNALS], 1)))
        if rank == 0:
            merged = {i: v for ids, vals in gathered for i, v in zip(ids, vals, strict=True)}
            ids = [r.id for r in rendered]
            self._write(path, ids, np.stack([merged[i] for i in ids]), fingerprint)
        dist.barrier()
        part_path.unlink(missing_ok=True)
        self.passes.append({"desc": desc, "key": path.stem, "samples": len(rendered), "world_size": world,
                            "seconds": round(time.time() - t0, 3)})
        return _table(read_npz(path, fingerprint))

    @staticmethod
    def _resume(path: Path, fingerprint: dict) -> ScoreTable | None:
        """A checkpointed partial table, or None when there is none or it cannot be trusted (then said)."""
        if not path.exists():
            return None
        try:
            return _table(read_npz(path, fingerprint))
        except Exception as e:  # a damaged checkpoint costs its batches again, never the run
            log.warning("checkpoint %s is unusable (%s: %s): scoring those samples again", path,
                        type(e).__name__, e)
            return None

    @staticmethod
    def _write(path: Path, ids: list[str], values: np.ndarray, fingerprint: dict) -> None:
        write_npz(path, {"ids": np.array(ids), **{s: values[:, k] for k, s in enumerate(RESPONSE_SIGNALS)}},
                  fingerprint, "a score table")

    def _compute(self, model, rendered: list[Rendered], settings: dict, path: Path, fingerprint: dict,
                 desc: str) -> ScoreTable:
        partial = path.with_name(path.stem + ".partial.npz")
        # One preallocated (rows x signals) float64 array filled by pool position: memory is the output itself
        # (32 bytes a row), not a small array per row that keeps its batch's array alive (issue 15: ~550 B/row).
        ids = [r.id for r in rendered]
        position = {i: k for k, i in enumerate(ids)}
        values = np.full((len(ids), len(RESPONSE_SIGNALS)), np.nan)
        filled = np.zeros(len(ids), dtype=bool)
        prev = self._resume(partial, fingerprint)
        if prev is not None:
            for k, i in enumerate(prev.ids):
                if i in position:
                    values[position[i]] = [prev.values[s][k] for s in RESPONSE_SIGNALS]
                    filled[position[i]] = True
            log.info("%s: resuming, %d of %d samples already scored", desc, int(filled.sum()), len(rendered))
        todo = [r for r in rendered if not filled[position[r.id]]]
        pad_id = settings.get("pad_id", 0)
        every = int(settings.get("checkpoint_every", 20))
        batches = score_pass(model, todo, pad_id, int(settings.get("max_tokens_per_batch", 8192)),
                             int(settings.get("max_batch_size", 64)), dtype=str(settings.get("dtype", "fp32")),
                             compile=bool(settings.get("compile", False)))
        bar = tqdm(total=len(rendered), initial=int(filled.sum()), desc=desc, unit="sample", dynamic_ncols=True)
        for n_batch, (batch_idx, vals) in enumerate(batches, 1):
            for k, v in zip(batch_idx, vals, strict=True):
                at = position[todo[k].id]
                values[at] = v
                filled[at] = True
            bar.update(len(batch_idx))
            if n_batch % every == 0:
                done_at = np.flatnonzero(filled)
                self._write(partial, [ids[k] for k in done_at], values[done_at], fingerprint)
                crash_point("score.checkpoint")
        bar.close()
        self._write(path, ids, values, fingerprint)
        partial.unlink(missing_ok=True)
        table = ScoreTable(ids, {s: values[:, k] for k, s in enumerate(RESPONSE_SIGNALS)})
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
