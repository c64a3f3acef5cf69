"""How messages name things: paths and counts, in the words a user reads.

A path in a message is quoted as typed, never as a Python literal (``repr`` doubles
every backslash); only what would break the line or cannot be printed is escaped,
as ``\\ooo`` octal bytes. A count agrees with its noun ("1 block", "2 blocks").
"""

from __future__ import annotations

# Control characters and DEL would split or garble a one-line message.
_CONTROL = {c: f"\\{c:03o}" for c in [*range(0x20), 0x7F]}
# A name that is not valid UTF-8 reaches Python as lone surrogates (os.fsdecode):
# shown as the octal bytes they stand for.
_CONTROL.update({0xDC00 + b: f"\\{b:03o}" for b in range(0x80, 0x100)})


def quoted(path: str) -> str:
    """``'path'`` for a message: as typed, with control characters and undecodable
    bytes as ``\\ooo``."""
    return f"'{path.translate(_CONTROL)}'"


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """``1 block``, ``2 blocks``, ``1,000 files``; ``nouns`` for irregular plurals."""
    return f"{count:,} {noun if count == 1 else nouns or noun + 's'}"
