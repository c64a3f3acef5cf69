"""A scripted worker for attack tests: a real DEALER socket speaking the worker
protocol by hand, so a test can make it lie, stall or send garbage.

``Rogue(endpoint, keys)`` connects (with CURVE credentials, or none), ``hello()``
joins the run, ``take_block()`` waits for the first chunk of a block it was given,
and ``expect_stop()`` waits for the coordinator to drop it. Everything is bounded in
time and the socket is closed by ``close()`` (or the context manager).
"""

from __future__ import annotations

import os
import time
from typing import Any

import msgpack
import zmq
from zmq.utils.monitor import recv_monitor_message

from ingest import protocol
from ingest.link import KeyPair, WorkerCredentials, load_key_pair, load_public_key


def credentials(secret_key_file: Any, coordinator_public_file: Any) -> WorkerCredentials:
    return WorkerCredentials(load_key_pair(str(secret_key_file)), load_public_key(str(coordinator_public_file)))


def stranger(coordinator_public_file: Any) -> WorkerCredentials:
    """Credentials of a key pair no coordinator was given."""
    return WorkerCredentials(KeyPair.new(), load_public_key(str(coordinator_public_file)))


class Rogue:
    def __init__(self, ctx: zmq.Context, endpoint: str, creds: WorkerCredentials | None):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if creds is not None:
            creds.secure(self.sock)
        self.monitor = self.sock.get_monitor_socket()
        self.events: list[int] = []
        self.received: list[list[bytes]] = []
        self.sock.connect(endpoint)

    def __enter__(self) -> Rogue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=0)

    def send(self, *frames: bytes) -> None:
        self.sock.send_multipart(list(frames))

    def send_msg(self, kind: str, *extra: bytes, **fields: Any) -> None:
        self.send(protocol.encode(kind, **fields), *extra)

    def hello(self) -> dict:
        """Join the run; the WELCOME's fields."""
        self.send_msg(protocol.HELLO, pid=os.getpid(), host="rogue", version=protocol.PROTOCOL_VERSION)
        kind, fields, _ = self.next_message(10)
        assert kind == protocol.WELCOME, (kind, fields)
        return fields

    def next_message(self, timeout: float) -> tuple[str, dict, list[bytes]]:
        """The next message (type, fields, extra frames); AssertionError if none comes in time."""
        assert self.sock.poll(int(timeout * 1000)), f"nothing from the coordinator within {timeout} s"
        frames = self.sock.recv_multipart()
        self.received.append(frames)
        fields = msgpack.unpackb(frames[0])
        return fields.pop("t"), fields, frames[1:]

    def take_block(self, timeout: float = 10) -> tuple[int, bytes]:
        """The block it was given and the bytes of its first chunk (heartbeats skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            kind, fields, extra = self.next_message(max(0.1, deadline - time.monotonic()))
            if kind == protocol.CHUNK:
                return fields["block"], extra[0]

    def take_whole_block(self, timeout: float = 10) -> tuple[int, bytes]:
        """Receive a block to its last chunk, crediting each chunk as a worker does."""
        deadline = time.monotonic() + timeout
        block, data = None, bytearray()
        while True:
            kind, fields, extra = self.next_message(max(0.1, deadline - time.monotonic()))
            if kind != protocol.CHUNK:
                continue
            assert block in (None, fields["block"]), "chunks of two blocks interleaved"
            block = fields["block"]
            data += extra[0]
            self.send_msg(protocol.CREDIT, bytes=len(extra[0]))
            if fields["last"]:
                return block, bytes(data)

    def expect_stop(self, timeout: float = 10, heartbeat: bool = False) -> str:
        """Wait to be dropped (sending heartbeats meanwhile if asked): the STOP's error text."""
        deadline = time.monotonic() + timeout
        while True:
            if heartbeat:
                self.send_msg(protocol.HEARTBEAT)
            try:
                kind, fields, _ = self.next_message(min(0.5, max(0.1, deadline - time.monotonic())))
            except AssertionError:
                if time.monotonic() >= deadline:
                    raise
                continue
            if kind == protocol.STOP:
                return fields.get("error", "")

    def wait_for_event(self, mask: int, timeout: float = 10) -> int:
        """The first socket event in ``mask`` (e.g. a failed handshake); AssertionError if none."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.monitor.poll(100):
                event = recv_monitor_message(self.monitor)["event"]
                self.events.append(event)
                if event & mask:
                    return event
        raise AssertionError(f"no event {mask} within {timeout} s (saw {self.events})")

    def heard_anything(self) -> bool:
        return bool(self.received) or bool(self.sock.poll(0))
