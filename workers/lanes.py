"""Read several blocks at once and hash their chunks together, one block per MD5 lane.

A worker that reads its blocks itself (READ) holds up to ``lanes`` of them here. Each
pass reads the next chunk of every block into that block's own buffer, hashes all
the chunks in one call of the MD5 engine (ingest.md5lanes: up to 16 blocks in SIMD
lanes, without the GIL), and appends each chunk to its block's writer. Chunks are
the reader's full chunk size except a block's last one, so the lanes stay full while
blocks last; a block that ends leaves its lane to the next one added.

Memory (:func:`layout`): the worker's ``chunk_size`` (4 MiB by default) is shared
among the lanes, ``chunk_size / lanes`` each but at least ``LANE_CHUNK_MIN``: with 16
lanes, 16 buffers of 256 KiB, the memory a single stream's one buffer took. A store
that holds whole blocks in memory until their commit (the HTTP Keep client: 64 MiB a
block) gets one lane, hashed by hashlib: its blocks in memory stay
``blocks_per_worker`` per worker, as with a single stream.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from ingest import md5lanes
from ingest.errors import IngestError
from ingest.keep.store import BlockStore, BlockWriter
from ingest.md5lanes import Engine, Hasher
from ingest.reader import BlockReader, Chunk, PieceSource

LANE_CHUNK_MIN = 64 * 1024


def layout(engine: Engine, store: BlockStore) -> tuple[Engine, int]:
    """The engine and the number of lanes of a worker with this engine storing into
    ``store``: one lane, hashed by hashlib (the fastest single stream), for a store
    that holds whole blocks in memory."""
    if engine.lanes == 1 or store.buffers_whole_blocks:
        return md5lanes.select("hashlib", origin="one lane"), 1
    return engine, engine.lanes


def lane_chunk(chunk_size: int, lanes: int) -> int:
    """Bytes each lane reads per pass: its share of ``chunk_size``, in whole 64-byte
    MD5 blocks, at least LANE_CHUNK_MIN (the whole of it for one lane)."""
    if lanes == 1:
        return chunk_size
    return max(LANE_CHUNK_MIN, chunk_size // lanes // 64 * 64)


@dataclass
class ReadBlock:
    """A block whose bytes are all read, hashed and written: ready to commit."""

    block: int
    writer: BlockWriter
    md5_hex: str
    size: int
    digests: list[int]       # xxh3-64 of each piece


@dataclass
class DroppedBlock:
    """A block given up: its writer is aborted. ``error`` is the reader's Unreadable or
    FileChanged, or the store's IngestError."""

    block: int
    error: IngestError


@dataclass
class Pass:
    """What one pass did: blocks read whole, blocks dropped, and ``(block, bytes, last)``
    for each block that has read ``report_every`` more bytes since it last said (or its
    last byte)."""

    read: list[ReadBlock] = field(default_factory=list)
    dropped: list[DroppedBlock] = field(default_factory=list)
    progress: list[tuple[int, int, bool]] = field(default_factory=list)


@dataclass
class _Lane:
    block: int
    writer: BlockWriter
    hasher: Hasher
    chunks: Iterator[tuple[Chunk, bool]]
    buffer: bytearray
    digests: list[int]
    size: int = 0
    unreported: int = 0


class Lanes:
    """The blocks a worker is reading, advanced together by ``step``."""

    def __init__(self, engine: Engine, lanes: int, reader: BlockReader, store: BlockStore, report_every: int):
        self.engine = engine
        self.lanes = lanes
        self.reader = reader
        self.store = store
        self.report_every = report_every
        self._active: list[_Lane] = []
        self._spare: list[bytearray] = []   # buffers of lanes whose blocks ended

    def __len__(self) -> int:
        return len(self._active)

    def add(self, block: int, size: int, pieces: Iterable[PieceSource]) -> None:
        """Start reading a block (at most ``lanes`` at once); IngestError if the store
        cannot open a writer for it."""
        if len(self._active) >= self.lanes:
            raise ValueError(f"already reading {self.lanes} blocks")
        writer = self.store.open_block()
        buffer = self._spare.pop() if self._spare else bytearray(self.reader.chunk_size)
        digests: list[int] = []
        chunks = self.reader.chunks(size, pieces, digests, buffer)
        self._active.append(_Lane(block, writer, self.engine.new(), chunks, buffer, digests))

    def step(self) -> Pass:
        """Read, hash and write the next chunk of every block being read."""
        done = Pass()
        taken: list[tuple[_Lane, Chunk, bool]] = []
        for lane in self._active:
            try:
                data, last = next(lane.chunks)
            except IngestError as exc:      # Unreadable, FileChanged
                self._drop(lane, exc, done)
                continue
            taken.append((lane, data, last))
        self.engine.update_many([lane.hasher for lane, _, _ in taken], [data for _, data, _ in taken])
        for lane, data, last in taken:
            try:
                lane.writer.write(data)
            except IngestError as exc:
                self._drop(lane, exc, done)
                continue
            lane.size += len(data)
            lane.unreported += len(data)
            if last or lane.unreported >= self.report_every:
                done.progress.append((lane.block, lane.unreported, last))
                lane.unreported = 0
            if last:
                self._retire(lane)
                done.read.append(ReadBlock(lane.block, lane.writer, lane.hasher.hexdigest(), lane.size,
                                           lane.digests))
        return done

    def drop(self, block: int) -> bool:
        """Give up one block being read (aborting its writer); False if it is not here."""
        for lane in self._active:
            if lane.block == block:
                self._retire(lane)
                lane.writer.abort()
                return True
        return False

    def drop_all(self) -> None:
        """Give up every block being read."""
        for lane in list(self._active):
            self._retire(lane)
            lane.writer.abort()

    def _drop(self, lane: _Lane, error: IngestError, done: Pass) -> None:
        self._retire(lane)
        lane.writer.abort()
        done.dropped.append(DroppedBlock(lane.block, error))

    def _retire(self, lane: _Lane) -> None:
        self._active.remove(lane)
        lane.chunks.close()               # closes a file it has open
        self._spare.append(lane.buffer)
