"""The block reader: bytes in plan order, and files that change under it."""

import os

import pytest
import xxhash
from trees import pack

from ingest.errors import SourceError
from ingest.reader import BlockReader, FileChanged, piece_sources
from ingest.walk import walk_sources

pytestmark = pytest.mark.usefixtures("small_file_loops")   # each test with the C loop and without


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


@pytest.mark.parametrize("chunk_size", [1, 7, 4096, 1 << 20])
def test_each_pieces_digest_is_the_xxh3_of_its_bytes_whatever_the_chunking(src, chunk_size):
    files = walk_sources([str(src) + "/"]).files
    plan = pack(files, 8192)
    reader = BlockReader(chunk_size)
    for block in plan.blocks:
        want = [xxhash.xxh3_64_intdigest((src / p.file.name).read_bytes()[p.file_offset:p.file_offset + p.length])
                for p in block.pieces]
        assert reader.digests(block.size, piece_sources(block.pieces)) == want


@pytest.fixture
def tree(tmp_path):
    """Small files in three directories, nested, so that one block spans them all."""
    for where in ("a", "a/b", "c"):
        (tmp_path / where).mkdir()
        for i in range(3):
            (tmp_path / where / f"f{i}").write_bytes(f"{where}/{i}".encode() * 10)
    return tmp_path


def test_a_block_over_several_directories_reads_each_file_from_its_own(tree):
    files = walk_sources([str(tree) + "/"]).files
    plan = pack(files)
    assert len(plan.blocks) == 1 and len({os.path.dirname(f.path) for f in files}) == 3
    data = read_all(files, plan, 7)[0]
    assert data == b"".join((tree / f.name).read_bytes() for f in files)


@pytest.mark.parametrize("change", ["directory renamed", "directory replaced by a file"])
def test_a_directory_gone_after_the_walk_is_reported_with_the_files_path(tree, change):
    files = walk_sources([str(tree) + "/"]).files
    plan = pack(files)
    os.rename(tree / "c", tree / "gone")
    if change == "directory replaced by a file":
        (tree / "c").write_bytes(b"not a directory")
    with pytest.raises(SourceError, match=str(tree / "c" / "f0")):
        read_all(files, plan, 4096)


def open_descriptors():
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_a_stream_closed_part_way_or_read_to_the_end_leaves_no_descriptor_open(tree):
    files = walk_sources([str(tree) + "/"]).files
    plan = pack(files)
    reader = BlockReader(16)
    before = open_descriptors()
    stream = chunks(reader, plan.blocks[0], files)
    for _ in range(5):
        next(stream)
    assert open_descriptors() > before      # a file and its directory are open
    stream.close()
    assert open_descriptors() == before
    for _ in chunks(reader, plan.blocks[0], files):
        pass
    assert open_descriptors() == before
