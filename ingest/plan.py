"""The packing policy: which bytes of which files make up each block.

Files are taken in walk order. A file larger than half a block is *large*: it gets
blocks of its own, cut every ``block_size`` bytes from offset 0, its tail a block of
its own. Every other non-empty file is *small*: small files are packed, in walk
order, into shared blocks; a small file never spans two blocks, and a block is
closed when the next small file does not fit. Empty files take no block. This is the
layout arv-put produces, and nothing in it depends on workers, chunks or timing.

The policy needs no look-ahead, so a :class:`Packer` is fed the files as the walk
finds them and hands out each block as soon as it is closed: nothing is kept per
file but the pieces of the one shared block being filled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

from ingest.keep.locator import BLOCK_SIZE_MAX
from ingest.walk import SourceFile


class Piece(NamedTuple):
    """``length`` bytes of ``file`` from ``file_offset``, in block order.

    A named tuple, not a dataclass: a block of small files has one per file (65,536
    for 1 KiB files), and a tuple is built several times faster.
    """

    file: SourceFile
    file_offset: int
    length: int


@dataclass(frozen=True, slots=True)
class BlockPlan:
    """One block to build: its index in the run, size, pieces in order, and how many
    files have their last byte in it."""

    index: int
    size: int
    pieces: tuple[Piece, ...]
    ends: int


_piece = partial(tuple.__new__, Piece)   # Piece(*fields), at half the cost of the call

FileParts = tuple[tuple[int, int, int], ...]
"""Where one file's bytes lie: ``(block index, offset in block, length)`` in file order."""


class Packer:
    """Packs files, fed in walk order, into blocks under the packing policy."""

    def __init__(self, block_size: int = BLOCK_SIZE_MAX):
        if not 1 <= block_size <= BLOCK_SIZE_MAX:
            raise ValueError(f"block size must be between 1 and {BLOCK_SIZE_MAX}")
        self.block_size = block_size
        self._half = block_size // 2
        self.block_count = 0
        self._open = -1                       # index of the shared block being filled
        self._open_size = 0
        self._open_pieces: list[Piece] = []

    def is_large(self, size: int) -> bool:
        """Large files (more than half a block) get blocks of their own."""
        return size > self._half

    def add(self, file: SourceFile) -> tuple[FileParts, Sequence[BlockPlan]]:
        """Place one file: where its bytes go, and the blocks this closes (its own,
        for a large file; the shared block it did not fit in, for a small one)."""
        size = file.fingerprint.size
        if size > self._half:
            return self._add_large(file, size)
        if not size:
            return (), ()
        closed: Sequence[BlockPlan] = ()   # most files close no block
        if self._open_size + size > self.block_size:
            closed = [self._close()]
        if self._open < 0:
            self._open = self._new_index()
        parts = ((self._open, self._open_size, size),)
        self._open_pieces.append(_piece((file, 0, size)))
        self._open_size += size
        return parts, closed

    def _add_large(self, file: SourceFile, size: int) -> tuple[FileParts, list[BlockPlan]]:
        parts, blocks = [], []
        for start in range(0, size, self.block_size):
            length = min(self.block_size, size - start)
            index = self._new_index()
            last = start + length == size
            blocks.append(BlockPlan(index, length, (Piece(file, start, length),), int(last)))
            parts.append((index, 0, length))
        return tuple(parts), blocks

    def finish(self) -> list[BlockPlan]:
        """The shared block still open, if any: the walk is over."""
        return [self._close()] if self._open >= 0 else []

    def _new_index(self) -> int:
        self.block_count += 1
        return self.block_count - 1

    def _close(self) -> BlockPlan:
        block = BlockPlan(self._open, self._open_size, tuple(self._open_pieces), len(self._open_pieces))
        self._open, self._open_size, self._open_pieces = -1, 0, []
        return block
