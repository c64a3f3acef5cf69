"""Piece rows as block records hold them, for tests that read or rewrite a journal."""

from __future__ import annotations

from typing import Any

import msgpack


def record_rows(record: dict[str, Any]) -> list[list[Any]]:
    """A decoded block record's piece rows, in either format (packed, or version 1's list)."""
    return msgpack.unpackb(record["rows"]) if "rows" in record else record["pieces"]
