"""ZeroMQ dispatch: hand each block to one worker, collect locators.

The coordinator binds a ROUTER socket (a private abstract-namespace ipc socket by
default, so nothing is left on disk, or ``--listen`` for remote workers) and forks
its local worker processes before the walk, then hands blocks to whichever worker
has room; a worker holds at most ``blocks_per_worker`` unfinished blocks.

A local worker gets one READ per block, listing the block's pieces (path, range,
fingerprint), and reads the files itself, so the bytes never cross the socket and
the per-file reads of small files are spread over the workers. Other workers
(remote ones, or all when ``put.local_reads`` is off) get the bytes streamed: the
coordinator reads each block and sends its chunks without copies (``copy=False``),
all to the same worker, with credit-based flow control (at most ``window_chunks``
chunks not yet consumed), so memory is bounded whatever the tree size.

Liveness: both sides send a HEARTBEAT when they have had nothing else to say for a
while. A worker that goes silent, disconnects or (when local) exits loses its
unfinished blocks to the others, and a local one is replaced. A file that cannot be
read costs only its block: the others go on, and the caller decides what to do.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import secrets
import signal
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import zmq

from ingest import protocol, worker_logs
from ingest.config import Settings
from ingest.errors import IngestError, StoreError
from ingest.keep.store import StoredBlock
from ingest.plan import Plan
from ingest.progress import Tracker
from ingest.reader import BlockReader, Chunk, FileChanged, Unreadable, piece_sources
from ingest.walk import SourceFile

log = logging.getLogger(__name__)

POLL_MS = 200
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
STOP_GRACE_S = 10.0


@dataclass
class _Peer:
    """What the coordinator knows of one connected worker."""

    identity: bytes
    pid: int
    name: str
    credit: int
    last_heard: float
    reads: bool = False              # reads blocks itself (READ), else gets CHUNKs
    reading: int | None = None       # the READ block it has not finished reading
    last_sent: float = 0.0
    open_blocks: set[int] = field(default_factory=set)
    stream: Iterator[tuple[Chunk, bool]] | None = None
    stream_block: int = -1


class _PeerLost(Exception):
    """Sending to a worker failed: it is gone."""


def _local_worker_main(address: str, parent_pid: int, local_token: str | None) -> None:
    """Body of a local worker process (forked with SIGINT and SIGTERM blocked): ignore
    Ctrl-C, the coordinator stops us; die quietly on SIGTERM."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    from workers import run_worker

    code = run_worker(address, parent_pid=parent_pid, local_token=local_token)
    worker_logs.flush_in_worker()
    os._exit(code)


class Coordinator:
    """The workers of one attempt at a run, and the dispatch of its blocks to them.

    Opened (as a context manager) before the walk: the socket is bound and the local
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
        self.peers: dict[bytes, _Peer] = {}
        self.processes: dict[int, multiprocessing.Process] = {}
        self.restarts_left = 2 * settings.local_worker_count + 2
        self.unreadable: dict[str, str] = {}  # path -> why it could not be read
        self.bytes_read_by_workers = 0
        # Local workers say this token in their HELLO: they may be sent READs.
        self._local_token = secrets.token_hex(8) if settings.put.local_reads else None
        self._address = settings.put.listen or f"ipc://@keep-ingest-{os.getpid()}-{secrets.token_hex(6)}"
        self._ctx: zmq.Context | None = None
        self._sock: zmq.Socket | None = None
        self._digests: dict[int, list[int]] = {}
        self._pending: deque[int] = deque()
        self._remaining = 0

    # -- lifecycle -------------------------------------------------------

    def __enter__(self) -> Coordinator:
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._sock.setsockopt(zmq.LINGER, 1000)
        try:
            self._sock.bind(self._address)
        except zmq.ZMQError as exc:
            self._sock.close()
            self._ctx.term()
            raise IngestError(f"cannot listen for workers on {self._address}: {exc}") from None
        if self.settings.put.listen:
            log.info("accepting workers on %s", self._address)
        if multiprocessing.get_start_method(allow_none=True) != "fork":
            multiprocessing.set_start_method("fork", force=True)  # multiprocessing-logging needs it
        worker_logs.start_forwarding()
        for _ in range(self.settings.local_worker_count):
            self._start_local_worker()
        return self

    def __exit__(self, *exc_info: object) -> None:
        sock = self._sock
        self._turn_away_latecomers(sock)
        for peer in self.peers.values():
            self._send(sock, peer, [protocol.encode(protocol.STOP)], quiet=True)
            if peer.stream is not None:
                peer.stream.close()  # closes the file that stream has open
        self._stop_local_workers()
        worker_logs.stop_forwarding()
        sock.close()
        self._ctx.term()

    def _start_local_worker(self) -> None:
        proc = multiprocessing.get_context("fork").Process(
            target=_local_worker_main, args=(self._address, os.getpid(), self._local_token),
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
        connected = {peer.pid for peer in self.peers.values()}
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

    def run(self, plan: Plan, files: Sequence[SourceFile], reader: BlockReader, block_indexes: list[int],
            on_stored: Callable[[int, StoredBlock, list[int]], None], progress: Tracker) -> None:
        """Store the listed blocks of ``plan`` (over the walk's ``files``), except those
        whose files cannot be read (see ``unreadable``); raise on a store failure, a
        changing file or no workers.

        ``reader`` reads the blocks streamed to workers that do not read them
        themselves; ``on_stored(block index, stored block, xxh3 digests of its pieces)``
        is called for each block as the store confirms it; ``progress`` hears of every
        worker's bytes and is ticked on each turn of the loop.
        """
        self.plan, self.files, self.reader = plan, files, reader
        self.on_stored, self.progress = on_stored, progress
        self._pending = deque(block_indexes)
        self._remaining = len(block_indexes)
        if self._remaining:
            self._dispatch(self._sock)

    # -- the dispatch loop ----------------------------------------------------

    def _dispatch(self, sock: zmq.Socket) -> None:
        timeout_s = self.settings.put.worker_timeout
        last_worker_seen = time.monotonic()
        while self._remaining:
            sent = self._send_round(sock)
            events = sock.poll(0 if sent else POLL_MS)
            while events:
                self._handle(sock, sock.recv_multipart())
                events = sock.poll(0)
            self._keep_alive(sock)
            self._check_local_workers()
            self.progress.tick()
            if self.peers:
                last_worker_seen = time.monotonic()
            elif not self.processes and self.settings.local_worker_count:
                raise IngestError("every worker process died and none could be restarted; "
                                  "see the messages above")
            elif time.monotonic() - last_worker_seen > timeout_s:
                raise IngestError(f"no worker connected within {timeout_s:g} s "
                                  f"(listening on {self.settings.put.listen or 'a local socket'})")

    def _send(self, sock: zmq.Socket, peer: _Peer, frames: list, quiet: bool = False) -> None:
        try:
            sock.send_multipart([peer.identity, *frames], zmq.NOBLOCK, copy=False)
            peer.last_sent = time.monotonic()
        except zmq.ZMQError as exc:
            if not quiet:
                raise _PeerLost(f"cannot reach it ({exc})") from None

    def _send_round(self, sock: zmq.Socket) -> bool:
        """Send its next block to each reading worker that is ready for one, and at
        most one chunk to each streamed worker that has credit; True if anything was sent."""
        sent = False
        for peer in list(self.peers.values()):
            if peer.reads:
                sent = self._send_read(sock, peer) or sent
                continue
            if peer.credit < self.chunk_size:
                continue
            if peer.stream is None:
                if not self._may_take(peer):
                    continue
                index = self._assign(peer)
                self._digests[index] = []
                block = self.plan.block(index)
                peer.stream = self.reader.chunks(block.size, piece_sources(block, self.files), self._digests[index])
                peer.stream_block = index
            try:
                try:
                    data, last = next(peer.stream)
                except Unreadable as exc:
                    self._send(sock, peer, [protocol.encode(protocol.ABORT, block=peer.stream_block)], quiet=True)
                    peer.stream = None
                    self._skip_block(peer, peer.stream_block, exc.path, exc.reason)
                    continue
                except FileChanged:
                    self._send(sock, peer, [protocol.encode(protocol.ABORT, block=peer.stream_block)], quiet=True)
                    raise
                header = protocol.encode(protocol.CHUNK, block=peer.stream_block, last=last)
                self._send(sock, peer, [header, data])
            except _PeerLost as exc:
                self._lose(peer, str(exc))
                continue
            peer.credit -= len(data)
            if last:
                peer.stream = None
            sent = True
        return sent

    def _may_take(self, peer: _Peer) -> bool:
        """Whether a worker may take one more block now.

        A worker always may when it holds none; a further block (to read while the
        last one commits, or queued behind the one streaming to it) only once it has
        finished reading the last, and while enough are left for every worker that
        holds none, counting local workers not yet connected: so the few blocks of a
        small tree are spread over the workers instead of going to whichever connected
        first.
        """
        if not self._pending or len(peer.open_blocks) >= self.max_blocks or peer.reading is not None:
            return False
        if not peer.open_blocks:
            return True
        connected = {p.pid for p in self.peers.values()}
        waiting = sum(1 for pid in self.processes if pid not in connected)
        idle = sum(1 for p in self.peers.values() if not p.open_blocks)
        return len(self._pending) > waiting + idle

    def _assign(self, peer: _Peer) -> int:
        """Take the next pending block for this worker."""
        index = self._pending.popleft()
        peer.open_blocks.add(index)
        log.debug("block %d to %s", index, peer.name)
        return index

    def _send_read(self, sock: zmq.Socket, peer: _Peer) -> bool:
        """Give a reading worker its next block if it may take one; True if sent."""
        if not self._may_take(peer):
            return False
        block = self.plan.block(self._assign(peer))
        peer.reading = block.index
        try:
            self._send(sock, peer, protocol.read_frames(block.index, block.size,
                                                        piece_sources(block, self.files)))
        except _PeerLost as exc:
            self._lose(peer, str(exc))
            return False
        return True

    def _skip_block(self, peer: _Peer, index: int, path: str, reason: str) -> None:
        """A file of this block cannot be read: drop the block, note the file, go on."""
        log.error("cannot read %s: %s", path, reason)
        self.unreadable[path] = reason
        peer.open_blocks.discard(index)
        self._digests.pop(index, None)
        self._remaining -= 1

    def _handle(self, sock: zmq.Socket, frames: list[bytes]) -> None:
        """Handle one worker message."""
        identity, msg = frames[0], protocol.decode(frames[1])
        kind = msg["t"]
        if kind == protocol.HELLO:
            self._welcome(sock, identity, msg)
            return
        peer = self.peers.get(identity)
        if peer is None:
            log.debug("ignoring %r from a worker no longer counted", kind)
            return
        peer.last_heard = time.monotonic()
        if kind == protocol.CREDIT:
            peer.credit += msg["bytes"]
            self.progress.worker_bytes(peer.name, msg["bytes"])
        elif kind == protocol.PROGRESS:
            if msg["last"]:
                peer.reading = None
            self.bytes_read_by_workers += msg["bytes"]
            self.progress.worker_bytes(peer.name, msg["bytes"])
        elif kind == protocol.STORED:
            index = msg["block"]
            if index in peer.open_blocks:
                peer.open_blocks.discard(index)
                self._remaining -= 1
                digests = msg["digests"] if peer.reads else self._digests.pop(index)
                self.on_stored(index, StoredBlock(msg["locator"], msg["replicas"]), digests)
        elif kind == protocol.UNREADABLE:
            peer.reading = None
            self._skip_block(peer, msg["block"], msg["path"], msg["reason"])
        elif kind == protocol.CHANGED:
            raise FileChanged(msg["path"], msg["why"])
        elif kind == protocol.FAILED:
            raise StoreError(f"{peer.name}: {msg['error']}")

    def _welcome(self, sock: zmq.Socket, identity: bytes, msg: dict) -> None:
        name = f"worker {msg.get('pid')}@{msg.get('host')}"
        reads = self._local_token is not None and msg.get("local") == self._local_token
        peer = _Peer(identity, msg.get("pid", -1), name, credit=self.window, last_heard=time.monotonic(),
                     reads=reads)
        if msg.get("version") != protocol.PROTOCOL_VERSION:
            log.warning("refusing %s: protocol version %s, expected %s",
                        name, msg.get("version"), protocol.PROTOCOL_VERSION)
            self._send(sock, peer, [protocol.encode(protocol.STOP, error="protocol version mismatch")], quiet=True)
            return
        self.peers[identity] = peer
        self._send(sock, peer, [protocol.encode(protocol.WELCOME, store=self.settings.store_spec(),
                                                heartbeat_timeout=self.heartbeat_timeout,
                                                chunk_size=self.chunk_size)], quiet=True)
        log.debug("%s connected; %s", name,
                  "it reads the files itself" if reads else "blocks are streamed to it")

    def _turn_away_latecomers(self, sock: zmq.Socket) -> None:
        """Answer workers whose HELLO arrived as the run ended, so they exit at once.

        Anything else is dropped, including the rest of a message whose receipt an
        interrupt (Ctrl-C, SIGTERM) cut short.
        """
        while sock.poll(0):
            frames = sock.recv_multipart()
            if len(frames) < 2:
                continue
            identity, header = frames[:2]
            try:
                kind = protocol.decode(header)["t"]
            except ValueError:
                continue
            if kind == protocol.HELLO:
                try:
                    sock.send_multipart([identity, protocol.encode(protocol.STOP)], zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass

    # -- liveness -----------------------------------------------------------------

    def _lose(self, peer: _Peer, why: str) -> None:
        """Forget a worker; its unfinished blocks go back to the queue for the others."""
        self.peers.pop(peer.identity, None)
        if peer.stream is not None:
            peer.stream.close()
        for index in sorted(peer.open_blocks, reverse=True):
            self._digests.pop(index, None)
            self._pending.appendleft(index)
        log.warning("%s lost (%s); %d unfinished blocks go to other workers",
                    peer.name, why, len(peer.open_blocks))

    def _keep_alive(self, sock: zmq.Socket) -> None:
        now = time.monotonic()
        for peer in list(self.peers.values()):
            if now - peer.last_heard > self.heartbeat_timeout:
                self._lose(peer, f"silent for {self.heartbeat_timeout:g} s")
            elif now - peer.last_sent > self.heartbeat_interval:
                try:
                    self._send(sock, peer, [protocol.encode(protocol.HEARTBEAT)])
                except _PeerLost as exc:
                    self._lose(peer, str(exc))

    def _check_local_workers(self) -> None:
        for pid, proc in list(self.processes.items()):
            if proc.is_alive():
                continue
            del self.processes[pid]
            proc.join()
            for peer in [p for p in self.peers.values() if p.pid == pid]:
                self._lose(peer, f"process exited with code {proc.exitcode}")
            if self.restarts_left > 0:
                self.restarts_left -= 1
                self._start_local_worker()
                log.warning("worker process %d died (exit code %s); started a replacement",
                            pid, proc.exitcode)
            else:
                log.error("worker process %d died (exit code %s); no restarts left", pid, proc.exitcode)
