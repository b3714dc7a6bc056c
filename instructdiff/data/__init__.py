"""Data layer: read raw files in their native formats, map each record to a :class:`Row`, assemble a pool.

Every stage downstream sees only ``Row`` objects, so all knowledge of GSM8K, MedMCQA, LIMA, ... lives here.
Locations in messages and reports are ``file:LINE`` (1-based) for JSON Lines and ``file:element I``
(0-based array index) for JSON files, so a user can jump straight to the offending record; every row also
keeps them as fields (``provenance(row)``).

Modules, one job each: ``errors`` (DataError), ``paths`` (finding a file), ``reader`` (files -> raw records),
``fields`` (typed fields of a record), ``formats`` (record -> Row per dataset format), ``source`` (one file ->
rows with provenance), ``domain`` (what a domain config asks for), ``pool`` (a domain's pool and its report).
"""

from __future__ import annotations

from instructdiff import resolvers as _resolvers
from instructdiff.data.domain import ON_ERROR, resolve_on_error
from instructdiff.data.errors import DataError, Record
from instructdiff.data.formats import FORMAT_FIELDS, FORMATS, detect_format
from instructdiff.data.paths import resolve_data_path
from instructdiff.data.pool import PoolReport, SourceCount, drop_reason, load_pool
from instructdiff.data.reader import read_records
from instructdiff.data.source import load_source, original_records, provenance

# The domain YAMLs name a user's pool after its file (${instructdiff.file_stem:...}); registering here too makes
# any process that reads pools able to resolve them, whichever entry point it started from.
_resolvers.register()

__all__ = [
    "FORMATS", "FORMAT_FIELDS", "ON_ERROR", "DataError", "PoolReport", "Record", "SourceCount", "detect_format",
    "drop_reason", "load_pool", "load_source", "original_records", "provenance", "read_records",
    "resolve_data_path", "resolve_on_error",
]
