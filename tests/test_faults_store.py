"""Directory-store faults: a full disk and permission denied, through the real CLI.

Disk full uses a real 2 MiB tmpfs (``mount -t tmpfs``); where mounting is not
allowed the tests are skipped, saying why. Permission denied needs a CLI that file
permissions apply to: as root (root writes anywhere) it runs as ``nobody`` when
that user can run this Python and checkout, otherwise as root with
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH and CAP_FOWNER dropped; as any other user,
as that user.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import hashlib
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from fault_helpers import (
    assert_journal_holds_only_stored_blocks,
    assert_no_partial_blocks,
    block_files,
    fast_profile,
    run_cli,
)
from trees import MiB, fill

pytestmark = [pytest.mark.fault, pytest.mark.timeout(60)]

TMPFS_SIZE = "2m"


@pytest.fixture
def mount_tmpfs(tmp_path_factory):
    """``mount(options) -> Path``: a fresh tmpfs; all unmounted at teardown.

    Skips the test when mounting is refused (not root, no CAP_SYS_ADMIN, ...).
    """
    points: list[Path] = []

    def mount(options: str) -> Path:
        if shutil.which("mount") is None:
            pytest.skip("no mount command")
        point = tmp_path_factory.mktemp("tmpfs")
        try:
            proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
                                  capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired) as exc:
            pytest.skip(f"cannot mount a tmpfs here: {exc}")
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {(proc.stderr or proc.stdout).strip()}")
        points.append(point)
        return point

    try:
        yield mount
    finally:
        for point in reversed(points):
            if subprocess.run(["umount", str(point)], capture_output=True, timeout=20).returncode != 0:
                subprocess.run(["umount", "-l", str(point)], capture_output=True, timeout=20)


@pytest.fixture
def tmpfs(mount_tmpfs) -> Path:
    """A fresh, empty 2 MiB tmpfs."""
    return mount_tmpfs(f"size={TMPFS_SIZE},mode=0755")


def test_disk_full_fails_naming_the_store_and_leaves_no_partial_block(tmpfs, tmp_path):
    src = tmp_path / "src"
    fill(src / "big", 5 * MiB, "big")        # five 1 MiB blocks: at most two fit
    store = tmpfs / "store"
    run = run_cli(tmp_path, "put", "--store", str(store), "--block-size", str(MiB), "--workers", "2",
                  str(src))
    assert run.returncode == 1, run.stderr
    assert run.leftovers == []
    assert "no space left on device" in run.stderr and str(store) in run.stderr
    assert run.stdout == ""
    stored = assert_no_partial_blocks(store)
    assert len(stored) < 5
    journaled = assert_journal_holds_only_stored_blocks(tmp_path / "xdg-state", [store])
    assert len(journaled) <= len(stored)


def test_keepstore_on_a_full_volume_answers_507_and_the_run_fails_naming_it(
        tmpfs, keepstore_factory, tmp_path):
    # No free-space floor: the volume really runs out of space mid-write.
    ks = keepstore_factory(volumes=[str(tmpfs)], extra_args=["--min-free-space", "0"])
    src = tmp_path / "src"
    fill(src / "big", 5 * MiB, "big")
    run = run_cli(tmp_path, "put", "--config", fast_profile(tmp_path / "p.toml"), "--keep", ks.url,
                  "--replication", "1", "--block-size", str(MiB), "--workers", "2", str(src))
    assert run.returncode == 1, run.stderr
    assert run.leftovers == []
    assert ks.url in run.stderr and "HTTP 507" in run.stderr
    assert "no space left on device" in ks.log()
    stored = assert_no_partial_blocks(tmpfs)
    assert len(stored) < 5
    assert_journal_holds_only_stored_blocks(tmp_path / "xdg-state", [tmpfs])


def test_read_only_file_system_fails_saying_so(mount_tmpfs, tmp_path):
    store = mount_tmpfs("ro,size=1m,mode=0755")
    src = tmp_path / "src"
    fill(src / "f", 1000, "f")
    run = run_cli(tmp_path, "put", "--store", str(store), str(src))
    assert run.returncode == 1, run.stderr
    assert run.leftovers == []
    assert "read-only file system" in run.stderr and str(store) in run.stderr


# ---- permission denied

@pytest.fixture
def shared_dir():
    """A directory another user can reach (pytest's own temp dirs are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="keep-ingest-faults-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for p in [path, *path.rglob("*")]:
            if p.is_dir() and not p.is_symlink():
                p.chmod(0o755)
        shutil.rmtree(path, ignore_errors=True)


@dataclass
class Unprivileged:
    """How to run the CLI so that file permissions apply to it."""

    how: str
    user: tuple[int, int] | None = None
    preexec_fn: Callable[[], None] | None = None

    def give(self, path: Path) -> None:
        """Make ``path`` (and what is under it) writable by the runner."""
        if self.user is not None:
            for p in [path, *path.rglob("*")]:
                os.chown(p, *self.user)

    def take(self, path: Path) -> None:
        """Make ``path`` someone else's (when the runner is another user)."""
        if self.user is not None:
            os.chown(path, 0, 0)


_PR_CAPBSET_DROP = 24
_DAC_CAPS = (1, 2, 3)  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER


@functools.cache
def unprivileged() -> Unprivileged:
    """``nobody`` when we are root and nobody can run this Python and this checkout;
    else root without the capabilities that bypass file permissions (dropped from the
    bounding set before exec); else ourselves."""
    if os.geteuid() != 0:
        return Unprivileged("current user")
    try:
        pw = pwd.getpwnam("nobody")
        probe = subprocess.run([sys.executable, "-c", "import ingest.cli"], user=pw.pw_uid,
                               group=pw.pw_gid, extra_groups=[], cwd="/", capture_output=True,
                               env={"PYTHONPATH": str(REPO_ROOT), "PATH": os.environ.get("PATH", "")},
                               timeout=30)
        if probe.returncode == 0:
            return Unprivileged("nobody", user=(pw.pw_uid, pw.pw_gid))
    except (KeyError, OSError, subprocess.SubprocessError):
        pass
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def drop_dac_capabilities() -> None:
        for cap in _DAC_CAPS:
            if prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")

    check = subprocess.run(["true"], preexec_fn=drop_dac_capabilities, capture_output=True)
    if check.returncode != 0:
        pytest.skip("running as root, 'nobody' cannot run this Python, and capabilities cannot be dropped")
    return Unprivileged("root without CAP_DAC_OVERRIDE", preexec_fn=drop_dac_capabilities)


@pytest.mark.parametrize("case", ["store-read-only", "parent-read-only", "prefix-dir-read-only"])
def test_permission_denied_names_the_path(shared_dir, case):
    runner = unprivileged()
    src = shared_dir / "src"
    fill(src / "f", 300_000, "f")
    md5 = hashlib.md5((src / "f").read_bytes()).hexdigest()
    home = shared_dir / "home"
    home.mkdir()
    runner.give(home)
    parent = shared_dir / "stores"
    parent.mkdir()
    parent.chmod(0o755)
    store = parent / "store"
    if case == "store-read-only":
        store.mkdir()
        store.chmod(0o555)
        named = str(store)
    elif case == "parent-read-only":
        parent.chmod(0o555)                     # the store cannot be created
        named = str(store)
    else:
        prefix = store / md5[:3]                # the block's prefix directory, not writable
        prefix.mkdir(parents=True)
        runner.give(store)
        runner.take(prefix)
        prefix.chmod(0o555)
        named = str(prefix / md5)
    run = run_cli(home, "put", "--store", str(store), "--workers", "1", str(src), user=runner.user,
                  preexec_fn=runner.preexec_fn, env={"HOME": str(home)}, cwd=str(home))
    assert run.returncode == 1, f"as {runner.how}: {run.stderr}"
    assert run.leftovers == []
    assert "permission denied" in run.stderr.lower() and named in run.stderr, run.stderr
    assert run.stdout == ""
    if store.exists():
        assert block_files(store) == []
        assert_no_partial_blocks(store)


# ---- a stored copy that went bad (bit rot under the final name)

def _rot(path: Path) -> None:
    """Flip one byte in place: same name, same size, wrong content."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_rotten_copy_in_the_directory_store_is_replaced_not_trusted(tmp_path):
    src = tmp_path / "src"
    fill(src / "f", 200_000, "f")
    store = tmp_path / "store"
    first = run_cli(tmp_path, "put", "--store", str(store), str(src))
    assert first.returncode == 0, first.stderr
    [block] = block_files(store)
    _rot(block)
    again = run_cli(tmp_path, "put", "--store", str(store), "--no-resume", str(src))
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout
    assert_no_partial_blocks(store)          # the block hashes to its name again


def test_a_rotten_copy_on_a_keepstore_volume_is_replaced_not_a_collision(keepstore, tmp_path):
    src = tmp_path / "src"
    fill(src / "f", 200_000, "f")
    args = ["put", "--config", fast_profile(tmp_path / "p.toml"), "--keep", keepstore.url,
            "--replication", "1", str(src)]
    first = run_cli(tmp_path, *args)
    assert first.returncode == 0, first.stderr
    [block] = block_files(keepstore.volumes[0])
    _rot(block)
    again = run_cli(tmp_path, *args, "--no-resume")
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout
    assert_no_partial_blocks(keepstore.volumes[0])


def test_keepstore_still_refuses_a_genuine_collision(tmp_path, monkeypatch):
    """A stored copy that differs from the body yet hashes right is a collision: 500."""
    from test_keepstore_units import _put_request

    from ingest.keep.dirstore import DirectoryStore
    from ingest.keepstore.server import KeepstoreServer, ServerConfig

    md5 = hashlib.md5(b"foo").hexdigest()
    vol = tmp_path / "v"
    (vol / md5[:3]).mkdir(parents=True)
    (vol / md5[:3] / md5).write_bytes(b"bar")     # differs from the body...
    monkeypatch.setattr(DirectoryStore, "verify", lambda self, m: 3)  # ...and "hashes right"

    async def main():
        server = KeepstoreServer(ServerConfig(volumes=[str(vol)], fsync=False))
        try:
            resp = await server._dispatch(_put_request(md5, b"foo", 3))
            assert resp.status == 500 and b"hash collision" in resp.body
        finally:
            server.executor.shutdown()

    asyncio.run(main())
    assert (vol / md5[:3] / md5).read_bytes() == b"bar"
