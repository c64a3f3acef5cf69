"""An interrupted or failed ``get`` resumes without fetching complete files again.

The proof: files completed before the interruption keep their inode and mtime (they
were neither rewritten nor replaced), the resumed run reports them as already
complete and fetches only the blocks of the others, and the tree ends identical.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import cli_env, processes_tagged
from trees import fill, read_tree

BLOCK = 64 * 1024
TMP_RE = re.compile(r"^\.keep-ingest-get-[0-9a-f]{16}\.tmp$")


def put_tree(cli, tmp_path: Path, count: int, size: int) -> tuple[Path, Path, tuple[str, str]]:
    src = tmp_path / "src"
    for i in range(count):
        fill(src / f"d{i % 3}" / f"f{i:03}", size, f"f{i}")
    store = ("--store", str(tmp_path / "store"))
    manifest = tmp_path / "manifest.txt"
    fast = tmp_path / "no-fsync.toml"  # the store's durability is not what this tests
    fast.write_text("[store]\nfsync = false\n")
    proc = cli("put", "-q", "--config", str(fast), *store, "--block-size", str(BLOCK),
               "--manifest-out", str(manifest), str(src) + "/")
    assert proc.returncode == 0, proc.stderr
    return src, manifest, store


def complete_files(dest: Path) -> dict[str, tuple[int, int]]:
    """Files under their final names: relative path -> (inode, mtime_ns)."""
    out = {}
    for dirpath, _, names in os.walk(dest):
        for name in names:
            if not TMP_RE.match(name):
                st = os.stat(os.path.join(dirpath, name))
                out[os.path.relpath(os.path.join(dirpath, name), dest)] = (st.st_ino, st.st_mtime_ns)
    return out


def temp_files(dest: Path) -> list[str]:
    return [name for _, _, names in os.walk(dest) for name in names if TMP_RE.match(name)]


def counts(stderr: str) -> tuple[int, int, int]:
    m = re.search(r"(\d+) written, (\d+) already complete; fetched (\d+) blocks", stderr)
    assert m, stderr
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def test_a_failed_get_keeps_complete_files_and_resumes_without_refetching_them(cli, tmp_path):
    src, manifest, store = put_tree(cli, tmp_path, 12, BLOCK + 1000)  # two blocks per file
    # take away the first block of f06: the run fails there
    line = next(line for line in manifest.read_text().splitlines() if line.startswith("./d0 "))
    md5 = line.split()[5][:32]  # ./d0 holds f000, f003, f006, f009: blocks 1-2, 3-4, 5-6, ...
    block = tmp_path / "store" / md5[:3] / md5
    saved = block.read_bytes()
    block.unlink()
    dest = tmp_path / "dest"
    proc = cli("get", *store, "--workers", "1", str(manifest), str(dest))
    assert proc.returncode == 1
    assert f"block {md5}+{BLOCK} not found" in proc.stderr and "d0/f006" in proc.stderr, proc.stderr
    done = complete_files(dest)
    assert "d0/f000" in done and "d0/f006" not in done and temp_files(dest) == []
    # the block is back: the second run fetches only what is missing
    block.write_bytes(saved)
    proc = cli("get", *store, "--workers", "2", str(manifest), str(dest))
    assert proc.returncode == 0, proc.stderr
    written, already, fetched = counts(proc.stderr)
    assert (written, already, fetched) == (12 - len(done), len(done), 2 * (12 - len(done)))
    after = complete_files(dest)
    assert {p: after[p] for p in done} == done  # same inodes, same mtimes: not rewritten
    assert read_tree(dest) == read_tree(src)
    # a third run has nothing to do
    assert counts(cli("get", *store, str(manifest), str(dest)).stderr) == (0, 12, 0)




@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "term"])
def test_a_killed_get_resumes_without_refetching_complete_files(cli, tmp_path, sig):
    total = 400
    src, manifest, store = put_tree(cli, tmp_path, total, BLOCK)  # one block per file
    dest = tmp_path / "dest"
    tag = f"get-{uuid.uuid4()}"
    proc = subprocess.Popen([sys.executable, "-m", "ingest", "get", *store, "--workers", "1",
                             str(manifest), str(dest)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=cli_env(tmp_path, {"KEEP_INGEST_TEST_TAG": tag}))
    try:
        deadline = time.monotonic() + 30
        while not dest.exists() or len(complete_files(dest)) < 10:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "get made no progress"
            time.sleep(0.002)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 130, err
        assert temp_files(dest) == []  # cleaned up on the way out
    # no worker outlives its parent, even after kill -9
    deadline = time.monotonic() + 5
    while processes_tagged(tag):
        assert time.monotonic() < deadline, f"leftover processes {processes_tagged(tag)}"
        time.sleep(0.05)
    done = complete_files(dest)
    assert 10 <= len(done) < total
    resumed = cli("get", *store, "--workers", "2", str(manifest), str(dest))
    assert resumed.returncode == 0, resumed.stderr
    assert counts(resumed.stderr) == (total - len(done), len(done), total - len(done))
    after = complete_files(dest)
    assert {p: after[p] for p in done} == done
    assert temp_files(dest) == []
    assert read_tree(dest) == read_tree(src)
