"""MD5 of several blocks at once: the project's multi-buffer extension, or hashlib.

Each block is its own MD5 stream, and a worker has several at hand, so the extension
``ingest._md5lanes`` (built from ``ingest/_md5lanes.c`` by ``pip install``) hashes
the next chunk of up to 16 blocks in one pass, one block per SIMD lane: ``avx512``
(16 lanes), ``avx2`` (8 lanes), or ``portable`` (plain C, 4 blocks interleaved),
the fastest the CPU runs. Without the extension (no C compiler at install time)
``hashlib`` hashes one block at a time; the result is the same either way.

``$KEEP_INGEST_MD5`` forces a choice for this process and the local workers it forks
(``auto``, the default, or one of ``avx512``, ``avx2``, ``portable``, ``hashlib``).
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from ingest.errors import ConfigError

ENV = "KEEP_INGEST_MD5"
CHOICES = ("auto", "avx512", "avx2", "portable", "hashlib")

try:
    from ingest import _md5lanes
except ImportError as exc:  # not built: no C compiler when installed, or another platform
    _md5lanes = None
    NOT_BUILT = f"the ingest._md5lanes extension is not built ({exc})"
else:
    NOT_BUILT = ""


class Hasher(Protocol):
    """What an engine's ``new()`` returns: hashlib's MD5 interface."""

    def update(self, data: bytes | bytearray | memoryview, /) -> None: ...

    def hexdigest(self) -> str: ...


Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True)
class Engine:
    """One way of hashing blocks: ``lanes`` blocks advance together in one pass."""

    name: str                       # a kernel of the extension, or "hashlib"
    lanes: int
    origin: str                     # why this one: "detected", "$KEEP_INGEST_MD5", or why not the extension
    new: Callable[[], Hasher]

    def update_many(self, hashers: Sequence[Hasher], chunks: Sequence[Buffer]) -> None:
        """Hasher ``i`` absorbs ``chunks[i]``; with the extension all in one pass, without
        the GIL. Chunks of equal length fill the lanes best."""
        if self.name == "hashlib":
            for hasher, chunk in zip(hashers, chunks, strict=True):
                hasher.update(chunk)
        else:
            _md5lanes.update_many(hashers, chunks, self.name)

    @property
    def lanes_text(self) -> str:
        """``16 lanes`` or ``one block at a time``."""
        return f"{self.lanes} lanes" if self.lanes > 1 else "one block at a time"

    def describe(self) -> str:
        """E.g. ``avx512 (16 lanes)`` or ``hashlib (one block at a time)``."""
        return f"{self.name} ({self.lanes_text})"


def available() -> tuple[str, ...]:
    """The engines this process can use, fastest first (always ending with hashlib)."""
    kernels = _md5lanes.kernels() if _md5lanes is not None else ()
    return (*kernels, "hashlib")


def select(choice: str, origin: str = f"${ENV}") -> Engine:
    """The engine for ``choice`` (one of CHOICES); ConfigError naming ``origin`` when it
    is unknown or cannot run here."""
    if choice not in CHOICES:
        raise ConfigError(f"{origin}: unknown MD5 engine {choice!r}; choose one of {', '.join(CHOICES)}")
    usable = available()
    if choice == "auto":
        choice, origin = usable[0], NOT_BUILT or "detected"
    elif choice not in usable:
        why = NOT_BUILT or "this CPU cannot run it"
        raise ConfigError(f"{origin}: MD5 engine {choice!r} is not available: {why} "
                          f"(available: {', '.join(usable)})")
    if choice == "hashlib":
        return Engine("hashlib", 1, origin, hashlib.md5)
    return Engine(choice, _md5lanes.LANES[choice], origin, _md5lanes.md5)


@functools.cache
def engine() -> Engine:
    """This process's engine: ``$KEEP_INGEST_MD5``, or the fastest available."""
    return select(os.environ.get(ENV) or "auto")
