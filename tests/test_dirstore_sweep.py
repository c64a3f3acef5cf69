"""The directory store's sweep of temporary files abandoned by dead writers.

Only regular files named ``TMP_PREFIX*`` in the store root, unmodified for
``TMP_MAX_AGE``, are removed; once per store object, on its first write-side use
(``unreachable()``, the preflight, or ``open_block()``); never raising.
"""

import hashlib
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SETPRIV, cli_env

from ingest.keep.dirstore import TMP_MAX_AGE, TMP_PREFIX, DirectoryStore

pytestmark = pytest.mark.timeout(30)

HOUR = 3600


def make_file(path: Path, size: int = 100, age: float = 0) -> Path:
    """A file of ``size`` bytes whose mtime is ``age`` seconds in the past."""
    path.write_bytes(b"x" * size)
    then = time.time() - age
    os.utime(path, (then, then))
    return path


def stored_block(store: DirectoryStore, data: bytes) -> str:
    writer = store.open_block()
    writer.write(data)
    return writer.commit(hashlib.md5(data).hexdigest()).locator[:32]


def test_old_temp_files_are_removed_and_logged(tmp_path, caplog):
    old = [make_file(tmp_path / f"{TMP_PREFIX}a", 1000, TMP_MAX_AGE + HOUR),
           make_file(tmp_path / f"{TMP_PREFIX}b", 234, 30 * 24 * HOUR)]
    store = DirectoryStore(str(tmp_path))
    with caplog.at_level(logging.INFO, logger="keep-ingest.store"):
        assert store.unreachable() == {}
    assert not any(p.exists() for p in old)
    [record] = [r for r in caplog.records if "abandoned" in r.getMessage()]
    assert record.levelno == logging.INFO
    assert f"removed 2 abandoned temporary files (1234 bytes) from block store {tmp_path}" in record.getMessage()


def test_fresh_temp_files_are_kept(tmp_path, caplog):
    fresh = [make_file(tmp_path / f"{TMP_PREFIX}now"),
             make_file(tmp_path / f"{TMP_PREFIX}almost", age=TMP_MAX_AGE - HOUR),
             make_file(tmp_path / f"{TMP_PREFIX}future", age=-HOUR)]  # clock skew on a shared file system
    with caplog.at_level(logging.INFO, logger="keep-ingest.store"):
        DirectoryStore(str(tmp_path)).unreachable()
    assert all(p.exists() for p in fresh)
    assert "abandoned" not in caplog.text  # nothing removed, nothing said


def test_a_live_concurrent_writer_keeps_its_file_and_commits(tmp_path):
    live = DirectoryStore(str(tmp_path)).open_block()
    live.write(b"half a block")
    make_file(tmp_path / f"{TMP_PREFIX}dead", age=TMP_MAX_AGE + HOUR)
    other = DirectoryStore(str(tmp_path))  # another worker or run opening the same store
    md5 = stored_block(other, b"other")
    assert [n for n in os.listdir(tmp_path) if n.startswith(TMP_PREFIX)] != []  # the live writer's file
    live.write(b", the rest")
    done = live.commit(hashlib.md5(b"half a block, the rest").hexdigest())
    assert other.get(done.locator) == b"half a block, the rest"
    assert other.verify(md5) == 5
    assert [n for n in os.listdir(tmp_path) if n.startswith(TMP_PREFIX)] == []


def test_block_files_and_other_names_are_never_touched(tmp_path):
    store = DirectoryStore(str(tmp_path))
    md5 = stored_block(store, b"a block")
    block = Path(store.block_path(md5))
    ancient = 365 * 24 * HOUR
    make_file(block, 0, ancient)  # age only: the bytes do not matter to the sweep
    kept = [
        block,
        make_file(tmp_path / md5[:3] / f"{TMP_PREFIX}in-a-prefix-dir", age=ancient),  # not where temp files live
        make_file(tmp_path / md5[:3] / f"{md5}.trash.12345", age=ancient),
        make_file(tmp_path / "tmp-keep-ingest", age=ancient),  # the prefix without the dash
        make_file(tmp_path / "tmpkeep-ingest-x", age=ancient),
        make_file(tmp_path / f"x{TMP_PREFIX}y", age=ancient),
        make_file(tmp_path / ".keep-ingest-get-0123.tmp", age=ancient),
        make_file(tmp_path / "notes.txt", age=ancient),
    ]
    (tmp_path / f"{TMP_PREFIX}dir").mkdir()  # not a regular file
    os.utime(tmp_path / f"{TMP_PREFIX}dir", (time.time() - ancient,) * 2)
    target = make_file(tmp_path / "target", age=ancient)
    os.symlink(target, tmp_path / f"{TMP_PREFIX}link")
    os.utime(tmp_path / f"{TMP_PREFIX}link", (time.time() - ancient,) * 2, follow_symlinks=False)

    DirectoryStore(str(tmp_path)).unreachable()
    assert all(p.exists() for p in kept)
    assert (tmp_path / f"{TMP_PREFIX}dir").is_dir()
    assert (tmp_path / f"{TMP_PREFIX}link").is_symlink() and target.exists()


def test_sweep_runs_once_per_store_on_first_write(tmp_path):
    first = make_file(tmp_path / f"{TMP_PREFIX}first", age=TMP_MAX_AGE + HOUR)
    store = DirectoryStore(str(tmp_path))
    assert first.exists()  # opening alone (e.g. to read) sweeps nothing
    stored_block(store, b"one")
    assert not first.exists()
    second = make_file(tmp_path / f"{TMP_PREFIX}second", age=TMP_MAX_AGE + HOUR)
    stored_block(store, b"two")
    store.unreachable()
    assert second.exists()  # the same store does not sweep again
    stored_block(DirectoryStore(str(tmp_path)), b"three")
    assert not second.exists()


SWEEP_WITHOUT_WRITE_PERMISSION = """
import logging, os, sys
from ingest.keep.dirstore import DirectoryStore
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
store = DirectoryStore(sys.argv[1])
os.chmod(store.root, 0o500)  # now nothing in it can be unlinked
print(store.unreachable())
"""


@pytest.mark.skipif(os.geteuid() == 0 and SETPRIV is None, reason="needs setpriv to drop root's capabilities")
def test_unremovable_temp_file_is_logged_not_raised(tmp_path):
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    stale = make_file(store_dir / f"{TMP_PREFIX}stuck", age=TMP_MAX_AGE + HOUR)
    prefix = [SETPRIV, "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", "--"] \
        if os.geteuid() == 0 else []
    try:
        proc = subprocess.run([*prefix, sys.executable, "-c", SWEEP_WITHOUT_WRITE_PERMISSION, str(store_dir)],
                              capture_output=True, text=True, timeout=20, env=cli_env(tmp_path))
    finally:
        os.chmod(store_dir, 0o700)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "{}"
    assert f"WARNING cannot remove abandoned temporary file {stale}: permission denied" in proc.stderr
    assert "removed" not in proc.stderr
    assert stale.exists()


@pytest.mark.timeout(90)
def test_put_preflight_sweeps_the_store(tmp_path, cli):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"data")
    store_dir = tmp_path / "xdg-data" / "keep-ingest" / "store"  # the default store of cli_env
    store_dir.mkdir(parents=True)
    stale = make_file(store_dir / f"{TMP_PREFIX}killed-worker", 4096, TMP_MAX_AGE + HOUR)
    fresh = make_file(store_dir / f"{TMP_PREFIX}live-writer", 10)
    proc = cli("put", "-v", "--workers", "1", f"{src}/")
    assert proc.returncode == 0, proc.stderr
    assert not stale.exists() and fresh.exists()
    assert f"removed 1 abandoned temporary files (4096 bytes) from block store {store_dir}" in proc.stderr
