"""Read a block's bytes from its source files, chunk by chunk, and notice changes.

Each piece is read with one ``preadv`` into the chunk buffer (one copy, from the page
cache), and when a piece is complete the file is ``fstat``-ed and compared with the
walk's fingerprint: a file that changed, grew, shrank or was replaced since the walk
is reported, and its block must not be stored. A large file stays open across its
pieces; small files cost one open, read, fstat and close each.
"""

from __future__ import annotations

import os
from typing import Iterator, Sequence

from ingest.errors import SourceError
from ingest.plan import BlockPlan
from ingest.walk import Fingerprint, SourceFile

_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOATIME", 0)


class FileChanged(SourceError):
    """A source file changed between the walk and the end of its read."""

    def __init__(self, path: str, why: str):
        super().__init__(f"file changed while being read: {path} ({why})")
        self.path = path


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
            raise SourceError(f"file vanished before it was read: {path}") from None
        except OSError as exc:
            raise SourceError(f"cannot read {path}: {exc.strerror}") from None

    def _check_unchanged(self, index: int, fd: int) -> None:
        fp = self.files[index].fingerprint
        st = os.fstat(fd)
        # Field by field: building a Fingerprint per file costs more than the fstat.
        if (st.st_size != fp.size or st.st_mtime_ns != fp.mtime_ns or st.st_ctime_ns != fp.ctime_ns
                or st.st_ino != fp.inode or st.st_dev != fp.device):
            raise FileChanged(self.files[index].path, describe_change(fp, Fingerprint.of(st)))

    def _read_into(self, index: int, fd: int, view: memoryview, offset: int) -> int:
        try:
            got = os.preadv(fd, [view], offset)
        except OSError as exc:
            raise SourceError(f"cannot read {self.files[index].path}: {exc.strerror}") from None
        if got == 0:
            self._check_unchanged(index, fd)
            raise FileChanged(self.files[index].path, "shorter than when walked")
        return got

    def chunks(self, block: BlockPlan) -> Iterator[tuple[bytearray, bool]]:
        """Yield ``(data, is_last)`` for the block's bytes, in order.

        A piece's file is checked against its fingerprint as soon as the piece is
        read, before the chunk holding the piece's end is yielded.
        """
        remaining = block.size
        buf = bytearray(min(self.chunk_size, remaining))
        view = memoryview(buf)
        filled = 0
        for index, offset, left in block.pieces:
            fd = self._open(index)
            try:
                if 0 < left <= len(buf) - filled:
                    # The whole piece fits: the common case for small files, kept short.
                    got = self._read_into(index, fd, view[filled:filled + left], offset)
                    if got < left:   # a short read: finish it below
                        filled, offset, left = filled + got, offset + got, left - got
                    else:
                        filled += got
                        left = 0
                while left:
                    if filled == len(buf):
                        remaining -= filled
                        view.release()
                        yield buf, False
                        buf, filled = bytearray(min(self.chunk_size, remaining)), 0
                        view = memoryview(buf)
                    want = min(left, len(buf) - filled)
                    got = self._read_into(index, fd, view[filled:filled + want], offset)
                    filled, offset, left = filled + got, offset + got, left - got
                self._check_unchanged(index, fd)
            finally:
                os.close(fd)
        view.release()
        yield buf, True
