"""get and verify hold a bounded number of blocks: peak memory does not grow with the tree."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
from conftest import cli_env
from trees import MiB, fill

BLOCK = 4 * MiB


def peak_rss(tmp_path, *args: str) -> int:
    """Run the CLI; sample the summed RSS of it and its workers until it exits."""
    proc = subprocess.Popen([sys.executable, "-m", "ingest", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=cli_env(tmp_path))
    peak, parent = 0, psutil.Process(proc.pid)
    try:
        while proc.poll() is None:
            try:
                peak = max(peak, sum(p.memory_info().rss for p in [parent, *parent.children(recursive=True)]))
            except psutil.Error:
                pass
            time.sleep(0.005)
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    return peak


def test_peak_memory_of_get_and_verify_does_not_grow_with_the_tree(cli, tmp_path):
    fast = tmp_path / "no-fsync.toml"
    fast.write_text("[store]\nfsync = false\n")
    store = ("--config", str(fast), "--store", str(tmp_path / "store"))
    peaks = {}
    for label, count in (("16 MiB", 1), ("128 MiB", 8)):
        src = tmp_path / label.replace(" ", "")
        for i in range(count):  # distinct content: every block is a different block
            fill(src / f"f{i}", 16 * MiB, f"{label}-{i}")
        manifest = tmp_path / f"{label}.txt"
        proc = cli("put", "-q", *store, "--block-size", str(BLOCK), "--manifest-out", str(manifest),
                   str(src) + "/")
        assert proc.returncode == 0, proc.stderr
        peaks["get " + label] = peak_rss(tmp_path, "get", *store, "--workers", "2", str(manifest),
                                         str(tmp_path / f"dest-{count}"))
        peaks["verify " + label] = peak_rss(tmp_path, "verify", *store, "--workers", "2", str(manifest),
                                            f"{src}/")
    print("peak RSS, parent + 2 workers:", {k: f"{v / MiB:.0f} MiB" for k, v in peaks.items()})
    for cmd in ("get", "verify"):
        assert peaks[f"{cmd} 128 MiB"] < peaks[f"{cmd} 16 MiB"] * 1.2 + 2 * BLOCK
    assert max(peaks.values()) < 250 * MiB
