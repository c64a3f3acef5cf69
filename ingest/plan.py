"""The packing policy: which bytes of which files make up each block.

Files are taken in walk order. A file larger than half a block is *large*: it gets
blocks of its own, cut every ``block_size`` bytes from offset 0, its tail a block of
its own. Every other non-empty file is *small*: small files are packed, in walk
order, into shared blocks; a small file never spans two blocks, and a block is
closed when the next small file does not fit. Empty files take no block. This is the
layout arv-put produces, and nothing in it depends on workers, chunks or timing.

The policy needs no look-ahead, so a :class:`Packer` is fed the walk's batches as
the walk finds them and hands out each block as soon as it is closed. It works a
batch at a time: a run of small files is placed with one sum and one search, and a
block keeps its files as runs of batches (:class:`FileRun`), not an object per file.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from itertools import accumulate, chain, repeat
from operator import add
from typing import NamedTuple

from ingest.keep.locator import BLOCK_SIZE_MAX
from ingest.walk import FileBatch, SourceFile


class Piece(NamedTuple):
    """``length`` bytes of ``file`` from ``file_offset``, in block order (built from a
    block's runs when asked for: see BlockPlan.pieces)."""

    file: SourceFile
    file_offset: int
    length: int


class FileRun(NamedTuple):
    """Files ``start`` to ``stop`` (excluded) of a batch, whole and one after the other
    in a block, ``length`` bytes in all; or, for a large file's block (``stop`` is
    ``start + 1``), ``length`` bytes of that file from ``offset``."""

    batch: FileBatch
    start: int
    stop: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class BlockPlan:
    """One block to build: its index in the run, size, files (as runs, in order), how
    many pieces (files, or a large file's one), and how many files have their last
    byte in it."""

    index: int
    size: int
    runs: tuple[FileRun, ...]
    count: int
    ends: int

    @property
    def pieces(self) -> list[Piece]:
        """Its pieces in block order, one per file (made on each call: for the blocks
        read or listed, not for every block of a run)."""
        return self.pieces_at(range(self.count))

    def pieces_at(self, positions: Iterable[int]) -> list[Piece]:
        """Its pieces at ``positions`` (ascending), made without the others."""
        pieces = []
        wanted = iter(positions)
        want = next(wanted, None)
        first = 0           # the position of the run's first piece
        for batch, start, stop, offset, length in self.runs:
            first += stop - start
            while want is not None and want < first:
                i = stop - (first - want)
                pieces.append(Piece(batch.file(i), offset, length) if stop - start == 1
                              else Piece(batch.file(i), 0, batch.fingerprints.sizes[i]))
                want = next(wanted, None)
        return pieces

    def first_size(self) -> int:
        """The size of its first file (a large file's, for a block of one)."""
        run = self.runs[0]
        return run.batch.fingerprints.sizes[run.start]


FileParts = tuple[tuple[int, int, int], ...]
"""Where one file's bytes lie: ``(block index, offset in block, length)`` in file order."""

SPREAD = -1              # the span of a file in several blocks: (SPREAD, 0, 0), its parts kept aside
EMPTY = -2               # the span of an empty file: (EMPTY, 0, 0)
_SPREAD_SPAN = (SPREAD, 0, 0)
_EMPTY_SPAN = (EMPTY, 0, 0)


@dataclass(slots=True)
class BatchParts:
    """Where a batch's files went: one span ``(block, offset, length)`` a file, in an
    array of three numbers a file (the assembler keeps them so); the parts of a file
    in several blocks in ``spread``, by its index in the batch; the blocks used."""

    spans: array = field(default_factory=lambda: array("q"))
    spread: dict[int, FileParts] = field(default_factory=dict)
    blocks: list[int] = field(default_factory=list)

    def use(self, index: int) -> None:
        if not self.blocks or self.blocks[-1] != index:
            self.blocks.append(index)


def file_parts(spans: Iterable[int], spread: Mapping[int, FileParts]) -> Iterator[FileParts]:
    """Each file's parts, from its span (see BatchParts) or ``spread``, by file index."""
    spans = iter(spans)
    for i, (block, offset, length) in enumerate(zip(spans, spans, spans, strict=True)):
        if block >= 0:
            yield ((block, offset, length),)
        elif block == SPREAD:
            yield spread[i]
        else:
            yield ()


class Packer:
    """Packs files, fed in walk order a batch at a time, into blocks under the policy."""

    def __init__(self, block_size: int = BLOCK_SIZE_MAX):
        if not 1 <= block_size <= BLOCK_SIZE_MAX:
            raise ValueError(f"block size must be between 1 and {BLOCK_SIZE_MAX}")
        self.block_size = block_size
        self._half = block_size // 2
        self.block_count = 0
        self.empty_files = 0
        self._open = -1                       # index of the shared block being filled
        self._open_size = 0
        self._open_runs: list[FileRun] = []
        self._open_count = 0

    def is_large(self, size: int) -> bool:
        """Large files (more than half a block) get blocks of their own."""
        return size > self._half

    def add(self, batch: FileBatch) -> tuple[BatchParts, list[BlockPlan]]:
        """Place a batch's files: where their bytes go, and the blocks this closes
        (a large file's own, and each shared block the next small file did not fit in)."""
        sizes = batch.fingerprints.sizes
        placed, closed = BatchParts(), []
        half, n = self._half, len(sizes)
        if n and min(sizes) and max(sizes) <= half:    # nearly every batch: small files alone
            self._add_small(batch, sizes, 0, n, placed, closed)
            return placed, closed
        i = 0
        while i < n:
            size = sizes[i]
            if not size:
                placed.spans.extend(_EMPTY_SPAN)
                self.empty_files += 1
                i += 1
            elif size > half:
                parts = self._add_large(batch, i, size, placed, closed)
                if len(parts) == 1:
                    placed.spans.extend(parts[0])
                else:
                    placed.spans.extend(_SPREAD_SPAN)
                    placed.spread[i] = parts
                i += 1
            else:
                j = i + 1
                while j < n and 0 < sizes[j] <= half:
                    j += 1
                self._add_small(batch, sizes, i, j, placed, closed)
                i = j
        return placed, closed

    def _add_small(self, batch: FileBatch, sizes: list[int], start: int, stop: int, placed: BatchParts,
                   closed: list[BlockPlan]) -> None:
        """Place small files ``start`` to ``stop`` of a batch: as many as fit in the
        open block (found by a search of their running sums), then a new block."""
        ends = list(accumulate(sizes[start:stop], initial=0))   # ends[k]: bytes before file start + k
        k = start
        while k < stop:
            base = ends[k - start]
            fit = bisect_right(ends, base + self.block_size - self._open_size, k - start) - 1 + start
            if fit == k:              # file k does not fit: close the block
                closed.append(self._close())
                continue
            if self._open < 0:
                self._open = self._new_index()
            block, length = self._open, ends[fit - start] - base
            placed.use(block)
            offsets = map(add, repeat(self._open_size - base), ends[k - start:fit - start])
            placed.spans.extend(chain.from_iterable(zip(repeat(block), offsets, sizes[k:fit])))
            self._open_runs.append(_file_run((batch, k, fit, 0, length)))
            self._open_count += fit - k
            self._open_size += length
            k = fit

    def _add_large(self, batch: FileBatch, i: int, size: int, placed: BatchParts,
                   closed: list[BlockPlan]) -> FileParts:
        parts = []
        for start in range(0, size, self.block_size):
            length = min(self.block_size, size - start)
            index = self._new_index()
            last = start + length == size
            closed.append(BlockPlan(index, length, (FileRun(batch, i, i + 1, start, length),), 1, int(last)))
            placed.use(index)
            parts.append((index, 0, length))
        return tuple(parts)

    def finish(self) -> list[BlockPlan]:
        """The shared block still open, if any: the walk is over."""
        return [self._close()] if self._open >= 0 else []

    def _new_index(self) -> int:
        self.block_count += 1
        return self.block_count - 1

    def _close(self) -> BlockPlan:
        block = BlockPlan(self._open, self._open_size, tuple(self._open_runs), self._open_count, self._open_count)
        self._open, self._open_size, self._open_runs, self._open_count = -1, 0, [], 0
        return block


_file_run = partial(tuple.__new__, FileRun)   # FileRun(*fields), at half the cost of the call
