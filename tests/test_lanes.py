"""The worker's MD5 lanes: several blocks read at once, each chunk hashed with the
others', written to its own block; real files and a real directory store."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from trees import fill

from ingest import md5lanes
from ingest.keep.client import KeepClient
from ingest.keep.dirstore import TMP_PREFIX, DirectoryStore
from ingest.reader import BlockReader, FileChanged, PieceSource, Unreadable
from ingest.walk import Fingerprint
from workers.lanes import LANE_CHUNK_MIN, Lanes, lane_chunk, layout

CHUNK = 4096


def _pieces(*specs: tuple[Path, int, int]) -> list[PieceSource]:
    return [PieceSource(str(path), Fingerprint.of(os.stat(path)), offset, length) for path, offset, length in specs]


def _bytes(pieces: list[PieceSource]) -> bytes:
    out = b""
    for p in pieces:
        with open(p.path, "rb") as f:
            f.seek(p.offset)
            out += f.read(p.length)
    return out


@pytest.fixture
def files(tmp_path):
    for name, size in (("a", 50_000), ("b", 3 * CHUNK), ("c", 1), ("d", 10_000), ("e", 2 * CHUNK + 63)):
        fill(tmp_path / "src" / name, size, name)
    return tmp_path / "src"


def _blocks(files: Path) -> dict[int, list[PieceSource]]:
    """Blocks of different lengths: a range of a large file, whole files, several small
    files packed together."""
    return {
        0: _pieces((files / "a", 0, 30_000)),
        1: _pieces((files / "a", 30_000, 20_000)),
        2: _pieces((files / "b", 0, 3 * CHUNK)),
        3: _pieces((files / "c", 0, 1), (files / "d", 0, 10_000), (files / "e", 0, 2 * CHUNK + 63)),
    }


def _run(lanes: Lanes, blocks: dict[int, list[PieceSource]]):
    """Add every block as lanes free up, step until all are read; what came out."""
    todo = sorted(blocks)
    read, dropped, progress, passes = {}, {}, [], []
    while todo or len(lanes):
        while todo and len(lanes) < lanes.lanes:
            b = todo.pop(0)
            lanes.add(b, sum(p.length for p in blocks[b]), blocks[b])
        done = lanes.step()
        passes.append(sorted(b for b, _, _ in done.progress))
        progress += done.progress
        read.update({r.block: r for r in done.read})
        dropped.update({d.block: d.error for d in done.dropped})
    return read, dropped, progress, passes


@pytest.mark.parametrize("engine", md5lanes.available())
def test_blocks_read_together_are_each_hashed_written_and_reported_whole(tmp_path, files, engine):
    store = DirectoryStore(str(tmp_path / "store"), fsync=False)
    blocks = _blocks(files)
    lanes = Lanes(md5lanes.select(engine), 3, BlockReader(CHUNK), store, report_every=CHUNK)
    read, dropped, progress, passes = _run(lanes, blocks)
    assert not dropped and sorted(read) == sorted(blocks)
    assert passes[0] == [0, 1, 2]                 # every lane advances in each pass
    for b, pieces in blocks.items():
        data = _bytes(pieces)
        r = read[b]
        assert (r.md5_hex, r.size) == (hashlib.md5(data).hexdigest(), len(data))
        assert r.digests == BlockReader(CHUNK).digests(len(data), pieces)
        stored = r.writer.commit(r.md5_hex)
        assert store.get(stored.locator) == data
        said = [(n, last) for blk, n, last in progress if blk == b]
        assert sum(n for n, _ in said) == len(data) and [last for _, last in said] == [False] * (len(said) - 1) + [True]


def test_progress_is_said_every_report_every_bytes_not_every_chunk(tmp_path, files):
    store = DirectoryStore(str(tmp_path / "store"), fsync=False)
    blocks = {0: _pieces((files / "a", 0, 50_000))}
    lanes = Lanes(md5lanes.engine(), 4, BlockReader(CHUNK), store, report_every=5 * CHUNK)
    _, _, progress, _ = _run(lanes, blocks)
    assert [n for _, n, _ in progress] == [5 * CHUNK, 5 * CHUNK, 50_000 - 10 * CHUNK]


def test_a_block_that_cannot_be_read_or_changes_is_dropped_alone(tmp_path, files):
    store = DirectoryStore(str(tmp_path / "store"), fsync=False)
    blocks = _blocks(files)
    (files / "b").chmod(0)                      # block 2 cannot be opened (unless root: see below)
    if os.access(files / "b", os.R_OK):
        os.unlink(files / "b")                  # root reads anything: make it vanish instead
    lanes = Lanes(md5lanes.engine(), 4, BlockReader(CHUNK), store, report_every=CHUNK)
    for b in sorted(blocks):
        lanes.add(b, sum(p.length for p in blocks[b]), blocks[b])
    with open(files / "a", "r+b") as f:         # block 1's range of a changes under the reader
        f.seek(40_000)
        f.write(b"changed")
    read, dropped = {}, {}
    while len(lanes):
        done = lanes.step()
        read.update({r.block: r for r in done.read})
        dropped.update({d.block: d.error for d in done.dropped})
    assert isinstance(dropped[2], Unreadable) and dropped[2].path == str(files / "b")
    assert isinstance(dropped[0], FileChanged) and isinstance(dropped[1], FileChanged)
    assert sorted(read) == [3]
    read[3].writer.commit(read[3].md5_hex)
    assert not [p for p in (tmp_path / "store").iterdir() if p.name.startswith(TMP_PREFIX)]


def test_dropping_blocks_aborts_their_writers_and_frees_their_lanes(tmp_path, files):
    store = DirectoryStore(str(tmp_path / "store"), fsync=False)
    blocks = _blocks(files)
    lanes = Lanes(md5lanes.engine(), 2, BlockReader(CHUNK), store, report_every=CHUNK)
    lanes.add(0, 30_000, blocks[0])
    lanes.add(1, 20_000, blocks[1])
    with pytest.raises(ValueError, match="already reading 2 blocks"):
        lanes.add(2, 3 * CHUNK, blocks[2])
    lanes.step()
    assert lanes.drop(0) and not lanes.drop(0) and len(lanes) == 1
    lanes.add(2, 3 * CHUNK, blocks[2])
    lanes.drop_all()
    assert len(lanes) == 0
    assert not [p for p in (tmp_path / "store").iterdir() if p.name.startswith(TMP_PREFIX)]


def test_layout_gives_a_store_that_holds_whole_blocks_one_lane_and_shares_the_chunk_among_lanes(tmp_path):
    directory = DirectoryStore(str(tmp_path / "store"))
    keep = KeepClient(["http://127.0.0.1:9/"], token="t")
    try:
        for name in md5lanes.available():
            engine = md5lanes.select(name)
            chosen, lanes = layout(engine, directory)
            assert (chosen.name, lanes) == ((name, engine.lanes) if engine.lanes > 1 else ("hashlib", 1))
            chosen, lanes = layout(engine, keep)
            assert (chosen.name, lanes) == ("hashlib", 1)
    finally:
        keep.close()
    assert lane_chunk(4 << 20, 16) == 256 << 10     # 16 lanes x 256 KiB: the 4 MiB of one stream
    assert lane_chunk(4 << 20, 1) == 4 << 20
    assert lane_chunk(1 << 20, 16) == LANE_CHUNK_MIN
    assert lane_chunk(5_000_000, 8) % 64 == 0


def test_the_pipeline_gives_the_same_manifest_with_every_engine(cli, tmp_path):
    """Real runs, two workers each: the extension's kernels (AVX-512, AVX2, portable, as
    this CPU has them) and hashlib alone (as without the extension); blocks of 1 MiB,
    so each worker fills its lanes, with 64 KiB lane reads and a packed small-file block."""
    src = tmp_path / "src"
    for i in range(6):
        fill(src / f"big{i}", 3 * (1 << 20) + 1000 * i, f"big{i}")
    for i in range(40):
        fill(src / "small" / f"s{i}", 7 * i, f"s{i}")
    (src / "empty").touch()
    manifests = {}
    for name in md5lanes.available():
        base = tmp_path / name
        proc = cli("put", "-vv", "--store", str(base / "store"), "--state-dir", str(base / "state"),
                   "--block-size", str(1 << 20), "--chunk-size", str(1 << 20), "--workers", "2", str(src),
                   env={"KEEP_INGEST_MD5": name})
        assert proc.returncode == 0, proc.stderr
        lanes = md5lanes.select(name).lanes
        assert proc.stderr.count(f"it reads the files itself, {lanes} block(s) at once") == 2, proc.stderr
        manifests[name] = proc.stdout
    assert len(set(manifests.values())) == 1, manifests
    hashlib_run = manifests["hashlib"]
    for line in hashlib_run.split(" "):   # and every locator is the MD5 of a stored block's bytes
        if "+" in line and len(line.split("+")[0]) == 32:
            md5 = line.split("+")[0]
            data = (tmp_path / "hashlib" / "store" / md5[:3] / md5).read_bytes()
            assert hashlib.md5(data).hexdigest() == md5
