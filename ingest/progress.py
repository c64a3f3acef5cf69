"""Progress of a run: counters, and the displays that show them.

One :class:`Tracker` per run hears what the walk has found so far, then the plan,
then every worker's bytes as it reads or receives them and each block as the store
confirms it. At a fixed interval it hands a :class:`Snapshot` to a display: a live
terminal display (rich, laid out by :func:`render` for the terminal's width), JSON
lines for scripts and log collectors, arv-put's ``--batch-progress`` lines, or
nothing.

A run goes through phases: ``walk`` (files and bytes found so far, while the first
blocks are already reused or uploaded), ``upload`` (the walk is over: totals are
known) and ``done``. Rates are
measured over the last ``RATE_WINDOW`` seconds from the bytes each worker read or
received; the run's rate is the sum of its workers' rates.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import IO, Protocol

from ingest.walk import WalkCount

MODES = ("auto", "tty", "json", "batch", "none")
WALK, UPLOAD, DONE = "walk", "upload", "done"
RATE_WINDOW = 5.0         # seconds of history a rate is measured over


@dataclass
class Snapshot:
    """The counters at one moment; ``done`` on the last one."""

    elapsed: float
    bytes_done: int              # stored or reused (checkpointed); while walking: 0
    bytes_total: int             # while walking: found so far
    files_done: int
    files_total: int             # while walking: found so far
    blocks_done: int
    blocks_total: int
    bytes_uploaded: int
    bytes_reused: int
    rate: float                  # bytes per second the workers read or receive, recent: the sum of ``workers``
    eta: float | None            # seconds, when a rate is known
    workers: dict[str, float] = field(default_factory=dict)  # worker name (w1, w2, a remote host) -> its rate
    done: bool = False
    phase: str = WALK
    files_found: int = 0         # by the walk
    bytes_found: int = 0
    bytes_in_flight: int = 0     # read or received by workers, of blocks not stored yet
    skipped: int = 0             # left out with a warning (symlink loops, FIFOs...)
    unreadable: int = 0          # files and directories that could not be read


class Display(Protocol):
    max_interval: float          # the longest it may go without a new snapshot

    def show(self, snap: Snapshot) -> None:
        """Show the counters now."""

    def close(self, snap: Snapshot) -> None:
        """Show the final counters and release the output."""

    def close_quietly(self) -> None:
        """Release the output without showing anything (after an error)."""


class NoDisplay:
    max_interval = math.inf

    def show(self, snap: Snapshot) -> None:
        pass

    def close(self, snap: Snapshot) -> None:
        pass

    def close_quietly(self) -> None:
        pass


class JsonLines:
    """One JSON object per line, at each interval and once at the end (``done``)."""

    max_interval = math.inf

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
    """arv-put's ``--batch-progress`` format: ``<prog> <pid>: <done> written <total> total``,
    from the upload on (arv-put prints none while it walks either)."""

    def show(self, snap: Snapshot) -> None:
        if snap.phase == WALK:
            return
        self.stream.write(f"keep-ingest {os.getpid()}: {snap.bytes_done} written {snap.bytes_total} total\n")
        self.stream.flush()


def human_bytes(n: float) -> str:
    """``1.5 MiB`` style sizes for people."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


# -- the terminal display's layout ---------------------------------------------------

PHASE_WORDS = {WALK: "walking", UPLOAD: "uploading", DONE: "done"}
MIN_WIDTH = 20            # narrower terminals get lines cut at this width
NARROW = 50               # below this width: no blocks, reused or per-worker lines
BAR_MIN = 10              # a bar narrower than this is left out
WORKER_LINES = 2          # at most, then "+N more"
SIZE_W, RATE_W, CLOCK_W = 10, 12, 7   # "1023.9 MiB", "1023.9 MiB/s", "1:02:03"
PULSE_S = 2.0             # seconds for the walk's pulse to cross the bar


def clock(seconds: float) -> str:
    """``0:07``, ``12:34``, ``1:02:03``; ``3d04h`` past 99 hours."""
    s = int(seconds)
    if s >= 100 * 3600:
        return f"{s // 86400}d{s % 86400 // 3600:02d}h"
    h, m, s = s // 3600, s // 60 % 60, s % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _bar(snap: Snapshot, width: int, unicode: bool) -> str:
    full, empty = ("━", "─") if unicode else ("#", "-")
    if snap.phase == WALK:   # no total yet: a pulse, a sign of life
        size = max(1, width // 5)
        start = int((snap.elapsed % PULSE_S) / PULSE_S * (width + size)) - size
        return "".join(full if start <= i < start + size else empty for i in range(width))
    if snap.phase == DONE or not snap.bytes_total:
        fraction = 1.0 if snap.phase == DONE else 0.0
    else:
        fraction = (snap.bytes_done + snap.bytes_in_flight) / snap.bytes_total
    filled = min(width, int(fraction * width))
    return full * filled + empty * (width - filled)


def _percent(snap: Snapshot) -> str:
    if snap.phase == WALK:
        return ""
    if snap.phase == DONE:
        return "100.0%"
    if not snap.bytes_total:
        return "0.0%"
    # Rounded down and short of 100 until the end, so 100% means done.
    tenths = min(999, math.floor(1000 * (snap.bytes_done + snap.bytes_in_flight) / snap.bytes_total))
    return f"{tenths / 10:.1f}%"


def _count(done: int, total: int) -> str:
    """``  12 of 1,234``: as wide as the total, so the line keeps its layout."""
    text = f"{total:,}"
    return f"{done:>{len(text)},} of {text}"


def _worker_order(name: str) -> tuple[int, int, str]:
    local = re.fullmatch(r"w(\d+)", name)
    return (0, int(local.group(1)), "") if local else (1, 0, name)


def _fields(snap: Snapshot, narrow: bool) -> tuple[list[str], list[str], list[str]]:
    """The fields (never split) of the display's lines after the first: bytes and
    rate; files, blocks, reused and warnings; the workers' rates."""
    warnings = [f"skipped {snap.skipped:,}", f"unreadable {snap.unreadable:,}"]
    if snap.phase == WALK:
        return [f"{human_bytes(snap.bytes_found):>{SIZE_W}} found"], [f"files {snap.files_found:,} found",
                                                                     *warnings], []
    moving = snap.bytes_done + snap.bytes_in_flight
    amounts = [f"{human_bytes(moving):>{SIZE_W}} of {human_bytes(snap.bytes_total)}",
               f"{human_bytes(snap.rate) + '/s':>{RATE_W}}"]
    files = f"files {_count(snap.files_done, snap.files_total)}"
    if narrow:
        return amounts, [files, *warnings], []
    workers = [f"{name} {human_bytes(rate) + '/s':>{RATE_W}}"
               for name, rate in sorted(snap.workers.items(), key=lambda kv: _worker_order(kv[0]))]
    return amounts, [files, f"blocks {_count(snap.blocks_done, snap.blocks_total)}",
                     f"reused {human_bytes(snap.bytes_reused)}", *warnings], workers


def _pack(fields: list[str], width: int, max_lines: int | None = None) -> list[str]:
    """Fields joined by two spaces into lines of at most ``width``; past ``max_lines``
    lines, the fields left out are counted as ``+N more``."""
    rows: list[list[str]] = []
    for f in fields:
        if len(f) > width:
            f = f.strip()   # its padding, first
        if rows and len("  ".join([*rows[-1], f])) <= width:
            rows[-1].append(f)
        else:
            rows.append([f])
    if max_lines is not None and len(rows) > max_lines:
        hidden = sum(len(row) for row in rows[max_lines:])
        rows, last = rows[:max_lines], rows[max_lines - 1]
        while last and len("  ".join([*last, f"+{hidden} more"])) > width:
            last.pop()
            hidden += 1
        last.append(f"+{hidden} more")
    return ["  ".join(row)[:width] for row in rows]


def render(snap: Snapshot, width: int, unicode: bool = True) -> list[str]:
    """The terminal display of a snapshot: lines of at most ``width`` characters (at
    least ``MIN_WIDTH``) whose fields keep their place as the numbers change.

    First line: phase, percentage, bar, elapsed time and ETA (these move to the next
    line when the bar would be too short); then bytes and rate; files, blocks,
    reused, skipped and unreadable; each worker's rate (below ``NARROW`` columns, only
    bytes, rate, times, files and warnings).
    """
    width = max(width, MIN_WIDTH)
    head = f"{PHASE_WORDS[snap.phase]:<9} {_percent(snap):>6}"
    eta = clock(snap.eta) if snap.eta is not None else "-"
    times = [f"{'elapsed ' + clock(snap.elapsed):>{CLOCK_W + 8}}", f"{'ETA ' + eta:<{CLOCK_W + 4}}"]
    amounts, counts, workers = _fields(snap, width < NARROW)
    tail = "  ".join(times)
    if width - len(head) - len(tail) - 3 >= BAR_MIN:
        bar = _bar(snap, width - len(head) - len(tail) - 3, unicode)
        first = f"{head} {bar}  {tail}"
    else:
        amounts += [t.strip() for t in times]
        room = width - len(head) - 1
        first = f"{head} {_bar(snap, room, unicode)}" if room >= BAR_MIN else head
    return [first[:width], *_pack(amounts, width), *_pack(counts, width), *_pack(workers, width, WORKER_LINES)]


class Terminal:
    """A live display on a terminal, redrawn in place; it erases itself at the end.

    While it runs, what is written to stderr (log records: they are written to
    whatever ``sys.stderr`` is then, see ingest.cli) is printed above it.
    """

    max_interval = 0.25      # redrawn at least 4 times a second

    def __init__(self, stream: IO[str]):
        # rich is imported only here, for a live display: runs without one start without it.
        from rich.console import Console
        from rich.live import Live

        self.console = Console(file=stream, highlight=False, soft_wrap=True)
        self.unicode = self.console.encoding.lower().startswith("utf")
        self.live = Live(console=self.console, auto_refresh=False, transient=True, redirect_stdout=False)
        _real_stderr_in_children()
        self.live.start()

    def show(self, snap: Snapshot) -> None:
        from rich.text import Text

        text = Text("\n".join(render(snap, self.console.width, self.unicode)), no_wrap=True, overflow="crop")
        text.highlight_regex("━+" if self.unicode else "#+", "bar.complete")
        self.live.update(text, refresh=True)

    def close(self, snap: Snapshot) -> None:
        self.live.stop()

    def close_quietly(self) -> None:
        self.live.stop()


@functools.cache
def _real_stderr_in_children() -> None:
    """A worker forked while a live display holds stderr writes to the real stderr,
    never through the display (whose state it would share)."""
    def restore() -> None:
        proxied = getattr(sys.stderr, "rich_proxied_file", None)
        if proxied is not None:
            sys.stderr = proxied

    os.register_at_fork(after_in_child=restore)


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


# -- the counters ------------------------------------------------------------------------

_HOST_CHARS = re.compile(r"[^A-Za-z0-9._-]")
HOST_LABEL_MAX = 20


@dataclass
class _Worker:
    label: str
    joined: float
    moved: int = 0          # bytes read or received, ever
    in_flight: int = 0      # of those, in blocks not stored (or dropped) yet


class Tracker:
    """Counts a run's progress and feeds its display every ``interval`` seconds (or
    more often, if the display asks: see ``Display.max_interval``).

    The walk calls ``walk_progress``; ``put`` calls ``walk_started``, ``block_done``
    and ``walked``; the coordinator the ``worker_*`` methods and
    ``file_unreadable``, and ``tick`` on every turn of its loop. A worker is named by
    the caller's key for it; the display names it ``w1``, ``w2``... (local) or by its
    host (remote).
    """

    def __init__(self, display: Display, interval: float = 1.0, started: float | None = None):
        self.display = display
        self.interval = min(interval, display.max_interval)
        self.started = time.monotonic() if started is None else started   # the run's start, by the monotonic clock
        self._shown = -math.inf
        self._reset(left_out=0)

    def _reset(self, left_out: int) -> None:
        self.phase = WALK
        self.found = WalkCount(0, 0, 0, 0)
        self.left_out, self.read_unreadable = left_out, 0
        self.files_total = self.bytes_total = self.blocks_total = 0
        self.files_done = self.blocks_done = self.bytes_uploaded = self.bytes_reused = 0
        self._workers: dict[str, _Worker] = {}
        self._samples: deque[tuple[float, dict[str, int]]] = deque()

    # -- the phases (put) ------------------------------------------------------------

    def walk_started(self, left_out: int = 0) -> None:
        """An attempt at the run walks the sources (again: the counters start over, the
        clock goes on), leaving out ``left_out`` paths found unreadable before; shown at once."""
        self._reset(left_out)
        self.show()

    def walk_progress(self, found: WalkCount) -> None:
        self.found = found
        self.tick()

    def walked(self, files_total: int, bytes_total: int, blocks_total: int, empty_files: int) -> None:
        """The walk is over: the totals are known (empty files, in no block, are done)."""
        self.phase = UPLOAD
        self.files_total, self.bytes_total, self.blocks_total = files_total, bytes_total, blocks_total
        self.files_done += empty_files

    def block_done(self, size: int, files: int, reused: bool) -> None:
        """A block of ``size`` bytes, the last of ``files`` files, is stored or reused."""
        self.blocks_done += 1
        self.files_done += files
        if reused:
            self.bytes_reused += size
        else:
            self.bytes_uploaded += size

    # -- the workers (coordinator) ---------------------------------------------------

    def worker_joined(self, worker: str, host: str | None = None) -> None:
        """A worker connected: local (``host`` None) or remote, from ``host``."""
        labels = {w.label for w in self._workers.values()}
        if host is None:
            n = 1
            while f"w{n}" in labels:
                n += 1
            label = f"w{n}"
        else:
            base = _HOST_CHARS.sub("", host)[:HOST_LABEL_MAX] or "remote"
            label, n = base, 1
            while label in labels:
                n += 1
                label = f"{base}#{n}"
        self._workers[worker] = _Worker(label, time.monotonic())

    def worker_bytes(self, worker: str, n: int) -> None:
        """A worker read or received ``n`` more bytes of its blocks."""
        w = self._workers.get(worker)
        if w is None:
            self.worker_joined(worker)
            w = self._workers[worker]
        w.moved += n
        w.in_flight += n

    def worker_stored(self, worker: str, size: int) -> None:
        """A block of ``size`` bytes that the worker read or received is stored."""
        w = self._workers.get(worker)
        if w is not None:
            w.in_flight = max(0, w.in_flight - size)

    def worker_dropped(self, worker: str, left: bool) -> None:
        """The bytes of a worker's unstored blocks no longer count (they go to be read
        again): a block failed, or the worker ``left`` (its name is free again)."""
        w = self._workers.get(worker)
        if w is not None:
            w.in_flight = 0
            if left:
                del self._workers[worker]

    def file_unreadable(self) -> None:
        """A file could not be read."""
        self.read_unreadable += 1

    # -- snapshots -----------------------------------------------------------------

    def _rates(self, now: float) -> dict[str, float]:
        """Each worker's bytes per second over the last RATE_WINDOW seconds (or since it joined)."""
        self._samples.append((now, {k: w.moved for k, w in self._workers.items()}))
        while len(self._samples) > 2 and now - self._samples[1][0] >= RATE_WINDOW:
            self._samples.popleft()
        since, before = self._samples[0]
        rates = {}
        for key, w in self._workers.items():
            span = now - max(since, w.joined)
            rates[w.label] = (w.moved - before.get(key, 0)) / span if span > 0 else 0.0
        return rates

    def snapshot(self, done: bool = False) -> Snapshot:
        now = time.monotonic()
        rates = {name: round(r, 1) for name, r in self._rates(now).items()}
        rate = round(sum(rates.values()), 1)
        bytes_done = self.bytes_uploaded + self.bytes_reused
        walking = self.phase == WALK
        files_total = self.found.files if walking else self.files_total
        bytes_total = self.found.bytes if walking else self.bytes_total
        in_flight = min(sum(w.in_flight for w in self._workers.values()), max(0, bytes_total - bytes_done))
        eta = None
        if self.phase == UPLOAD and rate > 0:
            eta = round((bytes_total - bytes_done - in_flight) / rate, 1)
        return Snapshot(
            elapsed=round(now - self.started, 3), bytes_done=bytes_done, bytes_total=bytes_total,
            files_done=self.files_done, files_total=files_total, blocks_done=self.blocks_done,
            blocks_total=self.blocks_total, bytes_uploaded=self.bytes_uploaded, bytes_reused=self.bytes_reused,
            rate=rate, eta=eta, workers=rates, done=done, phase=DONE if done else self.phase,
            files_found=self.found.files, bytes_found=self.found.bytes, bytes_in_flight=0 if done else in_flight,
            skipped=self.found.skipped, unreadable=self.left_out + self.found.unreadable + self.read_unreadable)

    def show(self) -> None:
        self._shown = time.monotonic()
        self.display.show(self.snapshot())

    def tick(self) -> None:
        """Show a snapshot if the interval has passed."""
        if time.monotonic() - self._shown >= self.interval:
            self.show()

    def close(self) -> Snapshot:
        final = self.snapshot(done=True)
        self.display.close(final)
        return final
