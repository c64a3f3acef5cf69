"""bench.measure: a server the command talks to is measured apart from the command."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest

from bench.measure import run_measured

MiB = 1 << 20

# Holds about 200 MiB of touched pages, then burns CPU until killed.
SERVER = """
import sys
held = bytes(range(256)) * (200 * 4096)
print("ready", flush=True)
while True:
    pass
"""


@pytest.fixture
def busy_server():
    proc = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield psutil.Process(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def test_server_figures_are_apart_from_the_command(busy_server):
    m = run_measured([sys.executable, "-c", "import time; time.sleep(1.0)"], servers=[busy_server])
    assert m.returncode == 0
    # The command: a sleeping interpreter, nothing of the server's memory or CPU.
    assert m.peak_rss < 100 * MiB
    assert 0 < m.peak_pss < 100 * MiB
    assert m.cpu_s < 0.5
    # The server, measured in the same run.
    assert m.server_peak_rss is not None and m.server_peak_rss > 190 * MiB
    assert m.server_peak_pss is not None and m.server_peak_pss > 190 * MiB
    assert m.server_cpu_s is not None and m.server_cpu_s > 0.1


def test_no_server_no_server_figures():
    started = time.perf_counter()
    m = run_measured([sys.executable, "-c", "print('hi')"])
    assert m.returncode == 0 and m.stdout == "hi\n"
    assert 0 < m.wall_s <= time.perf_counter() - started
    assert m.peak_rss > 0
    assert m.server_cpu_s is None and m.server_peak_rss is None and m.server_peak_pss is None


# Starts a child after a while that holds about 200 MiB, then waits for it.
LATE_CHILD = """
import subprocess, sys, time
time.sleep(0.3)
child = subprocess.Popen([sys.executable, "-c",
                          "import time; held = bytes(range(256)) * (200 * 4096); time.sleep(1.0)"])
child.wait()
"""


def test_a_child_started_late_is_counted_with_its_parent():
    m = run_measured([sys.executable, "-c", LATE_CHILD])
    assert m.returncode == 0
    assert m.peak_rss > 200 * MiB          # the child's 200 MiB and the parent's interpreter
    assert m.peak_pss > 190 * MiB          # PSS sampled while the child held its memory
