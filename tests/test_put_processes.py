"""Processes and sockets: remote workers over TCP, bounded memory, clean shutdown."""

from __future__ import annotations

import os
import subprocess
import time
import uuid

import psutil
from conftest import finish, free_port, kill_all, processes_tagged, spawn_cli
from trees import MiB, fill


def test_remote_workers_over_tcp_give_the_same_manifest(cli, tmp_path, link_keys):
    src = tmp_path / "src"
    for i in range(20):
        fill(src / f"d{i % 3}" / f"f{i}", 1000 * i + 1, f"f{i}")
    fill(src / "big", 5 * MiB + 3, "big")
    local = cli("put", "--store", str(tmp_path / "s1"), "--block-size", str(MiB), str(src))
    assert local.returncode == 0, local.stderr
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    # Workers may start first: they wait (--wait) for the coordinator to listen.
    workers = [spawn_cli(tmp_path, "worker", "--connect", endpoint, "--wait", "5") for _ in range(2)]
    coordinator = spawn_cli(tmp_path, "put", "--store", str(tmp_path / "s2"), "--block-size", str(MiB),
                        "--workers", "0", "--listen", endpoint, str(src))
    try:
        code, out, err = finish(coordinator)
        assert code == 0, err
        assert out == local.stdout
        # Each worker stops by itself: told STOP by the coordinator (exit 0), or, if it
        # connected only after the run had ended, after --wait with a clear message.
        outcomes = [finish(w, timeout=30) for w in workers]
        for code, _, err in outcomes:
            assert code == 0 or (code == 1 and "no coordinator answered" in err), err
        assert 0 in [code for code, _, _ in outcomes]
    finally:
        kill_all(coordinator, *workers)


def test_worker_without_a_coordinator_gives_up_with_a_clear_message(cli, link_keys):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    proc = cli("worker", "--connect", endpoint, "--wait", "1", timeout=60)
    assert proc.returncode == 1
    assert f"no coordinator answered at {endpoint}" in proc.stderr


def _high_water(pid: int) -> int:
    """A process's peak RSS so far (the kernel's VmHWM), in bytes; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _peak_rss(proc: subprocess.Popen) -> int:
    """The peak RSS of a process and of each of its children, summed, until it exits.

    Each process's own high-water mark is summed, wherever in the run it fell: a short-lived
    child (the walk's) counts in full whether or not a sample met its peak.
    """
    peaks: dict[int, int] = {}
    parent = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            pids = [proc.pid, *(child.pid for child in parent.children(recursive=True))]
        except psutil.Error:
            pids = [proc.pid]
        for pid in pids:
            peaks[pid] = max(peaks.get(pid, 0), _high_water(pid))
        time.sleep(0.01)
    return sum(peaks.values())


def test_peak_memory_does_not_grow_with_the_tree(tmp_path):
    peaks = {}
    # 8 MiB blocks: both trees reach the steady state of 2 busy workers
    for label, count in (("128 MiB", 2), ("1 GiB", 16)):
        src = tmp_path / label.replace(" ", "")
        src.mkdir()
        for i in range(count):  # sparse files: cheap to make, read like any other
            with open(src / f"f{i}", "wb") as f:
                f.truncate(64 * MiB)
        proc = spawn_cli(tmp_path, "put", "-q", "--store", str(tmp_path / "store"), "--workers", "2",
                     "--block-size", str(8 * MiB), "--portable-data-hash", str(src))
        peaks[label] = _peak_rss(proc)
        assert finish(proc)[0] == 0
    print("peak RSS, coordinator + 2 workers:", {k: f"{v / MiB:.0f} MiB" for k, v in peaks.items()})
    # The only data in flight is the credit window: 3 chunks of 4 MiB per worker, held
    # at most twice (sender and receiver). Growth beyond that would mean a leak.
    in_flight = 2 * 2 * 3 * 4 * MiB
    assert peaks["1 GiB"] < peaks["128 MiB"] + in_flight
    assert max(peaks.values()) < 400 * MiB


def _tiny_files(root, count: int) -> None:
    """``count`` distinct 1 KiB files, 1,000 per directory, written cheaply."""
    data = bytes(1024)
    for i in range(count):
        if i % 1000 == 0:
            directory = root / f"d{i // 1000:03d}"
            directory.mkdir(parents=True)
        fd = os.open(directory / f"f{i:06d}", os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, i.to_bytes(8, "little") + data[8:])
        os.close(fd)


def test_peak_memory_does_not_grow_with_the_file_count(tmp_path):
    peaks = {}
    # 64 KiB blocks of 64 files, one MD5 lane: both trees are much larger than the
    # blocks in flight (those the walk is ahead by, those the 2 workers hold: 16 blocks)
    for count in (5_000, 30_000):
        src = tmp_path / str(count)
        _tiny_files(src, count)
        for run in ("fresh", "again"):   # the second run reuses every block
            proc = spawn_cli(tmp_path, "put", "-q", "--store", str(tmp_path / "store"), "--workers", "2",
                             "--state-dir", str(tmp_path / "state"), "--block-size", str(64 << 10),
                             "--portable-data-hash", str(src), env={"KEEP_INGEST_MD5": "hashlib"})
            peaks[count, run] = _peak_rss(proc)
            assert finish(proc)[0] == 0
    print("peak RSS, coordinator, 2 workers and the walk:", {k: f"{v / MiB:.0f} MiB" for k, v in peaks.items()})
    # Nothing is held per file but the files of the blocks in flight: 25,000 more files
    # would take 25 MiB or more if they were (the file list, the plan, the manifest, the index)
    for run in ("fresh", "again"):
        assert peaks[30_000, run] < peaks[5_000, run] + 8 * MiB


def test_no_worker_or_socket_outlives_a_run(cli, tmp_path):
    src = tmp_path / "src"
    fill(src / "f", 3 * MiB, "f")
    tag = f"run-{uuid.uuid4()}"  # inherited by every process the run starts
    proc = cli("put", "--store", str(tmp_path / "store"), "--workers", "3", str(src),
               env={"KEEP_INGEST_TEST_TAG": tag, "TMPDIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    time.sleep(0.2)
    assert processes_tagged(tag) == []
    # the private ipc socket lived in a temporary directory under TMPDIR
    assert not list(tmp_path.glob("keep-ingest-*"))


def test_worker_logs_reach_the_coordinators_stderr(cli, tmp_path):
    src = tmp_path / "src"
    fill(src / "f", 2 * MiB, "f")
    proc = cli("put", "-vv", "--store", str(tmp_path / "store"), "--workers", "2",
               "--block-size", str(MiB), str(src))
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "serving ipc://" in line]
    # a worker that connects after the work is done is turned away before it logs
    assert lines and all(f"storing into {tmp_path / 'store'}" in line for line in lines)
    # and the last words of each, logged just before it exits, are not lost
    assert len([line for line in proc.stderr.splitlines() if "told to stop; exiting" in line]) == len(lines)
    quiet = cli("put", "-q", "--store", str(tmp_path / "store"), str(src))
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_a_run_with_nothing_to_upload_stops_its_just_forked_workers_quietly(cli, tmp_path):
    # Workers are forked before the walk; when nothing needs uploading they are
    # stopped while still starting up, which must never print a traceback.
    src = tmp_path / "src"
    fill(src / "f", 1000, "f")
    args = ("put", "-q", "--store", str(tmp_path / "store"), "--state-dir", str(tmp_path / "state"),
            "--workers", "2", str(src))
    first = cli(*args)
    assert first.returncode == 0 and first.stderr == ""
    for _ in range(10):
        again = cli(*args)
        assert (again.returncode, again.stderr) == (0, ""), again.stderr
        assert again.stdout == first.stdout
