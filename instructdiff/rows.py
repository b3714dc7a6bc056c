"""The unit of data every stage passes around: one instruction/response pair with a content-hash id."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any


def content_id(instruction: str, input: str, response: str) -> str:
    """Stable id of a sample: the first 16 hex digits of sha256 over its three text fields.

    Length-prefixed fields make ("ab", "c") and ("a", "bc") hash differently.
    """
    h = hashlib.sha256()
    for part in (instruction, input, response):
        data = part.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Row:
    """One pool or eval sample. ``input`` is the optional context (Alpaca's ``input``); never dropped.

    ``file`` and ``line`` (JSON Lines, 1-based) or ``index`` (a JSON array or keyed object, 0-based) say where the
    record was read (``instructdiff.data.provenance``); None for rows built in code. They are kept out of the id,
    equality and hashing: the same text read from another file is the same sample, and caches keyed by ids stay
    valid when a file is moved.
    """

    id: str
    instruction: str
    input: str
    response: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    file: str | None = field(default=None, compare=False)
    line: int | None = field(default=None, compare=False)
    index: int | None = field(default=None, compare=False)

    @classmethod
    def make(cls, instruction: str, input: str, response: str, meta: dict[str, Any] | None = None) -> Row:
        return cls(content_id(instruction, input, response), instruction, input, response, dict(meta or {}))

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "instruction": self.instruction, "input": self.input,
                "response": self.response, "meta": self.meta}


def fingerprint_rows(rows: list[Row]) -> str:
    """Hash of an ordered pool: ids in order (ids already hash the content)."""
    h = hashlib.sha256()
    for r in rows:
        h.update(r.id.encode())
    return h.hexdigest()[:16]


def stable_hash(obj: Any) -> str:
    """sha256 of a JSON-serialisable object with sorted keys: the cache key of a stage's inputs."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
