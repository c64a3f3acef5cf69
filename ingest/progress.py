"""Progress of a run: counters, and the displays that show them.

One :class:`Tracker` per run counts blocks, files and bytes as the store confirms
them, and each worker's throughput; at a fixed interval it hands a
:class:`Snapshot` to a display: a live terminal display (rich), JSON lines for
scripts and log collectors, arv-put's ``--batch-progress`` lines, or nothing.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import IO, Protocol

MODES = ("auto", "tty", "json", "batch", "none")


@dataclass
class Snapshot:
    """The counters at one moment; ``done`` on the last one."""

    elapsed: float
    bytes_done: int
    bytes_total: int
    files_done: int
    files_total: int
    blocks_done: int
    blocks_total: int
    bytes_uploaded: int
    bytes_reused: int
    rate: float                  # bytes per second, recent
    eta: float | None            # seconds, when a rate is known
    workers: dict[str, float] = field(default_factory=dict)  # worker -> bytes per second, recent
    done: bool = False


class Display(Protocol):
    def show(self, snap: Snapshot) -> None:
        """Show the counters now."""

    def close(self, snap: Snapshot) -> None:
        """Show the final counters and release the output."""

    def close_quietly(self) -> None:
        """Release the output without showing anything (after an error)."""


class NoDisplay:
    def show(self, snap: Snapshot) -> None:
        pass

    def close(self, snap: Snapshot) -> None:
        pass

    def close_quietly(self) -> None:
        pass


class JsonLines:
    """One JSON object per line, at each interval and once at the end (``done``)."""

    def __init__(self, stream: IO[str]):
        self.stream = stream

    def show(self, snap: Snapshot) -> None:
        self.stream.write(json.dumps(asdict(snap)) + "\n")
        self.stream.flush()

    def close(self, snap: Snapshot) -> None:
        self.show(snap)

    def close_quietly(self) -> None:
        self.stream.flush()


class BatchLines(JsonLines):
    """arv-put's ``--batch-progress`` format: ``<prog> <pid>: <done> written <total> total``."""

    def show(self, snap: Snapshot) -> None:
        self.stream.write(f"keep-ingest {os.getpid()}: {snap.bytes_done} written {snap.bytes_total} total\n")
        self.stream.flush()


def human_bytes(n: float) -> str:
    """``1.5 MiB`` style sizes for people."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class Terminal:
    """A live display on a terminal: bar, bytes and files, rate, ETA, per-worker rates."""

    def __init__(self, stream: IO[str]):
        # rich is imported only here, for a live display: runs without one start without it.
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

        self.console = Console(file=stream)
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                                 TextColumn("{task.fields[detail]}"), console=self.console,
                                 transient=True, auto_refresh=False)
        self.task = self.progress.add_task("uploading", total=1, detail="")
        self.progress.start()

    def show(self, snap: Snapshot) -> None:
        eta = f"ETA {snap.eta:.0f} s" if snap.eta is not None else "ETA -"
        workers = "  ".join(f"{name.split('@')[0]} {human_bytes(rate)}/s" for name, rate in sorted(snap.workers.items()))
        detail = (f"{human_bytes(snap.bytes_done)}/{human_bytes(snap.bytes_total)}  "
                  f"files {snap.files_done}/{snap.files_total}  {human_bytes(snap.rate)}/s  {eta}"
                  + (f"\n  {workers}" if workers else ""))
        self.progress.update(self.task, total=max(snap.bytes_total, 1), completed=snap.bytes_done, detail=detail)
        self.progress.refresh()

    def close(self, snap: Snapshot) -> None:
        self.progress.stop()

    def close_quietly(self) -> None:
        self.progress.stop()


def make_display(mode: str, quiet: bool, stream: IO[str] | None = None) -> Display:
    """The display for a ``--progress`` mode; ``auto`` means a terminal display on a tty."""
    out = stream or sys.stderr
    if mode == "auto":
        mode = "tty" if out.isatty() and not quiet else "none"
    if mode == "tty":
        return Terminal(out)
    if mode == "json":
        return JsonLines(out)
    if mode == "batch":
        return BatchLines(out)
    return NoDisplay()


class Tracker:
    """Counts a run's progress and feeds its display every ``interval`` seconds."""

    def __init__(self, display: Display, files_total: int, bytes_total: int, blocks_total: int,
                 files_ending: list[int], interval: float = 1.0):
        self.display = display
        self.files_total, self.bytes_total, self.blocks_total = files_total, bytes_total, blocks_total
        self.files_ending = files_ending      # per block: files whose last byte is in it
        self.files_done = files_total - sum(files_ending)  # empty files are done from the start
        self.blocks_done = self.bytes_uploaded = self.bytes_reused = 0
        self.interval = interval
        self.started = time.monotonic()
        self._last = self.started
        self._last_bytes = 0
        self._rate = 0.0
        self._worker_bytes: dict[str, int] = {}
        self._worker_last: dict[str, int] = {}

    def block_done(self, index: int, size: int, reused: bool) -> None:
        self.blocks_done += 1
        self.files_done += self.files_ending[index]
        if reused:
            self.bytes_reused += size
        else:
            self.bytes_uploaded += size

    def worker_bytes(self, worker: str, n: int) -> None:
        self._worker_bytes[worker] = self._worker_bytes.get(worker, 0) + n

    def snapshot(self, done: bool = False) -> Snapshot:
        now = time.monotonic()
        dt = max(now - self._last, 1e-6)
        moved = self.bytes_uploaded - self._last_bytes
        self._rate = moved / dt if self._rate == 0 else 0.7 * self._rate + 0.3 * moved / dt
        workers = {w: (b - self._worker_last.get(w, 0)) / dt for w, b in self._worker_bytes.items()}
        self._worker_last = dict(self._worker_bytes)
        self._last, self._last_bytes = now, self.bytes_uploaded
        bytes_done = self.bytes_uploaded + self.bytes_reused
        left = self.bytes_total - bytes_done
        return Snapshot(round(now - self.started, 3), bytes_done, self.bytes_total, self.files_done,
                        self.files_total, self.blocks_done, self.blocks_total, self.bytes_uploaded,
                        self.bytes_reused, round(self._rate, 1),
                        round(left / self._rate, 1) if self._rate > 0 else None,
                        {w: round(r, 1) for w, r in workers.items()}, done)

    def tick(self) -> None:
        """Show a snapshot if the interval has passed."""
        if time.monotonic() - self._last >= self.interval:
            self.display.show(self.snapshot())

    def close(self) -> Snapshot:
        final = self.snapshot(done=True)
        self.display.close(final)
        return final
