"""Worker and coordinator deaths, unreadable and changing files: the run's own faults."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest
from conftest import SETPRIV, finish, free_port, kill_all, make_link_keys, processes_tagged, spawn_cli
from trees import MiB, fill, make_mixed_tree

from ingest.journal import iter_records

pytestmark = pytest.mark.fault







def wait_for(condition, timeout: float, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return False


def journaled(base: Path) -> int:
    """Blocks the run has checkpointed so far."""
    return sum(1 for j in (base / "state" / "runs").glob("*/journal")
               for r in iter_records(str(j)) if r["t"] == "block")


@pytest.fixture
def src(tmp_path):
    return make_mixed_tree(tmp_path / "src", 6, 6 * MiB, 40, 3000)


@pytest.fixture(params=["local-reads", "streamed"])
def mode(request, tmp_path) -> list[str]:
    """Options for each way blocks reach local workers (see ingest.coordinator)."""
    if request.param == "local-reads":
        return []
    profile = tmp_path / "streamed.toml"
    profile.write_text("[put]\nlocal_reads = false\n")
    return ["--config", str(profile)]


def put_args(base: Path, *extra: str) -> list[str]:
    return ["put", "--store", str(base / "store"), "--state-dir", str(base / "state"),
            "--block-size", str(MiB), "--chunk-size", "65536", *extra]


def reference(cli, tmp_path: Path, src: Path) -> str:
    base = tmp_path / "ref"
    proc = cli(*put_args(base), str(src))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_a_worker_killed_mid_block_is_replaced_and_the_manifest_is_unchanged(cli, tmp_path, src, mode):
    expected = reference(cli, tmp_path, src)
    base = tmp_path / "run"
    proc = spawn_cli(base, *put_args(base, *mode, "--workers", "2", "-v"), str(src))
    try:
        assert wait_for(lambda: len(psutil.Process(proc.pid).children()) >= 2, 30)
        # wait until some blocks are stored, then kill one worker in the middle of its work
        assert wait_for(lambda: journaled(base) >= 3, 30)
        victim = psutil.Process(proc.pid).children()[0]
        victim.kill()
        code, out, err = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, err
    assert out == expected
    assert f"worker process {victim.pid} died" in err and "started a replacement" in err


def test_when_every_worker_is_gone_the_run_fails_clearly_with_a_valid_journal(cli, tmp_path, src):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    profile = tmp_path / "p.toml"
    profile.write_text("[put]\nworker_timeout = 3\nheartbeat_timeout = 2\n")
    base = tmp_path / "run"
    make_link_keys(base)
    coordinator = spawn_cli(base, *put_args(base, "--config", str(profile), "--workers", "0",
                                        "--listen", endpoint), str(src))
    worker = spawn_cli(base, "worker", "--connect", endpoint)
    try:
        assert wait_for(lambda: journaled(base) >= 2, 30)
        worker.kill()
        code, _, err = finish(coordinator, timeout=60)
    finally:
        kill_all(coordinator, worker)
    assert code == 1
    assert "lost (" in err and "no worker connected within 3 s" in err
    # the journal is valid and only holds stored blocks: a local run resumes from it
    journal = next((base / "state" / "runs").glob("*/journal"))
    for record in iter_records(str(journal)):
        if record["t"] == "block":
            md5 = record["loc"][:32]
            assert (base / "store" / md5[:3] / md5).is_file()
    resumed = cli(*put_args(base, "--json", "-q"), str(src))
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["bytes_reused"] > 0


def test_local_workers_exit_by_themselves_when_the_coordinator_dies(tmp_path, src):
    tag = f"run-{uuid.uuid4()}"
    base = tmp_path / "run"
    proc = spawn_cli(base, *put_args(base, "--workers", "2"), str(src), env={"KEEP_INGEST_TEST_TAG": tag})
    try:
        assert wait_for(lambda: len(processes_tagged(tag)) >= 3, 30)
        proc.kill()
        proc.wait()
        # The README promises half a second; allow for a loaded machine (it took 4 s before).
        assert wait_for(lambda: processes_tagged(tag) == [], 2.5), "orphan workers"
    finally:
        for pid in processes_tagged(tag):
            os.kill(pid, signal.SIGKILL)


def test_a_remote_worker_exits_when_its_coordinator_goes_silent(tmp_path, src):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    profile = tmp_path / "p.toml"
    profile.write_text("[put]\nheartbeat_timeout = 2\n")
    base = tmp_path / "run"
    make_link_keys(base)
    worker = spawn_cli(base, "worker", "--connect", endpoint)
    coordinator = spawn_cli(base, *put_args(base, "--config", str(profile), "--workers", "0",
                                        "--listen", endpoint), str(src))
    try:
        assert wait_for(lambda: journaled(base) >= 1, 30)  # the worker is at work
        coordinator.kill()
        coordinator.wait()
        started = time.monotonic()
        code, _, err = finish(worker, timeout=30)
        assert code == 1 and "is gone" in err
        assert time.monotonic() - started < 10
    finally:
        kill_all(coordinator, worker)


@pytest.mark.skipif(SETPRIV is None, reason="needs setpriv to drop root's capabilities")
def test_unreadable_file_fails_after_the_rest_is_stored_or_is_skipped_with_exit_3(tmp_path, src, mode):
    locked = src / "small" / "s7"
    locked_dir = src / "closed"
    fill(locked_dir / "x", 10, "x")
    locked.chmod(0)
    locked_dir.chmod(0)
    base = tmp_path / "run"
    code, out, err = finish(spawn_cli(base, *put_args(base, *mode), str(src), unprivileged=True))
    assert code == 1 and out == ""
    assert f"{locked}: Permission denied" in err and f"{locked_dir}: Permission denied" in err
    assert "everything else is stored and checkpointed" in err
    code, out, err = finish(spawn_cli(base, *put_args(base, *mode, "--skip-unreadable", "--json", "-q"), str(src),
                                  unprivileged=True))
    assert code == 3, err
    result = json.loads(out)
    assert {u["path"] for u in result["unreadable"]} == {str(locked), str(locked_dir)}
    assert result["bytes_reused"] > 0  # the first run's blocks were checkpointed
    manifest = finish(spawn_cli(base, *put_args(base, *mode, "--skip-unreadable", "-q"), str(src),
                            unprivileged=True))[1]
    assert ":s7" not in manifest and "closed" not in manifest and ":s8" in manifest


def test_a_file_that_keeps_changing_fails_after_bounded_retries(tmp_path, src, mode):
    growing = src / "big0"
    stop = threading.Event()

    def grow():
        with open(growing, "ab") as f:
            while not stop.is_set():
                f.write(b"x" * 4096)
                f.flush()
                time.sleep(0.002)

    writer = threading.Thread(target=grow)
    writer.start()
    try:
        base = tmp_path / "run"
        code, out, err = finish(spawn_cli(base, *put_args(base, *mode), str(src)), timeout=120)
    finally:
        stop.set()
        writer.join()
    assert code == 1 and out == ""
    assert f"file changed while being read: {growing}" in err and "still changing after 4 attempts" in err
