"""The checkpoint journal: append-only records, each framed and checksummed.

Frame: ``b"KJ"``, payload length (u32), xxh32 of those 6 bytes (u32), xxh3-64 of
the payload (u64), then the msgpack payload. A record is appended only after the
store acknowledged the block; appends reach the file at once (so they survive the
process being killed) and are fsynced by group commit, at most ``sync_interval``
apart and when the journal is closed.

Reading tells a torn tail (the last record cut short by a crash: cut off) from
corruption before the tail (reported, with ``--reset-state`` as the way out).
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import xxhash

from ingest.errors import IngestError

MAGIC = b"KJ"
_HEAD = struct.Struct("<2sII")   # magic, payload length, xxh32(magic + length)
_CRC = struct.Struct("<Q")       # xxh3_64 of the payload
FRAME_OVERHEAD = _HEAD.size + _CRC.size
MAX_RECORD = 1 << 30


class JournalCorrupt(IngestError):
    """The journal is damaged before its tail; the message says how to start afresh."""


def frame(record: dict[str, Any]) -> bytes:
    """One record as bytes on disk."""
    payload = msgpack.packb(record)
    head = MAGIC + struct.pack("<I", len(payload))
    return head + struct.pack("<I", xxhash.xxh32_intdigest(head)) + _CRC.pack(
        xxhash.xxh3_64_intdigest(payload)) + payload


def read_journal(path: str, end: int = -1) -> tuple[list[dict[str, Any]], int, bool]:
    """(records, length of the valid prefix, whether a torn tail follows it), of the
    first ``end`` bytes when given.

    Raises JournalCorrupt naming the path and offset when a damaged record is
    followed by more data.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(end)
    except FileNotFoundError:
        return [], 0, False
    records: list[dict[str, Any]] = []
    offset = 0
    while offset < len(data):
        problem = _check_frame(data, offset)
        if problem is None:
            length = _HEAD.unpack_from(data, offset)[1]
            start = offset + FRAME_OVERHEAD
            records.append(msgpack.unpackb(data[start:start + length]))
            offset = start + length
            continue
        kind, end = problem
        if kind == "torn" or end >= len(data):
            return records, offset, True
        raise JournalCorrupt(
            f"checkpoint journal {path} is damaged at byte {offset} (record {len(records) + 1}) "
            f"and cannot be trusted; run again with --reset-state to start this run afresh")
    return records, offset, False


def _check_frame(data: bytes, offset: int) -> tuple[str, int] | None:
    """None for a good frame; else ("torn" | "bad", end offset of the damaged record)."""
    if len(data) - offset < _HEAD.size:
        return "torn", len(data)
    magic, length, head_crc = _HEAD.unpack_from(data, offset)
    if magic != MAGIC or head_crc != xxhash.xxh32_intdigest(data[offset:offset + 6]) or length > MAX_RECORD:
        return "bad", offset + _HEAD.size
    end = offset + FRAME_OVERHEAD + length
    if end > len(data):
        return "torn", len(data)
    (crc,) = _CRC.unpack_from(data, offset + _HEAD.size)
    if crc != xxhash.xxh3_64_intdigest(data[offset + FRAME_OVERHEAD:end]):
        return "bad", end
    return None


def iter_records(path: str) -> Iterator[dict[str, Any]]:
    """The valid records of a journal (read-only: a torn tail is ignored, not cut)."""
    yield from read_journal(path)[0]


class JournalWriter:
    """Appends records; fsyncs by group commit."""

    def __init__(self, path: str, valid_length: int | None = None, sync_interval: float = 0.5):
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if valid_length is not None:
            os.ftruncate(self._fd, valid_length)  # cut off a torn tail
        os.lseek(self._fd, 0, os.SEEK_END)
        self.sync_interval = sync_interval
        self._last_sync = time.monotonic()
        self._dirty = False

    def append(self, record: dict[str, Any]) -> None:
        """Write one record (durable against a kill at once, against a crash after sync)."""
        data = frame(record)
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        self._dirty = True
        if time.monotonic() - self._last_sync >= self.sync_interval:
            self.sync()

    def sync(self) -> None:
        if self._dirty:
            os.fsync(self._fd)
            self._dirty = False
        self._last_sync = time.monotonic()

    def close(self) -> None:
        if self._fd >= 0:
            self.sync()
            os.close(self._fd)
            self._fd = -1


def rewrite_journal(path: str, records: list[dict[str, Any]]) -> None:
    """Replace a journal atomically by the given records (used to compact it)."""
    tmp = path + ".compact"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        for record in records:
            data = memoryview(frame(record))
            while data:
                data = data[os.write(fd, data):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
