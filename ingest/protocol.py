"""Messages between the coordinator and its workers, and checking them.

Every message is a ZeroMQ multipart message whose first frame is a msgpack map with
a type ``t``; some carry further frames (a CHUNK's bytes, a READ's pieces, a
STORED's piece digests), sent and received without copies. The coordinator binds a
ROUTER socket per link (see ingest.link: a private one for its forked workers, and
``--listen`` for remote ones); each worker connects a DEALER socket.

A block reaches a worker in one of two ways. A *local* worker, forked by the
coordinator, gets one READ per block listing the block's pieces and reads the source
files itself (no copy of the bytes through the socket, and the per-file work of
small files is shared among the workers). A remote worker (``keep-ingest worker
--connect``, or every worker when ``put.local_reads`` is off) gets the bytes streamed
to it in CHUNKs.

Worker -> coordinator:
  HELLO   {pid, host, version[, lanes]}  a worker connected (lanes: how many READ blocks it
                                         reads at once, hashing their chunks together; 1
                                         when absent)
  CREDIT  {bytes}                        a streamed chunk was consumed: that much window free
  PROGRESS {block, bytes, last}          that many more bytes of a READ block read
                                         (last: the block is read, ready for another)
  STORED  {block, locator, replicas, size[, xxh3]} [+ digest frames]
                                         a block is durable in the store; a READ block
                                         comes with the xxh3-64 of each piece (packed
                                         little-endian u64, in frames of at most
                                         DIGESTS_PER_FRAME), a streamed one with the
                                         xxh3-64 of all the bytes received
  FAILED  {block, error}                 a block could not be stored (error names the store)
  UNREADABLE {block, path, reason}       a READ block's file could not be read: block dropped
  CHANGED {block, path, why}             a READ block's file changed while read: block dropped
  HEARTBEAT {}                           nothing else to say lately: still alive
Coordinator -> worker:
  WELCOME {heartbeat_timeout, chunk_size[, store]}
                                         when to give up on us; the read size; how to
                                         open the store (remote workers only: a local
                                         one inherited it)
  READ    {block, size} + places, rows   read, hash and store this block: its pieces'
                                         roots and devices, then their rows (name,
                                         size, times, inode, range), as journaled
  CHUNK   {block, last} + data frame     the next bytes of a block, in order
  ABORT   {block}                        drop a block whose source changed while read
  STOP    {[error]}                      no more work (or: refused, and why): exit
  HEARTBEAT {}                           as above; a worker that hears nothing for
                                         heartbeat_timeout seconds exits

:func:`parse` checks every message that arrives against its type's schema (the
fields, their types and ranges, the number and size of the extra frames) and raises
:class:`ProtocolError` saying what is wrong; what a field means for the run (is this
block the peer's? is the locator's size the plan's?) is the receiver's to check.

Flow control is the coordinator's: it gives a reading worker at most ``lanes`` blocks
to read at once and ``blocks_per_worker - 1`` more waiting for their commits (a streamed
one ``blocks_per_worker`` in all), a reading worker its next block only once a lane
is free, and, for streamed blocks, at most ``window_chunks`` chunks it has not yet
consumed (counted back by CREDIT), so the worker needs no limits of its own.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import zmq

from ingest.reader import PieceSource
from ingest.state import row_stream

PROTOCOL_VERSION = 6

HELLO = "hello"
CREDIT = "credit"
PROGRESS = "progress"
STORED = "stored"
FAILED = "failed"
UNREADABLE = "unreadable"
CHANGED = "changed"
WELCOME = "welcome"
READ = "read"
CHUNK = "chunk"
ABORT = "abort"
STOP = "stop"
HEARTBEAT = "heartbeat"

FROM_WORKER = frozenset({HELLO, CREDIT, PROGRESS, STORED, FAILED, UNREADABLE, CHANGED, HEARTBEAT})
FROM_COORDINATOR = frozenset({WELCOME, READ, CHUNK, ABORT, STOP, HEARTBEAT})

DIGESTS_PER_FRAME = 1 << 17           # 1 MiB of packed digests per frame
HEADER_MAX = 64 * 1024                # a header frame is small: a few fields
TEXT_MAX = 16 * 1024                  # error messages, reasons, host names
PATH_MAX = 64 * 1024
U64_MAX = (1 << 64) - 1
LANES_MAX = 64                        # blocks a worker may read at once


class ProtocolError(ValueError):
    """A message that breaks the protocol; the text says what is wrong with it."""


def named(kind: str) -> str:
    """A message type as errors name it: ``a STORED``, ``an UNREADABLE``."""
    return f"{'an' if kind[:1] in ('a', 'e', 'i', 'o', 'u') else 'a'} {kind.upper()}"


_Check = tuple[Callable[[Any], bool], str]


def _uint(limit: int = U64_MAX) -> _Check:
    return (lambda v: type(v) is int and 0 <= v <= limit, f"an integer from 0 to {limit}")


def _text(limit: int) -> _Check:
    return (lambda v: type(v) is str and len(v) <= limit, f"a string of at most {limit} characters")


_UINT = _uint()
_BOOL: _Check = (lambda v: type(v) is bool, "true or false")
_POSITIVE: _Check = (lambda v: type(v) in (int, float) and 0 < v < 1e9, "a positive number")
_MAP: _Check = (lambda v: type(v) is dict, "a map")
_TEXT = _text(TEXT_MAX)
_PATH = _text(PATH_MAX)


@dataclass(frozen=True)
class _Schema:
    fields: dict[str, _Check]
    optional: dict[str, _Check]
    frames: tuple[int, int] = (0, 0)   # how many frames may follow the header


_SCHEMAS: dict[str, _Schema] = {
    HELLO: _Schema({"pid": _UINT, "host": _TEXT, "version": _UINT},
                   {"lanes": (lambda v: type(v) is int and 1 <= v <= LANES_MAX, f"an integer from 1 to {LANES_MAX}")}),
    CREDIT: _Schema({"bytes": _UINT}, {}),
    PROGRESS: _Schema({"block": _UINT, "bytes": _UINT, "last": _BOOL}, {}),
    STORED: _Schema({"block": _UINT, "locator": _text(1024), "replicas": _UINT, "size": _UINT},
                    {"xxh3": _UINT}, (0, 1 << 16)),
    FAILED: _Schema({"block": _UINT, "error": _TEXT}, {}),
    UNREADABLE: _Schema({"block": _UINT, "path": _PATH, "reason": _TEXT}, {}),
    CHANGED: _Schema({"block": _UINT, "path": _PATH, "why": _TEXT}, {}),
    HEARTBEAT: _Schema({}, {}),
    WELCOME: _Schema({"heartbeat_timeout": _POSITIVE, "chunk_size": _uint(1 << 30)}, {"store": _MAP}),
    READ: _Schema({"block": _UINT, "size": _UINT}, {}, (2, 2)),
    CHUNK: _Schema({"block": _UINT, "last": _BOOL}, {}, (1, 1)),
    ABORT: _Schema({"block": _UINT}, {}),
    STOP: _Schema({}, {"error": _TEXT}),
}


@dataclass(frozen=True, slots=True)
class Message:
    """A checked message: its type, its header's fields, and the frames after it."""

    kind: str
    fields: dict[str, Any]
    frames: Sequence[Any] = ()

    def __getitem__(self, name: str) -> Any:
        return self.fields[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.fields.get(name, default)


def _buffer(frame: Any) -> Any:
    return frame.buffer if isinstance(frame, zmq.Frame) else frame


def encode(msg_type: str, **fields: Any) -> bytes:
    """The header frame of a message."""
    fields["t"] = msg_type
    return msgpack.packb(fields, unicode_errors="surrogateescape")


def parse(frames: Sequence[Any], allowed: frozenset[str]) -> Message:
    """Check a received message (its frames, without the ROUTER's identity frame)
    against the schema of its type; raise ProtocolError saying what is wrong."""
    if not frames:
        raise ProtocolError("an empty message")
    header = _buffer(frames[0])
    if len(header) > HEADER_MAX:
        raise ProtocolError(f"a header of {len(header)} bytes (at most {HEADER_MAX})")
    try:
        fields = msgpack.unpackb(header, unicode_errors="surrogateescape", strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise ProtocolError(f"an undecodable header ({type(exc).__name__})") from None
    if type(fields) is not dict:
        raise ProtocolError(f"a header that is a {type(fields).__name__}, not a map")
    kind = fields.pop("t", None)
    if kind not in allowed:
        raise ProtocolError(f"a message of unknown or unexpected type {kind!r}"[:200])
    schema = _SCHEMAS[kind]
    for name, (ok, what) in schema.fields.items():
        if name not in fields:
            raise ProtocolError(f"{named(kind)} without {name!r}")
        if not ok(fields[name]):
            raise ProtocolError(f"{named(kind)} whose {name!r} is not {what}")
    for name, (ok, what) in schema.optional.items():
        if name in fields and not ok(fields[name]):
            raise ProtocolError(f"{named(kind)} whose {name!r} is not {what}")
    low, high = schema.frames
    if not low <= len(frames) - 1 <= high:
        raise ProtocolError(f"{named(kind)} with {len(frames) - 1} frames after its header "
                            f"({low} to {high} expected)")
    return Message(kind, fields, frames[1:])


def pack_places(places: Iterable[tuple[str, int]]) -> bytes:
    """A READ's places frame, from each piece's (root, device) in block order: one
    msgpack ``[roots, runs]``, each run ``[pieces, root's index, device]`` for that
    many consecutive pieces (a block's files nearly always share both: one run). A
    root that is not valid UTF-8 travels with surrogate escapes."""
    roots: dict[str, int] = {}
    runs: list[list[int]] = []
    last_root, last_device = None, -1
    for root, device in places:
        if root is last_root and device == last_device:
            runs[-1][0] += 1
            continue
        index = roots.get(root)
        if index is None:
            index = roots[root] = len(roots)
        runs.append([1, index, device])
        last_root, last_device = root, device
    return msgpack.packb((list(roots), runs), unicode_errors="surrogateescape")


def read_frames(block: int, size: int, places: bytes, rows: bytes) -> list[bytes]:
    """A READ for a block of ``size`` bytes: the header, its places frame (see
    pack_places) and its rows frame: the block's piece rows as the journal keeps them,
    msgpack ``[[name, size, mtime_ns, ctime_ns, inode, offset, length], ...]``, each
    file at its run's root + name."""
    return [encode(READ, block=block, size=size), places, rows]


def read_pieces(places: Any, rows: Any) -> Iterator[PieceSource]:
    """A READ's pieces as (path, fingerprint, offset, length) tuples, which the reader
    takes as they are, decoded one at a time as the reader asks for them: a block
    being read holds its packed rows (tens of bytes a piece), not a tuple per piece.
    TypeError or ValueError if the frames are malformed: at once for the places frame
    and for runs that do not cover the rows, when it is reached for a row."""
    roots, runs = msgpack.unpackb(_buffer(places), use_list=False, unicode_errors="surrogateescape")
    data = _buffer(rows)
    count, unpacker = row_stream(data)
    spans = []
    for pieces, index, device in runs:
        if not 0 <= index < len(roots):
            raise ValueError("a run names a root the frame does not list")
        if pieces < 0:
            raise ValueError(f"a run of {pieces} pieces")
        spans.append((pieces, roots[index], device))
    covered = sum(pieces for pieces, _, _ in spans)
    if covered != count:
        raise ValueError(f"runs for {covered} pieces, and {count} rows")
    return _decoded_pieces(spans, unpacker, len(data))


def _decoded_pieces(spans: list[tuple[int, str, int]], unpacker: msgpack.Unpacker,
                    frame_size: int) -> Iterator[PieceSource]:
    """The pieces of ``spans`` (count, root, device), their rows read from ``unpacker``."""
    unpack = unpacker.unpack
    try:
        for pieces, root, device in spans:
            for _ in range(pieces):
                name, size, mtime, ctime, inode, offset, length = unpack()
                yield root + name, (size, mtime, ctime, inode, device), offset, length
    except msgpack.OutOfData:
        raise ValueError("a rows frame cut short") from None
    if unpacker.tell() != frame_size:
        raise ValueError("a rows frame with bytes after its rows")


def digest_frames(digests: Sequence[int]) -> list[bytes]:
    """Piece digests as STORED's extra frames: packed little-endian u64s."""
    packed = array("Q", digests)
    if sys.byteorder != "little":
        packed.byteswap()
    data = packed.tobytes()
    step = 8 * DIGESTS_PER_FRAME
    return [data[i:i + step] for i in range(0, len(data), step)]


def frame_digests(frames: Sequence[Any]) -> list[int]:
    """The digests of STORED's extra frames; ProtocolError if a frame is not whole u64s."""
    digests = array("Q")
    for frame in frames:
        data = _buffer(frame)
        if len(data) % 8 or len(data) > 8 * DIGESTS_PER_FRAME:
            raise ProtocolError(f"a digest frame of {len(data)} bytes")
        digests.frombytes(data)
    if sys.byteorder != "little":
        digests.byteswap()
    return digests.tolist()
