"""Fault injection for the reliability suite (tests/reliability): off unless ``INSTRUCTDIFF_CRASH_AT`` is set.

``INSTRUCTDIFF_CRASH_AT=point[:n][,point[:n]...]`` SIGKILLs the process the n-th time (default: the first) it
reaches ``crash_point(point)``. SIGKILL, not an exception: nothing runs after it (no ``finally``, no atexit),
which is what a kill from a scheduler or the OOM killer does. The points sit where a kill does the most
damage, between computing an artifact and publishing it:

    calibrate.step     after each optimiser step of a calibration SFT (train_sft), before the model is saved
    train.step         the same for the final SFT on the selection
    score.checkpoint   after each checkpoint of a partial scoring pass (ScoreStore._compute)
    select.publish     after the selector returned, before the selection is cached (Pipeline.select)
    eval.publish       after lm-eval ran, before eval_results.json is written (evaluate_model)

A kill at a step point lands in the middle of training (the trainer's scratch directory is half-written), as
a kill from outside would, but at a step count rather than after a wall-clock delay, so the test does not
depend on the machine's speed.
"""

from __future__ import annotations

import os
import signal
import sys
from collections import Counter

ENV = "INSTRUCTDIFF_CRASH_AT"
_hits: Counter[str] = Counter()


def crash_point(name: str) -> None:
    """SIGKILL this process here if ``INSTRUCTDIFF_CRASH_AT`` asks for it; a no-op otherwise."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    for item in spec.split(","):
        point, _, nth = item.strip().partition(":")
        if point != name:
            continue
        _hits[name] += 1
        if _hits[name] == int(nth or 1):
            # flush so the test can see how far the run got; the kill itself discards everything else
            print(f"[fault] SIGKILL at {name} (hit {_hits[name]})", flush=True)
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
