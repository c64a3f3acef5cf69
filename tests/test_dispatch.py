"""How blocks reach workers: local workers read the files themselves, others get
the bytes streamed; and a small tree's few blocks are spread over the workers."""

from __future__ import annotations

import json
import multiprocessing
import re
import time
import tracemalloc
from pathlib import Path

import msgpack
import pytest
import zmq
from trees import MiB, make_mixed_tree

from ingest import protocol
from ingest.config import Settings
from ingest.coordinator import Coordinator, _Link, _Peer
from ingest.walk import Fingerprint

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def src(tmp_path):
    return make_mixed_tree(tmp_path / "src", 3, 3 * MiB, 30, 5000)


def put(cli, base: Path, src: Path, *extra: str):
    manifest = base / "manifest"
    proc = cli("put", "--store", str(base / "store"), "--state-dir", str(base / "state"), "--json",
               "--manifest-out", str(manifest), "--block-size", str(MiB), "--workers", "2", "-vv",
               *extra, str(src))
    assert proc.returncode == 0, proc.stderr
    return {**json.loads(proc.stdout), "manifest": manifest.read_text()}, proc.stderr


def test_local_workers_read_the_files_themselves_unless_told_to_stream(cli, tmp_path, src):
    streamed_profile = tmp_path / "streamed.toml"
    streamed_profile.write_text("[put]\nlocal_reads = false\n")
    read, read_log = put(cli, tmp_path / "read", src)
    streamed, streamed_log = put(cli, tmp_path / "streamed", src, "--config", str(streamed_profile))

    assert read["manifest"] == streamed["manifest"] and read["pdh"] == streamed["pdh"]
    assert read_log.count("it reads the files itself") == 2 and "streamed to it" not in read_log
    assert streamed_log.count("blocks are streamed to it") == 2 and "reads the files" not in streamed_log
    total = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    for result in (read, streamed):
        assert result["bytes_read"] == result["bytes_uploaded"] == total
    # the same blocks, byte for byte, in both stores
    blocks = {p.relative_to(tmp_path / "read" / "store") for p in (tmp_path / "read" / "store").rglob("*")
              if p.is_file()}
    assert blocks and blocks == {p.relative_to(tmp_path / "streamed" / "store")
                                 for p in (tmp_path / "streamed" / "store").rglob("*") if p.is_file()}


def test_every_worker_gets_blocks(cli, tmp_path, src):
    _, log = put(cli, tmp_path / "run", src)
    takers = set(re.findall(r"block \d+ to (worker \d+@\S+)", log))
    assert len(takers) == 2, log


def _coordinator() -> Coordinator:
    return Coordinator(Settings())  # not entered: no socket, no processes


def _peer(coordinator: Coordinator, pid: int, open_blocks: set[int]) -> _Peer:
    peer = _Peer(_Link("local", None, "ipc://unused"), identity=str(pid).encode(), pid=pid, name=f"worker {pid}",
                 user="local", credit=0, last_heard=0.0, reads=True, open_blocks=set(open_blocks))
    coordinator.peers[peer.identity] = peer
    return peer


def test_a_second_block_goes_to_a_worker_only_when_it_is_ready_and_every_idle_worker_can_still_get_one():
    coordinator = _coordinator()
    # two local workers started; only the first has connected, and it holds block 0
    coordinator.processes = {101: multiprocessing.Process(), 102: multiprocessing.Process()}
    first = _peer(coordinator, 101, {0})
    coordinator._pending.extend([1])
    assert not coordinator._may_take(first)       # block 1 waits for worker 102
    coordinator._pending.extend([2])
    assert coordinator._may_take(first)           # two left: one for 102, one queued on 101
    second = _peer(coordinator, 102, set())
    coordinator._pending.clear()
    coordinator._pending.extend([1])
    assert not coordinator._may_take(first)       # 102 is connected and idle: it gets block 1
    assert coordinator._may_take(second)
    second.open_blocks.add(1)
    coordinator._pending.clear()
    coordinator._pending.extend([2, 3])
    assert coordinator._may_take(first)           # nobody is idle: the next, while block 0 commits
    first.reading = {2: 100}
    assert not coordinator._may_take(first)       # still reading block 2 (its only lane)
    first.open_blocks.add(2)
    first.reading = {}
    assert not coordinator._may_take(first)       # at blocks_per_worker (2)


def test_a_worker_with_lanes_reads_up_to_its_lanes_and_its_share_of_the_blocks_left():
    coordinator = _coordinator()
    coordinator.processes = {101: multiprocessing.Process(), 102: multiprocessing.Process()}
    first = _peer(coordinator, 101, set())
    first.lanes = 16
    coordinator._pending.extend(range(10))

    def take(peer):
        index = coordinator._assign(peer)
        peer.reading[index] = 100

    while coordinator._may_take(first):
        take(first)
    assert len(first.reading) == 5                # half of 10: worker 102 has not connected yet
    second = _peer(coordinator, 102, set())
    second.lanes = 16
    while coordinator._may_take(second):
        take(second)
    assert len(second.reading) == 5 and not coordinator._pending
    # many blocks: the lanes are the limit, then blocks_per_worker - 1 more waiting to commit
    coordinator._pending.extend(range(10, 100))
    while coordinator._may_take(first):
        take(first)
    assert len(first.reading) == 16
    first.reading.clear()                         # all 16 read: they commit, one more may be read
    assert coordinator._may_take(first)
    take(first)
    assert len(first.open_blocks) == 16 + 1 and not coordinator._may_take(first)


def test_a_read_lists_every_piece_even_with_a_path_that_is_not_utf8():
    big = Fingerprint(2**40, 2**62, 2**63 - 1, 7, 8)
    pieces = [("/data/", "a b:c", Fingerprint(5, 1, 2, 3, 4), 0, 5), ("/data/\udcff/", "x", big, 64, 2**33),
              ("/other/", "y", big, 0, 1), ("/other/", "z", big, 0, 1), ("/data/", "w", big, 0, 1)]
    rows = msgpack.packb([(name, *fp[:4], offset, length) for _, name, fp, offset, length in pieces])
    places = protocol.pack_places((root, fp.device) for root, _, fp, _, _ in pieces)
    header, *frames = protocol.read_frames(7, 8 + 2**33, places, rows)
    msg = protocol.parse([header, *frames], protocol.FROM_COORDINATOR)
    assert (msg.kind, msg["block"], msg["size"]) == (protocol.READ, 7, 8 + 2**33)
    assert list(protocol.read_pieces(*frames)) == [(root + name, tuple(fp), offset, length)
                                             for root, name, fp, offset, length in pieces]
    roots, runs = msgpack.unpackb(places, unicode_errors="surrogateescape")
    assert roots == ["/data/", "/data/\udcff/", "/other/"]        # a root shared by pieces is sent once
    assert runs == [[1, 0, 4], [1, 1, 8], [2, 2, 8], [1, 0, 8]]   # as are the root and device of a run of them


ROW = ["x", 1, 2, 3, 4, 0, 1]


@pytest.mark.parametrize("places, rows", [
    ([["/r/"], [[1, 1, 8]]], [ROW]),              # no such root
    ([["/r/"], [[2, 0, 8]]], [ROW]),              # runs for more pieces than rows
    ([["/r/"], [[1, 0, 8]]], [ROW, ROW]),         # rows no run covers
    ([["/r/"], [[1, 0, 8]]], [[7, *ROW[1:]]]),    # a name that is no text
    ([["/r/"], [[1, 0, 8]]], [ROW[:3]]),          # a short row
    ([["/r/"], [[-1, 0, 8], [2, 0, 8]]], [ROW]),  # a run of fewer than no pieces
    ([["/r/"], [[1, 0, 8]]], 7),                  # rows that are no array
    ("places", [ROW])])
def test_a_malformed_read_is_a_value_or_type_error_the_worker_reports(places, rows):
    with pytest.raises((ValueError, TypeError)):
        list(protocol.read_pieces(msgpack.packb(places), msgpack.packb(rows)))


@pytest.mark.parametrize("cut", ["short", "long"])
def test_a_rows_frame_cut_short_or_with_bytes_after_its_rows_is_a_value_error(cut):
    places, rows = msgpack.packb([["/r/"], [[2, 0, 8]]]), msgpack.packb([ROW, ROW])
    rows = rows[:-1] if cut == "short" else rows + msgpack.packb(ROW)
    with pytest.raises(ValueError, match="cut short" if cut == "short" else "after its rows"):
        list(protocol.read_pieces(places, rows))


def test_a_read_holds_its_packed_rows_not_an_object_per_piece():
    count = 65_536
    rows = msgpack.packb([(f"d/f{i:06}.txt", 1024, 2**60 + i, 2**60 + i, 10**6 + i, 0, 1024) for i in range(count)])
    places = protocol.pack_places([("/data/", 8)] * count)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        pieces = protocol.read_pieces(places, rows)
        held = tracemalloc.get_traced_memory()[0] - before
        first = next(pieces)
    finally:
        tracemalloc.stop()
    assert held < 2 * len(rows) + 65_536, (held, len(rows))   # one copy of the frame, and little else
    assert first == ("/data/d/f000000.txt", (1024, 2**60, 2**60, 10**6, 8), 0, 1024)
    assert sum(1 for _ in pieces) == count - 1


def test_leaving_drops_the_rest_of_a_message_an_interrupt_cut_short():
    settings = Settings()
    settings.put.workers = 0
    ctx = zmq.Context()
    cut, late = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    hello = protocol.encode(protocol.HELLO, pid=1, host="h", version=protocol.PROTOCOL_VERSION)
    try:
        with Coordinator(settings) as coordinator:
            for dealer in (cut, late):
                coordinator._security.local_credentials().secure(dealer)
                dealer.connect(coordinator._local.address)
            cut.send(hello)
            assert coordinator._local.sock.poll(5000)
            coordinator._local.sock.recv()  # its identity frame only, as when SIGTERM strikes mid-message
            late.send(hello)
            assert late.poll(0) == 0
            time.sleep(0.2)  # let the second HELLO arrive before the coordinator leaves
        # leaving did not trip over the leftover frame, and answered the latecomer
        assert late.poll(5000)
        assert protocol.parse([late.recv()], protocol.FROM_COORDINATOR).kind == protocol.STOP
    finally:
        cut.close(linger=0)
        late.close(linger=0)
        ctx.term()
