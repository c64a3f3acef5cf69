"""The worker: get each block's bytes, hash and store them, reply with locators.

A block's bytes either arrive in CHUNK messages, or (a local worker sent READ) are
read here from the source files the READ lists: several blocks at once, the next
chunk of each hashed together in MD5 lanes (workers.lanes), between the messages.
Either way the main thread appends each chunk to the block's writer and updates the
block's MD5 as the bytes arrive, with no second pass. When a block's last chunk arrives, the
commit (fsync and rename, or the HTTP PUT) runs in a committer thread so the next
block can already stream in; the committer reports back through an inproc socket,
and the main thread forwards the result to the coordinator.

A local worker inherits the store's description and the link's keys from the
coordinator that forked it, and exits as soon as that process is gone. A remote one
is given its key pair and the coordinator's public key, gets the store's description
in WELCOME over the encrypted link, and is never sent a READ (it cannot see the
coordinator's files, and must not read its own host's on anyone's word).
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import socket
import threading
import time
from typing import Any

import xxhash
import zmq

from ingest import md5lanes, protocol
from ingest.errors import IngestError
from ingest.gcpause import collector_paused
from ingest.keep.factory import open_store
from ingest.keep.locator import BLOCK_SIZE_MAX
from ingest.keep.store import BlockStore, BlockWriter
from ingest.link import WorkerCredentials
from ingest.protocol import Message, ProtocolError
from ingest.reader import BlockReader, FileChanged, Unreadable
from workers.lanes import Lanes, lane_chunk, layout

log = logging.getLogger("keep-ingest.worker")

POLL_MS = 100
_RESULTS_ADDR = "inproc://committer-results"
_REMOTE_KINDS = protocol.FROM_COORDINATOR - {protocol.READ}
_REMOTE_FRAME_MAX = BLOCK_SIZE_MAX + protocol.HEADER_MAX  # a chunk is at most a block
_HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_SUCCEEDED)


class _Committer(threading.Thread):
    """Commits finished blocks in order and reports each result on an inproc socket."""

    def __init__(self, ctx: zmq.Context):
        super().__init__(name="committer", daemon=True)
        self._ctx = ctx
        self.jobs: queue.Queue[tuple[int, BlockWriter, str, int, dict[str, Any], list[bytes]] | None] = \
            queue.Queue()

    def cancel_pending(self) -> None:
        """Drop the blocks still waiting to be committed (nobody will hear of them)."""
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job[1].abort()

    def run(self) -> None:
        out = self._ctx.socket(zmq.PAIR)
        out.connect(_RESULTS_ADDR)
        try:
            while (job := self.jobs.get()) is not None:
                block, writer, md5_hex, size, extra, frames = job
                try:
                    stored = writer.commit(md5_hex)
                    out.send_multipart([protocol.encode(protocol.STORED, block=block, locator=stored.locator,
                                                        replicas=stored.replicas, size=size, **extra), *frames])
                except IngestError as exc:
                    out.send(protocol.encode(protocol.FAILED, block=block, error=str(exc)))
                except Exception as exc:  # report, never die silently with a block in hand
                    log.exception("unexpected error storing block %d", block)
                    out.send(protocol.encode(protocol.FAILED, block=block, error=repr(exc)))
        finally:
            out.close(linger=0)


class _Worker:
    def __init__(self, sock: zmq.Socket, store: BlockStore, committer: _Committer, lanes: Lanes):
        self.sock = sock
        self.store = store
        self.committer = committer
        self.lanes = lanes                 # the READ blocks being read
        self.last_sent = time.monotonic()
        self.block: int | None = None      # block being received
        self.writer: BlockWriter | None = None
        self.md5: Any = None
        self.xxh3: Any = None
        self.size = 0
        self.failed_block: int | None = None  # ignore further chunks of this block

    def send(self, *frames: bytes) -> None:
        self.sock.send_multipart(frames)
        self.last_sent = time.monotonic()

    def on_chunk(self, msg: Message) -> None:
        block = msg["block"]
        view = msg.frames[0].buffer
        self.send(protocol.encode(protocol.CREDIT, bytes=len(view)))
        if block == self.failed_block:
            return
        try:
            if block != self.block:
                self.drop_current()
                self.block, self.writer = block, self.store.open_block()
                self.md5, self.xxh3, self.size = hashlib.md5(), xxhash.xxh3_64(), 0
            self.md5.update(view)
            self.xxh3.update(view)
            self.writer.write(view)
            self.size += len(view)
        except IngestError as exc:
            self.fail(block, str(exc))
            return
        if msg["last"]:
            self.committer.jobs.put((block, self.writer, self.md5.hexdigest(), self.size,
                                     {"xxh3": self.xxh3.intdigest()}, []))
            self.block = self.writer = self.md5 = self.xxh3 = None

    def on_read(self, msg: Message) -> None:
        """Start reading a block from the files it lists, in a lane of its own."""
        if len(self.lanes) >= self.lanes.lanes:
            raise ProtocolError(f"a READ for block {msg['block']} while it reads {self.lanes.lanes} blocks")
        try:
            pieces = protocol.read_pieces(*msg.frames)   # decoded as they are read
        except (TypeError, ValueError) as exc:
            raise ProtocolError(f"a READ whose pieces are malformed ({exc})") from None
        try:
            self.lanes.add(msg["block"], msg["size"], pieces)
        except IngestError as exc:
            self.send(protocol.encode(protocol.FAILED, block=msg["block"], error=str(exc)))

    def read_lanes(self) -> None:
        """Read, hash and write the next chunk of every block being read; say how far
        they got, queue the commits of those read whole, report those dropped."""
        try:
            with collector_paused():  # a tuple per piece read, none kept
                done = self.lanes.step()
        except (TypeError, ValueError) as exc:  # pieces that are not [path, fingerprint, offset, length]
            self.lanes.drop_all()
            raise ProtocolError(f"a READ whose pieces are malformed ({exc})") from None
        for block, nbytes, last in done.progress:
            self.send(protocol.encode(protocol.PROGRESS, block=block, bytes=nbytes, last=last))
        for r in done.read:
            self.committer.jobs.put((r.block, r.writer, r.md5_hex, r.size, {}, protocol.digest_frames(r.digests)))
        for dropped in done.dropped:
            exc = dropped.error
            if isinstance(exc, Unreadable):
                self.send(protocol.encode(protocol.UNREADABLE, block=dropped.block, path=exc.path, reason=exc.reason))
            elif isinstance(exc, FileChanged):
                self.send(protocol.encode(protocol.CHANGED, block=dropped.block, path=exc.path, why=exc.why))
            else:
                self.send(protocol.encode(protocol.FAILED, block=dropped.block, error=str(exc)))

    def on_abort(self, msg: Message) -> None:
        if msg["block"] == self.block:
            log.debug("aborting block %d", self.block)
            self.drop_current()

    def drop_current(self) -> None:
        if self.writer is not None:
            self.writer.abort()
        self.block = self.writer = self.md5 = self.xxh3 = None

    def drop_all(self) -> None:
        """Give up the block being received and those being read."""
        self.drop_current()
        self.lanes.drop_all()

    def fail(self, block: int, error: str) -> None:
        self.drop_current()
        self.failed_block = block
        self.send(protocol.encode(protocol.FAILED, block=block, error=error))


def _parent_gone(parent_pid: int | None) -> bool:
    return parent_pid is not None and os.getppid() != parent_pid


class _Handshakes:
    """What the monitor of a remote worker's socket says about its secure handshakes.

    A refused key (ZAP's answer) or a coordinator without CURVE fail the handshake
    every time, and say so; a failure without detail is also what a coordinator
    closing mid-handshake gives, so only ``NO_DETAIL_LIMIT`` of them in a row (the
    socket reconnects every 0.1 s) mean the coordinator's key is not the one given.
    """

    NO_DETAIL_LIMIT = 3

    def __init__(self, monitor: zmq.Socket | None):
        self.monitor = monitor
        self.no_detail = 0

    def failure(self) -> int | None:
        """The handshake failure that settles it, if one has happened by now."""
        from zmq.utils.monitor import recv_monitor_message

        while self.monitor is not None and self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)["event"]
            if event in (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
                return event
            if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                self.no_detail += 1
                if self.no_detail >= self.NO_DETAIL_LIMIT:
                    return event
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.no_detail = 0
        return None


def _await_welcome(sock: zmq.Socket, address: str, kinds: frozenset[str], parent_pid: int | None,
                   wait_s: float, handshakes: _Handshakes) -> Message | None:
    """The coordinator's WELCOME, or None if it has no work left for us.

    A local worker waits as long as its coordinator lives (it may be walking a
    large tree); another gives up after ``wait_s`` seconds, or at once when the
    coordinator refuses its key (or is not the one whose key it was given).
    """
    deadline = time.monotonic() + wait_s
    while not sock.poll(POLL_MS):
        if _parent_gone(parent_pid):
            return None
        failed = handshakes.failure()
        if failed == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            raise IngestError(f"the coordinator at {address} refused this worker's key: add its public key "
                              "(.key) to the coordinator's worker keys (put --worker-keys)")
        if failed is not None:
            raise IngestError(f"the secure handshake with {address} failed: is the coordinator's public key "
                              "(--coordinator-key) the one of the run listening there, and is that a keep-ingest "
                              "coordinator with CURVE on?")
        if parent_pid is None and time.monotonic() >= deadline:
            raise IngestError(f"no coordinator answered at {address} within {wait_s:g} s")
    msg = protocol.parse(sock.recv_multipart(copy=False), kinds)
    if msg.kind == protocol.STOP:
        if "error" in msg.fields:
            raise IngestError(f"coordinator at {address} refused this worker: {msg['error']}")
        log.info("coordinator at %s has no work left", address)
        return None
    if msg.kind != protocol.WELCOME:
        raise ProtocolError(f"a first message of type {msg.kind!r}, not a welcome")
    return msg


def run_worker(address: str, credentials: WorkerCredentials | None, *, store_spec: dict[str, Any] | None = None,
               parent_pid: int | None = None, wait_s: float = 30.0) -> int:
    """Serve one coordinator at ``address`` until it says STOP; return an exit code.

    ``credentials`` secure the link (None only for the insecure plaintext mode). A
    local worker passes its coordinator's pid, and exits by itself if that process
    goes away, and the store's spec it inherited; a remote one gets the spec in
    WELCOME, and ``wait_s`` bounds its wait for the coordinator's answer.
    """
    local = parent_pid is not None
    kinds = protocol.FROM_COORDINATOR if local else _REMOTE_KINDS
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 2000)
    if not local:
        sock.setsockopt(zmq.MAXMSGSIZE, _REMOTE_FRAME_MAX)
    if credentials is not None:
        credentials.secure(sock)
    monitor = None if local else sock.get_monitor_socket(_HANDSHAKE_EVENTS)
    results = ctx.socket(zmq.PAIR)
    results.bind(_RESULTS_ADDR)
    committer = _Committer(ctx)
    store = None
    worker = None
    coordinator_gone = False
    try:
        sock.connect(address)
        engine, lanes = md5lanes.engine(), 1
        hello = {}
        if local:  # only a local worker is sent READs: it says how many it reads at once
            store = _open_store(store_spec, address)
            engine, lanes = layout(engine, store)
            hello["lanes"] = lanes
        sock.send(protocol.encode(protocol.HELLO, pid=os.getpid(), host=socket.gethostname(),
                                  version=protocol.PROTOCOL_VERSION, **hello))
        welcome = _await_welcome(sock, address, kinds, parent_pid, wait_s, _Handshakes(monitor))
        if welcome is None:
            coordinator_gone = _parent_gone(parent_pid)
            return 0
        if store is None:
            if welcome.get("store") is None:
                raise ProtocolError("a WELCOME without the store")
            store = _open_store(welcome["store"], address)
        log.debug("worker %d serving %s, storing into %s", os.getpid(), address, store.describe())
        committer.start()
        chunk_size = welcome["chunk_size"]
        reader = BlockReader(lane_chunk(chunk_size, lanes))
        worker = _Worker(sock, store, committer, Lanes(engine, lanes, reader, store, report_every=chunk_size))
        if local:
            log.debug("worker %d reads %d blocks at once, %d bytes of each per pass; MD5: %s", os.getpid(),
                      lanes, reader.chunk_size, engine.describe())
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(results, zmq.POLLIN)
        silence_limit = float(welcome["heartbeat_timeout"])
        last_heard = time.monotonic()
        while True:
            events = dict(poller.poll(0 if len(worker.lanes) else POLL_MS))
            if results in events:
                worker.send(*results.recv_multipart())
            now = time.monotonic()
            if now - worker.last_sent > silence_limit / 5:
                worker.send(protocol.encode(protocol.HEARTBEAT))
            if sock in events:
                last_heard = now
                msg = protocol.parse(sock.recv_multipart(copy=False), kinds)
                if msg.kind == protocol.READ:
                    worker.on_read(msg)
                elif msg.kind == protocol.CHUNK:
                    worker.on_chunk(msg)
                elif msg.kind == protocol.ABORT:
                    worker.on_abort(msg)
                elif msg.kind == protocol.STOP:
                    if "error" in msg.fields:
                        log.error("coordinator at %s dropped worker %d: %s", address, os.getpid(), msg["error"])
                        return 1
                    log.debug("worker %d told to stop; exiting", os.getpid())
                    break
            if _parent_gone(parent_pid) or now - last_heard > silence_limit:
                coordinator_gone = True
                log.error("coordinator at %s is gone; worker %d exiting", address, os.getpid())
                return 1
            if len(worker.lanes):
                worker.read_lanes()
        return 0
    except ProtocolError as exc:
        log.error("coordinator at %s sent %s; worker %d exiting", address, exc, os.getpid())
        return 1
    except IngestError as exc:
        log.error("%s", exc)
        return 1
    finally:
        # Blocks still being read or received are dropped, whatever ended the loop.
        # After STOP the queue is empty in a run that went well; otherwise the
        # coordinator has stopped listening, so queued blocks are dropped and closing
        # the store ends a commit that is waiting to retry.
        if worker is not None:
            worker.drop_all()
        committer.cancel_pending()
        if store is not None:
            store.close()
        if committer.is_alive():
            committer.jobs.put(None)
            committer.join()
            while results.poll(0):
                sock.send_multipart(results.recv_multipart())
        if monitor is not None:
            sock.disable_monitor()
            monitor.close(linger=0)
        results.close(linger=0)
        sock.close(linger=0 if coordinator_gone else None)
        ctx.term()


def _open_store(spec: Any, address: str) -> BlockStore:
    """The store a spec describes; IngestError naming the coordinator if it is not one."""
    if not isinstance(spec, dict):
        raise ProtocolError("a store description that is not a map")
    try:
        return open_store(spec)
    except (ValueError, TypeError, KeyError) as exc:
        raise IngestError(f"coordinator at {address} described a store this worker cannot open: {exc}") from None
