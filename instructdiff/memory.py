"""Hand memory that a finished stage freed back to the operating system.

A run holds one model at a time, but without this its resident memory only ever grows: the trainer, its
optimiser state and the activations of the largest batch are freed at the end of a training stage, yet glibc
keeps the freed heap for reuse, so scoring and evaluation then run on top of the training stage's peak
(measured on the default run, 2026-12-06: 3.9 GiB resident while scoring a 135M model, 0.6 GiB of it needed).

Why by hand: no library exposes glibc's ``mallopt`` / ``malloc_trim``; PyTorch's CPU allocator calls
``posix_memalign`` and ``free`` directly, so the C library's policy decides what goes back to the system.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import platform

log = logging.getLogger(__name__)

# glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3
# Blocks from 1 MiB up are mapped one by one and unmapped when freed, so memory freed by a step goes back at
# once. glibc's own threshold starts at 128 KiB and rises to the largest block freed (up to 32 MiB), after which
# activations and logits tiles come from the heap, whose freed middle stays resident: the default run's
# calibration then peaked at 7.5 GiB for a live set of about 5 GiB.
MMAP_THRESHOLD_BYTES = 1 << 20

_libc = None


def _glibc():
    global _libc
    if _libc is None:
        if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
            _libc = False
        else:
            try:
                _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            except OSError:
                _libc = False
    return _libc or None


def return_large_blocks_at_once() -> bool:
    """Set glibc's mmap threshold to ``MMAP_THRESHOLD_BYTES`` for this process (the CLI entry points call it
    before any model is loaded). Returns whether it applied (False off glibc). Allocation only: no number a run
    computes changes."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def release_memory() -> None:
    """Collect garbage (a trainer and its callbacks form reference cycles, so ``del`` alone keeps the optimiser
    state alive), empty PyTorch's CUDA cache, and give the C heap's free pages back (``malloc_trim``)."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
