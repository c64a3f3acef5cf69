"""The block store interface shared by the workers and the read side.

A worker streams a block's bytes into a :class:`BlockWriter` as chunks arrive (it
computes the MD5 itself, as the bytes pass), then commits it under that MD5. The
store answers with the locator to put in the manifest, possibly signed, and the
number of replicas it confirmed. Stores are built from a plain ``spec`` dict (see
:mod:`ingest.keep.factory`) so the same description can travel to worker processes.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Protocol

from ingest.errors import StoreError
from ingest.keep.locator import EMPTY_BLOCK_MD5, Locator, LocatorError


@dataclass(frozen=True, slots=True)
class StoredBlock:
    """What a store confirmed for one committed block."""

    locator: str
    replicas: int


class BlockWriter(Protocol):
    """Receives one block's bytes, then commits or aborts it."""

    def write(self, data: bytes | memoryview) -> None:
        """Append bytes to the block."""

    def commit(self, md5_hex: str) -> StoredBlock:
        """Store the block under its MD5; durable when this returns."""

    def abort(self) -> None:
        """Drop the block; nothing becomes visible in the store."""


class BlockStore(Protocol):
    """A place blocks are written to and read from."""

    buffers_whole_blocks: bool
    """Whether a block being written is held in memory until its commit (so a worker
    keeps few open at once)."""

    def open_block(self) -> BlockWriter:
        """Start writing a new block."""

    def get(self, locator: str) -> bytes:
        """Read a whole block, verifying its MD5 and size."""

    def describe(self) -> str:
        """A short human name for messages, e.g. the directory path."""

    def unreachable(self) -> dict[str, str]:
        """Parts of the store that do not answer right now: ``{where: error}``."""

    def max_replicas(self, down: Collection[str] = ()) -> int | None:
        """The most distinct copies of one block this store can write (1 for a
        directory, the writable services for Keep disk services), not counting the
        parts ``down`` names (as :meth:`unreachable` names them); None when it cannot
        tell (a proxy stores copies behind it)."""

    def check_block(self, locator: str) -> None:
        """Confirm a stored block is still there and sound: BlockNotFound when it is
        missing (or has fewer copies than the store was asked to keep), BlockCorrupt
        when its stored bytes are not its own, StoreError when the store cannot tell."""

    def close(self) -> None:
        """Release connections and files."""


def block_to_read(locator: str) -> Locator | None:
    """The parsed locator of a block to read, or None for the empty block (nothing to
    read); StoreError naming the text when it is not a locator."""
    try:
        loc = Locator.parse(locator)
    except LocatorError as exc:
        raise StoreError(str(exc)) from None
    return None if loc.md5 == EMPTY_BLOCK_MD5 and loc.size == 0 else loc
