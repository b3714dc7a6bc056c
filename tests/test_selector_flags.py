"""Every selector's ``uses_*`` flags agree with what it actually calls (instructdiff.selection.HANDLE_FLAGS).

The flags are set by hand and decide what the selection cache key holds (``uses_training``: the trainer config;
``uses_queries``: the query rows), what results.json names as the scoring model (``uses_models``) and whether
the budget is checked (``uses_budget``): a wrong one silently serves a stale selection. Each conf/selector YAML
runs through the real pipeline on the tiny model; its ``select`` is handed a recording copy of the real
context, and the handles it called are compared with its flags, both ways.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from hydra.utils import get_class

from instructdiff import CONF_DIR
from instructdiff.models import ModelRef
from instructdiff.rows import Row
from instructdiff.selection import (
    HANDLE_FLAGS,
    Budget,
    Selection,
    SelectionContext,
    Selector,
    UndeclaredHandleError,
    audited_context,
    declared_context,
)

SELECTORS = sorted(p.stem for p in (CONF_DIR / "selector").glob("*.yaml"))
FLAGS = ("uses_budget", *sorted(set(HANDLE_FLAGS.values())))
# Options that keep a selector's own training to seconds on the tiny model, or that score with the target
# instead of a named proxy (superfiltering's default proxy is the real SmolLM2).
SMALL = {
    "gradfiltering": ["selector.members=2", "selector.epochs=2"],
    "less": ["selector.epochs=2", "selector.n_queries=2", "selector.projection_dim=64"],
    "superfiltering": ["selector.model=null"],
    "superfiltering_d": ["selector.model=null"],
}
# Options that switch on a path a flag depends on: IFD's pre-experienced calibration, InstructDiff's later rounds.
VARIANTS = [
    ("ifd", ["selector.pre_experienced=true", "selector.clusters=3", "selector.per_cluster=2"]),
    ("instructdiff", ["selector.rounds=2"]),
]
CASES = [(name, SMALL.get(name, [])) for name in SELECTORS] + VARIANTS


@dataclass(frozen=True)
class _RecordingBudget(Budget):
    """The selector's own budget, noting when the selector reads its limit (``take`` reads it too)."""

    def limit(self, n_pool: int, pool_tokens: int) -> int:
        object.__getattribute__(self, "_calls").add("budget")
        return super().limit(n_pool, pool_tokens)


def _run_recording(cfg, monkeypatch) -> tuple[Selector, set[str]]:
    """Run ``cfg`` through the pipeline; return the selector it built and the handles its ``select`` called."""
    from instructdiff.pipeline import run

    cls = get_class(cfg.selector._target_)
    real_select = cls.select
    calls: set[str] = set()
    seen: dict[str, Selector] = {}

    def recording_select(self: Selector, ctx: SelectionContext) -> Selection:
        seen["selector"] = self
        budget = self.budget
        recording = _RecordingBudget(budget.fraction, budget.count, budget.unit)
        object.__setattr__(recording, "_calls", calls)
        self.budget = recording
        try:
            return real_select(self, audited_context(ctx, calls.add))
        finally:
            self.budget = budget  # the pipeline's own budget checks after select are not the selector's

    monkeypatch.setattr(cls, "select", recording_select)
    run(cfg)
    assert "selector" in seen, "the pipeline never called select (a cached selection?)"
    return seen["selector"], calls


@pytest.mark.slow
@pytest.mark.parametrize("name,options", CASES, ids=[" ".join([n, *o]) for n, o in CASES])
def test_flags_match_the_handles_called(name, options, make_cfg, monkeypatch, one_torch_thread) -> None:
    cfg = make_cfg(f"selector={name}", *options, "domain.pool_size=24", "trainer.epochs=1",
                   "pipeline.stages=[calibrate,score,select]")
    selector, calls = _run_recording(cfg, monkeypatch)
    assert selector.name == name
    undeclared = sorted(a for a in dir(selector) if a.startswith("uses_") and a not in FLAGS)
    assert not undeclared, f"{name}: flag(s) {undeclared} have no check here; add them to HANDLE_FLAGS"
    declared = {flag: bool(getattr(selector, flag)) for flag in FLAGS}
    used = {flag: any(HANDLE_FLAGS[h] == flag for h in calls if h in HANDLE_FLAGS) for flag in FLAGS}
    used["uses_budget"] = "budget" in calls
    wrong = {flag: f"set {declared[flag]}, {'used' if used[flag] else 'not used'}"
             for flag in FLAGS if declared[flag] != used[flag]}
    assert not wrong, f"{name} {options}: {wrong}; handles called: {sorted(calls)}"


# ------------------------------------------------------------------------------------- the guard, by hand
class _Calibrates(Selector):
    def select(self, ctx: SelectionContext) -> Selection:
        ctx.calibrate(ctx.rows(ctx.ids[:1]), "warmup")
        return Selection.build(ctx.ids, ctx.ids[:1], {})


def _ctx(log: list[str]) -> SelectionContext:
    ref = ModelRef("m", "/nowhere", "fp")
    return SelectionContext(
        pool=[Row("a", "q", "", "r"), Row("b", "q2", "", "r2")], response_tokens={"a": 1, "b": 1},
        rng=np.random.default_rng(0), seed=0, base=ref, score=lambda *a: log.append("score"),
        calibrate=lambda rows, what: log.append(f"calibrate:{what}") or ref, train=lambda rows, what: ref)


def test_declared_context_refuses_an_undeclared_handle() -> None:
    ran: list[str] = []
    selector = _Calibrates()
    with pytest.raises(UndeclaredHandleError, match=r"ctx\.calibrate but does not set uses_training"):
        selector.select(declared_context(_ctx(ran), selector))
    assert ran == []  # refused before the handle ran: nothing was trained
    selector.uses_training = True
    assert selector.select(declared_context(_ctx(ran), selector)).selected == ["a"]
    assert ran == ["calibrate:warmup"]


def test_audited_context_reports_each_call_and_keeps_missing_handles() -> None:
    seen: list[str] = []
    ctx = audited_context(_ctx([]), seen.append)
    ctx.score(ctx.base, "base")
    ctx.calibrate([], "warmup")
    assert seen == ["score", "calibrate"] and ctx.signal is None and ctx.queries is None
