"""Publishing files so that a reader sees either the old state or the finished file, never a torn one.

Every artifact a later run may trust (score tables, selections, eval results, the run directory's files) is
written to a temporary name in the same directory, flushed and fsynced, then ``os.replace``-d onto its final
name. ``os.replace`` is atomic within one filesystem, so a SIGKILL, a full disk or a crash at any point leaves
either no file or the complete one; the temporary file is removed when the write fails in-process.

Write failures become :class:`OutputError` with the path, the config knob that chose it and a likely cause
("disk full", "is a file, not a directory", ...), instead of a bare ``OSError`` from deep inside a stage.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


class OutputError(RuntimeError):
    """An output location that cannot be written; the message names the path, the knob and the cause."""


def _cause(path: Path, e: OSError) -> str:
    # Walk up to the first existing ancestor: "a parent is a file" is the commonest typo and the least
    # obvious from ENOTDIR alone.
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    if p.exists() and not p.is_dir() and p != path:
        return f"{p} is a file, not a directory"
    return {
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is exhausted",
        errno.EFBIG: "the file exceeds the allowed file size (ulimit -f) or the disk is full",
        errno.EROFS: "the filesystem is read-only",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.ENOTDIR: "a parent is not a directory",
    }.get(e.errno or -1, e.strerror or type(e).__name__)


def explain(path: str | Path, e: OSError, what: str = "output") -> OutputError:
    """An :class:`OutputError` for ``e`` raised while writing ``path`` (``what``: the knob or artifact)."""
    path = Path(path)
    return OutputError(f"cannot write {what} at {path}: {_cause(path, e)} [{e.strerror or e}]; "
                       "nothing was published there (the previous file, if any, is unchanged)")


def ensure_dir(path: str | Path, what: str = "output directory") -> Path:
    """Create ``path`` (and parents) or raise OutputError; also fails early on a directory we cannot write."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise explain(path, e, what) from e
    if not os.access(path, os.W_OK | os.X_OK):
        code = errno.EROFS if _read_only_filesystem(path) else errno.EACCES
        cause = OSError(code, os.strerror(code), str(path))
        raise OutputError(f"cannot write {what} at {path}: {_cause(path, cause)}") from cause
    return path


def _read_only_filesystem(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # no statvfs (Windows): say "permission denied"
        return False


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", what: str = "output", **kwargs: Any) -> Iterator[IO]:
    """``open`` for writing whose result appears at ``path`` only if the block finishes without error."""
    path = Path(path)
    ensure_dir(path.parent, f"the directory of {what}")
    # pid + random suffix: two processes (or two threads) publishing the same key never share a temp file;
    # the real suffix is kept last because np.savez appends ".npz" to names without it.
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}-{secrets.token_hex(3)}{path.suffix}")
    try:
        with open(tmp, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise explain(path, e, what) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str, what: str = "output") -> None:
    with atomic_open(path, "w", what, encoding="utf-8") as fh:
        fh.write(text)


def atomic_write_json(path: str | Path, obj: Any, what: str = "output", **dump_kwargs: Any) -> None:
    # Serialise first: a value json cannot encode must fail before any file is touched.
    atomic_write_text(path, json.dumps(obj, **{"indent": 2, **dump_kwargs}), what)


def is_temporary(path: str | Path) -> bool:
    """Whether ``path`` is an unpublished temporary of :func:`atomic_open` (for cleanup and tests)."""
    return ".tmp" in Path(path).name
