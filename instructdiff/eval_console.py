"""What an evaluation prints: lm-eval's repeated log lines once per process, and generation progress per item.

* ``quiet_repeated_logs()``: lm-eval logs the same lines for every evaluation (the two HFLM warnings about a
  pre-loaded model, the ``generation_kwargs ... specified through cli`` warning, "Setting random seed ...",
  "Using pre-initialized model", ...), so a run that evaluates the base and the trained model, or a sweep of
  jobs in one process, repeats them all. A ``logging.Filter`` on the lm-eval and transformers generation loggers
  lets each distinct (logger, message) through once per process; errors always pass. In a data-parallel
  evaluation the other ranks log lm-eval's errors only (``quiet_other_ranks``).
* ``ItemProgress``: lm-eval's ``generate_until`` bar advances only when a whole batch has been generated, and a
  batch runs until its slowest item stops (or ``max_gen_toks``): at ``batch_size=8`` on a CPU it sits at 0/10 for
  minutes. This streamer, handed to ``model.generate``, ticks a bar as each item of the batch reaches a stop
  sequence and shows the tokens generated so far; it only reads the tokens, so the generations are unchanged.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from tqdm.auto import tqdm
from transformers.generation.streamers import BaseStreamer

#: logger namespaces whose repeated lines are dropped: lm-eval logs under its module names (lm_eval.*) and under
#: "lm-eval"; transformers' generation warnings under transformers.generation.*
QUIET_LOGGERS = ("lm_eval", "lm-eval", "transformers.generation")


class OncePerProcess(logging.Filter):
    """Lets a record through the first time its (logger name, formatted message) is seen; ERROR and above always.

    Keyed by the text, not the record: every evaluation builds new records with the same words."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        key = (record.name, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


_ONCE = OncePerProcess()


def _quiet(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in QUIET_LOGGERS)


def quiet_repeated_logs() -> None:
    """Attach the once-per-process filter to every lm-eval / transformers generation logger that exists now.

    A logger's filters do not apply to its children's records, so each module logger gets it; call this after
    importing the lm-eval modules that log (idempotent: calling it again only reaches loggers made since)."""
    for name in [*QUIET_LOGGERS, *list(logging.root.manager.loggerDict)]:
        if _quiet(name):
            logger = logging.getLogger(name)
            if _ONCE not in logger.filters:
                logger.addFilter(_ONCE)


def quiet_other_ranks(rank: int) -> None:
    """On a rank other than 0 of a data-parallel evaluation, lm-eval logs errors only: rank 0 logs the same lines
    (same tasks, same settings) for the group, as the pipeline's own logger does (instructdiff.pipeline.run)."""
    if rank != 0:
        for name in ("lm_eval", "lm-eval"):
            logging.getLogger(name).setLevel(logging.ERROR)


def generation_bar(total: int, disable: bool) -> tqdm:
    """The bar of a ``generate_until`` call: items whose generation has finished, of ``total``."""
    return tqdm(total=total, disable=disable, desc="Generating (items finished)")


class ItemProgress(BaseStreamer):
    """A ``generate`` streamer that ticks ``bar`` once per item of the batch as it reaches one of ``stop``.

    The rule is lm-eval's (``MultiTokenEOSCriteria``): a stop string within the decoded last tokens of the item's
    continuation, looking back the stop's length in tokens plus 2 (a stop string may be tokenized otherwise in
    the continuation). lm-eval cuts each generation at its first stop string, so the item is final from there
    even while the batch goes on. Items still open when the batch ends (``max_gen_toks``) tick at ``end()``."""

    def __init__(self, bar: Any, tokenizer: Any, stop: list[str], max_new_tokens: int,
                 refresh_s: float = 1.0) -> None:
        self.bar, self.tokenizer, self.stop = bar, tokenizer, [s for s in stop if s]
        self.max_new_tokens, self.refresh_s = max_new_tokens, refresh_s
        self.lookback = max((len(tokenizer.encode(s, add_special_tokens=False)) for s in self.stop), default=0) + 2
        self.rows: list[list[int]] | None = None
        self.done: list[bool] = []
        self.steps = 0
        self._shown = time.monotonic()

    def put(self, value: Any) -> None:
        if self.rows is None:  # generate's first call hands over the prompts
            self.rows = [[] for _ in range(value.shape[0])]
            self.done = [False] * value.shape[0]
            return
        self.steps += 1
        finished = 0
        for i, token in enumerate(value.reshape(-1).tolist()):
            if self.done[i]:
                continue
            self.rows[i].append(token)
            tail = self.tokenizer.decode(self.rows[i][-self.lookback:])
            if any(s in tail for s in self.stop):
                self.done[i] = True
                finished += 1
        self.bar.set_postfix_str(f"{self.steps}/{self.max_new_tokens} tokens in this batch", refresh=False)
        if finished:
            self.bar.update(finished)
        elif time.monotonic() - self._shown >= self.refresh_s:  # the token count moves even when no item ends
            self.bar.refresh()
            self._shown = time.monotonic()

    def end(self) -> None:
        left = self.done.count(False)
        self.done = [True] * len(self.done)
        if left:
            self.bar.update(left)
