"""Checkpointed, resumable and incremental runs, through the real CLI."""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
from conftest import cli_env
from trees import MiB, fill

from ingest import md5lanes
from ingest.journal import frame, iter_records, rewrite_journal
from ingest.state import block_key
from tests.journal_rows import record_rows

BLOCK = MiB


def make_tree(root: Path) -> Path:
    """Large files of several blocks and many small files: a multi-block run."""
    for i in range(4):
        fill(root / "big" / f"b{i}", 3 * BLOCK + 1000 * i, f"b{i}")
    for i in range(150):
        fill(root / "small" / f"d{i % 7}" / f"s{i}", 20_000 + 13 * i, f"s{i}")
    return root


def put_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["put", "--store", str(tmp_path / "store"), "--state-dir", str(tmp_path / "state"),
            "--block-size", str(BLOCK), "--workers", "2", *extra]


def put_json(cli, tmp_path, src, *extra):
    proc = cli(*put_args(tmp_path, "--json", "-q", *extra), str(src))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def manifest_of(cli, tmp_path, src, *extra):
    out = tmp_path / "out.manifest"
    put_json(cli, tmp_path, src, "--manifest-out", str(out), *extra)
    return out.read_text()


def fresh_dir(tmp_path: Path, name: str) -> Path:
    """A directory for a run with its own store and state."""
    path = tmp_path / name
    path.mkdir()
    return path


def journaled_blocks(state: Path) -> int:
    runs = state / "runs"
    return sum(1 for j in runs.glob("*/journal") for r in iter_records(str(j)) if r["t"] == "block")


def block_mtimes(store: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()}


@pytest.fixture
def src(tmp_path):
    return make_tree(tmp_path / "src")


def test_rerun_of_a_finished_run_reads_nothing_and_rewrites_no_block(cli, tmp_path, src):
    first = manifest_of(cli, tmp_path, src)
    before = block_mtimes(tmp_path / "store")
    time.sleep(0.01)
    again = put_json(cli, tmp_path, src, "--manifest-out", str(tmp_path / "again"))
    assert again["bytes_read"] == 0 and again["blocks_uploaded"] == 0 and again["bytes_uploaded"] == 0
    assert again["bytes_reused"] == again["bytes"]
    assert (tmp_path / "again").read_text() == first
    assert block_mtimes(tmp_path / "store") == before


def test_incremental_run_uploads_only_what_changed_and_says_why(cli, tmp_path, src):
    manifest_of(cli, tmp_path, src)
    fill(src / "big" / "b2", 3 * BLOCK + 2000 + 5, "b2-grown")   # a large file grows
    fill(src / "zz-new" / "n", 5000, "new")                      # a new file, last in walk order
    result = put_json(cli, tmp_path, src)
    changed = {c["path"]: c["reasons"] for c in result["changed"]}
    assert changed["src/big/b2"][:2] == ["size", "mtime"]
    assert changed["src/zz-new/n"] == ["new"]
    assert "src/big/b0" not in changed and "src/small/d0/s0" not in changed
    # only the grown file's blocks and the last small block (where the new file packs) move
    assert result["bytes_read"] <= (4 * BLOCK) + BLOCK
    # the incremental manifest is byte-identical to a fresh run's on the new tree
    assert manifest_of(cli, tmp_path, src) == manifest_of(cli, fresh_dir(tmp_path, "fresh"), src)


def _touch(*paths: Path) -> None:
    later = time.time_ns() + 10**9
    for path in paths:
        os.utime(path, ns=(later, later))


def test_touched_files_that_hold_the_same_bytes_are_read_alone_and_their_blocks_kept(cli, tmp_path, src):
    first = manifest_of(cli, tmp_path, src)
    small = src / "small"
    touched = [small / "d3" / "s10", small / "d6" / "s139"]         # in two different blocks
    _touch(*touched)
    again = put_json(cli, tmp_path, src, "--manifest-out", str(tmp_path / "again"))
    assert again["blocks_uploaded"] == 0 and again["files_rehashed"] == 2 and again["changed"] == []
    assert again["bytes_read"] == sum(p.stat().st_size for p in touched)
    assert (tmp_path / "again").read_text() == first
    # journaled under the new fingerprints: the next run reads nothing
    third = put_json(cli, tmp_path, src)
    assert third["bytes_read"] == 0 and third["files_rehashed"] == 0 and third["blocks_uploaded"] == 0


def test_a_touched_file_whose_bytes_changed_is_uploaded_and_the_manifest_is_a_fresh_runs(cli, tmp_path, src):
    manifest_of(cli, tmp_path, src)
    edited = src / "small" / "d2" / "s30"
    data = bytearray(edited.read_bytes())
    data[7] ^= 0xFF                                  # same size: only the bytes tell
    edited.write_bytes(bytes(data))
    _touch(edited, src / "small" / "d3" / "s31")     # and one more in the same block, unchanged
    result = put_json(cli, tmp_path, src)
    assert result["blocks_uploaded"] == 1 and result["files_rehashed"] == 0
    changed = {c["path"]: c["reasons"] for c in result["changed"]}
    assert changed["src/small/d2/s30"] == ["mtime", "ctime"]
    assert manifest_of(cli, tmp_path, src) == manifest_of(cli, fresh_dir(tmp_path, "fresh"), src)


def test_touching_much_of_a_block_or_a_large_file_reads_and_stores_it_whole(cli, tmp_path, src):
    manifest_of(cli, tmp_path, src)
    _touch(*sorted((src / "small").rglob("s*")), src / "big" / "b1")
    result = put_json(cli, tmp_path, src)
    assert result["files_rehashed"] == 0
    assert result["blocks_uploaded"] == result["blocks"] - 11   # kept: b0 (3 blocks), b2 and b3 (4 each)
    assert result["bytes_read"] == result["bytes_uploaded"]


def test_verify_content_catches_an_edit_the_fingerprint_misses(cli, tmp_path, src):
    manifest_of(cli, tmp_path, src)
    target = src / "small" / "d3" / "s10"
    data = bytearray(target.read_bytes())
    data[100] ^= 0xFF
    target.write_bytes(bytes(data))
    # Simulate a filesystem whose timestamps did not move: teach the journal the new
    # fingerprint, so that only the content differs from what was stored.
    journal = next((tmp_path / "state" / "runs").iterdir()) / "journal"
    st = target.stat()
    records = list(iter_records(str(journal)))
    for r in records:
        if r["t"] == "block":
            rows = record_rows(r)
            for row in rows:
                if row[0] == "src/small/d3/s10":
                    row[2], row[3] = st.st_mtime_ns, st.st_ctime_ns
            r["rows"] = msgpack.packb(rows)
            r["key"] = block_key(r["rows"])
    rewrite_journal(str(journal), map(frame, records))
    stale = put_json(cli, tmp_path, src)
    assert stale["blocks_uploaded"] == 0  # the hazard: nothing looks changed
    checked = put_json(cli, tmp_path, src, "--verify-content")
    changed = {c["path"]: c["reasons"] for c in checked["changed"]}
    assert changed["src/small/d3/s10"] == ["content"]
    assert checked["blocks_uploaded"] == 1


def test_a_version_1_journal_still_resumes(cli, tmp_path, src):
    """A user upgrading keeps their checkpoint: block records as version 1 wrote them
    (rows and digests as plain lists) are reused, verified and told apart."""
    first = manifest_of(cli, tmp_path, src)
    journal = next((tmp_path / "state" / "runs").iterdir()) / "journal"
    old = [{"t": "block", "loc": r["loc"], "exp": r["exp"], "pieces": record_rows(r),
            "digests": list(struct.unpack(f"<{len(r['digests']) // 8}Q", r["digests"]))}
           if r["t"] == "block" else r for r in iter_records(str(journal))]
    rewrite_journal(str(journal), map(frame, old))
    touched = src / "small" / "d3" / "s10"
    st = touched.stat()
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 1000))
    result = put_json(cli, tmp_path, src, "--verify-content", "--manifest-out", str(tmp_path / "again"))
    changed = {c["path"]: c["reasons"] for c in result["changed"]}
    assert changed.pop("src/small/d3/s10") == ["mtime", "ctime"]
    assert all(reasons == ["repacked"] for reasons in changed.values())   # the others of its block
    assert result["blocks_uploaded"] == 1 and (tmp_path / "again").read_text() == first


def test_second_run_on_the_same_state_exits_75_naming_the_holder(cli, tmp_path, src):
    holder = subprocess.Popen([sys.executable, "-c", f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent.parent)!r})
from ingest.config import load_settings
from ingest.state import RunIdentity, RunState
s = load_settings(None, {{"store.path": ({str(tmp_path / "store")!r}, "-"),
                         "put.block_size": ({BLOCK}, "-"), "state.dir": ({str(tmp_path / "state")!r}, "-")}})
RunState(s.state_dir, RunIdentity.of(s, [{str(src)!r}])).acquire()
print("locked", flush=True)
sys.stdin.read()
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=cli_env(tmp_path))
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = cli(*put_args(tmp_path), str(src))
        assert proc.returncode == 75
        assert f"pid {holder.pid} on" in proc.stderr and "since" in proc.stderr
        holder.kill()          # the holder dies: its lock goes with it
        holder.wait()
        proc = cli(*put_args(tmp_path, "-q", "--portable-data-hash"), str(src))
        assert proc.returncode == 0, proc.stderr
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_damaged_journal_is_reported_and_reset_state_recovers(cli, tmp_path, src):
    first = manifest_of(cli, tmp_path, src)
    journal = next((tmp_path / "state" / "runs").iterdir()) / "journal"
    data = bytearray(journal.read_bytes())
    data[len(data) // 2] ^= 0x10
    journal.write_bytes(bytes(data))
    proc = cli(*put_args(tmp_path), str(src))
    assert proc.returncode == 1 and f"{journal} is damaged" in proc.stderr and "--reset-state" in proc.stderr
    assert manifest_of(cli, tmp_path, src, "--reset-state") == first


def test_missing_journal_just_starts_afresh(cli, tmp_path, src):
    first = manifest_of(cli, tmp_path, src)
    next((tmp_path / "state" / "runs").iterdir()).joinpath("journal").unlink()
    again = put_json(cli, tmp_path, src)
    assert again["bytes_reused"] == 0 and again["bytes_read"] == again["bytes"]
    assert manifest_of(cli, tmp_path, src) == first


def test_state_is_private(cli, tmp_path, src):
    manifest_of(cli, tmp_path, src)
    run_dir = next((tmp_path / "state" / "runs").iterdir())
    assert run_dir.stat().st_mode & 0o777 == 0o700
    assert {p.stat().st_mode & 0o777 for p in run_dir.iterdir()} == {0o600}


def test_dry_run_reads_nothing_and_exits_2_when_pending(cli, tmp_path, src):
    proc = cli(*put_args(tmp_path, "--dry-run"), str(src))
    assert proc.returncode == 2 and "src/big/b0\tnew" in proc.stdout
    manifest_of(cli, tmp_path, src)
    proc = cli(*put_args(tmp_path, "--dry-run"), str(src))
    assert proc.returncode == 0 and proc.stdout == ""
    (src / "small" / "d0" / "s0").write_bytes(b"changed")
    proc = cli(*put_args(tmp_path, "--dry-run", "--json"), str(src))
    assert proc.returncode == 2
    report = json.loads(proc.stdout)
    assert report["bytes_read"] == 0
    assert {"path": "src/small/d0/s0", "reasons": ["size", "mtime", "ctime"]} in report["would_upload"]


def test_sigterm_checkpoints_and_exits_130_then_resumes(cli, tmp_path, src):
    reference = manifest_of(cli, fresh_dir(tmp_path, "ref"), src)
    args = [sys.executable, "-m", "ingest", *put_args(tmp_path, "--workers", "1", "--chunk-size", "65536"),
            str(src)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cli_env(tmp_path))
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if journaled_blocks(tmp_path / "state") >= 1:
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 130, err
    assert "run the same command again to resume" in err and out == ""
    resumed = put_json(cli, tmp_path, src, "--manifest-out", str(tmp_path / "resumed"))
    assert resumed["bytes_reused"] > 0
    assert (tmp_path / "resumed").read_text() == reference


def test_kill_9_at_random_moments_then_resume(cli, tmp_path, src):
    """20 trials: every resumed manifest equals the uninterrupted run's, and the bytes
    uploaded across kill and resume exceed the tree by at most the blocks in flight."""
    reference = manifest_of(cli, fresh_dir(tmp_path, "ref"), src)
    total = sum(f.stat().st_size for f in src.rglob("*") if f.is_file())
    # a worker holds a block in each MD5 lane it reads in, and blocks_per_worker - 1 committing
    workers, blocks_per_worker, lanes = 2, 2, md5lanes.engine().lanes
    in_flight = workers * (lanes + blocks_per_worker - 1) * BLOCK
    rng = random.Random(20261121)
    # how long an uninterrupted run takes here, to spread the kills over it
    t0 = time.monotonic()
    manifest_of(cli, fresh_dir(tmp_path, "timing"), src)
    duration = time.monotonic() - t0
    killed_mid_run = 0
    for trial in range(20):
        base = fresh_dir(tmp_path, f"trial{trial}")
        proc = subprocess.Popen([sys.executable, "-m", "ingest", *put_args(base, "-q"), str(src)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cli_env(base))
        time.sleep(rng.uniform(0, duration))
        proc.kill()
        finished = proc.wait(30) == 0
        killed_mid_run += not finished
        store = base / "store"
        stored_after_kill = sum(p.stat().st_size for p in store.rglob("*")
                                if p.is_file() and not p.name.startswith("tmp-")) if store.exists() else 0
        # a resume never references a block that was not stored
        runs = base / "state" / "runs"
        for journal in runs.glob("*/journal") if runs.exists() else []:
            for record in iter_records(str(journal)):
                if record["t"] == "block":
                    md5 = record["loc"][:32]
                    assert (store / md5[:3] / md5).is_file(), (trial, record["loc"])
        resumed = put_json(cli, base, src, "--manifest-out", str(base / "m"))
        assert (base / "m").read_text() == reference, trial
        assert stored_after_kill + resumed["bytes_uploaded"] <= total + in_flight, trial
    assert killed_mid_run >= 5  # the trials did interrupt real work


def test_status_lists_runs_and_the_lock_holder(cli, tmp_path, src):
    first = put_json(cli, tmp_path, src)
    proc = cli("status", "--state-dir", str(tmp_path / "state"), "--json")
    assert proc.returncode == 0, proc.stderr
    (info,) = [json.loads(line) for line in proc.stdout.splitlines()]
    assert info["sources"] == [str(src)] and info["finished"]["pdh"] == first["pdh"]
    assert info["blocks_stored"] == first["blocks"] and info["bytes_stored"] == first["bytes"]
    assert info["locked"] is False and info["torn_tail"] is False
    human = cli("status", "--state-dir", str(tmp_path / "state")).stdout
    assert f"finished, portable data hash {first['pdh']}" in human
