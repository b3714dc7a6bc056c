"""The selection protocol every selector plugin follows: budget rule, result type, context handle.

A selector receives a ``SelectionContext`` (pool, budget, seeded RNG, and handles to the ScoreStore and
to calibration training) and returns a ``Selection`` in which every pool row is ``selected``,
``not_selected`` or ``dropped`` with a reason. Selectors never load models or write files themselves.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from instructdiff.models import ModelRef
from instructdiff.rows import Row
from instructdiff.scoring import ScoreTable


class BudgetError(ValueError):
    """A budget that cannot be met as given (not a whole number, or selecting nothing from the pool)."""


@dataclass(frozen=True)
class Budget:
    """How much to select. ``count`` (absolute, in ``unit``) overrides ``fraction`` (of the pool's total).

    unit=samples is the InstructDiff paper's rule (β·N samples); unit=tokens is its reference code's
    (β · Σ response tokens of the whole scored pool; the sample that crosses the budget is kept).
    """

    fraction: float | None = 0.1
    count: int | None = None
    unit: str = "samples"

    def __post_init__(self) -> None:
        if self.unit not in ("samples", "tokens"):
            raise ValueError(f"budget.unit must be 'samples' or 'tokens', got {self.unit!r}")
        if self.count is None and self.fraction is None:
            raise ValueError("set budget.fraction or budget.count")
        if self.count is None and not (0.0 < float(self.fraction) <= 1.0):
            raise ValueError(f"budget.fraction must be in (0, 1], got {self.fraction}")
        if self.count is not None and (isinstance(self.count, bool) or float(self.count) != int(float(self.count))):
            # 2.7 silently became 2 before: a budget is a whole number of samples or tokens
            raise BudgetError(f"selector.budget.count must be a whole number of {self.unit}, got {self.count}")
        if self.count is not None and int(self.count) < 0:
            raise ValueError(f"budget.count must be >= 0, got {self.count}")

    @classmethod
    def from_cfg(cls, cfg: Any) -> Budget:
        if isinstance(cfg, Budget):
            return cfg
        get = cfg.get if hasattr(cfg, "get") else lambda k, d=None: getattr(cfg, k, d)
        return cls(fraction=get("fraction", 0.1), count=get("count"), unit=get("unit", "samples"))

    def check_selects_something(self, n_pool: int, pool_tokens: int) -> None:
        """Raise BudgetError when this budget takes nothing from a pool of this size (checked before any
        expensive stage, so a run never calibrates and scores only to train on an empty selection)."""
        if self.limit(n_pool, pool_tokens) >= 1:
            return
        total = f"a {n_pool}-row pool" if self.unit == "samples" else f"{pool_tokens} response tokens"
        given = f"count={self.count}" if self.count is not None else f"fraction={self.fraction}"
        raise BudgetError(f"selector.budget selects nothing: {given} of {total} is 0 {self.unit}; raise "
                          "selector.budget.fraction or set selector.budget.count to 1 or more")

    def limit(self, n_pool: int, pool_tokens: int) -> int:
        """The budget in its unit for a pool of ``n_pool`` samples holding ``pool_tokens`` response tokens."""
        if self.count is not None:
            return int(self.count)
        total = n_pool if self.unit == "samples" else pool_tokens
        # round first: 0.7 * 90 is 62.999999… in binary floating point, and the budget is 63
        return int(math.floor(round(float(self.fraction) * total, 6)))

    def take(self, ordered_ids: Sequence[str], tokens: dict[str, int], n_pool: int, pool_tokens: int) -> list[str]:
        """The prefix of ``ordered_ids`` that fills the budget."""
        limit = self.limit(n_pool, pool_tokens)
        if self.unit == "samples":
            return list(ordered_ids[:limit])
        chosen: list[str] = []
        used = 0
        for i in ordered_ids:
            if used >= limit:
                break
            chosen.append(i)
            used += int(tokens[i])
        return chosen


@dataclass
class Selection:
    """The outcome for every pool row. ``selected`` keeps the selector's rank order."""

    selected: list[str]
    status: dict[str, str]  # id -> "selected" | "not_selected" | "dropped:<reason>"
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # id -> signal -> value
    stats: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, pool_ids: Sequence[str], selected: Sequence[str], dropped: dict[str, str],
              scores: dict[str, dict[str, float]] | None = None, stats: dict[str, Any] | None = None) -> Selection:
        chosen = set(selected)
        if len(chosen) != len(selected):
            raise ValueError("a selector returned the same id twice")
        if len(set(pool_ids)) != len(pool_ids):
            raise ValueError("the pool holds duplicate ids; deduplicate it before selection")
        stray = set(dropped) - set(pool_ids)
        if stray:
            raise ValueError(f"{len(stray)} dropped ids are not in the pool (first: {sorted(stray)[0]})")
        overlap = chosen & set(dropped)
        if overlap:
            raise ValueError(f"{len(overlap)} ids are both selected and dropped")
        status = {}
        for i in pool_ids:
            status[i] = "selected" if i in chosen else (f"dropped:{dropped[i]}" if i in dropped else "not_selected")
        unknown = chosen - set(status)
        if unknown:
            raise ValueError(f"{len(unknown)} selected ids are not in the pool")
        counts = {"selected": len(selected), "not_selected": sum(v == "not_selected" for v in status.values()),
                  "dropped": sum(v.startswith("dropped") for v in status.values())}
        reasons: dict[str, int] = {}
        for r in dropped.values():
            reasons[r] = reasons.get(r, 0) + 1
        return cls(list(selected), status, scores or {}, {**(stats or {}), "counts": counts,
                                                            "dropped_reasons": reasons})


@dataclass
class SelectionContext:
    """What a selector may use. The callables are cached stages provided by the pipeline."""

    pool: list[Row]
    response_tokens: dict[str, int]  # completion token count of every pool row, same renderer as training
    rng: np.random.Generator
    seed: int
    base: ModelRef
    # (model, description[, variant]) -> ScoreTable of nll / entropy / n_tokens / first_token_entropy;
    # variant "unconditioned" scores the same response after an empty instruction (IFD's direct answer)
    score: Callable[..., ScoreTable]
    calibrate: Callable[[list[Row], str], ModelRef]  # (warmup rows, description) -> calibrated model
    train: Callable[[list[Row], str], ModelRef]  # (selected rows, description) -> model trained from base
    # (model, signal name, **options) -> dict of arrays in pool order (instructdiff.signals), cached
    signal: Callable[..., dict[str, np.ndarray]] | None = None
    # the model a selector scores with: selector.model (a conf/model name) or, by default, the base model
    selector_model: ModelRef | None = None
    # n -> the first n rows (all when None) of the domain's query set (domain.query; instructdiff.queries):
    # target-domain examples disjoint from the eval items, for selectors that match the pool against them (rds)
    queries: Callable[..., list[Row]] | None = None
    log: Callable[[str], None] = print

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.pool]

    def require(self, selector: str, *handles: str) -> None:
        """Raise unless the pipeline gave this context the named handles (``signal``, ``queries``, ...)."""
        missing = [h for h in handles if getattr(self, h) is None]
        if missing:
            raise ValueError(f"{selector} needs the pipeline's {' and '.join(missing)} handle(s) "
                             f"({', '.join('ctx.' + h for h in missing)})")

    @property
    def pool_tokens(self) -> int:
        return int(sum(self.response_tokens.values()))

    def rows(self, ids: Sequence[str]) -> list[Row]:
        by_id = {r.id: r for r in self.pool}
        return [by_id[i] for i in ids]


#: The context handle each ``uses_*`` flag declares. The selection cache key holds the trainer config only for
#: ``uses_training`` and the query rows only for ``uses_queries``, so a selector that calls an undeclared handle
#: would be served a stale selection after those inputs change; ``uses_models`` names the scoring model in
#: results.json. ``declared_context`` enforces the map at run time, tests/test_selector_flags.py checks it both ways.
HANDLE_FLAGS: dict[str, str] = {"calibrate": "uses_training", "train": "uses_training",
                                "queries": "uses_queries", "score": "uses_models", "signal": "uses_models"}


class UndeclaredHandleError(RuntimeError):
    """A selector called a context handle whose ``uses_*`` flag it does not set."""


class Selector(ABC):
    """Base class of selector plugins; subclasses are instantiated by Hydra from conf/selector/*.yaml."""

    #: does it score with a model (ctx.score / ctx.signal)? Then results.json names that model (scoring_model).
    uses_models: bool = False
    #: does it fine-tune models (ctx.calibrate / ctx.train)? Then the trainer config is part of its cache key.
    uses_training: bool = False
    #: does it read the domain's query set (ctx.queries)? Then those rows are part of its cache key.
    uses_queries: bool = False
    #: does its budget decide how many rows it takes? (``full`` takes the pool whatever the budget says)
    uses_budget: bool = True

    def __init__(self, budget: Any = None, model: str | None = None) -> None:
        self.budget = Budget.from_cfg(budget if budget is not None else {})
        #: conf/model/<name>.yaml of the model this selector scores with; None = the target (base) model
        self.model = model
        #: the selector's one name: its conf/selector/<name>.yaml (the Hydra choice), set by
        #: instructdiff.selector_factory.instantiate_selector; results.json, the report and W&B show it. A selector
        #: built directly in Python has only its class to go by.
        self.name: str = type(self).__name__

    @abstractmethod
    def select(self, ctx: SelectionContext) -> Selection: ...


def audited_context(ctx: SelectionContext, on_call: Callable[[str], None]) -> SelectionContext:
    """A copy of ``ctx`` whose handles (the keys of ``HANDLE_FLAGS``) call ``on_call(handle)`` before they run;
    handles the pipeline did not provide stay None."""

    def announce(handle: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def called(*args: Any, **kwargs: Any) -> Any:
            on_call(handle)
            return fn(*args, **kwargs)
        return called

    return replace(ctx, **{h: announce(h, getattr(ctx, h)) for h in HANDLE_FLAGS if getattr(ctx, h) is not None})


def declared_context(ctx: SelectionContext, selector: Selector) -> SelectionContext:
    """``ctx`` for ``selector.select``: a handle whose ``uses_*`` flag the selector does not set raises
    ``UndeclaredHandleError`` instead of running (and so instead of caching a selection under a key that misses
    what the handle read)."""

    def check(handle: str) -> None:
        flag = HANDLE_FLAGS[handle]
        if not getattr(selector, flag):
            raise UndeclaredHandleError(
                f"selector {selector.name} ({type(selector).__module__}.{type(selector).__qualname__}) called "
                f"ctx.{handle} but does not set {flag} = True; set it on the class (or in __init__ when an option "
                f"decides it) so the selection cache key covers what ctx.{handle} reads")

    return audited_context(ctx, check)
