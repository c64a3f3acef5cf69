"""The packing policy: which bytes of which files make up each block.

Files are taken in walk order. A file larger than half a block is *large*: it gets
blocks of its own, cut every ``block_size`` bytes from offset 0, its tail a block of
its own. Every other non-empty file is *small*: small files are packed, in walk
order, into shared blocks; a small file never spans two blocks, and a block is
closed when the next small file does not fit. Empty files take no block. This is the
layout arv-put produces, and nothing in it depends on workers, chunks or timing.

The plan is compact (a few integers per file) so that very large trees stay cheap.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from ingest.keep.locator import BLOCK_SIZE_MAX


class Piece(NamedTuple):
    """``length`` bytes of file ``file_index`` from ``file_offset``, in block order.

    A named tuple, not a dataclass: a block of small files has one per file (65,536
    for 1 KiB files), and a tuple is built several times faster.
    """

    file_index: int
    file_offset: int
    length: int


@dataclass(frozen=True, slots=True)
class BlockPlan:
    """One block to build: its index in the plan, size and pieces in order."""

    index: int
    size: int
    pieces: tuple[Piece, ...]


class FilePlacement(NamedTuple):
    """Where one file's bytes lie: ``(block index, offset in block, length)`` in file order."""

    parts: tuple[tuple[int, int, int], ...]


_NO_PLACEMENT = FilePlacement(())


class Plan:
    """Block plans for a list of file sizes, under the packing policy."""

    def __init__(self, sizes: Sequence[int], block_size: int = BLOCK_SIZE_MAX):
        if not 1 <= block_size <= BLOCK_SIZE_MAX:
            raise ValueError(f"block size must be between 1 and {BLOCK_SIZE_MAX}")
        self.block_size = block_size
        self._half = block_size // 2
        self.sizes = array("q", sizes)
        n = len(self.sizes)
        # Per file: its first block and its offset there (-1 for empty files).
        self._file_block = array("q", bytes(8 * n))
        self._file_offset = array("q", bytes(8 * n))
        # Per block: size, and the range of files that may have pieces in it.
        self._block_size = array("q")
        self._block_first_file = array("q")
        self._block_end_file = array("q")
        self._build()

    def is_large(self, size: int) -> bool:
        """Large files (more than half a block) get blocks of their own."""
        return size > self._half

    def _new_block(self, first_file: int) -> int:
        self._block_size.append(0)
        self._block_first_file.append(first_file)
        self._block_end_file.append(first_file + 1)
        return len(self._block_size) - 1

    def _build(self) -> None:
        open_block = -1  # the shared block small files are being packed into
        for i, size in enumerate(self.sizes):
            if size == 0:
                self._file_block[i] = -1
            elif self.is_large(size):
                self._file_block[i] = len(self._block_size)
                self._file_offset[i] = 0
                for start in range(0, size, self.block_size):
                    b = self._new_block(i)
                    self._block_size[b] = min(self.block_size, size - start)
            else:
                if open_block < 0 or self._block_size[open_block] + size > self.block_size:
                    open_block = self._new_block(i)
                self._file_block[i] = open_block
                self._file_offset[i] = self._block_size[open_block]
                self._block_size[open_block] += size
                self._block_end_file[open_block] = i + 1

    @property
    def block_count(self) -> int:
        return len(self._block_size)

    def block_size_of(self, index: int) -> int:
        return self._block_size[index]

    def block(self, index: int) -> BlockPlan:
        """The pieces of one block, in the order its bytes are laid out."""
        first, end = self._block_first_file[index], self._block_end_file[index]
        size = self._block_size[index]
        if self.is_large(self.sizes[first]):
            offset = (index - self._file_block[first]) * self.block_size
            return BlockPlan(index, size, (Piece(first, offset, size),))
        # Files in [first, end) that are not in this block are empty (block -1) or
        # large (their own blocks): the block index alone tells them apart.
        sizes, file_block = self.sizes, self._file_block
        pieces = tuple([Piece(i, 0, sizes[i]) for i in range(first, end) if file_block[i] == index])
        return BlockPlan(index, size, pieces)

    def blocks(self) -> Iterator[BlockPlan]:
        """Every block plan, in index order."""
        for index in range(self.block_count):
            yield self.block(index)

    def placement(self, file_index: int) -> FilePlacement:
        """Where a file's bytes are: its blocks, offsets and lengths in file order."""
        size = self.sizes[file_index]
        if size <= self._half:
            if size == 0:
                return _NO_PLACEMENT
            return FilePlacement(((self._file_block[file_index], self._file_offset[file_index], size),))
        first = self._file_block[file_index]
        return FilePlacement(tuple(
            (first + k, 0, min(self.block_size, size - start))
            for k, start in enumerate(range(0, size, self.block_size))))
