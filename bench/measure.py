"""Run one command and measure it: wall time, CPU seconds, peak memory of its process tree.

* **CPU seconds** are user + system time from ``wait4`` on the command: Linux adds in
  every descendant that was waited for (worker processes joined by the coordinator,
  ``md5sum`` processes reaped by ``xargs``, threads of course), so the whole tree counts.
* **Peak memory** is the largest sum of resident set sizes over the command and all
  its descendants, sampled every ``interval`` seconds with psutil. Forked processes
  share some pages, which the RSS sum counts once per process: it is an upper bound.
  The proportional set size (PSS, each shared page divided among its sharers) is
  sampled too, every fifth sample (it costs a page-table walk); its sum is what the
  tree really holds.
* ``extra`` processes (a keepstore server the command talks to) are included in both:
  their CPU time as a before/after difference, their memory in every sample.
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


@dataclass
class Measurement:
    """What one run of a command cost."""

    wall_s: float
    cpu_s: float
    peak_rss: int        # bytes, RSS summed over the tree
    peak_pss: int        # bytes, PSS summed over the tree (0 where unavailable)
    returncode: int
    stdout: str
    stderr: str


class _Sampler(threading.Thread):
    """Samples the summed RSS of a process tree (plus extra processes) until stopped."""

    def __init__(self, pid: int, extra: Sequence[psutil.Process], interval: float):
        super().__init__(name="rss-sampler", daemon=True)
        self.root = psutil.Process(pid)
        self.extra = list(extra)
        self.interval = interval
        self.peak = 0
        self.peak_pss = 0
        self.samples = 0
        self.stop = threading.Event()

    def _sample(self) -> None:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            procs = []
        total = pss = 0
        with_pss = self.samples % 5 == 0
        for proc in (*procs, *self.extra):
            try:
                total += proc.memory_info().rss
                if with_pss:
                    pss += proc.memory_full_info().pss
            except (psutil.Error, AttributeError):
                pass    # exited between listing and reading, or no PSS on this system
        self.peak = max(self.peak, total)
        self.peak_pss = max(self.peak_pss, pss)
        self.samples += 1

    def run(self) -> None:
        while not self.stop.is_set():
            self._sample()
            self.stop.wait(self.interval)


def _cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def run_measured(cmd: Sequence[str], env: Mapping[str, str] | None = None,
                 extra: Sequence[psutil.Process] = (), interval: float = 0.02,
                 cwd: str | None = None) -> Measurement:
    """Run ``cmd`` to completion and measure it (see the module docstring)."""
    extra_cpu0 = [_cpu(p) for p in extra]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                env=dict(env) if env is not None else None, cwd=cwd)
        sampler = _Sampler(proc.pid, extra, interval)
        sampler.start()
        # wait4 (not Popen.wait) for the rusage of the whole waited-for tree.
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        sampler.stop.set()
        sampler.join()
        cpu = usage.ru_utime + usage.ru_stime
        cpu += sum(_cpu(p) - c0 for p, c0 in zip(extra, extra_cpu0, strict=True))
        out.seek(0)
        err.seek(0)
        return Measurement(wall, cpu, sampler.peak, sampler.peak_pss, proc.returncode,
                           out.read().decode(errors="replace"), err.read().decode(errors="replace"))
