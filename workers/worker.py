"""The worker: get each block's bytes, hash and store them, reply with locators.

A block's bytes either arrive in CHUNK messages, or (a local worker sent READ) are
read here from the source files the READ lists, into one reused buffer. Either way
the main thread appends each chunk to the block's writer and updates the block's MD5
as the bytes arrive, with no second pass. When a block's last chunk arrives, the
commit (fsync and rename, or the HTTP PUT) runs in a committer thread so the next
block can already stream in; the committer reports back through an inproc socket,
and the main thread forwards the result to the coordinator.
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

import zmq

from ingest import protocol
from ingest.errors import IngestError
from ingest.gcpause import collector_paused
from ingest.keep.factory import open_store
from ingest.keep.store import BlockStore, BlockWriter
from ingest.reader import BlockReader, FileChanged, Unreadable

log = logging.getLogger("keep-ingest.worker")

POLL_MS = 500
_RESULTS_ADDR = "inproc://committer-results"


class _Committer(threading.Thread):
    """Commits finished blocks in order and reports each result on an inproc socket."""

    def __init__(self, ctx: zmq.Context):
        super().__init__(name="committer", daemon=True)
        self._ctx = ctx
        self.jobs: queue.Queue[tuple[int, BlockWriter, str, int, list[int] | None] | None] = queue.Queue()

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
                block, writer, md5_hex, size, digests = job
                try:
                    stored = writer.commit(md5_hex)
                    extra = {} if digests is None else {"digests": digests}
                    out.send(protocol.encode(protocol.STORED, block=block, locator=stored.locator,
                                             replicas=stored.replicas, size=size, **extra))
                except IngestError as exc:
                    out.send(protocol.encode(protocol.FAILED, block=block, error=str(exc)))
                except Exception as exc:  # report, never die silently with a block in hand
                    log.exception("unexpected error storing block %d", block)
                    out.send(protocol.encode(protocol.FAILED, block=block, error=repr(exc)))
        finally:
            out.close(linger=0)


class _Worker:
    def __init__(self, sock: zmq.Socket, store: BlockStore, committer: _Committer, chunk_size: int):
        self.sock = sock
        self.store = store
        self.committer = committer
        self.reader = BlockReader(chunk_size)    # for READ blocks
        self.read_buffer: bytearray | None = None  # allocated at the first READ
        self.last_sent = time.monotonic()
        self.block: int | None = None      # block being received
        self.writer: BlockWriter | None = None
        self.md5: Any = None
        self.size = 0
        self.failed_block: int | None = None  # ignore further chunks of this block

    def send(self, frame: bytes) -> None:
        self.sock.send(frame)
        self.last_sent = time.monotonic()

    def on_chunk(self, header: dict, data: zmq.Frame) -> None:
        block = header["block"]
        view = data.buffer
        self.send(protocol.encode(protocol.CREDIT, bytes=len(view)))
        if block == self.failed_block:
            return
        try:
            if block != self.block:
                self.drop_current()
                self.block, self.writer = block, self.store.open_block()
                self.md5, self.size = hashlib.md5(), 0
            self.md5.update(view)
            self.writer.write(view)
            self.size += len(view)
        except IngestError as exc:
            self.fail(block, str(exc))
            return
        if header["last"]:
            self.committer.jobs.put((block, self.writer, self.md5.hexdigest(), self.size, None))
            self.block = self.writer = self.md5 = None

    def on_read(self, header: dict, pieces_frame: zmq.Frame) -> None:
        """Read a block from the files it lists, hash it, queue its commit."""
        block = header["block"]
        if self.read_buffer is None:
            self.read_buffer = bytearray(self.reader.chunk_size)
        digests: list[int] = []
        md5, size = hashlib.md5(), 0
        try:
            writer = self.store.open_block()
        except IngestError as exc:
            self.send(protocol.encode(protocol.FAILED, block=block, error=str(exc)))
            return
        try:
            pieces = protocol.read_pieces(pieces_frame.buffer)
            chunks = self.reader.chunks(header["size"], pieces, digests, self.read_buffer)
            for data, last in chunks:
                md5.update(data)
                writer.write(data)
                size += len(data)
                self.send(protocol.encode(protocol.PROGRESS, bytes=len(data), last=last))
        except Unreadable as exc:
            writer.abort()
            self.send(protocol.encode(protocol.UNREADABLE, block=block, path=exc.path, reason=exc.reason))
        except FileChanged as exc:
            writer.abort()
            self.send(protocol.encode(protocol.CHANGED, block=block, path=exc.path, why=exc.why))
        except IngestError as exc:
            writer.abort()
            self.send(protocol.encode(protocol.FAILED, block=block, error=str(exc)))
        else:
            self.committer.jobs.put((block, writer, md5.hexdigest(), size, digests))

    def on_abort(self, header: dict) -> None:
        if header["block"] == self.block:
            log.debug("aborting block %d", self.block)
            self.drop_current()

    def drop_current(self) -> None:
        if self.writer is not None:
            self.writer.abort()
        self.block = self.writer = self.md5 = None

    def fail(self, block: int, error: str) -> None:
        self.drop_current()
        self.failed_block = block
        self.send(protocol.encode(protocol.FAILED, block=block, error=error))


def _parent_gone(parent_pid: int | None) -> bool:
    return parent_pid is not None and os.getppid() != parent_pid


def _await_welcome(sock: zmq.Socket, address: str, parent_pid: int | None,
                   wait_s: float) -> dict | None:
    """The coordinator's WELCOME, or None if it has no work left for us.

    A local worker waits as long as its coordinator lives (it may be walking a
    large tree); another gives up after ``wait_s`` seconds.
    """
    deadline = time.monotonic() + wait_s
    while not sock.poll(POLL_MS):
        if _parent_gone(parent_pid):
            return None
        if parent_pid is None and time.monotonic() >= deadline:
            raise IngestError(f"no coordinator answered at {address} within {wait_s:g} s")
    msg = protocol.decode(sock.recv_multipart()[0])
    if msg["t"] == protocol.STOP:
        if "error" in msg:
            raise IngestError(f"coordinator at {address} refused this worker: {msg['error']}")
        log.info("coordinator at %s has no work left", address)
        return None
    if msg["t"] != protocol.WELCOME:
        raise IngestError(f"unexpected first message {msg['t']!r} from {address}")
    return msg


def run_worker(address: str, parent_pid: int | None = None, wait_s: float = 30.0,
               local_token: str | None = None) -> int:
    """Serve one coordinator at ``address`` until it says STOP; return an exit code.

    A local worker passes its coordinator's pid, and exits by itself if that
    process goes away, and the token it inherited, by which the coordinator knows
    it can read the source files itself; ``wait_s`` bounds the wait for the
    coordinator's answer (for a worker that is not local).
    """
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 2000)
    results = ctx.socket(zmq.PAIR)
    results.bind(_RESULTS_ADDR)
    committer = _Committer(ctx)
    store = None
    try:
        sock.connect(address)
        local = {} if local_token is None else {"local": local_token}
        sock.send(protocol.encode(protocol.HELLO, pid=os.getpid(), host=socket.gethostname(),
                                  version=protocol.PROTOCOL_VERSION, **local))
        welcome = _await_welcome(sock, address, parent_pid, wait_s)
        if welcome is None:
            return 0
        store = open_store(welcome["store"])
        log.debug("worker %d serving %s, storing into %s", os.getpid(), address, store.describe())
        committer.start()
        worker = _Worker(sock, store, committer, welcome["chunk_size"])
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(results, zmq.POLLIN)
        silence_limit = float(welcome["heartbeat_timeout"])
        last_heard = time.monotonic()
        while True:
            events = dict(poller.poll(POLL_MS))
            if results in events:
                worker.send(results.recv())
            now = time.monotonic()
            if now - worker.last_sent > silence_limit / 5:
                worker.send(protocol.encode(protocol.HEARTBEAT))
            if sock in events:
                last_heard = now
                frames = sock.recv_multipart(copy=False)
                header = protocol.decode(frames[0].buffer)
                kind = header["t"]
                if kind == protocol.READ:
                    with collector_paused():  # one tuple per piece, none kept
                        worker.on_read(header, frames[1])
                elif kind == protocol.CHUNK:
                    worker.on_chunk(header, frames[1])
                elif kind == protocol.ABORT:
                    worker.on_abort(header)
                elif kind == protocol.STOP:
                    worker.drop_current()
                    log.debug("worker %d told to stop; exiting", os.getpid())
                    break
            if _parent_gone(parent_pid) or now - last_heard > silence_limit:
                log.error("coordinator at %s is gone; worker %d exiting", address, os.getpid())
                worker.drop_current()
                return 1
        return 0
    except IngestError as exc:
        log.error("%s", exc)
        return 1
    finally:
        # After STOP the queue is empty in a run that went well; otherwise the
        # coordinator has stopped listening, so queued blocks are dropped and closing
        # the store ends a commit that is waiting to retry.
        committer.cancel_pending()
        if store is not None:
            store.close()
        if committer.is_alive():
            committer.jobs.put(None)
            committer.join()
            while results.poll(0):
                sock.send(results.recv())
        results.close(linger=0)
        sock.close()
        ctx.term()
