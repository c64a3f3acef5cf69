"""The block reader: bytes in plan order, and files that change under it."""

import os

import pytest
from trees import pack

from ingest.errors import SourceError
from ingest.reader import BlockReader, FileChanged, piece_sources
from ingest.walk import walk_sources


def read_all(files, plan, chunk_size):
    reader = BlockReader(chunk_size)
    return [b"".join(bytes(c) for c, _ in chunks(reader, b, files)) for b in plan.blocks]


def chunks(reader, block, files, **options):
    return reader.chunks(block.size, piece_sources(block.pieces), **options)


@pytest.fixture
def src(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    for i, size in enumerate([5, 0, 9000, 300, 17]):
        (d / f"f{i}").write_bytes(bytes([65 + i]) * size)
    return d


@pytest.mark.parametrize("chunk_size", [1, 7, 4096, 1 << 20])
def test_chunks_concatenate_to_the_block_bytes(src, chunk_size):
    files = walk_sources([str(src) + "/"]).files
    plan = pack(files, 8192)
    blocks = read_all(files, plan, chunk_size)
    assert sum(len(b) for b in blocks) == sum(f.size for f in files)
    for plan_block, data in zip(plan.blocks, blocks, strict=True):
        want = b"".join((src / p.file.name).read_bytes()[p.file_offset:p.file_offset + p.length]
                        for p in plan_block.pieces)
        assert data == want


@pytest.mark.parametrize("buffer_size", [1, 7, 4096, 1 << 20])
def test_chunks_read_into_a_reused_buffer_give_the_same_bytes(src, buffer_size):
    files = walk_sources([str(src) + "/"]).files
    plan = pack(files, 8192)
    reader = BlockReader(4096)
    buffer = bytearray(buffer_size)
    for block, want in zip(plan.blocks, read_all(files, plan, 4096), strict=True):
        got = b""
        for data, _ in chunks(reader, block, files, buffer=buffer):
            assert data.obj is buffer if isinstance(data, memoryview) else data is buffer
            got += bytes(data)
        assert got == want


def test_last_flag_only_on_the_final_chunk(src):
    files = walk_sources([str(src) + "/"]).files
    plan = pack(files, 8192)
    reader = BlockReader(1000)
    flags = [last for _, last in chunks(reader, plan.blocks[0], files)]
    assert flags[-1] is True and not any(flags[:-1])


@pytest.mark.parametrize("change", ["append", "truncate", "rewrite-same-size", "replace", "delete"])
def test_a_file_changed_after_the_walk_is_reported_with_its_path(src, change):
    files = walk_sources([str(src) + "/"]).files
    plan = pack(files)
    target = src / "f2"
    if change == "append":
        with open(target, "ab") as f:
            f.write(b"more")
    elif change == "truncate":
        os.truncate(target, 10)
    elif change == "rewrite-same-size":
        st = os.stat(target)
        target.write_bytes(b"Z" * 9000)
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime; ctime moves
    elif change == "replace":
        (src / "new").write_bytes(b"C" * 9000)
        os.replace(src / "new", target)
    elif change == "delete":
        target.unlink()
    error = FileChanged if change != "delete" else SourceError
    with pytest.raises(error, match=str(target)):
        read_all(files, plan, 4096)


def test_interleaved_streams_each_read_their_own_file(tmp_path):
    # two streams consumed alternately, as the coordinator does for two workers
    for name, byte in (("a", b"A"), ("b", b"B")):
        (tmp_path / name).write_bytes(byte * 50_000)
    files = walk_sources([str(tmp_path) + "/"]).files
    plan = pack(files, 50_000)
    reader = BlockReader(4096)
    streams = [chunks(reader, plan.blocks[0], files), chunks(reader, plan.blocks[1], files)]
    got = [bytearray(), bytearray()]
    done = [False, False]
    while not all(done):
        for i, stream in enumerate(streams):
            if not done[i]:
                data, done[i] = next(stream)
                got[i] += data
    assert got == [b"A" * 50_000, b"B" * 50_000]
