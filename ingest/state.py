"""Per-run state: the run's identity, its directory, its lock and its resume index.

A run is identified by its sources (absolute, in their ``dir`` / ``dir/`` form), its
packing parameters and its destination; never by a token. Its state lives in
``STATE_DIR/runs/<id>/`` (directory 0700, files 0600): ``journal`` (see
ingest.journal) and ``lock``, a POSIX lock held for the whole run. The kernel
releases that lock when its holder dies, and forked workers do not inherit it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import xxhash

from ingest.config import Settings
from ingest.errors import EXIT_LOCKED, IngestError
from ingest.journal import JournalWriter, read_journal, rewrite_journal
from ingest.keep.locator import Locator
from ingest.plan import BlockPlan

JOURNAL_VERSION = 1


def source_forms(sources: Iterable[str]) -> list[str]:
    """Absolute source paths, keeping the trailing slash that changes their meaning."""
    return [os.path.abspath(s) + ("/" if s.endswith(os.sep) and os.path.abspath(s) != "/" else "")
            for s in sources]


def store_identity(settings: Settings) -> str:
    if settings.uses_cluster:
        # The cluster, not its current list of services: a keepstore added or moved
        # keeps the run (and its pending save) resumable.
        return (f"arvados {settings.api.host} replication={settings.store.replication} "
                f"classes={','.join(sorted(settings.store.storage_classes))}")
    if settings.store.type == "keep":
        return f"keep {' '.join(sorted(settings.store.services))} replication={settings.store.replication}"
    return f"directory {settings.store_path}"


@dataclass(frozen=True)
class RunIdentity:
    """What makes two runs the same run, for resuming."""

    sources: tuple[str, ...]
    block_size: int
    store: str

    @classmethod
    def of(cls, settings: Settings, sources: Iterable[str]) -> RunIdentity:
        return cls(tuple(source_forms(sources)), settings.put.block_size, store_identity(settings))

    @property
    def key(self) -> str:
        return xxhash.xxh3_128_hexdigest(msgpack.packb([list(self.sources), self.block_size, self.store]))


class Locked(IngestError):
    """Another live process holds the run's lock."""

    exit_code = EXIT_LOCKED


def piece_rows(block: BlockPlan) -> list[list[Any]]:
    """The identity of a block's content: each piece's file name, fingerprint and range."""
    rows = []
    for f, offset, length in block.pieces:
        fp = f.fingerprint
        rows.append([f.name, fp.size, fp.mtime_ns, fp.ctime_ns, fp.inode, offset, length])
    return rows


def block_key(rows: list[list[Any]]) -> bytes:
    """A compact key for a block's piece rows."""
    return xxhash.xxh3_128_digest(msgpack.packb(rows))


@dataclass
class StoredRecord:
    """A block the journal says is stored."""

    locator: str
    expiry: int | None
    digests: list[int]


@dataclass
class ResumeIndex:
    """What earlier runs stored, as loaded from the journal."""

    blocks: dict[bytes, StoredRecord] = field(default_factory=dict)
    files: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)  # name -> size, mtime, ctime, inode
    last_done: dict[str, Any] | None = None
    saves: list[dict[str, Any]] = field(default_factory=list)  # "save" / "saved" records (ingest.save)
    records: int = 0

    def add(self, record: dict[str, Any]) -> None:
        self.records += 1
        if record["t"] == "block":
            rows = record["pieces"]
            self.blocks[block_key(rows)] = StoredRecord(record["loc"], record.get("exp"), record["digests"])
            for name, size, mtime, ctime, inode, _, _ in rows:
                self.files[name] = (size, mtime, ctime, inode)
        elif record["t"] == "done":
            self.last_done = record
        elif record["t"] in ("save", "saved"):
            self.saves.append(record)


def block_record(rows: list[list[Any]], locator: str, digests: list[int]) -> dict[str, Any]:
    """The journal record of a stored block (never holds a token: a signature at most)."""
    return {"t": "block", "loc": locator, "exp": Locator.parse(locator).permission_expiry,
            "pieces": rows, "digests": digests}


class RunState:
    """The state directory of one run identity."""

    def __init__(self, state_dir: str, identity: RunIdentity):
        self.identity = identity
        self.dir = os.path.join(os.path.abspath(os.path.expanduser(state_dir)), "runs", identity.key)
        self.journal_path = os.path.join(self.dir, "journal")
        self.lock_path = os.path.join(self.dir, "lock")
        self._lock_fd = -1

    def _make_dir(self) -> None:
        try:
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
            for d in (self.dir, os.path.dirname(self.dir), os.path.dirname(os.path.dirname(self.dir))):
                os.chmod(d, 0o700)
        except OSError as exc:
            raise IngestError(f"cannot create state directory {self.dir}: {exc.strerror}") from None

    def acquire(self) -> None:
        """Take the run's lock, or raise Locked naming the holder."""
        self._make_dir()
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise Locked(f"another run holds the lock on this state: {describe_holder(self.lock_path)} "
                         f"(state {self.dir})") from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._lock_fd = fd

    def release(self) -> None:
        if self._lock_fd >= 0:
            os.ftruncate(self._lock_fd, 0)
            os.close(self._lock_fd)  # closing drops the POSIX lock
            self._lock_fd = -1

    def reset(self) -> None:
        """Forget every earlier checkpoint of this run (held lock required)."""
        try:
            os.unlink(self.journal_path)
        except FileNotFoundError:
            pass

    def load(self) -> tuple[ResumeIndex, int]:
        """The resume index and the length of the journal's valid prefix."""
        records, valid, _ = read_journal(self.journal_path)
        index = ResumeIndex()
        for record in records:
            index.add(record)
        return index, valid

    def previous_fingerprints(self, names: set[str], end: int) -> dict[str, tuple[int, int, int, int]]:
        """The fingerprint (size, mtime, ctime, inode) the journal's first ``end`` bytes
        (what earlier runs wrote) last recorded for each of ``names`` that they hold."""
        found: dict[str, tuple[int, int, int, int]] = {}
        for record in read_journal(self.journal_path, end)[0]:
            if record["t"] == "block":
                for name, size, mtime, ctime, inode, _, _ in record["pieces"]:
                    if name in names:
                        found[name] = (size, mtime, ctime, inode)
        return found

    def open_writer(self, valid_length: int) -> JournalWriter:
        self._make_dir()
        return JournalWriter(self.journal_path, valid_length=valid_length)

    def compact(self, live: set[bytes], index: ResumeIndex) -> None:
        """Rewrite the journal with only the records this tree still uses, when worth it."""
        if index.records <= 2 * len(live) + 16:
            return
        records, _, _ = read_journal(self.journal_path)
        keep = [r for r in records if r["t"] != "block" or block_key(r["pieces"]) in live]
        drop: set[int] = set()
        for kind in ("run", "done", "failed"):  # only the last of each
            drop.update([i for i, r in enumerate(keep) if r["t"] == kind][:-1])
        rewrite_journal(self.journal_path, [r for i, r in enumerate(keep) if i not in drop])


def describe_holder(lock_path: str) -> str:
    """``pid N on HOST since TIME`` from a lock file, as well as it can be read."""
    try:
        with open(lock_path) as f:
            holder = json.load(f)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["started"]))
        return f"pid {holder['pid']} on {holder['host']} since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet written its name"


def is_locked(lock_path: str) -> bool:
    """True if a live process holds this lock (tested without taking it)."""
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.lockf(fd, fcntl.LOCK_UN)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)
