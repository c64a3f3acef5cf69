"""A real local worker process, driven by a scripted coordinator over a real ZeroMQ
socket: it says its lanes, reads several READ blocks at once, names each block in its
PROGRESS, and leaves no temporary block files when it has to quit mid-read."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import signal
import time

import msgpack
import pytest
import zmq
from trees import MiB, fill

from ingest import md5lanes, protocol
from ingest.keep.dirstore import TMP_PREFIX
from ingest.reader import PieceSource
from ingest.walk import Fingerprint
from workers.lanes import LANE_CHUNK_MIN

pytestmark = pytest.mark.timeout(60)
CHUNK = 16 * LANE_CHUNK_MIN          # lanes share it: at most 16 x 64 KiB
HEARTBEAT_S = 40.0


def _serve(address: str, store: str, parent: int) -> None:
    from workers import run_worker

    code = run_worker(address, None, store_spec={"type": "directory", "path": store, "fsync": False},
                      parent_pid=parent)
    os._exit(code)


class _Coordinator:
    """A ROUTER socket speaking the coordinator's side, and one forked local worker."""

    def __init__(self, tmp_path):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.address = f"ipc://{tmp_path}/link"
        self.sock.bind(self.address)
        self.store = tmp_path / "store"
        self.proc = multiprocessing.get_context("fork").Process(
            target=_serve, args=(self.address, str(self.store), os.getpid()), daemon=True)
        self.proc.start()
        self.identity, hello = self.receive()
        self.hello = hello
        # a long heartbeat timeout: a worker that exits sooner did so for what it was sent
        self.send(protocol.encode(protocol.WELCOME, heartbeat_timeout=HEARTBEAT_S, chunk_size=CHUNK))

    def receive(self, timeout_s: float = 20) -> tuple[bytes, protocol.Message]:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.sock.poll(100):
                identity, *frames = self.sock.recv_multipart()
                msg = protocol.parse(frames, protocol.FROM_WORKER)
                if msg.kind != protocol.HEARTBEAT:
                    return identity, msg
            assert time.monotonic() < deadline, "the worker said nothing"

    def send(self, *frames: bytes) -> None:
        self.sock.send_multipart([getattr(self, "identity", b""), *frames])

    def read(self, block: int, pieces: list[PieceSource]) -> None:
        rows = msgpack.packb([(p.path, *p.fingerprint[:4], p.offset, p.length) for p in pieces])
        places = protocol.pack_places(("", p.fingerprint[4]) for p in pieces)
        self.send(*protocol.read_frames(block, sum(p.length for p in pieces), places, rows))

    def close(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join()
        self.sock.close(linger=0)
        self.ctx.term()


@pytest.fixture
def coordinator(tmp_path):
    c = _Coordinator(tmp_path)
    yield c
    c.close()


def _file(tmp_path, name: str, size: int) -> PieceSource:
    path = tmp_path / "src" / name
    fill(path, size, name)
    return PieceSource(str(path), Fingerprint.of(os.stat(path)), 0, size)


def test_a_worker_reads_its_lanes_worth_of_blocks_at_once_and_names_them(coordinator, tmp_path):
    lanes = md5lanes.engine().lanes
    assert coordinator.hello.get("lanes", 1) == lanes and coordinator.hello["version"] == protocol.PROTOCOL_VERSION
    sources = {b: _file(tmp_path, f"f{b}", 3 * MiB + b) for b in range(lanes)}
    os.kill(coordinator.proc.pid, signal.SIGSTOP)   # all the READs wait for it at once, however loaded the machine
    try:
        for b, piece in sources.items():
            coordinator.read(b, [piece])
    finally:
        os.kill(coordinator.proc.pid, signal.SIGCONT)
    progress: dict[int, list[tuple[int, bool]]] = {b: [] for b in sources}
    said_before_any_ended, stored = set(), {}
    while len(stored) < len(sources):
        _, msg = coordinator.receive()
        if msg.kind == protocol.PROGRESS:
            progress[msg["block"]].append((msg["bytes"], msg["last"]))
            if not any(last for said in progress.values() for _, last in said):
                said_before_any_ended.add(msg["block"])
        else:
            assert msg.kind == protocol.STORED, msg
            stored[msg["block"]] = msg["locator"]
    for b, piece in sources.items():
        data = open(piece.path, "rb").read()
        assert stored[b] == f"{hashlib.md5(data).hexdigest()}+{len(data)}"
        assert sum(n for n, _ in progress[b]) == len(data) and progress[b][-1][1]
        assert all(n == CHUNK for n, _ in progress[b][:-1])   # said every chunk_size bytes, not every pass
    if lanes > 1:   # the blocks advanced together: each said how far it got before any ended
        assert said_before_any_ended == set(sources)
    assert not [p for p in coordinator.store.iterdir() if p.name.startswith(TMP_PREFIX)]


def test_a_worker_that_must_quit_mid_read_leaves_no_temporary_files(coordinator, tmp_path):
    lanes = md5lanes.engine().lanes
    sources = [_file(tmp_path, f"f{b}", 8 * MiB) for b in range(lanes)]
    for b, piece in enumerate(sources):
        coordinator.read(b, [piece])
    _, msg = coordinator.receive()
    assert msg.kind == protocol.PROGRESS                       # reading has begun
    assert any(p.name.startswith(TMP_PREFIX) for p in coordinator.store.iterdir())
    coordinator.send(msgpack.packb({"t": "evil"}))             # breaks the protocol: the worker quits
    coordinator.proc.join(HEARTBEAT_S / 2)
    assert coordinator.proc.exitcode == 1
    assert not [p for p in coordinator.store.iterdir() if p.name.startswith(TMP_PREFIX)]


def test_a_read_whose_later_row_is_malformed_is_given_up_when_reached(coordinator, tmp_path):
    # a READ's rows are decoded as they are read: the bad one is found mid-block,
    # after the first file's bytes went into the block, which is then thrown away
    good = _file(tmp_path, "good", 3 * MiB)
    rows = msgpack.packb([(good.path, *good.fingerprint[:4], 0, good.length), (7, 1, 2, 3, 4, 0, 1)])
    places = protocol.pack_places([("", good.fingerprint.device)] * 2)
    coordinator.send(*protocol.read_frames(0, good.length + 1, places, rows))
    _, msg = coordinator.receive()
    assert (msg.kind, msg["block"], msg["last"]) == (protocol.PROGRESS, 0, False)   # reading had begun
    coordinator.proc.join(HEARTBEAT_S / 2)
    assert coordinator.proc.exitcode == 1
    assert not [p for p in coordinator.store.iterdir() if p.name.startswith(TMP_PREFIX)]


def test_more_reads_than_lanes_break_the_protocol(coordinator, tmp_path):
    lanes = coordinator.hello.get("lanes", 1)
    sources = [_file(tmp_path, f"f{b}", 8 * MiB) for b in range(lanes + 1)]
    for b, piece in enumerate(sources):
        coordinator.read(b, [piece])
    coordinator.proc.join(HEARTBEAT_S / 2)
    assert coordinator.proc.exitcode == 1
    assert not [p for p in coordinator.store.iterdir() if p.name.startswith(TMP_PREFIX)]


def test_a_read_whose_places_and_rows_disagree_breaks_the_protocol(coordinator, tmp_path):
    piece = _file(tmp_path, "f", MiB)
    rows = msgpack.packb([(piece.path, *piece.fingerprint[:4], piece.offset, piece.length)] * 2)
    places = protocol.pack_places([("", piece.fingerprint[4])])      # one piece placed, two rows
    coordinator.send(*protocol.read_frames(0, 2 * MiB, places, rows))
    coordinator.proc.join(HEARTBEAT_S / 2)
    assert coordinator.proc.exitcode == 1
    assert not list(coordinator.store.iterdir()) or not [p for p in coordinator.store.iterdir()
                                                         if p.name.startswith(TMP_PREFIX)]
