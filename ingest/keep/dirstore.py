"""The directory block store: blocks as files in keepstore's volume layout.

A block lives at ``ROOT/<md5[:3]>/<md5>``, the layout of a keepstore Directory
volume, so a real keepstore can serve the directory. Writes are atomic: bytes go to
a temporary file in ROOT, which is fsynced, renamed to its final name and followed by
an fsync of the directory. A partial block is never visible under a final name, and
two writers of the same block race harmlessly (the content is the same). A block
already stored counts only if its file still hashes to its name: a copy that went
bad (bit rot, a foreign partial write) is replaced by the new one.

Temporary files (``ROOT/tmp-keep-ingest-*``, only ever in ROOT itself) outlive a
writer that is killed (SIGKILL, OOM, power loss). Once per store object, when it is
first used for writing (the coordinator's preflight :meth:`DirectoryStore.unreachable`,
or the first :meth:`DirectoryStore.open_block` of a worker or keepstore volume), the
store removes the regular files in ROOT with that prefix that were not modified for
``TMP_MAX_AGE`` (24 hours). The age is the only evidence used: a live writer modifies
its file with every chunk it writes and finishes a block (at most 64 MiB) long
before that, whereas a pid or host name in the file name would prove nothing about
writers in another PID namespace or on another host sharing the directory. A writer
stalled for longer than that would lose its temporary file: its commit then fails
(the rename finds nothing), it never stores a partial block. The sweep reads only
ROOT, logs what it removed, and never fails: a file it cannot remove is a warning.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import stat
import tempfile
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass

from ingest.errors import BlockCorrupt, BlockNotFound, StoreError, StoreFull
from ingest.keep.locator import BLOCK_SIZE_MAX, EMPTY_BLOCK_MD5
from ingest.keep.store import StoredBlock, block_to_read

log = logging.getLogger("keep-ingest.store")

TMP_PREFIX = "tmp-keep-ingest-"
TMP_MAX_AGE = 24 * 3600  # seconds unmodified before a temporary file counts as abandoned
READ_CHUNK = 1 << 20

_PREFIX_DIR_RE = re.compile(r"[0-9a-f]+")
_BLOCK_FILE_RE = re.compile(r"[0-9a-f]{32}")
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True, slots=True)
class BlockInfo:
    """One stored block as a listing sees it."""

    md5: str
    size: int
    mtime_ns: int


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_only_fs(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _describe_os_error(exc: OSError, what: str) -> str:
    reason = {errno.ENOSPC: "no space left on device", errno.EACCES: "permission denied",
              errno.EROFS: "read-only file system", errno.EDQUOT: "disk quota exceeded"}
    return f"{what}: {reason.get(exc.errno, exc.strerror or str(exc))}"


def _store_error(exc: OSError, what: str) -> StoreError:
    """The StoreError for an OSError; StoreFull when the device or quota is full."""
    cls = StoreFull if exc.errno in _FULL_ERRNOS else StoreError
    return cls(_describe_os_error(exc, what))


class DirectoryStore:
    """Blocks stored as files under one root directory."""

    buffers_whole_blocks = False   # streamed into a temporary file

    def __init__(self, root: str, fsync: bool = True, write: bool = True):
        """A store for writing (created if missing, and checked writable) or, with
        ``write=False``, for reading only: nothing is created, and it must exist."""
        self.root = os.path.abspath(os.path.expanduser(root))
        self.fsync = fsync
        self._swept = False
        if not write:
            if not os.path.isdir(self.root):
                why = "is not a directory" if os.path.lexists(self.root) else "does not exist"
                raise StoreError(f"block store {self.root} {why}")
            return
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as exc:
            raise _store_error(exc, f"cannot create block store {self.root}") from None
        if not os.access(self.root, os.W_OK | os.X_OK):
            # access() says no for a read-only mount too, even to root: say which.
            reason = "read-only file system" if _read_only_fs(self.root) else "permission denied"
            raise StoreError(f"block store {self.root} is not writable: {reason}")

    def describe(self) -> str:
        return self.root

    def unreachable(self) -> dict[str, str]:
        """Nothing: the constructor already checked the directory is there and writable.

        This is the preflight of a writing run, so abandoned temporary files go now.
        """
        self._sweep_abandoned_temp_files()
        return {}

    def block_path(self, md5_hex: str) -> str:
        """Final path of a block: ``ROOT/<md5[:3]>/<md5>``."""
        return os.path.join(self.root, md5_hex[:3], md5_hex)

    def open_block(self) -> DirectoryBlockWriter:
        self._sweep_abandoned_temp_files()
        return DirectoryBlockWriter(self)

    def _sweep_abandoned_temp_files(self) -> None:
        """Remove temporary files in ROOT unmodified for ``TMP_MAX_AGE`` (see the
        module docstring); only the first call on this store does anything.

        Never raises. Files that vanish meanwhile (committed, or removed by a
        concurrent sweep of another process or thread) are simply skipped.
        """
        if self._swept:
            return
        self._swept = True
        try:
            with os.scandir(self.root) as entries:
                names = [e.name for e in entries if e.name.startswith(TMP_PREFIX)]
        except OSError as exc:
            log.warning("%s", _describe_os_error(exc, f"cannot look for abandoned temporary files in {self.root}"))
            return
        cutoff = time.time() - TMP_MAX_AGE
        removed = freed = 0
        for name in names:
            path = os.path.join(self.root, name)
            try:
                st = os.lstat(path)
                if not stat.S_ISREG(st.st_mode) or st.st_mtime >= cutoff:
                    continue
                os.unlink(path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("%s", _describe_os_error(exc, f"cannot remove abandoned temporary file {path}"))
                continue
            removed += 1
            freed += st.st_size
        if removed:
            log.info("removed %d abandoned temporary files (%d bytes) from block store %s "
                     "(unmodified for over %d hours)", removed, freed, self.root, TMP_MAX_AGE // 3600)

    def contains(self, md5_hex: str, size: int) -> bool:
        """True if a block with this MD5 and size is stored."""
        if md5_hex == EMPTY_BLOCK_MD5 and size == 0:
            return True
        try:
            return os.stat(self.block_path(md5_hex)).st_size == size
        except FileNotFoundError:
            return False

    def max_replicas(self, down: Collection[str] = ()) -> int:
        return 1

    def check_block(self, locator: str) -> None:
        """Re-hash the stored block (streamed) and check its size."""
        loc = block_to_read(locator)
        if loc is None:
            return
        size = self.verify(loc.md5)
        if size != loc.size:
            raise BlockCorrupt(f"block {self.block_path(loc.md5)} is corrupt: {size} bytes, not {loc.size}")

    def get(self, locator: str) -> bytes:
        loc = block_to_read(locator)
        if loc is None:
            return b""
        path = self.block_path(loc.md5)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise BlockNotFound(f"block {loc.stripped()} not found in {self.root}") from None
        except OSError as exc:
            raise _store_error(exc, f"cannot read block {path}") from None
        if len(data) != loc.size or hashlib.md5(data).hexdigest() != loc.md5:
            raise BlockCorrupt(f"block {path} is corrupt: its content does not match {loc.stripped()}")
        return data

    def close(self) -> None:
        pass

    # Volume operations used by the keepstore server. They take a bare MD5 and,
    # unlike get(), do not treat the empty block specially: keepstore stores and
    # lists it like any other block.

    def stat_block(self, md5_hex: str) -> os.stat_result | None:
        """The stat of a stored block's file, or None when it is not stored."""
        try:
            return os.stat(self.block_path(md5_hex))
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise _store_error(exc, f"cannot stat block {self.block_path(md5_hex)}") from None

    def touch(self, md5_hex: str) -> bool:
        """Set a stored block's mtime to now; False when it is not stored."""
        try:
            os.utime(self.block_path(md5_hex))
            return True
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as exc:
            raise _store_error(exc, f"cannot touch block {self.block_path(md5_hex)}") from None

    def read_raw(self, md5_hex: str, into: bytearray | None = None) -> bytes | bytearray:
        """A stored block's bytes, unverified; BlockNotFound when it is not stored.

        With ``into``, the bytes are read into that bytearray (cleared first), so a
        caller can reuse one buffer.
        """
        path = self.block_path(md5_hex)
        try:
            with open(path, "rb", buffering=0) as f:
                if into is None:
                    return f.read()
                into.clear()
                while chunk := f.read(READ_CHUNK):
                    into += chunk
                return into
        except (FileNotFoundError, NotADirectoryError):
            raise BlockNotFound(f"block {md5_hex} not found in {self.root}") from None
        except OSError as exc:
            raise _store_error(exc, f"cannot read block {path}") from None

    def same_content(self, md5_hex: str, data: bytes | bytearray | memoryview) -> bool | None:
        """Compare a stored block with ``data``: None when not stored, else equality.

        Reads the file in chunks, so comparing a 64 MiB block does not need a
        second 64 MiB buffer.
        """
        view = memoryview(data).cast("B")
        path = self.block_path(md5_hex)
        try:
            with open(path, "rb", buffering=0) as f:
                if os.fstat(f.fileno()).st_size != len(view):
                    return False
                pos = 0
                while chunk := f.read(READ_CHUNK):
                    if view[pos:pos + len(chunk)] != chunk:
                        return False
                    pos += len(chunk)
                return pos == len(view)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise _store_error(exc, f"cannot read block {path}") from None

    def verify(self, md5_hex: str) -> int:
        """Check a stored block's MD5 by streaming it; returns its size.

        Raises BlockNotFound when absent and BlockCorrupt when the bytes do not
        hash to ``md5_hex``.
        """
        path = self.block_path(md5_hex)
        digest = hashlib.md5()
        size = 0
        try:
            with open(path, "rb", buffering=0) as f:
                while chunk := f.read(READ_CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
        except (FileNotFoundError, NotADirectoryError):
            raise BlockNotFound(f"block {md5_hex} not found in {self.root}") from None
        except OSError as exc:
            raise _store_error(exc, f"cannot read block {path}") from None
        if digest.hexdigest() != md5_hex:
            raise BlockCorrupt(f"block {path} is corrupt: its content does not match its name")
        return size

    def holds_good_copy(self, md5_hex: str) -> bool:
        """True if the block's file exists and hashes to ``md5_hex`` (streams it).

        A copy that hashes wrong, or cannot be read, is logged and reported False,
        so a writer replaces it rather than trusting it. Costs one read of the block,
        paid only when the block is already stored.
        """
        try:
            self.verify(md5_hex)
            return True
        except BlockNotFound:
            return False
        except StoreError as exc:
            log.warning("%s; storing the block again", exc)
            return False

    def index(self, prefix: str = "") -> Iterator[BlockInfo]:
        """Stored blocks whose MD5 starts with ``prefix``, in MD5 order.

        Only names of the volume layout count: ``<hex prefix dir>/<32 hex>``;
        temporary files and trash (``<md5>.trash.<deadline>``) are skipped. A file
        that disappears while listing is skipped too.
        """
        try:
            subdirs = sorted(os.listdir(self.root))
        except OSError as exc:
            raise _store_error(exc, f"cannot list block store {self.root}") from None
        for sub in subdirs:
            if not (sub.startswith(prefix) or prefix.startswith(sub)):
                continue
            if not _PREFIX_DIR_RE.fullmatch(sub):
                continue
            subpath = os.path.join(self.root, sub)
            try:
                with os.scandir(subpath) as it:
                    entries = sorted((e for e in it if _BLOCK_FILE_RE.fullmatch(e.name)
                                      and e.name.startswith(prefix)), key=lambda e: e.name)
            except NotADirectoryError:
                continue
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise _store_error(exc, f"cannot list {subpath}") from None
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    raise _store_error(exc, f"cannot stat {entry.path}") from None
                yield BlockInfo(entry.name, st.st_size, st.st_mtime_ns)

    def free_space(self) -> int:
        """Bytes available to unprivileged writers on the store's file system."""
        try:
            st = os.statvfs(self.root)
        except OSError as exc:
            raise _store_error(exc, f"cannot check free space of {self.root}") from None
        return st.f_bavail * st.f_frsize


class DirectoryBlockWriter:
    """Streams one block into a temporary file, then renames it into place."""

    def __init__(self, store: DirectoryStore):
        self._store = store
        self.size = 0
        try:
            self._fd, self._tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=store.root)
        except OSError as exc:
            raise _store_error(exc, f"cannot write to block store {store.root}") from None

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
            raise _store_error(exc, f"cannot write to block store {self._store.root}") from None

    def commit(self, md5_hex: str) -> StoredBlock:
        store = self._store
        final = store.block_path(md5_hex)
        try:
            existing = store.stat_block(md5_hex)
            if existing is not None and existing.st_size == self.size and store.holds_good_copy(md5_hex):
                # Already stored (same MD5 and size, and it still hashes right): keep
                # the old file, refresh its mtime as keepstore does for a repeated
                # PUT; no need to sync ours. (stat_block, not contains(): the empty
                # block counts as present even without a file, and keepstore does
                # write one.)
                self.abort()
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
        except StoreError:
            self.abort()
            raise
        except OSError as exc:
            self.abort()
            raise _store_error(exc, f"cannot store block {final}") from None
        return StoredBlock(f"{md5_hex}+{self.size}", replicas=1)

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        try:
            os.unlink(self._tmp)
        except FileNotFoundError:
            pass
