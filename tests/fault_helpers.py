"""Helpers shared by the fault tests (``test_faults_*.py``).

``run_cli`` runs ``keep-ingest`` in a session of its own, so the run and every
worker it forks share one process group: whatever is left of that group when the
run ends (or times out, or the test fails) is killed, and reported in
``Run.leftovers`` so a test can insist there was nothing to kill.
"""

from __future__ import annotations

import glob
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from conftest import cli_env

from ingest.journal import iter_records
from ingest.keep.client import KeepClient
from ingest.keep.locator import Locator
from ingest.manifest import parse_manifest


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    leftovers: list[int] = field(default_factory=list)  # pids that outlived the run (killed)


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getpgid(int(entry)) == pgid:
                members.append(int(entry))
        except (ProcessLookupError, PermissionError):
            pass
    return members


def _reap_group(pgid: int, grace: float = 5.0) -> list[int]:
    """Wait up to ``grace`` s for the group to empty; SIGKILL and return what is left."""
    deadline = time.monotonic() + grace
    members = _group_members(pgid)
    while members and time.monotonic() < deadline:
        time.sleep(0.05)
        members = _group_members(pgid)
    if members:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return members


def run_cli(tmp_path: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 60,
            user: tuple[int, int] | None = None, preexec_fn: Callable[[], None] | None = None,
            cwd: str | None = None) -> Run:
    """Run ``keep-ingest ARGS`` (optionally as ``user`` = (uid, gid)); always cleaned up."""
    kwargs: dict = {"preexec_fn": preexec_fn}
    if user is not None:
        kwargs.update(user=user[0], group=user[1], extra_groups=[])
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "ingest", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, encoding="utf-8",
                            env=cli_env(tmp_path, env), cwd=cwd, start_new_session=True, **kwargs)
    leftovers: list[int] = []
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        err += f"\n[test: killed after {timeout} s]"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        leftovers = _reap_group(proc.pid)
    return Run(proc.returncode, out, err, time.monotonic() - started, leftovers)


def journaled_locators(state_home: Path) -> list[str]:
    """Locators of every block record in every run journal under ``state_home``."""
    locs = []
    for path in sorted(glob.glob(str(state_home / "keep-ingest" / "runs" / "*" / "journal"))):
        locs += [r["loc"] for r in iter_records(path) if r["t"] == "block"]
    return locs


def good_copies(md5: str, size: int, volumes: Iterable[Path]) -> int:
    """How many volumes hold a whole, correct copy of the block (its file hashes to md5)."""
    n = 0
    for vol in volumes:
        path = Path(vol) / md5[:3] / md5
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue
        if len(data) == size and hashlib.md5(data).hexdigest() == md5:
            n += 1
    return n


def assert_journal_holds_only_stored_blocks(state_home: Path, volumes: Sequence[Path],
                                            replication: int = 1) -> list[str]:
    """Every journaled block really is in the volumes, whole, with enough copies."""
    locs = journaled_locators(state_home)
    for loc in locs:
        parsed = Locator.parse(loc)
        copies = good_copies(parsed.md5, parsed.size, volumes)
        assert copies >= replication, f"journal lists {loc} but {copies} good copies are stored"
    return locs


def block_files(root: Path) -> list[Path]:
    """Files under a directory store that have a final block name (prefix dir/32 hex)."""
    return [p for p in root.glob("*/*") if len(p.name) == 32 and p.parent.name == p.name[:3]]


def assert_no_partial_blocks(root: Path) -> list[Path]:
    """Every file under a final block name is whole, and no temporary file is left."""
    files = block_files(root)
    for p in files:
        assert hashlib.md5(p.read_bytes()).hexdigest() == p.name, f"partial or corrupt block {p}"
    temps = [p for p in root.rglob("*") if p.is_file() and p not in files]
    assert temps == [], f"files left in the store besides blocks: {temps}"
    return files


def read_back(manifest_text: str, services: Sequence[str]) -> dict[str, bytes]:
    """Every file of a manifest, read from Keep services with our client (MD5-checked)."""
    client = KeepClient(list(services), None, retries=0)
    try:
        out: dict[str, bytes] = {}
        cache: dict[str, bytes] = {}
        for path, segs in parse_manifest(manifest_text).files():
            parts = []
            for seg in segs:
                if seg.locator not in cache:
                    cache[seg.locator] = client.get(seg.locator)
                parts.append(cache[seg.locator][seg.offset:seg.offset + seg.length])
            out[path] = b"".join(parts)
        return out
    finally:
        client.close()


def fast_profile(path: Path, retries: int = 3, backoff_start: float = 0.05) -> str:
    """A profile with quick retries, for services that are keepstores (``disk``: one
    copy each, so each PUT the tests count is a block's); returns its path for ``--config``."""
    path.write_text(f"[store]\nretries = {retries}\nbackoff_start = {backoff_start}\nservice_type = \"disk\"\n")
    return str(path)
