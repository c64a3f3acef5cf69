"""The C extension's loops over small files: what they take, and what they hand back.

Both loops are accelerators of a Python loop that stays the authority: anything out of
the ordinary is handed back to it untouched. The readers' and walks' own tests run with
and without the extension; these check the hand-over itself.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
from array import array

import pytest
import xxhash
from conftest import cli_env
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest import reader as reader_module
from ingest.reader import BlockReader, _Directory

try:
    from ingest import _smallfiles
except ImportError:
    _smallfiles = None

built = pytest.mark.skipif(_smallfiles is None, reason="the ingest._smallfiles extension is not built")


@pytest.mark.skipif(not (sysconfig.get_config_var("CC") and shutil.which(sysconfig.get_config_var("CC").split()[0])),
                    reason="no C compiler: the extension is optional")
def test_the_extension_is_built_where_a_compiler_is():
    """The build is optional, so a compile error would pass unnoticed: with a compiler
    here, the extension must have been built (make test installs it)."""
    assert _smallfiles is not None


def test_a_put_without_the_extension_warns_in_verbose_and_writes_the_same_manifest(tmp_path):
    src = tmp_path / "src"
    for d in range(3):
        (src / f"d{d}").mkdir(parents=True)
        for i in range(300):
            (src / f"d{d}" / f"f{i}").write_bytes(b"%d-%d " % (d, i) * (i % 50))
    (src / "d1" / "big").write_bytes(os.urandom(3 << 20))
    (src / "link").symlink_to("d0/f7")
    manifests = []
    for without in ("", "import sys; sys.modules['ingest._smallfiles'] = None\n"):
        store = tmp_path / f"store{len(manifests)}"
        code = without + f"from ingest.cli import main; sys.exit(main(['put', '-v', '--store', {str(store)!r}, " \
                         f"'--chunk-size', '65536', {str(src)!r}]))"
        out = subprocess.run([sys.executable, "-c", "import sys\n" + code], capture_output=True, text=True,
                             env=cli_env(tmp_path), timeout=60)
        assert out.returncode == 0, out.stderr
        assert ("the ingest._smallfiles extension is not built" in out.stderr) == bool(without)
        manifests.append(out.stdout)
    assert manifests[0] == manifests[1] and manifests[0].count("\n") == 4

FLAGS = os.O_RDONLY | os.O_CLOEXEC


def open_descriptors():
    return len(os.listdir("/proc/self/fd"))


def fingerprint(path):
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev


def piece(path, offset=0, length=None):
    fp = fingerprint(path)
    return str(path), fp, offset, fp[0] - offset if length is None else length


@pytest.fixture
def files(tmp_path):
    """Three small files in a directory, and one in a subdirectory."""
    (tmp_path / "sub").mkdir()
    paths = [tmp_path / "a", tmp_path / "b", tmp_path / "c", tmp_path / "sub" / "d"]
    for i, path in enumerate(paths):
        path.write_bytes(bytes([65 + i]) * (10 + i))
    return paths


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """Files of 0 to 300 bytes in two directories, for the property below."""
    root = tmp_path_factory.mktemp("many")
    paths = []
    for i in range(40):
        path = root / f"d{i % 2}" / f"f{i:02d}"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(os.urandom(i * 37 % 301))
        paths.append(path)
    return paths


def _read(pieces, size, chunk_size, reused):
    reader, digests = BlockReader(chunk_size), []
    buffer = bytearray(chunk_size) if reused else None
    chunks = [(bytes(data), last) for data, last in reader.chunks(size, iter(pieces), digests, buffer)]
    return chunks, digests, reader.bytes_read


@built
@settings(max_examples=120, deadline=None)
@given(picks=st.lists(st.tuples(st.integers(0, 39), st.integers(0, 300), st.integers(0, 300)), min_size=1,
                      max_size=30),
       chunk_size=st.integers(1, 2000), reused=st.booleans())
def test_the_c_loop_gives_the_python_loops_chunks_and_digests(many, picks, chunk_size, reused):
    pieces = []
    for index, start, length in picks:     # any ranges of any files, in any order, repeats too
        path = many[index]
        size = path.stat().st_size
        offset = min(start, size)
        pieces.append(piece(path, offset, min(length, size - offset)))
    size = sum(p[3] for p in pieces)
    with_c = _read(pieces, size, chunk_size, reused)
    saved, reader_module._smallfiles = reader_module._smallfiles, None
    try:
        without = _read(pieces, size, chunk_size, reused)
    finally:
        reader_module._smallfiles = saved
    assert with_c == without
    assert b"".join(data for data, _ in with_c[0]) == b"".join(
        many[i].read_bytes()[p[2]:p[2] + p[3]] for (i, _, _), p in zip(picks, pieces, strict=True))


def read_run(pieces, buffer, filled=0, limit=None, directory=None, digests=None):
    directory = directory or _Directory()
    limit = len(buffer) if limit is None else limit
    return _smallfiles.read_run(pieces, buffer, filled, limit, directory, FLAGS, digests,
                                xxhash.xxh3_64_intdigest)


@built
def test_pieces_that_fit_are_read_hashed_and_their_directory_kept_open(files):
    buffer, digests, directory = bytearray(100), [], _Directory()
    pieces = iter([piece(p) for p in files])
    filled, pending = read_run(pieces, buffer, 3, directory=directory, digests=digests)
    want = b"".join(p.read_bytes() for p in files)
    assert (filled, pending) == (3 + len(want), None)
    assert bytes(buffer[3:filled]) == want
    assert digests == [xxhash.xxh3_64_intdigest(p.read_bytes()) for p in files]
    assert directory.path == str(files[3].parent)
    assert os.path.samestat(os.fstat(directory.fd), os.stat(files[3].parent))
    directory.close()


@built
def test_a_piece_past_the_limit_is_handed_back_and_the_rest_left_in_the_iterator(files):
    buffer = bytearray(100)
    pieces = iter([piece(files[0]), piece(files[1], 2), piece(files[2])])
    filled, pending = read_run(pieces, buffer, limit=15)
    assert filled == 10 and buffer[:10] == files[0].read_bytes()
    assert pending == piece(files[1], 2)              # 9 bytes: one too many
    assert next(pieces) == piece(files[2])


@built
@pytest.mark.parametrize("change", ["size", "mtime", "inode", "device", "vanished", "shorter"])
def test_a_file_that_is_not_as_walked_is_handed_back_with_nothing_counted(files, change):
    path, (size, mtime, ctime, inode, device), offset, length = piece(files[1])
    fp = {"size": (size + 1, mtime, ctime, inode, device), "mtime": (size, mtime + 1, ctime, inode, device),
          "inode": (size, mtime, ctime, inode + 1, device), "device": (size, mtime, ctime, inode, device + 1)}
    bad = (path, fp.get(change, (size, mtime, ctime, inode, device)), offset, length + (change == "shorter"))
    if change == "vanished":
        files[1].unlink()
    digests = []
    filled, pending = read_run(iter([piece(files[0]), bad, piece(files[2])]), bytearray(100), digests=digests)
    assert (filled, pending) == (10, bad) and len(digests) == 1


@built
@pytest.mark.parametrize("bad", [
    ["x", (1, 2, 3, 4, 5), 0, 1],                # a list, not a tuple
    ("x", (1, 2, 3, 4), 0, 1),                   # four fingerprint fields
    ("x", (1, 2, 3, 4, 5), 0),                   # three fields
    (b"x", (1, 2, 3, 4, 5), 0, 1),               # a bytes path
    ("x", (1, 2, 3, 4, 5), "0", 1),              # a str offset
    ("x", (1, 2, 3, 4, 5), -1, 1),               # a negative offset
    ("x", (1, 2, 3, 4, 5), 0, -1),               # a negative length
    ("x", (1, 2, 3, -4, 5), 0, 1),               # a negative inode
    ("x", (1, 1 << 70, 3, 4, 5), 0, 1),          # a time that does not fit 64 bits
    ("x\0y", (1, 2, 3, 4, 5), 0, 1),             # a NUL in the path
    ("x\udcff", (1, 2, 3, 4, 5), 0, 1),          # a surrogate (a byte that is not UTF-8)
    ("", (1, 2, 3, 4, 5), 0, 1),                 # no path
    None,
])
def test_a_malformed_piece_is_handed_back_for_the_python_loop_to_judge(files, bad):
    filled, pending = read_run(iter([piece(files[0]), bad]), bytearray(100))
    assert filled == 10 and pending is bad


@built
def test_a_directory_that_cannot_be_opened_is_let_go_and_its_file_handed_back(files, tmp_path):
    directory = _Directory()
    gone = piece(files[3])
    os.rename(tmp_path / "sub", tmp_path / "moved")
    before = open_descriptors()
    filled, pending = read_run(iter([piece(files[0]), gone]), bytearray(100), directory=directory)
    assert (filled, pending) == (10, gone)
    assert (directory.path, directory.fd) == (None, -1)
    assert open_descriptors() == before           # the first directory's descriptor was closed too
    assert read_run(iter([piece(files[0])]), bytearray(100), directory=directory)[0] == 10
    assert open_descriptors() == before + 1
    directory.close()


@built
def test_an_error_of_the_iterator_propagates_with_the_directory_accounted_for(files):
    directory = _Directory()
    before = open_descriptors()

    def pieces():
        yield piece(files[3])
        raise ValueError("a rows frame cut short")

    with pytest.raises(ValueError, match="cut short"):
        read_run(pieces(), bytearray(100), directory=directory)
    assert directory.path == str(files[3].parent) and open_descriptors() == before + 1
    directory.close()
    assert open_descriptors() == before


@built
@pytest.mark.parametrize("filled, limit", [(-1, 10), (11, 10), (0, 101)])
def test_positions_outside_the_buffer_are_refused(files, filled, limit):
    with pytest.raises(ValueError, match="outside a buffer of 100 bytes"):
        read_run(iter([piece(files[0])]), bytearray(100), filled, limit)


@built
def test_a_read_only_buffer_is_refused(files):
    with pytest.raises(BufferError, match="not writable"):
        read_run(iter([piece(files[0])]), bytes(100))


def columns(rows=8):
    return tuple(array(typecode, bytes(8 * rows)) for typecode in "qqqQQ")


def rows(cols, count):
    return [tuple(column[i] for column in cols) for i in range(count)]


@pytest.fixture
def directory(tmp_path):
    """Regular files around a subdirectory, a symlink, a FIFO and a non-ASCII name."""
    for name in ("a", "b", "c", "é", "f", "g", "h"):
        (tmp_path / name).write_bytes(name.encode() * 3)
    (tmp_path / "d").mkdir()
    (tmp_path / "e").symlink_to("a")
    os.mkfifo(tmp_path / "fifo")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    yield tmp_path, fd
    os.close(fd)


@built
def test_stat_run_takes_regular_files_and_stops_at_anything_else(directory):
    path, fd = directory
    names = ["a", "b", "c", "d", "e", "fifo", "gone", "é", "f", "g", "h"]
    cols = columns()
    stops, count = [], 0
    i = 0
    while i < len(names):
        i, count = _smallfiles.stat_run(fd, names, i, cols, count)
        stops.append(i)
        i += 1
    assert stops == [3, 4, 5, 6, 7, 11]        # the subdirectory, symlink, FIFO, vanished name, é, the end
    taken = ["a", "b", "c", "f", "g", "h"]
    assert count == len(taken) and rows(cols, count) == [fingerprint(path / n) for n in taken]


@built
def test_stat_run_stops_when_the_columns_are_full(directory):
    path, fd = directory
    cols = columns(2)
    assert _smallfiles.stat_run(fd, ["a", "b", "c"], 0, cols, 0) == (2, 2)
    assert _smallfiles.stat_run(fd, ["a", "b", "c"], 0, cols, 2) == (0, 2)


@built
@pytest.mark.parametrize("bad", ["", "a/../b", "a\0", 7])
def test_stat_run_hands_back_a_name_no_listing_gives(directory, bad):
    _, fd = directory
    assert _smallfiles.stat_run(fd, ["a", bad, "b"], 0, columns(), 0) == (1, 1)


@built
@pytest.mark.parametrize("args, error", [
    ((["a"], -1, columns(), 0), "outside"),
    ((["a"], 2, columns(), 0), "outside"),
    ((["a"], 0, columns(), 9), "outside"),
    ((["a"], 0, columns()[:4], 0), "5 buffers"),
    ((["a"], 0, (*columns(2)[:4], array("q", bytes(24))), 0), "as many 8-byte rows"),
    ((["a"], 0, (*columns()[:4], bytes(64)), 0), "not writable"),
])
def test_stat_run_refuses_arguments_outside_its_columns(directory, args, error):
    _, fd = directory
    with pytest.raises((ValueError, BufferError), match=error):
        _smallfiles.stat_run(fd, *args)
