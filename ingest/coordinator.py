"""ZeroMQ dispatch: hand each block to one worker, collect checked locators.

The coordinator binds one ROUTER socket per link (see ingest.link): a private ipc
socket, in a directory only this user can enter, for the local workers it forks
before the walk, and with ``--listen`` a TCP one for remote workers. Both use CURVE:
a local worker proves the per-run key it inherited, a remote one a key the
coordinator was given. It hands blocks to whichever worker has room; a worker holds
at most ``blocks_per_worker`` unfinished blocks, plus one for each further block it
reads at once (its lanes, below).

A local worker gets one READ per block, listing the block's pieces (path, range,
fingerprint), and reads the files itself, so the bytes never cross the socket and
the per-file reads of small files are spread over the workers. It reads as many
blocks at once as its HELLO says it has MD5 lanes (see workers.lanes), hashing their
chunks together; the blocks left are shared evenly among the workers, so a small
tree's few blocks do not all fill the lanes of the first worker to ask. Other workers
(remote ones, or all when ``put.local_reads`` is off) get the bytes streamed: the
coordinator reads each block and sends its chunks without copies (``copy=False``),
all to the same worker, with credit-based flow control (at most ``window_chunks``
chunks not yet consumed), so memory is bounded whatever the tree size.

Every message is checked (ingest.protocol for its form, here for what it claims:
a block the peer holds, credit for bytes it was sent, a receipt that agrees with the
plan, see ingest.receipts). A peer that breaks the protocol is dropped, its blocks go
to the others, and a remote key that does so three times is refused for the rest of
the run; nothing a peer sends can end the run with a traceback.

Liveness: both sides send a HEARTBEAT when they have had nothing else to say for a
while. A worker that goes silent, disconnects, (when local) exits, or holds blocks
without progress for ``block_timeout`` seconds loses its unfinished blocks to the
others, and a local one is replaced. A file that cannot be read costs only its
block: the others go on, and the caller decides what to do.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import chain, repeat
from typing import Any

import xxhash
import zmq

from ingest import protocol, worker_logs
from ingest.config import Settings
from ingest.errors import IngestError, StoreError
from ingest.keep.locator import Locator
from ingest.keep.store import StoredBlock
from ingest.link import (
    CoordinatorLink,
    WorkerCredentials,
    load_authorized_keys,
    load_key_pair,
    peer_address,
    peer_user,
    private_ipc_endpoint,
)
from ingest.plan import BlockPlan
from ingest.progress import NoDisplay, Tracker
from ingest.protocol import Message, ProtocolError
from ingest.reader import BlockReader, Chunk, FileChanged, PieceSource, Unreadable
from ingest.receipts import check_receipt

log = logging.getLogger(__name__)

POLL_MS = 200
FEED_ITEMS = 2048               # walk items planned per turn of the loop while the walk goes on
FILES_AHEAD = 1 << 17           # pieces (files) of blocks handed out and not stored, beyond which the walk waits
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
STOP_GRACE_S = 10.0
STRIKES = 3                     # bad messages after which a remote key is refused for the run
BLOCK_FAILURES = 3              # FAILED receipts from remote workers after which a block fails the run
INBOUND_FRAME_MAX = 8 * protocol.DIGESTS_PER_FRAME + protocol.HEADER_MAX


@dataclass(frozen=True)
class _Link:
    """One of the coordinator's sockets: ``local`` (its forked workers) or ``remote``."""

    name: str
    sock: zmq.Socket
    address: str


@dataclass
class _Peer:
    """What the coordinator knows of one connected worker."""

    link: _Link
    identity: bytes
    pid: int
    name: str
    user: str                        # its authenticated name: "local", a key's name, "" in plaintext
    credit: int
    last_heard: float
    reads: bool = False              # reads blocks itself (READ), else gets CHUNKs
    lanes: int = 1                   # READ blocks it reads at once
    reading: dict[int, int] = field(default_factory=dict)  # READ block -> bytes it has yet to say it read
    last_sent: float = 0.0
    last_progress: float = 0.0       # when it last moved a block on (or was given one)
    open_blocks: set[int] = field(default_factory=set)
    stream: Iterator[tuple[Chunk, bool]] | None = None
    stream_block: int = -1
    stream_hash: Any = None          # xxh3 of the bytes of stream_block sent so far
    stream_digests: list[int] = field(default_factory=list)  # and of each of its pieces
    sent: dict[int, tuple[int, list[int]]] = field(default_factory=dict)  # streamed block -> those two
    outstanding: int = 0             # streamed bytes not yet credited back

    @property
    def key(self) -> tuple[str, bytes]:
        return self.link.name, self.identity

    @property
    def local(self) -> bool:
        return self.link.name == "local"


@dataclass(frozen=True, slots=True)
class BlockToStore:
    """A closed block given to the coordinator to store: its plan's figures, and its
    pieces as the READ that lists them will carry them: their packed rows (also what
    the journal keeps) and their places (roots and devices, see protocol.pack_places).
    Two bytes objects a block, not a tuple per piece: blocks of tiny files wait here
    by the hundred thousand files."""

    index: int
    size: int
    ends: int           # files whose last byte is in it
    pieces: int         # how many
    places: bytes
    rows: bytes         # state.packed_rows

    @classmethod
    def of(cls, block: BlockPlan, rows: bytes) -> BlockToStore:
        places = protocol.pack_places(chain.from_iterable(
            zip(repeat(batch.root), batch.fingerprints.devices[start:stop])
            for batch, start, stop, _, _ in block.runs))
        return cls(block.index, block.size, block.ends, block.count, places, rows)

    def sources(self) -> Iterator[PieceSource]:
        """Its pieces as (path, fingerprint, offset, length), for a BlockReader."""
        return protocol.read_pieces(self.places, self.rows)



class _PeerLost(Exception):
    """Sending to a worker failed: it is gone."""


def _local_worker_main(address: str, parent_pid: int, credentials: WorkerCredentials,
                       store_spec: dict[str, Any]) -> None:
    """Body of a local worker process (forked with SIGINT and SIGTERM blocked): ignore
    Ctrl-C, the coordinator stops us; die quietly on SIGTERM."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    from workers import run_worker

    code = run_worker(address, credentials, store_spec=store_spec, parent_pid=parent_pid)
    worker_logs.flush_in_worker()
    os._exit(code)


class Coordinator:
    """The workers of one attempt at a run, and the dispatch of its blocks to them.

    Opened (as a context manager) before the walk: the sockets are bound and the local
    workers are forked while the coordinator is still small, so they share none of
    the file list and start up while it walks. ``run`` then stores a plan's blocks;
    leaving stops every worker.
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self.chunk_size = settings.put.chunk_size
        self.window = settings.put.window_chunks * settings.put.chunk_size
        self.max_blocks = settings.put.blocks_per_worker
        self.heartbeat_timeout = float(settings.put.heartbeat_timeout)
        self.heartbeat_interval = self.heartbeat_timeout / 5
        self.block_timeout = float(settings.put.block_timeout)
        self.replication = settings.store.replication if settings.store.type == "keep" else 1
        self.peers: dict[tuple[str, bytes], _Peer] = {}
        self.processes: dict[int, multiprocessing.Process] = {}
        self.restarts_left = 2 * settings.local_worker_count + 2
        self.unreadable: dict[str, str] = {}  # path -> why it could not be read
        self.bytes_read_by_workers = 0
        self._links: list[_Link] = []
        self._security: CoordinatorLink | None = None
        self._exits = contextlib.ExitStack()
        self._ctx: zmq.Context | None = None
        self._poller = zmq.Poller()
        self._in_store: Callable[[Locator], bool] | None = None
        self._strikes: Counter[str] = Counter()
        self._failures: Counter[int] = Counter()
        self._pending: deque[int] = deque()
        self._blocks: dict[int, BlockToStore] = {}   # blocks to store, not stored yet: pending or open
        self._pieces = 0                            # in those blocks
        self._walking = False
        self.progress = Tracker(NoDisplay())   # run() is given the run's

    # -- lifecycle -------------------------------------------------------

    def __enter__(self) -> Coordinator:
        put = self.settings.put
        remote_key = remote_workers = None
        if put.listen and not put.insecure_plaintext:  # key errors come before anything starts
            remote_key = load_key_pair(self.settings.link_key_path)
            remote_workers = load_authorized_keys(self.settings.worker_key_paths)
        try:
            local_address = self._exits.enter_context(private_ipc_endpoint())
            self._ctx = zmq.Context()
            self._security = CoordinatorLink(self._ctx, remote_key, remote_workers)
            self._local = self._bind("local", local_address, self._security.secure_local)
            if put.listen:
                self._bind("remote", put.listen, self._security.secure_remote)
                if put.insecure_plaintext:
                    log.warning("INSECURE: the worker link on %s is neither authenticated nor encrypted: "
                                "anyone who can reach it receives the store's credentials and the files' bytes",
                                put.listen)
                else:
                    log.info("accepting workers on %s (CURVE: %d worker keys accepted)",
                             put.listen, len(remote_workers or {}))
        except BaseException:
            self._close()
            raise
        if self.settings.store.type == "directory":
            from ingest.keep.dirstore import DirectoryStore

            store = DirectoryStore(self.settings.store_path, fsync=False)
            self._in_store = lambda loc: store.contains(loc.md5, loc.size)
        if multiprocessing.get_start_method(allow_none=True) != "fork":
            multiprocessing.set_start_method("fork", force=True)  # multiprocessing-logging needs it
        worker_logs.start_forwarding()
        for _ in range(self.settings.local_worker_count):
            self._start_local_worker()
        return self

    def _bind(self, name: str, address: str, secure: Callable[[zmq.Socket], None]) -> _Link:
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.MAXMSGSIZE, INBOUND_FRAME_MAX)
        secure(sock)
        try:
            sock.bind(address)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise IngestError(f"cannot listen for workers on {address}: {exc}") from None
        link = _Link(name, sock, address)
        self._links.append(link)
        self._poller.register(sock, zmq.POLLIN)
        return link

    def __exit__(self, *exc_info: object) -> None:
        for link in self._links:
            self._turn_away_latecomers(link.sock)
        for peer in self.peers.values():
            self._send(peer, [protocol.encode(protocol.STOP)], quiet=True)
            if peer.stream is not None:
                peer.stream.close()  # closes the file that stream has open
        self._stop_local_workers()
        worker_logs.stop_forwarding()
        self._close()

    def _close(self) -> None:
        for link in self._links:
            link.sock.close()
        self._links.clear()
        if self._security is not None:
            self._security.close()
        if self._ctx is not None:
            self._ctx.term()
        self._exits.close()

    def _start_local_worker(self) -> None:
        proc = multiprocessing.get_context("fork").Process(
            target=_local_worker_main,
            args=(self._local.address, os.getpid(), self._security.local_credentials(), self.settings.store_spec()),
            name="keep-ingest-worker", daemon=True)
        # Until the worker has set its own handlers, a stop signal must not run ours
        # (put's SIGTERM handler raises KeyboardInterrupt): the child starts with them blocked.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        self.processes[proc.pid] = proc

    def _stop_local_workers(self) -> None:
        """Wait for local workers to exit; those that never connected hold no work."""
        connected = {peer.pid for peer in self.peers.values() if peer.local}
        for pid, proc in self.processes.items():
            if pid not in connected:
                proc.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in self.processes.values():
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                log.warning("worker %d did not stop; killing it", proc.pid)
                proc.kill()
                proc.join()
        self.processes.clear()

    def run(self, feed: Callable[[int], list[BlockToStore] | None], reader: BlockReader,
            on_stored: Callable[[BlockToStore, StoredBlock, list[int]], None], progress: Tracker) -> None:
        """Store the blocks ``feed`` gives, except those whose files cannot be read (see
        ``unreadable``); raise on a store failure, a changing file or no workers.

        ``feed(n)`` walks up to ``n`` more items of the tree and returns the blocks
        among them to store, or None once the walk is over; it is called while few
        blocks wait for a worker, so the walk goes on while the workers upload and
        stays only a few blocks ahead of them. ``reader`` reads the blocks streamed to
        workers that do not read them themselves; ``on_stored(block, stored block,
        xxh3 digests of its pieces)`` is called for each block as the store confirms
        it; ``progress`` hears of every worker (joined, its bytes, its blocks stored or
        dropped, left) and every file that cannot be read, and is ticked on each turn
        of the loop.
        """
        self.reader, self.on_stored, self.progress = reader, on_stored, progress
        self._pending.clear()
        self._blocks.clear()
        self._pieces = 0
        self._walking = True
        self._dispatch(feed)

    def _feed(self, feed: Callable[[int], list[BlockToStore] | None]) -> bool:
        """Walk on if few blocks wait for a worker and the blocks not stored yet hold
        few files (what the run holds per file lives until its block is stored);
        True if it did."""
        lanes = max((p.lanes for p in self.peers.values()), default=1)
        workers = max(len(self.peers), self.settings.local_worker_count, 1)
        if (not self._walking or len(self._pending) >= 2 * workers * (self.max_blocks + lanes)
                or self._pieces >= FILES_AHEAD):
            return False
        blocks = feed(FEED_ITEMS)
        if blocks is None:
            self._walking = False
            return True
        for block in blocks:
            self._blocks[block.index] = block
            self._pieces += block.pieces
            self._pending.append(block.index)
        return True

    def _forget(self, index: int) -> BlockToStore:
        """A block is stored, or left out: it is no longer the coordinator's."""
        block = self._blocks.pop(index)
        self._pieces -= block.pieces
        return block

    # -- the dispatch loop ----------------------------------------------------

    def _dispatch(self, feed: Callable[[int], list[BlockToStore] | None]) -> None:
        timeout_s = self.settings.put.worker_timeout
        last_worker_seen = time.monotonic()
        while True:
            walked = self._feed(feed)
            if not self._walking and not self._blocks:
                return
            sent = self._send_round()
            events = dict(self._poller.poll(0 if sent or walked else POLL_MS))
            for link in self._links:
                while events.get(link.sock):
                    self._handle(link, link.sock.recv_multipart(copy=False))
                    events[link.sock] = link.sock.poll(0)
            self._keep_alive()
            self._check_local_workers()
            self.progress.tick()
            if self.peers or not self._blocks:
                last_worker_seen = time.monotonic()
            elif not self.processes and self.settings.local_worker_count:
                raise IngestError("every worker process died and none could be restarted; "
                                  "see the messages above")
            elif time.monotonic() - last_worker_seen > timeout_s:
                raise IngestError(f"no worker connected within {timeout_s:g} s "
                                  f"(listening on {self.settings.put.listen or 'a local socket'})")

    def _send(self, peer: _Peer, frames: list, quiet: bool = False) -> None:
        try:
            peer.link.sock.send_multipart([peer.identity, *frames], zmq.NOBLOCK, copy=False)
            peer.last_sent = time.monotonic()
        except zmq.ZMQError as exc:
            if not quiet:
                raise _PeerLost(f"cannot reach it ({exc})") from None

    def _send_round(self) -> bool:
        """Send its next block to each reading worker that is ready for one, and at
        most one chunk to each streamed worker that has credit; True if anything was sent."""
        sent = False
        for peer in list(self.peers.values()):
            if peer.reads:
                sent = self._send_read(peer) or sent
            elif peer.credit >= self.chunk_size:
                sent = self._send_chunk(peer) or sent
        return sent

    def _send_chunk(self, peer: _Peer) -> bool:
        """The next chunk of the block streaming to this worker (starting its next
        block if none is); True if sent."""
        if peer.stream is None:
            if not self._may_take(peer):
                return False
            index = self._assign(peer)
            block = self._blocks[index]
            peer.stream_digests = []
            peer.stream = self.reader.chunks(block.size, block.sources(), peer.stream_digests)
            peer.stream_block, peer.stream_hash = index, xxhash.xxh3_64()
        index = peer.stream_block
        try:
            try:
                data, last = next(peer.stream)
            except Unreadable as exc:
                self._send(peer, [protocol.encode(protocol.ABORT, block=index)], quiet=True)
                peer.stream = None
                self._skip_block(peer, index, exc.path, exc.reason)
                return False
            except FileChanged:
                self._send(peer, [protocol.encode(protocol.ABORT, block=index)], quiet=True)
                raise
            peer.stream_hash.update(data)
            self._send(peer, [protocol.encode(protocol.CHUNK, block=index, last=last), data])
        except _PeerLost as exc:
            self._lose(peer, str(exc))
            return False
        peer.credit -= len(data)
        peer.outstanding += len(data)
        peer.last_progress = time.monotonic()
        if last:
            peer.sent[index] = (peer.stream_hash.intdigest(), peer.stream_digests)
            peer.stream = peer.stream_hash = None
        return True

    def _may_take(self, peer: _Peer) -> bool:
        """Whether a worker may take one more block now.

        A worker always may when it holds none; a further block (to read while others
        commit or are read in its other lanes, or queued behind the one streaming to
        it) only while it has a lane free, while enough are left for every worker that
        holds none, counting local workers not yet connected, and while it reads fewer
        than its share of the blocks left to read: so the few blocks of a small tree
        are spread over the workers instead of going to whichever connected first.
        """
        if (not self._pending or len(peer.reading) >= peer.lanes
                or len(peer.open_blocks) >= self.max_blocks + peer.lanes - 1):
            return False
        if not peer.open_blocks:
            return True
        connected = {p.pid for p in self.peers.values() if p.local}
        waiting = sum(1 for pid in self.processes if pid not in connected)
        idle = sum(1 for p in self.peers.values() if not p.open_blocks)
        if len(self._pending) <= waiting + idle:
            return False
        to_read = len(self._pending) + sum(len(p.reading) for p in self.peers.values())
        share = -(-to_read // (len(self.peers) + waiting))
        return len(peer.reading) < share

    def _assign(self, peer: _Peer) -> int:
        """Take the next pending block for this worker."""
        index = self._pending.popleft()
        if not peer.open_blocks:
            peer.last_progress = time.monotonic()  # its block clock starts now
        peer.open_blocks.add(index)
        log.debug("block %d to %s", index, peer.name)
        return index

    def _send_read(self, peer: _Peer) -> bool:
        """Give a reading worker its next block if it may take one; True if sent."""
        if not self._may_take(peer):
            return False
        block = self._blocks[self._assign(peer)]
        peer.reading[block.index] = block.size
        try:
            self._send(peer, protocol.read_frames(block.index, block.size, block.places, block.rows))
        except _PeerLost as exc:
            self._lose(peer, str(exc))
            return False
        return True

    def _skip_block(self, peer: _Peer, index: int, path: str, reason: str) -> None:
        """A file of this block cannot be read: drop the block, note the file, go on."""
        log.error("cannot read %s: %s", path, reason)
        self.unreadable[path] = reason
        self.progress.file_unreadable()
        peer.open_blocks.discard(index)
        self._forget(index)

    # -- what workers say ---------------------------------------------------------

    def _handle(self, link: _Link, frames: list[zmq.Frame]) -> None:
        """Check and act on one message; a peer that breaks the protocol is dropped."""
        identity, body = frames[0].bytes, frames[1:]
        peer = self.peers.get((link.name, identity))
        try:
            msg = protocol.parse(body, protocol.FROM_WORKER)
            if msg.kind == protocol.HELLO:
                self._welcome(link, identity, msg, peer_user(body[0]), peer_address(body[0]))
            elif peer is None:
                log.debug("ignoring %s from a worker no longer counted", msg.kind)
            else:
                peer.last_heard = time.monotonic()
                self._on_message(peer, msg)
        except ProtocolError as exc:
            if peer is not None:
                self._misbehaved(peer, str(exc))
            else:
                log.warning("ignoring a bad message from an unknown peer on the %s link: %s", link.name, exc)

    def _on_message(self, peer: _Peer, msg: Message) -> None:
        kind = msg.kind
        if kind == protocol.CREDIT:
            if peer.reads or msg["bytes"] > peer.outstanding:
                raise ProtocolError(f"a CREDIT for {msg['bytes']} bytes, of {peer.outstanding} sent")
            peer.outstanding -= msg["bytes"]
            peer.credit += msg["bytes"]
            peer.last_progress = time.monotonic()
            self.progress.worker_bytes(peer.name, msg["bytes"])
        elif kind == protocol.PROGRESS:
            index = msg["block"]
            if not peer.reading:
                raise ProtocolError("a PROGRESS while it reads no block")
            if index not in peer.reading:
                raise ProtocolError(f"a PROGRESS for block {index}, which it is not reading")
            left = peer.reading[index]
            if msg["bytes"] > left or (msg["last"] and msg["bytes"] != left):
                raise ProtocolError(f"a PROGRESS of {msg['bytes']} bytes (last: {msg['last']}) with "
                                    f"{left} bytes of block {index} to read")
            peer.reading[index] = left - msg["bytes"]
            if msg["last"]:
                del peer.reading[index]
            peer.last_progress = time.monotonic()
            self.bytes_read_by_workers += msg["bytes"]
            self.progress.worker_bytes(peer.name, msg["bytes"])
        elif kind == protocol.STORED:
            self._on_stored(peer, msg)
        elif kind == protocol.FAILED:
            self._on_failed(peer, msg)
        elif kind in (protocol.UNREADABLE, protocol.CHANGED):
            if not peer.reads:
                raise ProtocolError(f"{protocol.named(kind)} from a worker that is streamed its blocks")
            index = self._held(peer, msg)
            if index not in peer.reading or msg["path"] not in {p[0] for p in self._blocks[index].sources()}:
                raise ProtocolError(f"{protocol.named(kind)} for {msg['path']!r}, not a file of a block it is reading")
            del peer.reading[index]
            if kind == protocol.CHANGED:
                raise FileChanged(msg["path"], msg["why"])
            self._skip_block(peer, index, msg["path"], msg["reason"])

    def _held(self, peer: _Peer, msg: Message) -> int:
        """The block a message is about, which must be one the peer holds."""
        index = msg["block"]
        if index not in peer.open_blocks:
            raise ProtocolError(f"{protocol.named(msg.kind)} for block {index}, which it does not hold")
        return index

    def _on_stored(self, peer: _Peer, msg: Message) -> None:
        index = self._held(peer, msg)
        block = self._blocks[index]
        if peer.reads:
            if index in peer.reading:
                raise ProtocolError(f"a STORED for block {index} before it said it read it")
            stored, digests = check_receipt(msg, block.size, self.replication,
                                            pieces=block.pieces, in_store=self._in_store)
        elif index not in peer.sent:
            raise ProtocolError(f"a STORED for block {index} before it was sent the whole block")
        else:
            sent_xxh3, digests = peer.sent.pop(index)
            stored, _ = check_receipt(msg, block.size, self.replication, sent_xxh3=sent_xxh3, in_store=self._in_store)
        peer.open_blocks.discard(index)
        peer.last_progress = time.monotonic()
        self._forget(index)
        self.progress.worker_stored(peer.name, block.size)
        self.on_stored(block, stored, digests)

    def _on_failed(self, peer: _Peer, msg: Message) -> None:
        index = self._held(peer, msg)
        if peer.local:
            raise StoreError(f"{peer.name}: {msg['error']}")
        self._failures[index] += 1
        if self._failures[index] >= BLOCK_FAILURES:
            raise StoreError(f"block {index} could not be stored by {BLOCK_FAILURES} workers; "
                             f"the last, {peer.name}, said: {msg['error']}")
        log.warning("%s could not store block %d (%s); another worker will try", peer.name, index, msg["error"])
        self.progress.worker_dropped(peer.name, left=False)
        if peer.stream is not None and peer.stream_block == index:
            peer.stream.close()
            peer.stream = None
        peer.open_blocks.discard(index)
        peer.sent.pop(index, None)
        peer.reading.pop(index, None)
        self._pending.appendleft(index)

    def _welcome(self, link: _Link, identity: bytes, msg: Message, user: str, address: str) -> None:
        name = f"worker {msg['pid']}@{msg['host']}" + ("" if link.name == "local" else
                                                       f" ({address or 'unknown address'}, key {user or 'none'})")
        known = self.peers.get((link.name, identity))
        if known is not None:
            self._lose(known, "it said hello again")
        if msg["version"] != protocol.PROTOCOL_VERSION:
            self._refuse(link, identity, name, f"protocol version {msg['version']}, expected "
                                               f"{protocol.PROTOCOL_VERSION}: use the same keep-ingest version")
            return
        if link.name == "remote" and user and self._strikes[user] >= STRIKES:
            self._refuse(link, identity, name, f"key {user} sent bad messages {STRIKES} times in this run")
            return
        now = time.monotonic()
        reads = link.name == "local" and self.settings.put.local_reads
        peer = _Peer(link, identity, msg["pid"], name, user, credit=self.window, last_heard=now,
                     reads=reads, lanes=msg.get("lanes", 1) if reads else 1)
        self.peers[peer.key] = peer
        self.progress.worker_joined(peer.name, None if peer.local else msg["host"])
        store = {} if peer.local else {"store": self.settings.store_spec()}
        self._send(peer, [protocol.encode(protocol.WELCOME, heartbeat_timeout=self.heartbeat_timeout,
                                          chunk_size=self.chunk_size, **store)], quiet=True)
        log.debug("%s connected; %s", name, f"it reads the files itself, {peer.lanes} block(s) at once"
                  if peer.reads else "blocks are streamed to it")

    def _refuse(self, link: _Link, identity: bytes, name: str, why: str) -> None:
        log.warning("refusing %s: %s", name, why)
        try:
            link.sock.send_multipart([identity, protocol.encode(protocol.STOP, error=why)], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def _misbehaved(self, peer: _Peer, why: str) -> None:
        """Drop a peer that broke the protocol; a local one's process is replaced."""
        self._lose(peer, f"it sent {why}")
        self._send(peer, [protocol.encode(protocol.STOP, error=f"you sent {why}")], quiet=True)
        if peer.local:
            proc = self.processes.get(peer.pid)
            if proc is not None:
                proc.terminate()
        elif peer.user:
            self._strikes[peer.user] += 1

    def _turn_away_latecomers(self, sock: zmq.Socket) -> None:
        """Answer workers whose HELLO arrived as the run ended, so they exit at once.

        Anything else is dropped, including the rest of a message whose receipt an
        interrupt (Ctrl-C, SIGTERM) cut short.
        """
        while sock.poll(0):
            frames = sock.recv_multipart()
            if len(frames) < 2:
                continue
            try:
                kind = protocol.parse(frames[1:], protocol.FROM_WORKER).kind
            except ProtocolError:
                continue
            if kind == protocol.HELLO:
                try:
                    sock.send_multipart([frames[0], protocol.encode(protocol.STOP)], zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass

    # -- liveness -----------------------------------------------------------------

    def _lose(self, peer: _Peer, why: str) -> None:
        """Forget a worker; its unfinished blocks go back to the queue for the others."""
        if self.peers.get(peer.key) is not peer:
            return
        del self.peers[peer.key]
        self.progress.worker_dropped(peer.name, left=True)
        if peer.stream is not None:
            peer.stream.close()
        for index in sorted(peer.open_blocks, reverse=True):
            self._pending.appendleft(index)
        log.warning("%s lost (%s); %d unfinished blocks go to other workers",
                    peer.name, why, len(peer.open_blocks))

    def _keep_alive(self) -> None:
        now = time.monotonic()
        for peer in list(self.peers.values()):
            if now - peer.last_heard > self.heartbeat_timeout:
                self._lose(peer, f"silent for {self.heartbeat_timeout:g} s")
            elif peer.open_blocks and now - peer.last_progress > self.block_timeout:
                self._lose(peer, f"no progress on its blocks for {self.block_timeout:g} s")
                self._send(peer, [protocol.encode(protocol.STOP, error="no progress on your blocks")], quiet=True)
            elif now - peer.last_sent > self.heartbeat_interval:
                try:
                    self._send(peer, [protocol.encode(protocol.HEARTBEAT)])
                except _PeerLost as exc:
                    self._lose(peer, str(exc))

    def _check_local_workers(self) -> None:
        for pid, proc in list(self.processes.items()):
            if proc.is_alive():
                continue
            del self.processes[pid]
            proc.join()
            for peer in [p for p in self.peers.values() if p.local and p.pid == pid]:
                self._lose(peer, f"process exited with code {proc.exitcode}")
            if self.restarts_left > 0:
                self.restarts_left -= 1
                self._start_local_worker()
                log.warning("worker process %d died (exit code %s); started a replacement",
                            pid, proc.exitcode)
            else:
                log.error("worker process %d died (exit code %s); no restarts left", pid, proc.exitcode)
