"""The directory block store: blocks as files in keepstore's volume layout.

A block lives at ``ROOT/<md5[:3]>/<md5>``, the layout of a keepstore Directory
volume, so a real keepstore can serve the directory. Writes are atomic: bytes go to
a temporary file in ROOT, which is fsynced, renamed to its final name and followed by
an fsync of the directory. A partial block is never visible under a final name, and
two writers of the same block race harmlessly (the content is the same).
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile

from ingest.errors import BlockCorrupt, BlockNotFound, StoreError
from ingest.keep.locator import BLOCK_SIZE_MAX, EMPTY_BLOCK_MD5, Locator, LocatorError
from ingest.keep.store import StoredBlock

TMP_PREFIX = "tmp-keep-ingest-"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _describe_os_error(exc: OSError, what: str) -> str:
    reason = {errno.ENOSPC: "no space left on device", errno.EACCES: "permission denied",
              errno.EROFS: "read-only file system", errno.EDQUOT: "disk quota exceeded"}
    return f"{what}: {reason.get(exc.errno, exc.strerror or str(exc))}"


class DirectoryStore:
    """Blocks stored as files under one root directory."""

    def __init__(self, root: str, fsync: bool = True):
        self.root = os.path.abspath(os.path.expanduser(root))
        self.fsync = fsync
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as exc:
            raise StoreError(_describe_os_error(exc, f"cannot create block store {self.root}")) from None
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StoreError(f"block store {self.root} is not writable: permission denied")

    def describe(self) -> str:
        return self.root

    def block_path(self, md5_hex: str) -> str:
        """Final path of a block: ``ROOT/<md5[:3]>/<md5>``."""
        return os.path.join(self.root, md5_hex[:3], md5_hex)

    def open_block(self) -> "DirectoryBlockWriter":
        return DirectoryBlockWriter(self)

    def contains(self, md5_hex: str, size: int) -> bool:
        """True if a block with this MD5 and size is stored."""
        if md5_hex == EMPTY_BLOCK_MD5 and size == 0:
            return True
        try:
            return os.stat(self.block_path(md5_hex)).st_size == size
        except FileNotFoundError:
            return False

    def get(self, locator: str) -> bytes:
        try:
            loc = Locator.parse(locator)
        except LocatorError as exc:
            raise StoreError(str(exc)) from None
        if loc.md5 == EMPTY_BLOCK_MD5 and loc.size == 0:
            return b""
        path = self.block_path(loc.md5)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise BlockNotFound(f"block {loc.stripped()} not found in {self.root}") from None
        except OSError as exc:
            raise StoreError(_describe_os_error(exc, f"cannot read block {path}")) from None
        if len(data) != loc.size or hashlib.md5(data).hexdigest() != loc.md5:
            raise BlockCorrupt(f"block {path} is corrupt: its content does not match {loc.stripped()}")
        return data

    def close(self) -> None:
        pass


class DirectoryBlockWriter:
    """Streams one block into a temporary file, then renames it into place."""

    def __init__(self, store: DirectoryStore):
        self._store = store
        self.size = 0
        try:
            self._fd, self._tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=store.root)
        except OSError as exc:
            raise StoreError(_describe_os_error(exc, f"cannot write to block store {store.root}")) from None

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        if self.size + len(view) > BLOCK_SIZE_MAX:
            self.abort()
            raise StoreError(f"block larger than {BLOCK_SIZE_MAX} bytes")
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
                self.size += n
        except OSError as exc:
            self.abort()
            raise StoreError(_describe_os_error(exc, f"cannot write to block store {self._store.root}")) from None

    def commit(self, md5_hex: str) -> StoredBlock:
        store = self._store
        final = store.block_path(md5_hex)
        try:
            if store.contains(md5_hex, self.size):
                # Already stored (same MD5 and size): keep the old file, refresh its
                # mtime as keepstore does for a repeated PUT; no need to sync ours.
                self.abort()
                if self.size:  # the empty block has no file
                    os.utime(final)
                return StoredBlock(f"{md5_hex}+{self.size}", replicas=1)
            if store.fsync:
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
            prefix_dir = os.path.dirname(final)
            if not os.path.isdir(prefix_dir):
                os.makedirs(prefix_dir, exist_ok=True)
                if store.fsync:
                    _fsync_dir(store.root)
            os.replace(self._tmp, final)
            if store.fsync:
                _fsync_dir(prefix_dir)
        except OSError as exc:
            self.abort()
            raise StoreError(_describe_os_error(exc, f"cannot store block {final}")) from None
        return StoredBlock(f"{md5_hex}+{self.size}", replicas=1)

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        try:
            os.unlink(self._tmp)
        except FileNotFoundError:
            pass
