"""The stage runner: the one sequence every cached stage of a run follows, so each stage is one short call.

    open      "stage k/N: <name>" the first time the stage runs (k: its place among this run's N enabled stages)
    serve     a valid cache entry is read without a lock (instructdiff.cache_check); otherwise, under the
              entry's file lock, looked at again (another job may have just published it), else computed and
              published atomically with its checksum and fingerprint; under several processes rank 0 alone
              reads, locks and publishes, and decides hit or miss for every rank (cache_check.serve_in_group)
    log       "[stage] cached, skipping: …" or "[stage] computing: …", decided under the lock, so a job that
              waited for another's result never says it computed it
    check     a stage left out of pipeline.stages whose output is not cached stops the run (StageNotEnabled)
    cost      the pass is recorded in the run's CostLedger (instructdiff.cost), cached or not
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from typing import Any, TypeVar

from instructdiff.cache_check import Entry, serve
from instructdiff.cost import CostLedger
from instructdiff.memory import release_memory

T = TypeVar("T")

STAGES = ("calibrate", "score", "select", "train", "eval")
# The version in each stage's cache key: bump it when a stage's output for the same inputs changes, so stale
# entries are not reused (score tables: instructdiff.scoring.SCORING_VERSION).
STAGE_VERSIONS = {"train": 1, "select": 1, "eval": 1}


class StageNotEnabled(RuntimeError):
    """A stage's output is needed, is not cached, and the stage is not in ``pipeline.stages``."""


class Timer:
    """Wall seconds per stage, summed over the stage's calls. A stage's time leaves out the stages timed inside
    it: the calibration and scoring a selector asks for are theirs, the rest of its wall time is selection's."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._inner: list[float] = []  # per open stage, the seconds its nested stages took

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.time()
        self._inner.append(0.0)
        try:
            yield
        finally:
            elapsed = time.time() - t0
            own = elapsed - self._inner.pop()
            if self._inner:
                self._inner[-1] += elapsed
            self.seconds[name] = round(self.seconds.get(name, 0.0) + own, 3)


class StageRunner:
    """Runs cached stages for one run and keeps what they did: ``events`` (hit or computed, per entry), the
    ``timer`` and the cost ``ledger``."""

    def __init__(self, enabled: Sequence[str], say: Callable[[str], None]) -> None:
        unknown = [s for s in enabled if s not in STAGES]
        if unknown:
            raise ValueError(f"pipeline.stages has unknown stage(s) {unknown}; known: {list(STAGES)}")
        self.enabled = list(enabled)
        self.say = say
        self.timer = Timer()
        self.ledger = CostLedger()
        self.events: list[dict] = []
        self._opened: set[str] = set()

    def open(self, stage: str) -> None:
        """Log "stage k/N: <stage>" once per run; a stage outside pipeline.stages (served from the cache) has
        no place among them and is not numbered."""
        if stage in self._opened or stage not in self.enabled:
            return
        self._opened.add(stage)
        order = [s for s in STAGES if s in self.enabled]
        self.say(f"stage {order.index(stage) + 1}/{len(order)}: {stage}")

    def note(self, stage: str, key: str, hit: bool, what: str) -> None:
        self.events.append({"stage": stage, "key": key, "hit": hit, "what": what})
        self.say(f"[{stage}] {'cached, skipping' if hit else 'computing'}: {what} ({key})")

    def run(self, stage: str, what: str, key: str, entry: Entry[T], ref: Any = None,
            estimate: Callable[[Any, T], dict] | None = None, time_hits: bool = False) -> tuple[T, bool]:
        """(value, served from the cache?) of ``entry`` for ``stage``. ``estimate(ModelParams, value)`` is the
        pass's from-scratch cost, recorded against the model ``ref``. The stage's wall time counts the compute
        only, or with ``time_hits`` reading a cached entry too (scores: reading a big table is scoring time)."""
        self.open(stage)

        def opened(hit: bool) -> None:
            self.note(stage, key, hit, what)
            if not hit and stage not in self.enabled:
                raise StageNotEnabled(f"{what} is not cached and needs stage '{stage}', which is not in "
                                      f"pipeline.stages={self.enabled}; add '{stage}' to pipeline.stages")

        def timed() -> T:
            try:
                with self.timer.stage(stage):
                    return entry.compute()
            finally:
                # the next stage must not start on top of this one's freed peak (instructdiff/memory.py)
                release_memory()

        with self.timer.stage(stage) if time_hits else nullcontext():
            value, hit = serve(entry if time_hits else replace(entry, compute=timed), on_open=opened)
        if estimate is not None:
            self.ledger.record(stage, what, ref, hit, lambda params: estimate(params, value))
        return value, hit
