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
from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO

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


class Frames:
    """The frames of a journal, read one at a time (never the whole file).

    Iterating yields (offset, payload) for each valid frame; once it is done,
    ``valid`` is the length of the valid prefix and ``torn`` whether a torn tail
    follows it. Raises JournalCorrupt naming the path and offset when a damaged
    record is followed by more data. Only the bytes the file held when iterating
    started are read (a writer may be appending meanwhile).
    """

    def __init__(self, path: str):
        self.path = path
        self.valid = 0
        self.torn = False

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        self.valid, self.torn = 0, False
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return
        with f:
            size = os.fstat(f.fileno()).st_size
            count = 0
            while self.valid < size:
                payload, end = _next_frame(f, self.valid, size)
                if payload is None:
                    if end >= size:
                        self.torn = True
                        return
                    raise JournalCorrupt(
                        f"checkpoint journal {self.path} is damaged at byte {self.valid} (record {count + 1}) "
                        f"and cannot be trusted; run again with --reset-state to start this run afresh")
                count += 1
                yield self.valid, payload
                self.valid = end


def _next_frame(f: BinaryIO, offset: int, size: int) -> tuple[bytes | None, int]:
    """(payload, end) of the frame at ``offset`` (where ``f`` is); for a damaged one
    (None, the end of the damage), that end being ``size`` when it is cut short."""
    head = f.read(min(FRAME_OVERHEAD, size - offset))
    if len(head) < _HEAD.size:
        return None, size
    magic, length, head_crc = _HEAD.unpack_from(head)
    if magic != MAGIC or head_crc != xxhash.xxh32_intdigest(head[:6]) or length > MAX_RECORD:
        return None, offset + _HEAD.size
    end = offset + FRAME_OVERHEAD + length
    if end > size:
        return None, size
    payload = f.read(length)
    if len(payload) < length:  # cut while being read
        return None, size
    if _CRC.unpack_from(head, _HEAD.size)[0] != xxhash.xxh3_64_intdigest(payload):
        return None, end
    return payload, end


def frame_at(path: str, offset: int) -> bytes:
    """The payload of the frame at ``offset`` (one Frames yielded), checked again."""
    with open(path, "rb") as f:
        f.seek(offset)
        payload, _ = _next_frame(f, offset, os.fstat(f.fileno()).st_size)
    if payload is None:
        raise JournalCorrupt(f"checkpoint journal {path} changed under this run at byte {offset}; "
                             f"run again (with --reset-state if it says it is damaged)")
    return payload


def read_journal(path: str) -> tuple[list[dict[str, Any]], int, bool]:
    """(records, length of the valid prefix, whether a torn tail follows it); see Frames."""
    frames = Frames(path)
    records = [msgpack.unpackb(payload) for _, payload in frames]
    return records, frames.valid, frames.torn


def iter_records(path: str) -> Iterator[dict[str, Any]]:
    """The valid records of a journal, decoded one at a time (a torn tail is ignored, not cut)."""
    for _, payload in Frames(path):
        yield msgpack.unpackb(payload)


class JournalWriter:
    """Appends records; fsyncs by group commit."""

    def __init__(self, path: str, valid_length: int | None = None, sync_interval: float = 0.5):
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if valid_length is not None:
            os.ftruncate(self._fd, valid_length)  # cut off a torn tail
        self._end = os.lseek(self._fd, 0, os.SEEK_END)
        self.sync_interval = sync_interval
        self._last_sync = time.monotonic()
        self._dirty = False

    def append(self, record: dict[str, Any]) -> int:
        """Write one record (durable against a kill at once, against a crash after sync);
        return the offset of its frame."""
        data = frame(record)
        offset = self._end
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        self._end += len(data)
        self._dirty = True
        if time.monotonic() - self._last_sync >= self.sync_interval:
            self.sync()
        return offset

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


def rewrite_journal(path: str, frames: Iterable[bytes]) -> None:
    """Replace a journal atomically by the given frames (written one at a time)."""
    tmp = path + ".compact"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        for data in frames:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
