"""ZeroMQ dispatch: stream each block's chunks to one worker, collect locators.

The coordinator binds a ROUTER socket (a private ipc socket by default, or
``--listen`` for remote workers), starts local worker processes, and streams block
plans to whichever worker has room. Flow control is by credit: a worker holds at
most ``blocks_per_worker`` unfinished blocks and ``window_chunks`` chunks not yet
consumed, so memory is bounded whatever the tree size. Chunks are sent without
copies (``copy=False``); every chunk of a block goes to the same worker.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

import multiprocessing_logging
import zmq

from ingest import protocol
from ingest.config import Settings
from ingest.errors import IngestError, StoreError
from ingest.keep.store import StoredBlock
from ingest.plan import Plan
from ingest.reader import BlockReader

log = logging.getLogger(__name__)

POLL_MS = 200
STOP_GRACE_S = 10.0


@dataclass
class _Peer:
    """What the coordinator knows of one connected worker."""

    identity: bytes
    pid: int
    name: str
    credit: int
    open_blocks: set[int] = field(default_factory=set)
    stream: Iterator[tuple[bytearray, bool]] | None = None
    stream_block: int = -1


def _local_worker_main(address: str, parent_pid: int) -> None:
    """Body of a local worker process (forked): ignore Ctrl-C, the coordinator stops us."""
    from workers import run_worker

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os._exit(run_worker(address, parent_pid=parent_pid))


class Coordinator:
    """Runs one dispatch of a plan's blocks through local and/or remote workers."""

    def __init__(self, settings: Settings, plan: Plan, reader: BlockReader,
                 on_stored: Callable[[int, StoredBlock, list[int]], None]):
        """``on_stored(block index, stored block, xxh3 digests of its pieces)`` is called
        for each block as the store confirms it."""
        self.settings = settings
        self.plan = plan
        self.reader = reader
        self.on_stored = on_stored
        self.chunk_size = settings.put.chunk_size
        self.window = settings.put.window_chunks * settings.put.chunk_size
        self.max_blocks = settings.put.blocks_per_worker
        self.peers: dict[bytes, _Peer] = {}
        self._digests: dict[int, list[int]] = {}
        self.processes: list[multiprocessing.Process] = []
        self._tmpdir: str | None = None
        self._mp_logging = False

    # -- lifecycle -------------------------------------------------------

    def _address(self) -> str:
        if self.settings.put.listen:
            return self.settings.put.listen
        self._tmpdir = tempfile.mkdtemp(prefix="keep-ingest-")
        return f"ipc://{self._tmpdir}/coordinator.sock"

    def _start_local_workers(self, address: str, count: int) -> None:
        if multiprocessing.get_start_method(allow_none=True) != "fork":
            multiprocessing.set_start_method("fork", force=True)
        multiprocessing_logging.install_mp_handler()
        self._mp_logging = True
        for _ in range(count):
            proc = multiprocessing.Process(target=_local_worker_main, args=(address, os.getpid()),
                                           name="keep-ingest-worker", daemon=True)
            proc.start()
            self.processes.append(proc)
        log.debug("started %d local workers: %s", count, [p.pid for p in self.processes])

    def _stop_local_workers(self) -> None:
        """Wait for local workers to exit; those that never connected hold no work."""
        connected = {peer.pid for peer in self.peers.values()}
        for proc in self.processes:
            if proc.pid not in connected:
                proc.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in self.processes:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                log.warning("worker %d did not stop; killing it", proc.pid)
                proc.kill()
                proc.join()
        self.processes.clear()
        if self._mp_logging:
            multiprocessing_logging.uninstall_mp_handler()
            self._mp_logging = False

    def run(self, block_indexes: list[int]) -> None:
        """Store every listed block; return when all are stored, raise on failure."""
        if not block_indexes:
            return
        address = self._address()
        local = self.settings.local_worker_count
        # Fork before creating this process's ZeroMQ context: a context must not cross a fork.
        self._start_local_workers(address, local)
        ctx = zmq.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.LINGER, 1000)
        try:
            try:
                sock.bind(address)
            except zmq.ZMQError as exc:
                raise IngestError(f"cannot listen for workers on {address}: {exc}") from None
            if self.settings.put.listen:
                log.info("accepting workers on %s", address)
            self._dispatch(sock, deque(block_indexes))
        finally:
            self._turn_away_latecomers(sock)
            for peer in self.peers.values():
                try:
                    sock.send_multipart([peer.identity, protocol.encode(protocol.STOP)], zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
            for peer in self.peers.values():
                if peer.stream is not None:
                    peer.stream.close()  # closes the file that stream has open
            self._stop_local_workers()
            sock.close()
            ctx.term()
            if self._tmpdir:
                shutil.rmtree(self._tmpdir, ignore_errors=True)

    # -- the dispatch loop ----------------------------------------------------

    def _dispatch(self, sock: zmq.Socket, pending: deque[int]) -> None:
        remaining = len(pending)
        timeout_s = self.settings.put.worker_timeout
        last_worker_seen = time.monotonic()
        while remaining:
            sent = self._send_round(sock, pending)
            events = sock.poll(0 if sent else POLL_MS)
            while events:
                remaining -= self._handle(sock, sock.recv_multipart())
                events = sock.poll(0)
            self._check_local_workers()
            if self.peers:
                last_worker_seen = time.monotonic()
            elif time.monotonic() - last_worker_seen > timeout_s:
                raise IngestError(f"no worker connected within {timeout_s:g} s "
                                  f"(listening on {self.settings.put.listen or 'a local socket'})")

    def _send_round(self, sock: zmq.Socket, pending: deque[int]) -> bool:
        """Send at most one chunk to each worker that has credit; True if any was sent."""
        sent = False
        for peer in self.peers.values():
            if peer.credit < self.chunk_size:
                continue
            if peer.stream is None:
                if not pending or len(peer.open_blocks) >= self.max_blocks:
                    continue
                index = pending.popleft()
                peer.open_blocks.add(index)
                self._digests[index] = []
                peer.stream = self.reader.chunks(self.plan.block(index), self._digests[index])
                peer.stream_block = index
            try:
                data, last = next(peer.stream)
            except IngestError:
                sock.send_multipart([peer.identity, protocol.encode(protocol.ABORT, block=peer.stream_block)])
                raise
            header = protocol.encode(protocol.CHUNK, block=peer.stream_block, last=last)
            sock.send_multipart([peer.identity, header, data], copy=False)
            peer.credit -= len(data)
            if last:
                peer.stream = None
            sent = True
        return sent

    def _handle(self, sock: zmq.Socket, frames: list[bytes]) -> int:
        """Handle one worker message; return how many blocks it completed."""
        identity, msg = frames[0], protocol.decode(frames[1])
        kind = msg["t"]
        if kind == protocol.HELLO:
            self._welcome(sock, identity, msg)
            return 0
        peer = self.peers.get(identity)
        if peer is None:
            log.warning("ignoring %r from an unknown worker", kind)
            return 0
        if kind == protocol.CREDIT:
            peer.credit += msg["bytes"]
        elif kind == protocol.STORED:
            index = msg["block"]
            peer.open_blocks.discard(index)
            self.on_stored(index, StoredBlock(msg["locator"], msg["replicas"]), self._digests.pop(index))
            return 1
        elif kind == protocol.FAILED:
            raise StoreError(f"{peer.name}: {msg['error']}")
        return 0

    def _welcome(self, sock: zmq.Socket, identity: bytes, msg: dict) -> None:
        name = f"worker {msg.get('pid')}@{msg.get('host')}"
        if msg.get("version") != protocol.PROTOCOL_VERSION:
            log.warning("refusing %s: protocol version %s, expected %s",
                        name, msg.get("version"), protocol.PROTOCOL_VERSION)
            sock.send_multipart([identity, protocol.encode(protocol.STOP, error="protocol version mismatch")])
            return
        self.peers[identity] = _Peer(identity, msg.get("pid", -1), name, credit=self.window)
        sock.send_multipart([identity, protocol.encode(protocol.WELCOME, store=self.settings.store_spec())])
        log.debug("%s connected", name)

    def _turn_away_latecomers(self, sock: zmq.Socket) -> None:
        """Answer workers whose HELLO arrived as the run ended, so they exit at once."""
        while sock.poll(0):
            identity, header = sock.recv_multipart()[:2]
            if protocol.decode(header)["t"] == protocol.HELLO:
                sock.send_multipart([identity, protocol.encode(protocol.STOP)], zmq.NOBLOCK)

    def _check_local_workers(self) -> None:
        for proc in self.processes:
            if not proc.is_alive():
                raise IngestError(f"worker process {proc.pid} died unexpectedly "
                                  f"(exit code {proc.exitcode}); see the messages above")
