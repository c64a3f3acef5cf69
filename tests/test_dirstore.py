"""The directory block store: layout, atomicity, concurrent writers, verified reads."""

import hashlib
import os
import threading

import pytest

from ingest.errors import BlockCorrupt, BlockNotFound, StoreError
from ingest.keep.dirstore import TMP_PREFIX, DirectoryStore
from ingest.keep.factory import open_store


def put(store, data: bytes) -> str:
    writer = store.open_block()
    for i in range(0, len(data), 3):
        writer.write(data[i:i + 3])
    return writer.commit(hashlib.md5(data).hexdigest()).locator


def test_keepstore_volume_layout_and_round_trip(tmp_path):
    store = open_store({"type": "directory", "path": str(tmp_path)})
    loc = put(store, b"hello world")
    md5 = hashlib.md5(b"hello world").hexdigest()
    assert loc == f"{md5}+11"
    assert (tmp_path / md5[:3] / md5).read_bytes() == b"hello world"
    assert store.get(loc) == b"hello world"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(TMP_PREFIX)]


def test_empty_block_needs_no_file(tmp_path):
    assert DirectoryStore(str(tmp_path)).get("d41d8cd98f00b204e9800998ecf8427e+0") == b""


def test_abort_leaves_nothing_behind(tmp_path):
    store = DirectoryStore(str(tmp_path))
    writer = store.open_block()
    writer.write(b"partial")
    writer.abort()
    assert os.listdir(tmp_path) == []


def test_uncommitted_block_is_never_visible_under_its_final_name(tmp_path):
    store = DirectoryStore(str(tmp_path))
    writer = store.open_block()
    writer.write(b"abc")
    md5 = hashlib.md5(b"abc").hexdigest()
    assert not os.path.exists(store.block_path(md5))
    writer.commit(md5)
    assert os.path.exists(store.block_path(md5))


def test_concurrent_writers_of_the_same_block(tmp_path):
    store = DirectoryStore(str(tmp_path))
    data = os.urandom(1 << 20)
    results, errors = [], []

    def write():
        try:
            results.append(put(DirectoryStore(str(tmp_path)), data))
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=write) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and len(set(results)) == 1
    assert store.get(results[0]) == data
    assert sorted(os.listdir(tmp_path)) == [results[0][:3]]


def test_corrupt_block_is_detected_on_read(tmp_path):
    store = DirectoryStore(str(tmp_path))
    loc = put(store, b"precious bytes")
    path = store.block_path(loc[:32])
    raw = bytearray(open(path, "rb").read())
    raw[3] ^= 0xFF
    open(path, "wb").write(raw)
    with pytest.raises(BlockCorrupt, match=path):
        store.get(loc)


def test_missing_block_names_locator_and_store(tmp_path):
    with pytest.raises(BlockNotFound, match=f"acbd18db4cc2f85cedef654fccc4a4d8\\+3 not found in {tmp_path}"):
        DirectoryStore(str(tmp_path)).get("acbd18db4cc2f85cedef654fccc4a4d8+3")


def test_unwritable_store_is_refused_with_its_path(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    os.chmod(tmp_path, 0o500)
    try:
        with pytest.raises(StoreError, match=str(tmp_path)):
            DirectoryStore(str(tmp_path / "store"))
    finally:
        os.chmod(tmp_path, 0o700)


def test_store_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="file"):
        DirectoryStore(str(tmp_path / "file"))
