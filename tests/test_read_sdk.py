"""A manifest written by the official Arvados SDK is read correctly by ls, cat and get.

The SDK writes the files (awkward names, an empty file, an empty directory, files
split over several blocks by flushes) into a local block directory; its blocks are
then laid out as our directory store, and its manifest text, as the SDK emits it,
is given to the real CLI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli_env
from trees import AWKWARD_NAMES

pytest.importorskip("arvados")
import arvados.collection  # noqa: E402
from sdk_referee import sdk_collection_in  # noqa: E402


def sdk_written(tmp_path: Path) -> tuple[str, dict[str, bytes], set[str], Path]:
    """(manifest text, {path: bytes}, directories, store) of a collection the SDK wrote."""
    flat = tmp_path / "sdk-blocks"
    flat.mkdir()
    coll = sdk_collection_in(str(flat))
    files: dict[str, bytes] = {}

    def write(path: str, *parts: bytes) -> None:
        with coll.open(path, "wb") as f:
            for i, part in enumerate(parts):
                if i:
                    f.flush()  # the next part starts a new block
                f.write(part)
        files[path] = b"".join(parts)

    for i, name in enumerate(AWKWARD_NAMES):
        write(name, f"top {i} {name}".encode())
        write(f"dir one/sub:dir/{name}", f"nested {i}".encode() * (i + 1))
    write("split.bin", b"A" * 1000, b"B" * 3000, b"C" * 7)
    write("dir one/split too", b"x" * 10, b"y" * 20)
    write("empty file")
    coll.find_or_create("empty dir", arvados.collection.COLLECTION)
    coll.find_or_create("dir one/inner empty", arvados.collection.COLLECTION)
    text = coll.manifest_text()
    store = tmp_path / "store"
    for name in os.listdir(flat):
        (store / name[:3]).mkdir(parents=True, exist_ok=True)
        os.replace(flat / name, store / name[:3] / name)
    return text, files, {"dir one", "dir one/sub:dir", "dir one/inner empty", "empty dir"}, store


@pytest.mark.sdk
def test_ls_cat_and_get_read_a_manifest_the_sdk_wrote(cli, tmp_path):
    text, files, dirs, store = sdk_written(tmp_path)
    assert "./dir\\040one/sub\\072dir" in text and "split.bin" in text
    manifest = tmp_path / "sdk-manifest.txt"
    manifest.write_text(text)
    listing = json.loads(cli("ls", "--json", str(manifest)).stdout)
    assert {e["path"]: e["size"] for e in listing if e["type"] == "file"} == {p: len(d) for p, d in files.items()}
    assert {e["path"] for e in listing if e["type"] == "directory"} == dirs
    for path in ("split.bin", "dir one/sub:dir/new\nline", "dir one/split too"):
        proc = subprocess.run([sys.executable, "-m", "ingest", "cat", "--store", str(store), str(manifest), path],
                              capture_output=True, timeout=60, env=cli_env(tmp_path))
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == files[path]
    dest = tmp_path / "dest"
    proc = cli("get", "--store", str(store), "--workers", "2", str(manifest), str(dest))
    assert proc.returncode == 0, proc.stderr
    got = {}
    got_dirs = set()
    for dirpath, dirnames, names in os.walk(dest):
        for d in dirnames:
            got_dirs.add(os.path.relpath(os.path.join(dirpath, d), dest))
        for name in names:
            full = os.path.join(dirpath, name)
            got[os.path.relpath(full, dest)] = Path(full).read_bytes()
    assert got == files
    assert got_dirs == dirs
