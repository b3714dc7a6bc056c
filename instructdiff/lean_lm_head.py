"""Fold TRL's fused LM-head tiles a few rows at a time on devices without Triton (CPU): same numbers, less memory.

TRL's ``SFTTrainer`` computes the loss with ``trl.kernels.chunked_logprob``: the logits are built one
``[tokens, 32,768-vocabulary]`` tile at a time and folded into per-token statistics. Without Triton the fold
is plain torch over the whole tile, and each step of it (scale, mask, exp, products, the gradient) makes a new
tile-sized temporary: for a batch of 4 × ~200 SmolLM2 tokens that is ~100 MB each, and about 1.4 GiB of them were
alive at once, the largest allocation of the default run's training stages (measured 2026-12-06 with a
resident-memory sampler that recorded the Python stack at the peak: ``_forward_tile`` and ``_backward_tile``).

Every statistic of the fold is per token (row): online log-sum-exp, entropy, target logit, and in the backward
the row's gradient written back into the tile. Calling TRL's own fold on ``ROW_BLOCK`` rows at a time therefore
computes exactly the same values (the projections and the gradient products, which mix rows, stay whole in
TRL's code), while its temporaries shrink by the ratio of block to tile rows. ``tests/test_lean_lm_head.py``
checks bit-identity against the unblocked fold on random tiles, and the default run's calibrated model file stayed
byte-identical.

Why by hand: TRL offers no setting for the fold's row granularity (its token chunk is 4,096 and its vocabulary
chunk 32,768 module constants; changing either regroups sums and changes the trained weights in the last bits).
If TRL's fold functions change their parameter names, nothing is patched and training runs on TRL's own code.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

ROW_BLOCK = 64
# the arguments of TRL's torch folds that hold one entry (or one tile row) per token
_ROW_ARGS = {
    "_forward_tile": ("tile", "targets", "running_max", "sum_exp", "x_sum_exp", "sq_sum_exp", "z_sum",
                      "max_before_target", "target_logit"),
    "_backward_tile": ("tile", "targets", "log_z", "entropy", "grad_logprobs", "grad_entropy"),
}
_PATCHED_MARK = "_instructdiff_row_blocked"


def row_blocked(fold: Callable[..., Any], row_args: tuple[str, ...], block: int = ROW_BLOCK) -> Callable[..., Any]:
    """``fold`` applied to ``block`` rows at a time: each argument named in ``row_args`` is sliced along its first
    dimension (views, so the fold's in-place updates reach the caller's tensors); every other argument is passed
    as is. Falls back to one call when the row arguments disagree on the row count."""
    signature = inspect.signature(fold)

    def blocked(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        rows = {name: bound.arguments[name] for name in row_args if name in bound.arguments}
        counts = {getattr(t, "shape", (None,))[0] if getattr(t, "ndim", 0) else None for t in rows.values()}
        if len(counts) != 1 or None in counts:
            return fold(*args, **kwargs)
        (n,) = counts
        if n <= block:
            return fold(*args, **kwargs)
        for start in range(0, n, block):
            part = dict(bound.arguments)
            for name, tensor in rows.items():
                part[name] = tensor[start:start + block]
            fold(**part)
        return None

    setattr(blocked, _PATCHED_MARK, fold)
    return blocked


def fold_in_row_blocks(rows: int | None = ROW_BLOCK) -> bool:
    """Make TRL's torch folds (used on devices without Triton) work ``rows`` rows at a time; ``None`` (or 0) puts
    TRL's own whole-tile folds back. The setting is process-wide and applies to the next training. Returns whether
    TRL's folds are now row-blocked (False for ``None``, or when TRL has no such functions or their parameters
    changed)."""
    if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 0):
        raise ValueError(f"trainer.lm_head_fold_rows must be a positive number of token rows, or null (or 0) for "
                         f"TRL's whole-tile fold; got {rows!r}")
    try:
        from trl.kernels import chunked_logprob as kernel
    except ImportError:
        return False
    originals = {}
    for name, row_args in _ROW_ARGS.items():
        fold = getattr(kernel, name, None)
        if fold is None:
            log.debug("trl.kernels.chunked_logprob.%s not found: LM-head folds left as TRL has them", name)
            return False
        fold = getattr(fold, _PATCHED_MARK, fold)
        if not set(row_args) <= set(inspect.signature(fold).parameters):
            log.debug("trl.kernels.chunked_logprob.%s has other parameters than expected: left as is", name)
            return False
        originals[name] = fold
    for name, fold in originals.items():
        setattr(kernel, name, row_blocked(fold, _ROW_ARGS[name], int(rows)) if rows else fold)
    return bool(rows)
