"""Read a block's bytes from its source files, chunk by chunk, and notice changes.

Each piece is read with one ``preadv`` into the chunk buffer (one copy, from the page
cache), and when a piece is complete the file is ``fstat``-ed and compared with the
walk's fingerprint: a file that changed, grew, shrank or was replaced since the walk
is reported, and its block must not be stored. A large file stays open across its
pieces; small files cost one open, read, fstat and close each, and are opened by
name relative to their directory, which a stream keeps open while its files last.

The C extension ``ingest._smallfiles`` (built from ``ingest/_smallfiles.c`` by
``pip install``, optional) runs that loop for every piece that fits whole in the
chunk being filled, the small files of a block: it does the same calls, in the same
order, with no Python between them, and hands back any piece it does not finish
(one that spans chunks, or anything out of the ordinary), which the Python loop
below then reads, or reports as unreadable or changed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import xxhash

from ingest.errors import SourceError
from ingest.plan import Piece
from ingest.walk import Fingerprint

try:
    from ingest import _smallfiles
except ImportError:  # not built: no C compiler when installed, or another platform
    _smallfiles = None

Chunk = bytearray | memoryview  # a chunk of a block's bytes, readable without a copy

_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOATIME", 0)
_DIRECTORY_FLAGS = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_CLOEXEC


def small_file_loops_in_c() -> bool:
    """Whether the per-file loops run in C: the ingest._smallfiles extension is built."""
    return _smallfiles is not None


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


class _Directory:
    """The directory of the file a read stream opened last, held open so that the next
    file there is opened by its name alone: one path component for the kernel to
    resolve, not the whole path (a block's small files share a few directories)."""

    __slots__ = ("path", "fd")

    def __init__(self) -> None:
        self.path: str | None = None
        self.fd = -1

    def opener(self, path: str) -> tuple[str, int | None]:
        """What to open ``path`` by: a name and the directory fd it is relative to
        (``None``: the path as it is)."""
        parent, slash, name = path.rpartition("/")
        if not slash:
            return path, None
        if parent != self.path:
            self.close()
            try:
                self.fd = os.open(parent or "/", _DIRECTORY_FLAGS)
            except OSError:
                return path, None          # the file's own open tells what is wrong
            self.path = parent
        return name, self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        self.path, self.fd = None, -1


class BlockReader:
    """Turns a block's piece sources into chunks of at most ``chunk_size`` bytes.

    Each ``chunks()`` stream owns its open file, so streams to several workers can
    be interleaved safely.
    """

    def __init__(self, chunk_size: int):
        self.chunk_size = chunk_size
        self.bytes_read = 0
        self._open_flags = _OPEN_FLAGS

    def _open(self, path: str, directory: _Directory) -> int:
        name, dir_fd = directory.opener(path)
        try:
            try:
                return os.open(name, self._open_flags, dir_fd=dir_fd)
            except PermissionError:
                if not self._open_flags & getattr(os, "O_NOATIME", 0):
                    raise
                # O_NOATIME needs file ownership; fall back for others' files.
                self._open_flags &= ~os.O_NOATIME
                return os.open(name, self._open_flags, dir_fd=dir_fd)
        except FileNotFoundError:
            raise Unreadable(path, "vanished before it was read") from None
        except OSError as exc:
            raise Unreadable(path, exc.strerror or str(exc)) from None

    @staticmethod
    def _check_unchanged(path: str, fingerprint: tuple[int, ...], fd: int) -> None:
        st = os.fstat(fd)
        if (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev) != fingerprint:
            raise FileChanged(path, describe_change(Fingerprint(*fingerprint), Fingerprint.of(st)))

    @staticmethod
    def _read_into(path: str, fingerprint: tuple[int, ...], fd: int, view: memoryview,
                   offset: int) -> int:
        try:
            got = os.preadv(fd, [view], offset)
        except OSError as exc:
            raise Unreadable(path, exc.strerror or str(exc)) from None
        if got == 0:
            BlockReader._check_unchanged(path, fingerprint, fd)
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
        given, the xxh3-64 of each piece is appended to it as the piece completes
        (in one call for a piece within one chunk, the common case of a small file).
        """
        remaining = size

        def next_buffer() -> tuple[bytearray, int]:
            if buffer is not None:
                return buffer, min(len(buffer), remaining)
            want = min(self.chunk_size, remaining)
            return bytearray(want), want

        buf, limit = next_buffer()
        view = memoryview(buf)
        filled = 0
        directory = _Directory()
        pieces = iter(pieces)
        try:
            while True:
                if _smallfiles is not None:    # the pieces that fit in this chunk
                    was = filled
                    filled, piece = _smallfiles.read_run(pieces, buf, filled, limit, directory,
                                                         self._open_flags, digests, xxhash.xxh3_64_intdigest)
                    self.bytes_read += filled - was
                else:
                    piece = next(pieces, None)
                if piece is None:
                    break
                path, fingerprint, offset, left = piece
                fd = self._open(path, directory)
                hasher = None            # for a piece that spans chunks
                start = filled           # where the piece's bytes in this chunk begin
                try:
                    while left:
                        if filled == limit:
                            if digests is not None:
                                hasher = hasher or xxhash.xxh3_64()
                                hasher.update(view[start:filled])
                            view.release()
                            remaining -= filled
                            yield _filled(buf, filled), False
                            (buf, limit), filled, start = next_buffer(), 0, 0
                            view = memoryview(buf)
                        want = min(left, limit - filled)
                        got = self._read_into(path, fingerprint, fd, view[filled:filled + want], offset)
                        filled, offset, left = filled + got, offset + got, left - got
                        self.bytes_read += got
                    self._check_unchanged(path, fingerprint, fd)
                finally:
                    os.close(fd)
                if digests is not None:
                    if hasher is None:
                        digests.append(xxhash.xxh3_64_intdigest(view[start:filled]))
                    else:
                        hasher.update(view[start:filled])
                        digests.append(hasher.intdigest())
            view.release()
            yield _filled(buf, filled), True
        finally:
            directory.close()

    def digests(self, size: int, pieces: Iterable[PieceSource]) -> list[int]:
        """The xxh3-64 of each piece of a block, read from the sources now."""
        digests: list[int] = []
        for _ in self.chunks(size, pieces, digests):
            pass
        return digests
