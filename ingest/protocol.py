"""Messages between the coordinator and its workers.

Every message is a ZeroMQ multipart message whose first frame is a msgpack map with
a type ``t``; a CHUNK carries the block's bytes as a second, raw frame (sent and
received without copies). The coordinator binds a ROUTER socket; each worker
connects a DEALER socket.

Worker -> coordinator:
  HELLO   {pid, host, version}               a worker connected
  CREDIT  {bytes}                            a chunk was consumed: that many bytes of window free
  STORED  {block, locator, replicas, size}   a block is durable in the store
  FAILED  {block, error}                     a block could not be stored (error names the store)
  HEARTBEAT {}                               nothing else to say lately: still alive
Coordinator -> worker:
  WELCOME {store, heartbeat_timeout}         how to open the store; when to give up on us
  CHUNK   {block, last} + data frame         the next bytes of a block, in order
  ABORT   {block}                            drop a block whose source changed while read
  STOP    {}                                 no more work: exit
  HEARTBEAT {}                               as above; a worker that hears nothing for
                                             heartbeat_timeout seconds exits

Flow control is the coordinator's: it gives a worker at most ``blocks_per_worker``
unfinished blocks and at most ``window_chunks`` chunks it has not yet consumed
(counted back by CREDIT), so the worker needs no limits of its own.
"""

from __future__ import annotations

from typing import Any

import msgpack

PROTOCOL_VERSION = 1

HELLO = "hello"
CREDIT = "credit"
STORED = "stored"
FAILED = "failed"
WELCOME = "welcome"
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
