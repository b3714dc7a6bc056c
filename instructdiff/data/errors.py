"""The data layer's one error type, and what a raw record is."""

from __future__ import annotations

from typing import Any

Record = dict[str, Any]


class DataError(ValueError):
    """A file or record that cannot be used.

    Mappers raise it without a location (they see one record); the readers add ``where`` (file and line or
    element) so the final message names file, line, field and what was expected.
    """

    def __init__(self, message: str, *, where: str | None = None, field: str | None = None) -> None:
        super().__init__(f"{where}: {message}" if where else message)
        self.reason = message
        self.where = where
        self.field = field

    def at(self, where: str, hint: str = "") -> DataError:
        """The same error located at ``where`` (keeps an existing location: the innermost one is exact)."""
        if self.where is not None:
            return self
        return DataError(self.reason + hint, where=where, field=self.field)


def _a(value: Any) -> str:
    """JSON-ish type name with article, for "field 'x' is an integer; expected a string"."""
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "an object", type(None): "null"}
    return names.get(type(value), f"a {type(value).__name__}")
