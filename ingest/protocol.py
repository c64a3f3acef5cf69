"""Messages between the coordinator and its workers.

Every message is a ZeroMQ multipart message whose first frame is a msgpack map with
a type ``t``; a CHUNK carries the block's bytes as a second, raw frame (sent and
received without copies). The coordinator binds a ROUTER socket; each worker
connects a DEALER socket.

A block reaches a worker in one of two ways. A *local* worker, forked by the
coordinator, says in its HELLO the token it inherited; it gets one READ per block,
listing the block's pieces, and reads the source files itself (no copy of the bytes
through the socket, and the per-file work of small files is shared among the
workers). Any other worker (``keep-ingest worker
--connect``, or every worker when ``put.local_reads`` is off) gets the bytes
streamed to it in CHUNKs.

Worker -> coordinator:
  HELLO   {pid, host, version[, local]}      a worker connected (local: the token a
                                             local worker inherited from its coordinator)
  CREDIT  {bytes}                            a chunk was consumed: that many bytes of window free
  PROGRESS {bytes, last}                     that many more bytes of a READ block read
                                             (last: the block is read, ready for another)
  STORED  {block, locator, replicas, size[, digests]}
                                             a block is durable in the store (digests: the
                                             xxh3-64 of each piece, for a READ block)
  FAILED  {block, error}                     a block could not be stored (error names the store)
  UNREADABLE {block, path, reason}           a READ block's file could not be read: block dropped
  CHANGED {block, path, why}                 a READ block's file changed while read: block dropped
  HEARTBEAT {}                               nothing else to say lately: still alive
Coordinator -> worker:
  WELCOME {store, heartbeat_timeout, chunk_size}
                                             how to open the store; when to give up on us;
                                             the read size
  READ    {block, size} + pieces frame       read, hash and store this block: its pieces,
                                             [path, fingerprint, offset, length] each
  CHUNK   {block, last} + data frame         the next bytes of a block, in order
  ABORT   {block}                            drop a block whose source changed while read
  STOP    {}                                 no more work: exit
  HEARTBEAT {}                               as above; a worker that hears nothing for
                                             heartbeat_timeout seconds exits

Flow control is the coordinator's: it gives a worker at most ``blocks_per_worker``
unfinished blocks, a reading worker its next block only once it has read the last,
and, for streamed blocks, at most ``window_chunks`` chunks it has
not yet consumed (counted back by CREDIT), so the worker needs no limits of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack

from ingest.reader import PieceSource

PROTOCOL_VERSION = 2

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


def encode(msg_type: str, **fields: Any) -> bytes:
    """The header frame of a message."""
    fields["t"] = msg_type
    return msgpack.packb(fields)


def decode(frame: bytes | memoryview) -> dict[str, Any]:
    """Decode a header frame; raises ValueError on garbage."""
    try:
        msg = msgpack.unpackb(frame)
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise ValueError(f"undecodable message: {exc}") from None
    if not isinstance(msg, dict) or "t" not in msg:
        raise ValueError("message without a type")
    return msg


def read_frames(block: int, size: int, pieces: Sequence[PieceSource]) -> list[bytes]:
    """A READ for a block of ``size`` bytes: the header, then its pieces as one msgpack
    frame of ``[path, fingerprint, offset, length]`` (a path that is not valid UTF-8
    travels with surrogate escapes, as the file system gave it)."""
    return [encode(READ, block=block, size=size),
            msgpack.packb(pieces, unicode_errors="surrogateescape")]


def read_pieces(frame: bytes | memoryview) -> Sequence[tuple]:
    """The pieces of a READ's second frame, as tuples the reader takes as they are."""
    return msgpack.unpackb(frame, use_list=False, unicode_errors="surrogateescape")
