"""``get`` never writes outside DEST, even when DEST changes under it during the run.

An attacker who can write into DEST swaps a directory, or a temporary file, for a
symlink (or a hard link) to a place outside DEST while a real ``get`` runs. The
mid-run swaps happen during real CLI runs whose store is slowed by the fault
proxy (every block read waits), so the swap lands between two blocks; the swaps
at one defined instant (between the conflict check and the mkdirs, right before
a rename) use a run whose step is wrapped to swap first. Each test proves that
nothing outside DEST was created or changed (content and mtime), and that the
run fails naming the path.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from pathlib import Path

import pytest
from conftest import finish, spawn_cli
from trees import fill

from ingest.errors import IngestError
from ingest.keep.dirstore import DirectoryStore
from ingest.manifest import parse_manifest
from ingest.read.get import _Getter

BLOCK = 64 * 1024
TMP_RE = re.compile(r"^\.keep-ingest-get-[0-9a-f]{16}\.tmp$")
DELAY_MS = 250  # per block read: a run of 12 blocks takes about 3 s


def snapshot(root: Path) -> dict[str, tuple[str, int, str]]:
    """Everything under ``root``: path -> (kind, mtime_ns, sha256 of a file's bytes)."""
    out = {}
    for dirpath, dirnames, names in os.walk(root):
        for name in dirnames + names:
            p = Path(dirpath) / name
            st = p.lstat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else ""
            out[str(p.relative_to(root))] = (oct(st.st_mode), st.st_mtime_ns, digest)
    return out


def make_outside(tmp_path: Path) -> Path:
    """A directory outside DEST holding one victim file an attacker wants overwritten."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"v" * (6 * BLOCK))
    os.utime(outside / "victim", ns=(10**18, 10**18))
    return outside


def put_via(cli, tmp_path: Path, src: Path, url: str) -> Path:
    manifest = tmp_path / "manifest.txt"
    proc = cli("put", "-q", "--keep", url, "--replication", "1", "--block-size", str(BLOCK),
               "--manifest-out", str(manifest), str(src) + "/")
    assert proc.returncode == 0, proc.stderr
    return manifest


def wait_until(predicate, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def temp_files(d: Path) -> list[Path]:
    return [p for p in d.iterdir() if TMP_RE.match(p.name)] if d.is_dir() else []


def test_a_directory_swapped_for_a_symlink_mid_run_is_never_written_through(
        cli, tmp_path, keepstore, fault_proxy):
    src = tmp_path / "src"
    for d in ("a", "b", "c"):
        for i in range(2):
            fill(src / d / f"f{i}", BLOCK + 1000, f"{d}{i}")  # two blocks per file, 12 in all
    manifest = put_via(cli, tmp_path, src, keepstore.url)
    outside = make_outside(tmp_path)
    before = snapshot(outside)
    proxy = fault_proxy(keepstore.url, delay_ms=DELAY_MS, methods=("GET",))
    dest = tmp_path / "dest"
    proc = spawn_cli(tmp_path, "get", "--keep", proxy.url, "--workers", "1", str(manifest), str(dest))
    try:
        # a/ is being written, c/ (fetched last) is made but none of its files begun
        wait_until(lambda: (dest / "a" / "f0").exists(), "the first file")
        assert not temp_files(dest / "c")
        os.rename(dest / "c", dest / "c.aside")
        os.symlink(outside, dest / "c")
    finally:
        code, _, err = finish(proc)
    assert code == 1, err
    assert f"{dest / 'c'} is now a symlink" in err, err
    assert snapshot(outside) == before  # nothing created, written or timed outside DEST
    assert (dest / "a" / "f0").read_bytes() == (src / "a" / "f0").read_bytes()
    assert not temp_files(dest / "c.aside")  # the failed run removed its temporary files


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_a_temporary_file_swapped_mid_run_is_never_written_through(
        cli, tmp_path, keepstore, fault_proxy, link):
    src = tmp_path / "src"
    fill(src / "d" / "big.bin", 6 * BLOCK, "big")  # six blocks, one file
    manifest = put_via(cli, tmp_path, src, keepstore.url)
    outside = make_outside(tmp_path)
    before = snapshot(outside)
    proxy = fault_proxy(keepstore.url, delay_ms=DELAY_MS, methods=("GET",))
    dest = tmp_path / "dest"
    proc = spawn_cli(tmp_path, "get", "--keep", proxy.url, "--workers", "1", str(manifest), str(dest))
    try:
        # swapped once the first block has been written into it
        wait_until(lambda: proxy.snapshot()["requests"].get("GET", 0) >= 2, "the second block read")
        [tmp] = temp_files(dest / "d")
        tmp.unlink()
        if link == "symlink":
            tmp.symlink_to(outside / "victim")
        else:
            os.link(outside / "victim", tmp)
    finally:
        code, _, err = finish(proc)
    assert code == 1, err
    assert f"cannot write {dest / 'd' / 'big.bin'}" in err and "replaced" in err, err
    assert snapshot(outside) == before
    assert not (dest / "d" / "big.bin").exists()


# -- swaps at one defined instant -----------------------------------------------------


def small_collection(tmp_path: Path) -> tuple[object, dict]:
    """A manifest of two directories with one file each, in a directory store."""
    store = DirectoryStore(str(tmp_path / "store"), fsync=False)
    lines = []
    for d in ("one", "two"):
        data = d.encode() * 1000
        w = store.open_block()
        w.write(data)
        locator = w.commit(hashlib.md5(data).hexdigest()).locator
        lines.append(f"./{d} {locator} 0:{len(data)}:file\n")
    return parse_manifest("".join(lines)), {"type": "directory", "path": str(tmp_path / "store"),
                                            "fsync": False}


def test_a_temporary_file_swapped_right_before_its_rename_is_not_touched(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    manifest, spec = small_collection(tmp_path)
    outside = make_outside(tmp_path)
    before = snapshot(outside)
    dest = tmp_path / "dest"

    class SwapBeforeRename(_Getter):
        def finish(self, t):
            tmp = dest / t.dir_rel / t.tmp
            tmp.unlink()
            tmp.symlink_to(outside / "victim")
            super().finish(t)

    with pytest.raises(IngestError) as failed:
        SwapBeforeRename(manifest, str(dest), "", spec, 1, False).run()
    assert f"cannot write {dest / 'one' / 'file'}: " in str(failed.value)
    assert "is now a symlink" in str(failed.value)
    assert snapshot(outside) == before  # its mtime was not set, nothing renamed into it
    assert not (dest / "one" / "file").exists()


def test_a_directory_swapped_between_the_conflict_check_and_its_creation_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    manifest, spec = small_collection(tmp_path)
    outside = make_outside(tmp_path)
    before = snapshot(outside)
    dest = tmp_path / "dest"
    dest.mkdir()

    class SwapAfterCheck(_Getter):
        def preflight(self, state):
            found = super().preflight(state)
            os.symlink(outside, dest / "two")
            return found

    with pytest.raises(IngestError) as failed:
        SwapAfterCheck(manifest, str(dest), "", spec, 1, False).run()
    assert f"{dest / 'two'} appeared during the run and is not a directory" in str(failed.value)
    assert snapshot(outside) == before


def test_a_directory_replaced_by_another_inside_dest_fails_the_run(tmp_path, monkeypatch):
    """Renamed aside and replaced by a fresh directory after its files were written:
    nothing escapes, but the tree is not the manifest's, so the run must not succeed."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    manifest, spec = small_collection(tmp_path)
    dest = tmp_path / "dest"

    class ReplaceAfterWrites(_Getter):
        def finish(self, t):
            super().finish(t)
            if t.dir_rel == "one":
                os.rename(dest / "one", dest / "one.aside")
                (dest / "one").mkdir()

    with pytest.raises(IngestError) as failed:
        ReplaceAfterWrites(manifest, str(dest), "", spec, 1, False).run()
    assert f"{dest / 'one'} was replaced by another directory during the run" in str(failed.value)
