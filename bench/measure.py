"""Run one command and measure it: wall time, CPU seconds, peak memory of its process tree.

* **CPU seconds** are user + system time from ``wait4`` on the command: Linux adds in
  every descendant that was waited for (worker processes joined by the coordinator,
  ``md5sum`` processes reaped by ``xargs``, threads of course), so the whole tree counts.
* **Peak memory** is the largest sum of resident set sizes over the command and all
  its descendants, sampled every ``interval`` seconds with psutil; the list of
  descendants is refreshed every ``TREE_EVERY`` samples (listing them reads every
  process's ``/proc`` entry: every 20 ms it took a tenth of a core). Forked processes
  share some pages, which the RSS sum counts once per process: it is an upper bound.
  The proportional set size (PSS, each shared page divided among its sharers) is
  sampled too, every fifth sample at most, and less often for big processes: it costs
  a walk of their page tables (some 25 ms of kernel time per GiB resident, taken in
  the sampler's process), so the next PSS sample waits at least ``PSS_SPACING`` times
  as long as the last one took, which keeps the sampler under 5% of a core (at
  1,000,000 files every fifth sample took a fifth of a core). Its sum is what the tree
  really holds.
* ``servers`` (a keepstore server the command talks to, which it did not start) are
  measured apart from the command, never added to its figures: their CPU time as a
  before/after difference, their memory (RSS and PSS, summed over each server and its
  descendants) sampled in the same ticks as the command's, with its own peak.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import psutil

PSS_SPACING = 20   # the wait before the next PSS sample, in multiples of the last one's cost
TREE_EVERY = 5     # samples between two listings of the command's process tree


@dataclass
class Measurement:
    """What one run of a command cost; the ``server_*`` figures are None without servers."""

    wall_s: float
    cpu_s: float         # the command's process tree alone
    peak_rss: int        # bytes, RSS summed over the command's tree
    peak_pss: int        # bytes, PSS summed over the command's tree (0 where unavailable)
    returncode: int
    stdout: str
    stderr: str
    server_cpu_s: float | None = None   # the servers' CPU seconds during the run
    server_peak_rss: int | None = None  # bytes, RSS summed over the servers (and their children)
    server_peak_pss: int | None = None  # bytes, PSS likewise


def _tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _memory(procs: Sequence[psutil.Process], with_pss: bool) -> tuple[int, int]:
    """(RSS sum, PSS sum or 0) over ``procs``."""
    rss = pss = 0
    for proc in procs:
        try:
            rss += proc.memory_info().rss
            if with_pss:
                pss += proc.memory_full_info().pss
        except (psutil.Error, AttributeError):
            pass    # exited between listing and reading, or no PSS on this system
    return rss, pss


class _Sampler(threading.Thread):
    """Samples the summed RSS (and PSS) of a process tree, and of the servers apart, until stopped."""

    def __init__(self, pid: int, servers: Sequence[psutil.Process], interval: float):
        super().__init__(name="rss-sampler", daemon=True)
        self.root = psutil.Process(pid)
        self.servers = list(servers)
        self.interval = interval
        self.peak = self.peak_pss = 0
        self.server_peak = self.server_peak_pss = 0
        self.samples = 0
        self.next_pss = 0.0      # time.monotonic() from which the next PSS sample may be taken
        self.procs: list[psutil.Process] = []
        self.server_procs: list[psutil.Process] = []
        self.stop = threading.Event()

    def _sample(self) -> None:
        started = time.monotonic()
        with_pss = self.samples % 5 == 0 and started >= self.next_pss
        if self.samples % TREE_EVERY == 0:
            self.procs = _tree(self.root)
            self.server_procs = [p for s in self.servers for p in _tree(s)]
        rss, pss = _memory(self.procs, with_pss)
        self.peak = max(self.peak, rss)
        self.peak_pss = max(self.peak_pss, pss)
        if self.servers:
            rss, pss = _memory(self.server_procs, with_pss)
            self.server_peak = max(self.server_peak, rss)
            self.server_peak_pss = max(self.server_peak_pss, pss)
        if with_pss:
            self.next_pss = started + PSS_SPACING * (time.monotonic() - started)
        self.samples += 1

    def run(self) -> None:
        while not self.stop.is_set():
            self._sample()
            self.stop.wait(self.interval)


def _cpu(proc: psutil.Process) -> float:
    """User + system seconds of ``proc``, with those of its children it has waited for."""
    times = proc.cpu_times()
    return times.user + times.system + times.children_user + times.children_system


def run_measured(cmd: Sequence[str], env: Mapping[str, str] | None = None,
                 servers: Sequence[psutil.Process] = (), interval: float = 0.02,
                 cwd: str | None = None) -> Measurement:
    """Run ``cmd`` to completion and measure it, and ``servers`` apart (see the module docstring)."""
    server_cpu0 = [_cpu(p) for p in servers]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                env=dict(env) if env is not None else None, cwd=cwd)
        sampler = _Sampler(proc.pid, servers, interval)
        sampler.start()
        # wait4 (not Popen.wait) for the rusage of the whole waited-for tree.
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        sampler.stop.set()
        sampler.join()
        server_cpu = sum(_cpu(p) - c0 for p, c0 in zip(servers, server_cpu0, strict=True))
        out.seek(0)
        err.seek(0)
        m = Measurement(wall, usage.ru_utime + usage.ru_stime, sampler.peak, sampler.peak_pss,
                        proc.returncode, out.read().decode(errors="replace"),
                        err.read().decode(errors="replace"))
        if servers:
            m.server_cpu_s = round(server_cpu, 3)   # psutil counts in clock ticks: no float noise
            m.server_peak_rss = sampler.server_peak
            m.server_peak_pss = sampler.server_peak_pss
        return m
