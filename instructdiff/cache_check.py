"""Cache entries that prove what they hold, and the one way every stage serves them.

Every entry records a checksum of its payload and the fingerprint of the inputs that made it (the model and
settings its cache key hashes), in the form its format allows:

* ``.npz`` tables (score tables, signals): a zip archive whose members each carry a CRC-32 that a full read
  checks; the first member, ``__cache__``, holds the fingerprint and every other member's name, dtype and shape
  (a member dropped from a damaged archive's directory is noticed, not read as absent). A table rewritten with
  ``np.savez`` keeping its members is a valid table: tests poison cached scores that way on purpose.
* JSON documents (selections, eval results): a ``_cache`` field with the sha256 of the rest of the document,
  serialised canonically, and the fingerprint.
* model directories (calibrated, trained, converted models): ``cache_check.json`` with the sha256 of every file
  and the fingerprint, written into the directory before it is published under its final name (or, for
  trained models, which ``train.py`` publishes itself, right after).

On read a damaged entry (cut, overwritten, bit-flipped) raises ``BadEntry("is corrupt")`` and one made for
other inputs (e.g. two table files swapped) ``BadEntry("was made by other settings")``; ``serve`` warns once
("cache entry <path> is corrupt: recomputing") and computes it again. An entry written before these records
existed has none: it is served if it passes the structural check of its kind (every npz member's CRC, the
JSON's fields, a safetensors file whose size matches its header), since its path is the hash of the same inputs.

A cached entry is read without a lock, so a read-only cache serves a fully cached run; the lock is taken only
to compute, and a cache that cannot be written then fails with one line naming the path and the fix. Under
several processes rank 0 alone reads, locks and publishes for the group (``serve_in_group``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

from instructdiff.atomic import OutputError, atomic_open, atomic_write_json, ensure_dir, explain

log = logging.getLogger("instructdiff")

T = TypeVar("T")

CORRUPT = "is corrupt"
OTHER_SETTINGS = "was made by other settings"
NPZ_META = "__cache__"
JSON_META = "_cache"
DIR_META = "cache_check.json"
CACHE_FIX = ("make it writable, or set paths.cache_dir to a writable directory (a run whose every stage is "
             "cached only reads the cache)")


class BadEntry(Exception):
    """A cache entry that must not be served: ``problem`` is ``CORRUPT`` or ``OTHER_SETTINGS``."""

    def __init__(self, problem: str, cause: str) -> None:
        super().__init__(f"{problem}: {cause}")
        self.problem, self.cause = problem, cause


@dataclass
class Entry(Generic[T]):
    """How to serve one cache entry: ``read()`` returns the verified value (raising on a bad entry),
    ``compute()`` makes and publishes it; ``lock`` is the file lock that makes concurrent jobs compute it once
    (None: no lock); ``opened(hit)`` is told whether it was served from the cache, before any compute.

    Under several processes (``serve_in_group``): ``together`` entries are computed by every rank at once (their
    ``compute`` holds collectives); the others by rank 0 alone. ``follow()`` is how a rank other than 0 takes
    the value once rank 0 has served it (default ``read``: e.g. a model directory whose every file rank 0 has
    just hashed needs only its stats read again)."""

    path: Path
    read: Callable[[], T]
    compute: Callable[[], T]
    lock: Path | None
    opened: Callable[[bool], None] | None = None
    together: bool = False
    follow: Callable[[], T] | None = None


_ABSENT = object()


def serve(entry: Entry[T], on_open: Callable[[bool], None] | None = None) -> tuple[T, bool]:
    """(value, hit): the cached value if the entry is valid, else computed (under the lock, after a second
    look: another job may have published it while this one waited)."""
    warned: list[bool] = []

    def cached() -> Any:
        if not entry.path.exists():
            return _ABSENT
        try:
            return entry.read()
        except Exception as e:  # anything a damaged file raises on the way in (BadZipFile, EOFError, ...)
            bad = e if isinstance(e, BadEntry) else BadEntry(CORRUPT, f"{type(e).__name__}: {e}")
            if not warned:  # once per entry, even when it is looked at again under the lock
                log.warning("cache entry %s %s: recomputing (%s)", entry.path, bad.problem, bad.cause)
                warned.append(True)
            return _ABSENT

    def opened(hit: bool) -> None:
        for hook in (entry.opened, on_open):
            if hook is not None:
                hook(hit)

    from instructdiff import distributed

    if distributed.joined():
        return serve_in_group(entry, cached, opened)
    return _serve_here(entry, cached, opened)


def _serve_here(entry: Entry[T], cached: Callable[[], Any], opened: Callable[[bool], None]) -> tuple[T, bool]:
    """``serve`` in one process (or on rank 0 for the group)."""
    value = cached()
    if value is _ABSENT:
        with lock_for_writing(entry.lock) if entry.lock is not None else nullcontext():
            if entry.lock is not None:
                value = cached()
            if value is _ABSENT:
                opened(False)
                return entry.compute(), False
    opened(True)
    return value, True


def serve_in_group(entry: Entry[T], cached: Callable[[], Any], opened: Callable[[bool], None]) -> tuple[T, bool]:
    """``serve`` for a rank of a group (torchrun, SLURM tasks); every rank calls it for the same entries in the
    same order. Rank 0 alone looks at the cache, takes the lock and publishes, and decides hit or miss for all:
    two ranks looking for themselves could disagree (another job publishing in between) and one would then
    wait in a collective the other never enters.

    * ``together``: on a miss every rank runs ``compute()`` (DDP training, sharded scoring, a selection whose
      selector trains or scores) while rank 0 alone holds the lock (``distributed.main_lock``) and looks again
      under it, since another job may have published the entry meanwhile.
    * otherwise rank 0 serves the entry as one process would (read, or lock, compute and publish) while the
      others wait (``distributed.main_first``: its error reaches every rank).

    Then the other ranks take the value rank 0 published (``follow``, else ``read``); a rank that cannot stops
    every rank with its message (``distributed.fail_together``).
    """
    from instructdiff import distributed

    held: dict[str, Any] = {}
    if entry.together:
        def look() -> bool:
            held["value"] = cached()
            return held["value"] is not _ABSENT

        hit = distributed.main_first(look)
        if not hit:
            with distributed.main_lock(entry.lock, lock_for_writing) if entry.lock is not None else nullcontext():
                if entry.lock is not None:
                    hit = distributed.main_first(look)
                if not hit:
                    opened(False)
                    return entry.compute(), False
    else:
        def on_main() -> bool:
            held["value"], hit = _serve_here(entry, cached, opened)
            return hit

        hit = distributed.main_first(on_main)
    main = distributed.is_main()
    with distributed.fail_together(f"reading the cache entry {entry.path}"):
        value = held["value"] if main else (entry.follow or entry.read)()
    if entry.together or not main:  # rank 0 told the hooks already when it served the entry itself
        opened(hit)
    return value, hit


@contextmanager
def writing_cache() -> Iterator[None]:
    """A write into the cache that fails for want of permission says how to fix it, in the same one line."""
    try:
        yield
    except OutputError as e:
        cause = e.__cause__
        if isinstance(cause, OSError) and cause.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise OutputError(f"{e}; {CACHE_FIX}") from cause
        raise


@contextmanager
def lock_for_writing(lock: Path) -> Iterator[None]:
    """The file lock of an entry about to be computed; an unwritable cache is one line with the path and fix."""
    from filelock import FileLock

    with writing_cache():
        ensure_dir(lock.parent, "the cache (paths.cache_dir)")
        try:
            handle = FileLock(str(lock))
            handle.acquire()
        except OSError as e:  # a lock file left by another user, a read-only mount that os.access missed
            raise explain(lock, e, "the cache lock (paths.cache_dir)") from e
    try:
        yield
    finally:
        handle.release()


def canonical(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists, keys strings): what fingerprints compare."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _compare(stored: Any, fingerprint: dict | None) -> None:
    if fingerprint is not None and stored != canonical(fingerprint):
        raise BadEntry(OTHER_SETTINGS, f"it records {_short(stored)}, this run needs {_short(fingerprint)}")


def _short(fp: Any) -> str:
    text = json.dumps(fp, sort_keys=True, default=str)
    return text if len(text) <= 160 else text[:157] + "..."


# -- npz tables ----------------------------------------------------------------------------------------------
def write_npz(path: Path, arrays: dict[str, np.ndarray], fingerprint: dict, what: str) -> None:
    """Publish ``arrays`` at ``path`` (atomically) with the fingerprint and member list first."""
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    meta = {"fingerprint": canonical(fingerprint),
            "members": {k: [v.dtype.str, list(v.shape)] for k, v in arrays.items()}}
    with writing_cache(), atomic_open(path, "wb", what) as fh:
        np.savez(fh, **{NPZ_META: np.array(json.dumps(meta, sort_keys=True))}, **arrays)


def read_npz(path: Path, fingerprint: dict | None,
             legacy_check: Callable[[dict[str, np.ndarray]], None] | None = None) -> dict[str, np.ndarray]:
    """The arrays of a table written by ``write_npz`` (or before it existed: then ``legacy_check``)."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}  # reading every member whole makes zipfile check its CRC-32
    meta_array = arrays.pop(NPZ_META, None)
    if meta_array is None:
        if legacy_check is not None:
            legacy_check(arrays)
        return arrays
    meta = json.loads(str(meta_array))
    found = {k: [v.dtype.str, list(v.shape)] for k, v in arrays.items()}
    if found != meta.get("members"):
        raise BadEntry(CORRUPT, f"its members {sorted(found)} differ from the ones recorded "
                                f"{sorted(meta.get('members') or {})}")
    _compare(meta.get("fingerprint"), fingerprint)
    return arrays


# -- JSON documents ----------------------------------------------------------------------------------------
def _json_digest(body: Any, fingerprint: Any) -> str:
    """sha256 of the body and the fingerprint recorded with it: a damaged record is corrupt, not "other settings"."""
    text = json.dumps({"body": body, "fingerprint": fingerprint}, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def write_json(path: Path, body: dict, fingerprint: dict, what: str, **dump_kwargs: Any) -> None:
    """Publish the JSON object ``body`` at ``path`` (atomically) with its checksum and fingerprint."""
    plain = json.loads(json.dumps(body, default=dump_kwargs.get("default")))  # exactly what a reader parses
    record = {"sha256": _json_digest(plain, canonical(fingerprint)), "fingerprint": canonical(fingerprint)}
    with writing_cache():
        atomic_write_json(path, {**plain, JSON_META: record}, what, **dump_kwargs)


def read_json(path: Path, fingerprint: dict | None, legacy_check: Callable[[dict], None] | None = None) -> dict:
    """The object written by ``write_json``, without its record (or, written before records: ``legacy_check``)."""
    body = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(body, dict):
        raise BadEntry(CORRUPT, f"a JSON object was expected, found {type(body).__name__}")
    record = body.pop(JSON_META, None)
    if record is None:
        if legacy_check is not None:
            legacy_check(body)
        return body
    if not isinstance(record, dict) or record.get("sha256") != _json_digest(body, record.get("fingerprint")):
        raise BadEntry(CORRUPT, "its content does not match its recorded sha256")
    _compare(record.get("fingerprint"), fingerprint)
    return body


# -- model directories ------------------------------------------------------------------------------------
def _file_digest(path: Path) -> str:
    h = hashlib.sha256()  # hashlib.file_digest is Python 3.11+; the project supports 3.10
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def seal_dir(path: Path, fingerprint: dict) -> None:
    """Record the sha256 of every file under ``path`` and the fingerprint in ``path/cache_check.json``."""
    files = {p.relative_to(path).as_posix(): _file_digest(p) for p in sorted(path.rglob("*"))
             if p.is_file() and p.name != DIR_META}
    record = {"fingerprint": canonical(fingerprint), "files": files}
    with writing_cache():
        atomic_write_json(path / DIR_META, {**record, "sha256": _json_digest(record, None)},
                          "a model's cache record")


def verify_dir(path: Path, fingerprint: dict | None, legacy_check: Callable[[Path], None]) -> None:
    """Raise BadEntry unless every file recorded by ``seal_dir`` is there with its checksum."""
    record_path = path / DIR_META
    if not record_path.exists():
        legacy_check(path)
        return
    record = json.loads(record_path.read_text(encoding="utf-8"))
    if record.pop("sha256", None) != _json_digest(record, None):
        raise BadEntry(CORRUPT, f"{DIR_META} does not match its own sha256")
    _compare(record.get("fingerprint"), fingerprint)
    for name, digest in sorted(record["files"].items()):
        if not (path / name).is_file():
            raise BadEntry(CORRUPT, f"{name} is missing")
        if _file_digest(path / name) != digest:
            raise BadEntry(CORRUPT, f"{name} does not match its recorded sha256")


def check_safetensors(path: Path) -> None:
    """Raise BadEntry unless ``path`` is a safetensors file as long as its header says (a cut file is not)."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if not 2 <= n <= 100_000_000:
            raise BadEntry(CORRUPT, f"{path.name} has no safetensors header")
        header = json.loads(fh.read(n))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if path.stat().st_size != 8 + n + end:
        raise BadEntry(CORRUPT, f"{path.name} holds {path.stat().st_size} bytes, its header describes {8 + n + end}")


def check_model_dir(path: Path, *json_files: str) -> None:
    """Structural check of a model directory written before its record existed: the named JSON files parse and
    every safetensors file is as long as its header says."""
    for name in ("config.json", *json_files):
        json.loads((path / name).read_text(encoding="utf-8"))
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise BadEntry(CORRUPT, "it holds no *.safetensors weights")
    for w in weights:
        check_safetensors(w)
