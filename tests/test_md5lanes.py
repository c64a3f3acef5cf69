"""The multi-buffer MD5 extension against hashlib.md5: every kernel, every lane count.

Each kernel the extension has (avx512: 16 lanes, avx2: 8, portable: plain C) is tried
when this CPU runs it and skipped, saying so, when it does not; the portable kernel
and the hashlib engine run everywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import threading

import pytest
from conftest import cli_env
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest import md5lanes
from ingest.errors import ConfigError
from ingest.keep.locator import BLOCK_SIZE_MAX

ext = md5lanes._md5lanes
KERNELS = ("avx512", "avx2", "portable")
EDGE_LENGTHS = (0, 1, 55, 56, 63, 64, 65, 119, 120, 127, 128, 129)


def _kernel_param(name: str):
    runs = ext is not None and name in ext.kernels()
    why = "the extension is not built" if ext is None else f"this CPU cannot run the {name} kernel"
    return pytest.param(name, marks=pytest.mark.skipif(not runs, reason=why), id=name)


KERNEL_PARAMS = [_kernel_param(k) for k in KERNELS]
needs_ext = pytest.mark.skipif(ext is None, reason="the extension is not built")


def _digests_in_pieces(kernel: str, streams: list[bytes], cuts: list[int]) -> list[str]:
    """Hash every stream with one update_many call per cut: each call gives every
    stream its bytes up to the next cut (streams of different lengths, too)."""
    hashers = [ext.md5() for _ in streams]
    start = 0
    for end in [*cuts, max(map(len, streams), default=0)]:
        ext.update_many(hashers, [memoryview(s)[start:end] for s in streams], kernel)
        start = max(start, end)
    return [h.hexdigest() for h in hashers]


def _expected(streams: list[bytes]) -> list[str]:
    return [hashlib.md5(s).hexdigest() for s in streams]


@pytest.mark.parametrize("kernel", KERNEL_PARAMS)
@pytest.mark.parametrize("lanes", range(1, 34))
def test_every_lane_count_equal_lengths(kernel, lanes):
    """1 to 33 streams (over two full passes of 16) of equal length, fed in calls
    that cut the streams off the 64-byte grid."""
    streams = [os.urandom(64 * 37 + 11) for _ in range(lanes)]
    assert _digests_in_pieces(kernel, streams, [5, 64, 1000, 2100]) == _expected(streams)


@pytest.mark.parametrize("kernel", KERNEL_PARAMS)
@pytest.mark.parametrize("length", EDGE_LENGTHS)
def test_edge_lengths_in_every_lane(kernel, length):
    streams = [os.urandom(length) for _ in range(17)]
    assert _digests_in_pieces(kernel, streams, []) == _expected(streams)
    # the same bytes in two calls, split at every position of the first block
    for cut in range(min(length, 65)):
        assert _digests_in_pieces(kernel, streams, [cut]) == _expected(streams)


lengths = st.one_of(st.sampled_from(EDGE_LENGTHS), st.integers(0, 5000))


@pytest.mark.parametrize("kernel", KERNEL_PARAMS)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_random_streams_and_cuts(kernel, data):
    """Any number of streams of any lengths (including 0 and the edges), in any cuts."""
    sizes = data.draw(st.lists(lengths, min_size=1, max_size=20), label="lengths")
    streams = [data.draw(st.binary(min_size=n, max_size=n)) if n < 200 else os.urandom(n) for n in sizes]
    cuts = sorted(data.draw(st.lists(st.integers(0, max(sizes)), max_size=4), label="cuts"))
    assert _digests_in_pieces(kernel, streams, cuts) == _expected(streams)


class _BlockStreams:
    """Streams of about one block each (64 MiB, 64 MiB - 1, ...), views of one buffer,
    and their hashlib digests, computed once."""

    def __init__(self, count: int):
        self.base = os.urandom(BLOCK_SIZE_MAX + count * 4099)
        self.views = [memoryview(self.base)[i * 4099: i * 4099 + BLOCK_SIZE_MAX - i] for i in range(count)]
        self._expected: dict[int, str] = {}

    def expected(self, i: int) -> str:
        if i not in self._expected:
            self._expected[i] = hashlib.md5(self.views[i]).hexdigest()
        return self._expected[i]


@pytest.fixture(scope="module")
def block_streams():
    return _BlockStreams(17)


@pytest.mark.parametrize("kernel", KERNEL_PARAMS)
def test_block_size_streams_in_worker_sized_chunks(kernel, block_streams):
    """One full pass of the kernel's lanes and one stream more, 4 MiB at a time."""
    views = block_streams.views[:ext.LANES[kernel] + 1]
    hashers = [ext.md5() for _ in views]
    chunk = 4 << 20
    for start in range(0, BLOCK_SIZE_MAX, chunk):
        ext.update_many(hashers, [v[start:start + chunk] for v in views], kernel)
    assert [h.hexdigest() for h in hashers] == [block_streams.expected(i) for i in range(len(views))]


@needs_ext
def test_single_stream_hasher_is_hashlibs_md5():
    data = os.urandom(100_000)
    h = ext.md5(data[:10])
    h.update(data[10:])
    assert h.hexdigest() == hashlib.md5(data).hexdigest()
    assert h.digest() == hashlib.md5(data).digest()
    assert (h.name, h.digest_size, h.block_size) == ("md5", 16, 64)
    assert h.hexdigest() == hashlib.md5(data).hexdigest()  # digesting does not change it


@needs_ext
def test_bad_calls_are_refused_and_leave_hashers_usable():
    h, other = ext.md5(), ext.md5()
    with pytest.raises(ValueError, match="given twice"):
        ext.update_many([h, h], [b"a", b"b"], "portable")
    with pytest.raises(ValueError, match="2 hashers but 1 chunks"):
        ext.update_many([h, other], [b"a"], "portable")
    with pytest.raises(TypeError, match="not an md5 hasher"):
        ext.update_many([hashlib.md5()], [b"a"], "portable")
    with pytest.raises(TypeError):
        ext.update_many([h], ["text is not bytes"], "portable")
    with pytest.raises(ValueError, match="unknown MD5 kernel 'sse9'"):
        ext.update_many([h], [b"a"], "sse9")
    ext.update_many([h, other], [b"abc", b""], "portable")
    assert (h.hexdigest(), other.hexdigest()) == (hashlib.md5(b"abc").hexdigest(), hashlib.md5().hexdigest())


@needs_ext
def test_kernels_the_cpu_lacks_are_refused():
    missing = [k for k in KERNELS if k not in ext.kernels()]
    if not missing:
        pytest.skip("this CPU runs every kernel")
    with pytest.raises(ValueError, match="this CPU cannot run"):
        ext.update_many([ext.md5()], [b"a"], missing[0])


@needs_ext
def test_hashing_runs_without_the_gil():
    """While update_many hashes, another Python thread runs, and finds the hasher busy:
    with the GIL held it could only run before or after."""
    h = ext.md5()
    data = bytearray(128 << 20)
    done = threading.Event()
    seen_busy = []

    def hash_it():
        try:
            ext.update_many([h], [data], "portable")
        finally:
            done.set()

    worker = threading.Thread(target=hash_it)
    worker.start()
    while not done.is_set():
        try:
            h.hexdigest()
        except ValueError as exc:
            seen_busy.append(str(exc))
            break
    worker.join()
    assert seen_busy and "being updated" in seen_busy[0]
    assert h.hexdigest() == hashlib.md5(data).hexdigest()


def test_engines_agree_with_hashlib():
    streams = [os.urandom(n) for n in (0, 1, 64, 1000, 70_000)]
    for name in md5lanes.available():
        engine = md5lanes.select(name)
        hashers = [engine.new() for _ in streams]
        engine.update_many(hashers, streams)
        engine.update_many(hashers, streams)
        assert [h.hexdigest() for h in hashers] == [hashlib.md5(s + s).hexdigest() for s in streams], name


def test_auto_is_the_fastest_available_and_hashlib_always_is():
    assert md5lanes.available()[-1] == "hashlib"
    auto = md5lanes.select("auto")
    assert auto.name == md5lanes.available()[0]
    assert auto.lanes == (ext.LANES[auto.name] if ext is not None else 1)
    assert md5lanes.select("hashlib").lanes == 1


def test_bad_choices_name_the_variable():
    with pytest.raises(ConfigError, match=r"\$KEEP_INGEST_MD5: unknown MD5 engine 'fast'"):
        md5lanes.select("fast")
    unavailable = [k for k in KERNELS if k not in md5lanes.available()]
    if unavailable:
        with pytest.raises(ConfigError, match="is not available"):
            md5lanes.select(unavailable[0])


def _python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env,
                          timeout=60)


WITHOUT_EXTENSION = "import sys; sys.modules['ingest._md5lanes'] = None\n"


def test_without_the_extension_hashlib_hashes_and_says_why():
    out = _python(WITHOUT_EXTENSION + "from ingest import md5lanes\ne = md5lanes.engine()\n"
                  "h = e.new(); e.update_many([h], [b'abc']); print(e.name, e.lanes, h.hexdigest()); "
                  "print(e.origin)", env={"KEEP_INGEST_MD5": ""})
    assert out.returncode == 0, out.stderr
    first, why = out.stdout.splitlines()
    assert first == f"hashlib 1 {hashlib.md5(b'abc').hexdigest()}"
    assert "the ingest._md5lanes extension is not built" in why


def test_environment_forces_the_engine_in_a_new_process():
    out = _python("from ingest import md5lanes; e = md5lanes.engine(); print(e.name, e.origin)",
                  env={"KEEP_INGEST_MD5": "hashlib"})
    assert out.stdout.split() == ["hashlib", "$KEEP_INGEST_MD5"]


@pytest.mark.skipif(not (sysconfig.get_config_var("CC") and shutil.which(sysconfig.get_config_var("CC").split()[0])),
                    reason="no C compiler: the extension is optional")
def test_the_extension_is_built_where_a_compiler_is():
    """The build is optional, so a compile error would pass unnoticed: with a compiler
    here, the extension must have been built (make test installs it)."""
    assert ext is not None, md5lanes.NOT_BUILT
    assert "portable" in ext.kernels()


def _cli_without_extension(tmp_path, *args: str) -> subprocess.CompletedProcess:
    """``keep-ingest ARGS`` in a process where the extension cannot be imported."""
    code = WITHOUT_EXTENSION + f"from ingest.cli import main; sys.exit(main({list(args)!r}))"
    return _python(code, env=cli_env(tmp_path, {"KEEP_INGEST_MD5": ""}))


def test_without_the_extension_put_warns_in_verbose_and_config_show_says_so(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"abc")
    put = _cli_without_extension(tmp_path, "put", "-v", "--store", str(tmp_path / "store"), str(src))
    assert put.returncode == 0, put.stderr
    assert "warning: MD5 by hashlib, one block at a time: the ingest._md5lanes extension is not built" in put.stderr
    assert f"{hashlib.md5(b'abc').hexdigest()}+3 0:3:a" in put.stdout
    quiet = _cli_without_extension(tmp_path, "put", "--store", str(tmp_path / "store"), str(src))
    assert quiet.returncode == 0 and "MD5" not in quiet.stderr
    show = _cli_without_extension(tmp_path, "config", "show", "--json")
    row = json.loads(show.stdout)["md5"]
    assert row["value"] == "hashlib" and "extension is not built" in row["origin"]


@needs_ext
def test_config_show_names_the_engine_and_where_the_choice_came_from(cli):
    detected = json.loads(cli("config", "show", "--json", env={"KEEP_INGEST_MD5": ""}).stdout)["md5"]
    assert detected == {"value": ext.kernels()[0], "origin": "detected", "note": f"{ext.LANES[ext.kernels()[0]]} lanes"}
    forced = cli("config", "show", env={"KEEP_INGEST_MD5": "portable"}).stdout.splitlines()[-1]
    assert forced.startswith('md5 = "portable"') and forced.endswith("# $KEEP_INGEST_MD5 (4 lanes)")


def test_a_bad_engine_choice_stops_put_before_any_work(cli, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"abc")
    store = tmp_path / "store"
    proc = cli("put", "--store", str(store), str(src), env={"KEEP_INGEST_MD5": "sse9"})
    assert proc.returncode == 2
    assert "$KEEP_INGEST_MD5: unknown MD5 engine 'sse9'" in proc.stderr and "Traceback" not in proc.stderr
    assert not store.exists()
