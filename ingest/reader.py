"""Read a block's bytes from its source files, chunk by chunk, and notice changes.

Each piece is read with one ``preadv`` into the chunk buffer (one copy, from the page
cache), and when a piece is complete the file is ``fstat``-ed and compared with the
walk's fingerprint: a file that changed, grew, shrank or was replaced since the walk
is reported, and its block must not be stored. A large file stays open across its
pieces; small files cost one open, read, fstat and close each.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import xxhash

from ingest.errors import SourceError
from ingest.plan import BlockPlan, Plan
from ingest.walk import Fingerprint, SourceFile

Chunk = bytearray | memoryview  # a chunk of a block's bytes, readable without a copy

_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOATIME", 0)


class Unreadable(SourceError):
    """A source file could not be opened or read (permission, vanished, I/O error)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot read {path}: {reason}")
        self.path = path
        self.reason = reason


class FileChanged(SourceError):
    """A source file changed between the walk and the end of its read."""

    def __init__(self, path: str, why: str):
        super().__init__(f"file changed while being read: {path} ({why})")
        self.path = path
        self.why = why


def _filled(buf: bytearray, filled: int) -> Chunk:
    """The first ``filled`` bytes of ``buf``, without a copy."""
    return buf if filled == len(buf) else memoryview(buf)[:filled]


def describe_change(old: Fingerprint, new: Fingerprint) -> str:
    """Which parts of a fingerprint differ, e.g. ``size 10 -> 12, mtime``."""
    parts = []
    if old.size != new.size:
        parts.append(f"size {old.size} -> {new.size}")
    for name in ("mtime_ns", "ctime_ns", "inode", "device"):
        if getattr(old, name) != getattr(new, name):
            parts.append(name.removesuffix("_ns"))
    return ", ".join(parts)


class BlockReader:
    """Turns block plans into chunks of at most ``chunk_size`` bytes.

    Each ``chunks()`` stream owns its open file, so streams to several workers can
    be interleaved safely.
    """

    def __init__(self, files: Sequence[SourceFile], chunk_size: int):
        self.files = files
        self.chunk_size = chunk_size
        self.bytes_read = 0
        self._open_flags = _OPEN_FLAGS

    def _open(self, index: int) -> int:
        path = self.files[index].path
        try:
            try:
                return os.open(path, self._open_flags)
            except PermissionError:
                if not self._open_flags & getattr(os, "O_NOATIME", 0):
                    raise
                # O_NOATIME needs file ownership; fall back for others' files.
                self._open_flags &= ~os.O_NOATIME
                return os.open(path, self._open_flags)
        except FileNotFoundError:
            raise Unreadable(path, "vanished before it was read") from None
        except OSError as exc:
            raise Unreadable(path, exc.strerror or str(exc)) from None

    def _check_unchanged(self, index: int, fd: int) -> None:
        source = self.files[index]
        now = Fingerprint.of(os.fstat(fd))
        if now != source.fingerprint:
            raise FileChanged(source.path, describe_change(source.fingerprint, now))

    def _read_into(self, index: int, fd: int, view: memoryview, offset: int) -> int:
        try:
            got = os.preadv(fd, [view], offset)
        except OSError as exc:
            raise Unreadable(self.files[index].path, exc.strerror or str(exc)) from None
        if got == 0:
            self._check_unchanged(index, fd)
            raise FileChanged(self.files[index].path, "shorter than when walked")
        return got

    def chunks(self, block: BlockPlan, digests: list[int] | None = None,
               buffer: bytearray | None = None) -> Iterator[tuple[Chunk, bool]]:
        """Yield ``(data, is_last)`` for the block's bytes, in order.

        Without ``buffer`` each chunk is a new ``bytearray`` of at most ``chunk_size``
        bytes that the caller may keep; with one, every chunk is a view into it, valid
        only until the next chunk is asked for (no allocation per chunk).
        A piece's file is checked against its fingerprint as soon as the piece is
        read, before the chunk holding the piece's end is yielded. If ``digests`` is
        given, the xxh3-64 of each piece is appended to it as the piece completes.
        """
        remaining = block.size

        def next_buffer() -> tuple[bytearray, int]:
            if buffer is not None:
                return buffer, min(len(buffer), remaining)
            size = min(self.chunk_size, remaining)
            return bytearray(size), size

        buf, limit = next_buffer()
        filled = 0
        for piece in block.pieces:
            fd = self._open(piece.file_index)
            hasher = xxhash.xxh3_64() if digests is not None else None
            try:
                offset, left = piece.file_offset, piece.length
                while left:
                    if filled == limit:
                        remaining -= filled
                        yield _filled(buf, filled), False
                        (buf, limit), filled = next_buffer(), 0
                    want = min(left, limit - filled)
                    with memoryview(buf) as view:
                        got = self._read_into(piece.file_index, fd, view[filled:filled + want], offset)
                        if hasher is not None:
                            hasher.update(view[filled:filled + got])
                    filled, offset, left = filled + got, offset + got, left - got
                    self.bytes_read += got
                self._check_unchanged(piece.file_index, fd)
                if hasher is not None:
                    digests.append(hasher.intdigest())
            finally:
                os.close(fd)
        yield _filled(buf, filled), True

    def digests(self, block: BlockPlan) -> list[int]:
        """The xxh3-64 of each piece of a block, read from the sources now."""
        digests: list[int] = []
        for _ in self.chunks(block, digests):
            pass
        return digests


@dataclass(frozen=True)
class LocalSource:
    """What a local worker inherits from its coordinator when forked, to read the
    run's blocks itself: the plan, a reader over the walked files, and the run's
    token, by which the coordinator knows the worker holds this very plan."""

    token: str
    plan: Plan
    reader: BlockReader
