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
import sys
import time
from array import array
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import repeat
from operator import add
from typing import Any

import msgpack
import xxhash

from ingest.config import Settings
from ingest.errors import EXIT_LOCKED, IngestError
from ingest.gcpause import collector_paused
from ingest.journal import FRAME_OVERHEAD, Frames, JournalWriter, frame_at, rewrite_journal
from ingest.keep.locator import Locator
from ingest.plan import BlockPlan

# 2: block records hold their rows packed ("rows", "key") and their digests as
# u64s; version 1 records ("pieces", a "digests" list) are still read.
JOURNAL_VERSION = 2


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


def packed_rows(block: BlockPlan) -> bytes:
    """The identity of a block's content, msgpack-packed: each piece's file name,
    fingerprint (size, mtime, ctime, inode) and range, one row per piece (made from
    the block's runs a column at a time, and packed a row at a time: no list of a
    block's rows is built, which for 65,536 small files would take 27 MB)."""
    packer = msgpack.Packer(autoreset=False)
    packer.pack_array_header(block.count)
    pack = packer.pack
    for batch, start, stop, offset, length in block.runs:
        prefix, names = batch.prefix, batch.names[start:stop]
        if stop - start == 1:
            fp = batch.fingerprints[start]
            pack((prefix + names[0], fp[0], fp[1], fp[2], fp[3], offset, length))
            continue
        f = batch.fingerprints
        sizes = f.sizes[start:stop]
        deque(map(pack, zip(map(add, repeat(prefix), names) if prefix else names, sizes, f.mtimes[start:stop],
                            f.ctimes[start:stop], f.inodes[start:stop], repeat(0), sizes)), maxlen=0)
    return packer.bytes()


def moved_pieces(now: bytes, then: bytes) -> list[tuple[int, int]] | None:
    """The position and length of each piece whose row differs between two packings
    of a block's rows (see packed_rows) in its fingerprint's mtime, ctime or inode
    alone; None when the rows differ in anything else, or in number. The rows are
    compared as they are decoded, one pair at a time: none is kept but those moved."""
    try:
        count, now_rows = row_stream(now)
        then_count, then_rows = row_stream(then)
        if count != then_count:
            return None
        moved = []
        for i, row, was in zip(range(count), now_rows, then_rows, strict=True):
            if row != was:
                if row[:2] != was[:2] or row[5:] != was[5:]:
                    return None
                moved.append((i, row[6]))
    except ValueError:       # not an array, or fewer or more rows than it says
        return None
    return moved


def row_stream(packed: Any) -> tuple[int, msgpack.Unpacker]:
    """How many rows a packing of them (see packed_rows) says it holds, and an
    unpacker that yields them in order, decoding each as it is asked for (iterating
    it stops early if the packing is cut short). ValueError if it is not an array."""
    unpacker = msgpack.Unpacker(use_list=False, max_buffer_size=max(len(packed), 1))
    unpacker.feed(packed)
    try:
        return unpacker.read_array_header(), unpacker
    except msgpack.OutOfData:
        raise ValueError("packed rows that are not an array") from None


def block_key(packed: bytes) -> bytes:
    """A compact key for a block's packed piece rows: their xxh3-128."""
    return xxhash.xxh3_128_digest(packed)


Layout = tuple[str, int, str, int, int]


def block_layout(block: BlockPlan) -> Layout:
    """A handle on where a block's bytes come from, taken without a pass over its
    pieces: its first piece's file name and offset, its last piece's file name, how
    many pieces, its size. A block of the same files in the same places, whatever
    their fingerprints now, has the same handle; its rows tell the rest."""
    first, last = block.runs[0], block.runs[-1]
    return (first.batch.prefix + first.batch.names[first.start], first.offset,
            last.batch.prefix + last.batch.names[last.stop - 1], block.count, block.size)


def block_record(packed: bytes, locator: str, digests: list[int], layout: Layout | None = None) -> dict[str, Any]:
    """The journal record of a stored block (never holds a token: a signature at most).

    The rows are kept packed (``key`` is their block_key) and the piece digests as
    little-endian u64s, so that loading the journal decodes neither; ``lay`` is its
    block_layout, when known (records written before it was kept have none).
    """
    record = {"t": "block", "loc": locator, "exp": Locator.parse(locator).permission_expiry,
              "key": block_key(packed), "rows": packed, "digests": _pack_digests(digests)}
    if layout is not None:
        record["lay"] = layout
    return record


def _pack_digests(digests: list[int]) -> bytes:
    packed = array("Q", digests)
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tobytes()


def _unpack_digests(digests: bytes | list[int]) -> list[int]:
    """Digests as a record holds them (packed, or a list in version 1 records)."""
    if isinstance(digests, list):
        return digests
    unpacked = array("Q")
    unpacked.frombytes(digests)
    if sys.byteorder == "big":
        unpacked.byteswap()
    return unpacked.tolist()


_PACKED = ("rows", "pieces", "digests")


def _outer(payload: bytes) -> tuple[dict[str, Any], dict[str, tuple[int, int]]]:
    """A record's fields but those of ``_PACKED``, and where those lie in ``payload``
    (start, end), skipped without being decoded."""
    unpacker = msgpack.Unpacker()
    unpacker.feed(payload)
    fields: dict[str, Any] = {}
    spans: dict[str, tuple[int, int]] = {}
    for _ in range(unpacker.read_map_header()):
        name = unpacker.unpack()
        if name in _PACKED:
            start = unpacker.tell()
            unpacker.skip()
            spans[name] = (start, unpacker.tell())
        else:
            fields[name] = unpacker.unpack()
    return fields, spans


def _key(fields: dict[str, Any], spans: dict[str, tuple[int, int]], payload: bytes) -> bytes:
    """A block record's key; a version 1 record's is that of its pieces, as packed in it."""
    if "key" in fields:
        return fields["key"]
    start, end = spans["pieces"]
    return xxhash.xxh3_128_digest(memoryview(payload)[start:end])


@dataclass(frozen=True)
class StoredRecord:
    """A block the journal says is stored; its piece digests are read back from its
    frame in the journal when asked for."""

    locator: str
    expiry: int | None
    journal: str
    offset: int

    @property
    def digests(self) -> list[int]:
        """The xxh3-64 of each piece, as they were stored."""
        return _unpack_digests(self._packed("digests")[0])

    def rows_and_digests(self) -> tuple[bytes, list[int]]:
        """Its pieces' rows, packed as packed_rows packed them, and their digests, from
        one read of its frame."""
        rows, digests = self._packed("rows", "digests")
        return rows, _unpack_digests(digests)

    def _packed(self, *names: str) -> list[Any]:
        payload = frame_at(self.journal, self.offset)
        spans = _outer(payload)[1]
        return [msgpack.unpackb(memoryview(payload)[slice(*spans[name])]) for name in names]


@dataclass
class ResumeIndex:
    """What earlier runs stored: per block, never per file (see previous_fingerprints)."""

    journal: str = ""  # the journal it was loaded from ("" for none)
    loaded: int = 0    # how many of its bytes were loaded: what earlier runs wrote
    blocks: dict[bytes, StoredRecord] = field(default_factory=dict)
    layouts: dict[Layout, StoredRecord] = field(default_factory=dict)   # loaded records by block_layout
    last_done: dict[str, Any] | None = None
    saves: list[dict[str, Any]] = field(default_factory=list)  # "save" / "saved" records (ingest.save)
    records: int = 0

    def add(self, record: dict[str, Any], offset: int) -> None:
        """A record this run has just journaled at ``offset`` (a block's as block_record
        made it: its digests are read back from there when asked for)."""
        self.records += 1
        if record["t"] == "block":
            self.blocks[record["key"]] = StoredRecord(record["loc"], record["exp"], self.journal, offset)
        else:
            self._add_other(record)

    def add_frame(self, offset: int, payload: bytes) -> None:
        """A record read from the journal at ``offset``, its rows and digests left packed."""
        fields, spans = _outer(payload)
        self.records += 1
        if fields["t"] == "block":
            record = StoredRecord(fields["loc"], fields.get("exp"), self.journal, offset)
            self.blocks[_key(fields, spans, payload)] = record
            if "lay" in fields:
                self.layouts[tuple(fields["lay"])] = record
        else:
            self._add_other(fields)

    def _add_other(self, record: dict[str, Any]) -> None:
        if record["t"] == "done":
            self.last_done = record
        elif record["t"] in ("save", "saved"):
            self.saves.append(record)

    def previous_fingerprints(self, names: set[str]) -> dict[str, tuple[int, int, int, int]]:
        """The last fingerprint (size, mtime_ns, ctime_ns, inode) that earlier runs (the
        journal as loaded) recorded for each of ``names`` they hold: one pass over the
        journal, decoding the rows of each block record in turn (none when no block
        was known)."""
        found: dict[str, tuple[int, int, int, int]] = {}
        if not names or not self.blocks or not self.loaded:
            return found
        with collector_paused():  # the rows of a block at a time: many small tuples
            for offset, payload in Frames(self.journal):
                if offset >= self.loaded:
                    break      # written by this run
                fields, spans = _outer(payload)
                if fields["t"] != "block":
                    continue
                start, end = spans["rows"] if "rows" in spans else spans["pieces"]
                rows = msgpack.unpackb(memoryview(payload)[start:end], use_list=False)
                if isinstance(rows, bytes):  # a version 2 record: the rows packed in a bin
                    rows = msgpack.unpackb(rows, use_list=False)
                for row in rows:
                    if row[0] in names:
                        found[row[0]] = row[1:5]
        return found


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
        """The resume index and the length of the journal's valid prefix (the journal is
        streamed: block records' rows and digests are not decoded)."""
        index = ResumeIndex(self.journal_path)
        frames = Frames(self.journal_path)
        for offset, payload in frames:
            index.add_frame(offset, payload)
        index.loaded = frames.valid
        return index, frames.valid

    def open_writer(self, valid_length: int) -> JournalWriter:
        self._make_dir()
        return JournalWriter(self.journal_path, valid_length=valid_length)

    def compact(self, live: set[bytes], index: ResumeIndex) -> None:
        """Rewrite the journal with only the records this tree still uses, when worth it:
        the last record of each block in ``live``, the last run, done and failed
        records, every save record. Frames are copied as they are (rows undecoded)."""
        if index.records <= 2 * len(live) + 16:
            return
        kept: list[tuple[int, int, str]] = []   # offset, length and kind of the frames kept
        last: dict[str, int] = {}                # run / done / failed -> the offset of its last frame
        for offset, payload in Frames(self.journal_path):
            fields, spans = _outer(payload)
            kind = fields["t"]
            if kind == "block":
                key = _key(fields, spans, payload)
                record = index.blocks.get(key) if key in live else None
                if record is None or record.locator != fields["loc"]:
                    continue
            elif kind in ("run", "done", "failed"):
                last[kind] = offset
            kept.append((offset, FRAME_OVERHEAD + len(payload), kind))
        with open(self.journal_path, "rb") as f:
            rewrite_journal(self.journal_path, (os.pread(f.fileno(), length, offset) for offset, length, kind in kept
                                                if last.get(kind, offset) == offset))


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
