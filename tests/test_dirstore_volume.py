"""DirectoryStore as a keepstore volume: stat, touch, compare, verify, index, free space, ENOSPC."""

import errno
import hashlib
import os

import pytest

from ingest.errors import BlockCorrupt, BlockNotFound, StoreError, StoreFull
from ingest.keep.dirstore import TMP_PREFIX, DirectoryStore

pytestmark = pytest.mark.timeout(20)


def store_bytes(store: DirectoryStore, data: bytes) -> str:
    md5 = hashlib.md5(data).hexdigest()
    w = store.open_block()
    w.write(data)
    w.commit(md5)
    return md5


def test_stat_touch_read_raw(tmp_path):
    store = DirectoryStore(str(tmp_path))
    md5 = store_bytes(store, b"hello")
    assert store.stat_block(md5).st_size == 5
    assert store.stat_block("0" * 32) is None
    os.utime(store.block_path(md5), ns=(10**9, 10**9))
    assert store.touch(md5)
    assert store.stat_block(md5).st_mtime_ns > 10**9
    assert not store.touch("0" * 32)
    assert store.read_raw(md5) == b"hello"
    buf = bytearray(b"junk")
    assert store.read_raw(md5, into=buf) is buf and buf == b"hello"
    with pytest.raises(BlockNotFound):
        store.read_raw("0" * 32)


def test_same_content_and_verify(tmp_path):
    store = DirectoryStore(str(tmp_path))
    data = os.urandom(3 * 1024 * 1024 + 7)
    md5 = store_bytes(store, data)
    assert store.same_content(md5, data) is True
    assert store.same_content(md5, memoryview(data)) is True
    changed = bytearray(data)
    changed[-1] ^= 1
    assert store.same_content(md5, changed) is False
    assert store.same_content(md5, data[:-1]) is False
    assert store.same_content("0" * 32, data) is None
    assert store.verify(md5) == len(data)
    with open(store.block_path(md5), "r+b") as f:
        f.seek(1000)
        f.write(bytes([data[1000] ^ 0xFF]))   # a byte that differs (random data may hold an "X" there)
    with pytest.raises(BlockCorrupt):
        store.verify(md5)
    with pytest.raises(BlockNotFound):
        store.verify("0" * 32)


def test_empty_block_is_a_regular_file_for_volume_operations(tmp_path):
    store = DirectoryStore(str(tmp_path))
    md5 = store_bytes(store, b"")
    assert md5 == "d41d8cd98f00b204e9800998ecf8427e"
    assert store.stat_block(md5).st_size == 0
    assert [b.md5 for b in store.index()] == [md5]


def test_index_prefixes_and_skipped_names(tmp_path):
    store = DirectoryStore(str(tmp_path))
    md5s = sorted(store_bytes(store, bytes([i]) * (i + 1)) for i in range(40))
    # Things that are not blocks: temp files, trash, stray names, a non-hex directory.
    md5 = md5s[0]
    open(os.path.join(store.root, TMP_PREFIX + "xyz"), "w").close()
    open(os.path.join(store.root, md5[:3], md5 + ".trash.12345"), "w").close()
    open(os.path.join(store.root, md5[:3], "tmp" + md5), "w").close()
    os.mkdir(os.path.join(store.root, "lost+found"))
    open(os.path.join(store.root, "lost+found", "f" * 32), "w").close()

    listed = list(store.index())
    assert [b.md5 for b in listed] == md5s
    for b in listed:
        st = os.stat(store.block_path(b.md5))
        assert (b.size, b.mtime_ns) == (st.st_size, st.st_mtime_ns)
    for prefix in ("", md5[:1], md5[:2], md5[:3], md5[:4], md5, "fff", "0" * 33):
        assert [b.md5 for b in store.index(prefix)] == [m for m in md5s if m.startswith(prefix)]


def test_free_space(tmp_path):
    store = DirectoryStore(str(tmp_path))
    st = os.statvfs(str(tmp_path))
    assert store.free_space() == st.f_bavail * st.f_frsize


def test_enospc_raises_store_full_and_leaves_nothing(tmp_path, monkeypatch):
    store = DirectoryStore(str(tmp_path))
    w = store.open_block()

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(StoreFull, match="no space left"):
        w.write(b"data")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []
    assert issubclass(StoreFull, StoreError)
