"""File ranges grouped by the block that holds them: the unit of work of get and verify.

A job is one block and every piece of the wanted files that lies in it, so each
block is fetched once however many files (or parts of a file) use it. Jobs come in
order of first use, following the files in the order given (tree order), so the
files finish roughly in that order too.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from ingest.keep.locator import Locator
from ingest.manifest import Segment


class Piece(NamedTuple):
    """``length`` bytes at ``block_offset`` in the block are file ``file`` at ``file_offset``."""

    file: int
    file_offset: int
    block_offset: int
    length: int


@dataclass(slots=True)
class BlockJob:
    locator: str   # the first spelling met in the manifest (signed if it was)
    size: int
    pieces: list[Piece] = field(default_factory=list)


def group_by_block(files: Iterable[tuple[int, Sequence[Segment]]]) -> list[BlockJob]:
    """Jobs for ``(file index, segments)`` pairs; a block is keyed by ``md5+size``."""
    jobs: dict[str, BlockJob] = {}
    keys: dict[str, str] = {}  # locator as spelled -> md5+size
    for index, segments in files:
        offset = 0
        for seg in segments:
            key = keys.get(seg.locator)
            if key is None:
                key = keys[seg.locator] = Locator.parse(seg.locator).stripped()
            job = jobs.get(key)
            if job is None:
                job = jobs[key] = BlockJob(seg.locator, seg.block_size)
            job.pieces.append(Piece(index, offset, seg.offset, seg.length))
            offset += seg.length
    return list(jobs.values())


def pieces_per_file(jobs: Iterable[BlockJob]) -> dict[int, int]:
    """How many pieces each file has across ``jobs``."""
    counts: dict[int, int] = {}
    for job in jobs:
        for piece in job.pieces:
            counts[piece.file] = counts.get(piece.file, 0) + 1
    return counts
