"""Checking a worker's STORED before the block counts as stored.

A STORED is a receipt: the worker says the block is durable in the store under a
locator. Before the coordinator journals it or puts it in a manifest, the receipt
must agree with what the coordinator knows: the locator parses, its size and the
size the worker says it stored are the planned block's size, enough replicas were
confirmed, and the digests are those of the bytes the block was made of (for a
streamed block: the xxh3-64 of every byte the coordinator sent, which it computed
while sending; for a block the worker read itself: one xxh3-64 per piece). Where the
coordinator can see the store itself (a directory store), the block must be there
with that size.

What an authenticated worker is still trusted with: computing the MD5 of the bytes
(the block's name) and storing those bytes; Keep checks the MD5 of every block it is
sent, and ``get``/``verify`` check every block they read.
"""

from __future__ import annotations

from collections.abc import Callable

from ingest import protocol
from ingest.keep.locator import Locator, LocatorError
from ingest.keep.store import StoredBlock
from ingest.protocol import Message, ProtocolError


def check_receipt(msg: Message, planned_size: int, replication: int, *, pieces: int | None = None,
                  sent_xxh3: int | None = None,
                  in_store: Callable[[Locator], bool] | None = None) -> tuple[StoredBlock, list[int] | None]:
    """The stored block and piece digests a STORED gives, once checked; ProtocolError
    saying what does not agree otherwise.

    ``pieces`` is the block's piece count when the worker read it itself (digests
    expected), ``sent_xxh3`` the digest of the bytes streamed to it otherwise;
    ``in_store`` tells whether a block is in the store, where the coordinator can see.
    """
    try:
        loc = Locator.parse(msg["locator"])
    except LocatorError as exc:
        raise ProtocolError(f"a STORED with an {exc}") from None
    if msg["size"] != planned_size or loc.size != planned_size:
        raise ProtocolError(f"a STORED of {msg['size']} bytes under {loc.stripped()} for block {msg['block']}, "
                            f"which has {planned_size} bytes")
    if msg["replicas"] < replication:
        raise ProtocolError(f"a STORED with {msg['replicas']} replicas, {replication} needed")
    digests = None
    if pieces is not None:
        if "xxh3" in msg.fields:
            raise ProtocolError("a STORED with a stream digest for a block it read itself")
        digests = protocol.frame_digests(msg.frames)
        if len(digests) != pieces:
            raise ProtocolError(f"a STORED with {len(digests)} piece digests for a block of {pieces} pieces")
    else:
        if msg.frames:
            raise ProtocolError("a STORED with piece digests for a streamed block")
        if msg.get("xxh3") != sent_xxh3:
            raise ProtocolError(f"a STORED for block {msg['block']} whose bytes are not the ones sent "
                                "(their xxh3 differs)")
    if in_store is not None and not in_store(loc):
        raise ProtocolError(f"a STORED for {loc.stripped()}, which is not in the store")
    return StoredBlock(msg["locator"], msg["replicas"]), digests
