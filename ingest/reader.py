"""Read a block's bytes from its source files, chunk by chunk, and notice changes.

Each piece is read with one ``preadv`` into the chunk buffer (one copy, from the page
cache), and when a piece is complete the file is ``fstat``-ed and compared with the
walk's fingerprint: a file that changed, grew, shrank or was replaced since the walk
is reported, and its block must not be stored. A large file stays open across its
pieces; small files cost one open, read, fstat and close each.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import xxhash

from ingest.errors import SourceError
from ingest.plan import Piece
from ingest.walk import Fingerprint

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


class PieceSource(NamedTuple):
    """Where one piece of a block comes from: ``length`` bytes at ``offset`` of the file
    at ``path``, which must still match ``fingerprint`` when read.

    The reader takes any 4-tuple in this order (the fingerprint as a plain tuple too):
    a worker reads the pieces of a READ as msgpack decodes them, with no object per
    piece built in Python.
    """

    path: str
    fingerprint: Fingerprint
    offset: int
    length: int


def piece_sources(pieces: Iterable[Piece]) -> list[PieceSource]:
    """The sources of a planned block's pieces, in block order."""
    return [PieceSource(p.file.path, p.file.fingerprint, p.file_offset, p.length) for p in pieces]


class BlockReader:
    """Turns a block's piece sources into chunks of at most ``chunk_size`` bytes.

    Each ``chunks()`` stream owns its open file, so streams to several workers can
    be interleaved safely.
    """

    def __init__(self, chunk_size: int):
        self.chunk_size = chunk_size
        self.bytes_read = 0
        self._open_flags = _OPEN_FLAGS

    def _open(self, path: str) -> int:
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

    @staticmethod
    def _check_unchanged(path: str, fingerprint: tuple[int, ...], fd: int) -> None:
        now = Fingerprint.of(os.fstat(fd))
        if now != fingerprint:
            raise FileChanged(path, describe_change(Fingerprint(*fingerprint), now))

    def _read_into(self, path: str, fingerprint: tuple[int, ...], fd: int, view: memoryview,
                   offset: int) -> int:
        try:
            got = os.preadv(fd, [view], offset)
        except OSError as exc:
            raise Unreadable(path, exc.strerror or str(exc)) from None
        if got == 0:
            self._check_unchanged(path, fingerprint, fd)
            raise FileChanged(path, "shorter than when walked")
        return got

    def chunks(self, size: int, pieces: Iterable[PieceSource], digests: list[int] | None = None,
               buffer: bytearray | None = None) -> Iterator[tuple[Chunk, bool]]:
        """Yield ``(data, is_last)`` for the ``size`` bytes of a block's pieces, in order.

        Without ``buffer`` each chunk is a new ``bytearray`` of at most ``chunk_size``
        bytes that the caller may keep; with one, every chunk is a view into it, valid
        only until the next chunk is asked for (no allocation per chunk).
        A piece's file is checked against its fingerprint as soon as the piece is
        read, before the chunk holding the piece's end is yielded. If ``digests`` is
        given, the xxh3-64 of each piece is appended to it as the piece completes.
        """
        remaining = size

        def next_buffer() -> tuple[bytearray, int]:
            if buffer is not None:
                return buffer, min(len(buffer), remaining)
            want = min(self.chunk_size, remaining)
            return bytearray(want), want

        buf, limit = next_buffer()
        filled = 0
        for path, fingerprint, offset, left in pieces:
            fd = self._open(path)
            hasher = xxhash.xxh3_64() if digests is not None else None
            try:
                while left:
                    if filled == limit:
                        remaining -= filled
                        yield _filled(buf, filled), False
                        (buf, limit), filled = next_buffer(), 0
                    want = min(left, limit - filled)
                    with memoryview(buf) as view:
                        got = self._read_into(path, fingerprint, fd, view[filled:filled + want], offset)
                        if hasher is not None:
                            hasher.update(view[filled:filled + got])
                    filled, offset, left = filled + got, offset + got, left - got
                    self.bytes_read += got
                self._check_unchanged(path, fingerprint, fd)
                if hasher is not None:
                    digests.append(hasher.intdigest())
            finally:
                os.close(fd)
        yield _filled(buf, filled), True

    def digests(self, size: int, pieces: Iterable[PieceSource]) -> list[int]:
        """The xxh3-64 of each piece of a block, read from the sources now."""
        digests: list[int] = []
        for _ in self.chunks(size, pieces, digests):
            pass
        return digests
