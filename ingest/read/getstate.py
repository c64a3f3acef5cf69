"""The resume journal of ``get``: which files under a destination are known complete.

One journal per destination directory, kept outside it (so the downloaded tree
holds nothing but the collection's files) in
``$XDG_STATE_HOME/keep-ingest/get/<sha256 of the destination's real path>.jsonl``,
with a lock file next to it: two ``get`` runs into one destination exclude each
other (exit 75).

Each line records one file ``get`` wrote: its path relative to the destination,
the identity of its content in the manifest (a hash of its segments' ``md5+size``,
offsets and lengths), and the file's size, mtime, inode and device. ``get`` writes
the line after the file's data are synced and right before renaming it into place,
so a file matches its line only if the rename happened, and it stops matching as
soon as anything replaces or modifies it (new inode, size or mtime). A file that
does not match is never trusted: it is fetched again, or refused as a conflict.
A truncated last line (kill -9 while appending) is ignored.

The journal tells which files a user downloaded where, so like put's state it is
private whatever the umask: the ``keep-ingest`` and ``get`` directories are made
(or set) 0700, the journal and the lock 0600.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ingest.errors import EXIT_LOCKED, IngestError
from ingest.keep.locator import Locator
from ingest.manifest import Segment

JOURNAL_VERSION = 1


def state_dir() -> str:
    """``$XDG_STATE_HOME/keep-ingest/get`` (XDG_STATE_HOME defaults to ~/.local/state)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "keep-ingest", "get")


def content_key(segments: Sequence[Segment]) -> str:
    """What a file's content is, as the manifest says: independent of signatures."""
    digest = hashlib.sha256()
    for seg in segments:
        digest.update(f"{Locator.parse(seg.locator).stripped()} {seg.offset} {seg.length}\n".encode())
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class Written:
    """What a file looked like right after get wrote it."""

    key: str
    size: int
    mtime_ns: int
    ino: int
    dev: int

    def matches(self, st: os.stat_result) -> bool:
        return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev) == (
            self.size, self.mtime_ns, self.ino, self.dev)


def _open_private(path: str, flags: int) -> int:
    """Open or create ``path`` as 0600 (also when it exists with another mode)."""
    fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
    except OSError:
        os.close(fd)
        raise
    return fd


class GetState:
    """The journal of one destination, locked while open."""

    def __init__(self, dest_root: str):
        self.dest_root = dest_root
        name = hashlib.sha256(os.path.realpath(dest_root).encode("utf-8", "surrogateescape")).hexdigest()[:32]
        self.dir = state_dir()
        self.journal_path = os.path.join(self.dir, name + ".jsonl")
        self.lock_path = os.path.join(self.dir, name + ".lock")
        self.entries: dict[str, Written] = {}
        self._lock_fd = -1
        self._fd = -1

    def __enter__(self) -> GetState:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        try:
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
            for d in (self.dir, os.path.dirname(self.dir)):  # .../keep-ingest/get and .../keep-ingest
                os.chmod(d, 0o700)
            self._lock_fd = _open_private(self.lock_path, os.O_RDWR)
        except OSError as exc:
            raise IngestError(f"cannot create the get state in {self.dir}: {exc.strerror}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._lock_fd)
            self._lock_fd = -1
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise IngestError(f"another keep-ingest get is writing into {self.dest_root} "
                                  f"(lock {self.lock_path})", EXIT_LOCKED) from None
            raise IngestError(f"cannot lock {self.lock_path}: {exc.strerror}") from None
        self._load()
        try:
            self._fd = _open_private(self.journal_path, os.O_WRONLY | os.O_APPEND)
            if os.fstat(self._fd).st_size == 0:
                self._append({"dest": self.dest_root, "version": JOURNAL_VERSION})
        except OSError as exc:
            self.close()
            raise IngestError(f"cannot write the get journal {self.journal_path}: {exc.strerror}") from None

    def _load(self) -> None:
        try:
            with open(self.journal_path, "rb") as f:
                lines = f.read().split(b"\n")
        except FileNotFoundError:
            return
        except OSError as exc:
            raise IngestError(f"cannot read the get journal {self.journal_path}: {exc.strerror}") from None
        for line in lines:
            try:
                rec = json.loads(line)
                self.entries[rec["path"]] = Written(rec["key"], rec["size"], rec["mtime_ns"],
                                                    rec["ino"], rec["dev"])
            except (ValueError, KeyError, TypeError):
                continue  # the header, an empty or a truncated line

    def _append(self, record: dict) -> None:
        os.write(self._fd, (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8", "surrogateescape"))

    @property
    def fds(self) -> tuple[int, ...]:
        """The open descriptors (the lock among them), for forked workers to close."""
        return tuple(fd for fd in (self._lock_fd, self._fd) if fd >= 0)

    def is_complete(self, rel: str, key: str, st: os.stat_result) -> bool:
        """True if the file at ``rel`` is one get wrote with content ``key``, unchanged since."""
        entry = self.entries.get(rel)
        return entry is not None and entry.key == key and entry.matches(st)

    def known(self, rel: str, st: os.stat_result) -> Written | None:
        """The record of the file now at ``rel``, if get wrote it and it is unchanged."""
        entry = self.entries.get(rel)
        return entry if entry is not None and entry.matches(st) else None

    def record(self, rel: str, key: str, st: os.stat_result) -> None:
        """Remember a file about to be renamed into place at ``rel``."""
        entry = Written(key, st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)
        self.entries[rel] = entry
        try:
            self._append({"path": rel, "key": key, "size": entry.size, "mtime_ns": entry.mtime_ns,
                          "ino": entry.ino, "dev": entry.dev})
        except OSError as exc:
            raise IngestError(f"cannot write the get journal {self.journal_path}: {exc.strerror}") from None

    def compact(self, lstat: Callable[[str], os.stat_result | None]) -> None:
        """Rewrite the journal with only the records that still match their files.

        ``lstat(rel)`` gives the entry now at ``rel`` (not followed), or None.
        """
        keep = {}
        for rel, entry in self.entries.items():
            try:
                st = lstat(rel)
            except (OSError, ValueError, IngestError):  # ValueError: a NUL in a damaged record
                continue
            if st is not None and entry.matches(st):
                keep[rel] = entry
        tmp = self.journal_path + ".tmp"
        try:
            with open(_open_private(tmp, os.O_WRONLY | os.O_TRUNC), "w", encoding="utf-8",
                      errors="surrogateescape") as f:
                f.write(json.dumps({"dest": self.dest_root, "version": JOURNAL_VERSION}) + "\n")
                for rel, e in keep.items():
                    f.write(json.dumps({"path": rel, "key": e.key, "size": e.size, "mtime_ns": e.mtime_ns,
                                        "ino": e.ino, "dev": e.dev}, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            os.replace(tmp, self.journal_path)
        except OSError as exc:
            raise IngestError(f"cannot rewrite the get journal {self.journal_path}: {exc.strerror}") from None
        self.entries = keep

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
