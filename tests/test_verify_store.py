"""``put --verify-content`` also checks that every reused block is still in the store
and sound, and stores again what is missing or damaged.

Real runs of the CLI into a directory store and into a real keepstore on 127.0.0.1;
the damage is done to the stored files themselves, as bit rot or an operator would.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from trees import MiB, fill

from ingest.errors import BlockCorrupt, BlockNotFound
from ingest.keep.client import KeepClient
from ingest.keep.dirstore import DirectoryStore
from ingest.manifest import parse_manifest


def ok(proc):
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture
def src(tmp_path):
    fill(tmp_path / "src" / "big.bin", 2 * MiB + 10, "big")
    for i in range(3):
        fill(tmp_path / "src" / "small" / f"s{i}", 1000 + i, f"s{i}")
    return tmp_path / "src"


def blocks_of(manifest: str) -> dict[str, list[str]]:
    """md5 -> the files with bytes in that block."""
    out: dict[str, list[str]] = {}
    for path, segments in parse_manifest(manifest).files():
        for seg in segments:
            out.setdefault(seg.locator[:32], []).append(path)
    return out


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def sound(path: Path) -> bool:
    return path.exists() and hashlib.md5(path.read_bytes()).hexdigest() == path.name


def test_a_damaged_or_vanished_block_is_stored_again_by_verify_content(cli, tmp_path, src):
    store = tmp_path / "store"
    args = ("put", "--store", str(store), "--block-size", str(MiB), f"{src}/")
    manifest = ok(cli(*args)).stdout
    blocks = blocks_of(manifest)
    big = next(md5 for md5, files in blocks.items() if files == ["big.bin"])
    small = next(md5 for md5, files in blocks.items() if files[0].startswith("small/"))
    flip_a_byte(store / big[:3] / big)
    (store / small[:3] / small).unlink()
    plain = ok(cli(*args))                    # without --verify-content the journal is trusted
    assert plain.stdout == manifest and not sound(store / big[:3] / big)
    proc = ok(cli(*args, "--verify-content"))
    assert proc.stdout == manifest
    assert sound(store / big[:3] / big) and sound(store / small[:3] / small)
    assert "uploaded big.bin (damaged in the store)" in proc.stderr
    assert "uploaded small/s0 (missing from the store)" in proc.stderr
    assert "(2 blocks) in" in proc.stderr      # only those two blocks
    again = ok(cli(*args, "--verify-content"))
    assert "uploaded 0 B (0 blocks)" in again.stderr


def test_a_block_gone_from_keepstore_is_stored_again_by_verify_content(cli, tmp_path, src, keepstore):
    args = ("put", "--keep", keepstore.url, "--replication", "1", "--block-size", str(MiB), f"{src}/")
    manifest = ok(cli(*args)).stdout
    gone, rotten = [md5 for md5, files in blocks_of(manifest).items() if files == ["big.bin"]][:2]
    keepstore.block_path(gone).unlink()
    flip_a_byte(keepstore.block_path(rotten))
    proc = ok(cli(*args, "--verify-content"))
    assert proc.stdout == manifest
    assert sound(keepstore.block_path(gone)) and sound(keepstore.block_path(rotten))
    assert "uploaded big.bin (" in proc.stderr and "uploaded 2.0 MiB (2 blocks)" in proc.stderr, proc.stderr


def test_the_directory_store_rehashes_a_block_to_check_it(tmp_path):
    store = DirectoryStore(str(tmp_path / "store"))
    writer = store.open_block()
    writer.write(b"hello")
    locator = writer.commit(hashlib.md5(b"hello").hexdigest()).locator
    store.check_block(locator)
    path = store.block_path(locator[:32])
    Path(path).write_bytes(b"hellp")          # same size, one bit off
    with pytest.raises(BlockCorrupt):
        store.check_block(locator)
    Path(path).unlink()
    with pytest.raises(BlockNotFound):
        store.check_block(locator)
    store.check_block("d41d8cd98f00b204e9800998ecf8427e+0")  # the empty block is always there


def test_the_keep_client_counts_the_copies_it_can_confirm(keepstores3):
    urls = [ks.url for ks in keepstores3]
    client = KeepClient(urls, replication=2, backoff_start=0)
    stored = client.put(b"two copies")
    client.check_block(stored.locator)
    md5 = stored.locator[:32]
    holders = [ks for ks in keepstores3 if ks.block_path(md5).exists()]
    assert len(holders) == 2
    holders[0].block_path(md5).unlink()
    with pytest.raises(BlockNotFound, match="1 of 2 copies found"):
        client.check_block(stored.locator)
    holders[1].block_path(md5).unlink()
    with pytest.raises(BlockNotFound, match="not found on 3 service"):
        client.check_block(stored.locator)
    client.close()
