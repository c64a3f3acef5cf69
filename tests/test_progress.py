"""The progress display: its layout at any width, its counters, and what a person sees
on a real pseudo-terminal of 80 columns during the walk, during the upload and after."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pyte
import pytest
from conftest import SETPRIV, UNPRIVILEGED, cli_env, finish, spawn_cli
from hypothesis import given
from hypothesis import strategies as st
from trees import MiB, fill

from ingest.commands.put import _summary
from ingest.progress import DONE, UPLOAD, WALK, Snapshot, Tracker, clock, render
from ingest.put import PutResult
from ingest.walk import WalkCount

TiB = 1 << 40

# -- the layout ------------------------------------------------------------------------


def upload(**changes) -> Snapshot:
    fields = dict(elapsed=12.3, bytes_done=700 * MiB, bytes_total=2800 * MiB, files_done=1234, files_total=5678,
                  blocks_done=12, blocks_total=44, bytes_uploaded=600 * MiB, bytes_reused=100 * MiB,
                  rate=98.0 * MiB, eta=15.2, workers={"w1": 49.0 * MiB, "w2": 49.0 * MiB}, phase=UPLOAD,
                  files_found=5678, bytes_found=2800 * MiB, bytes_in_flight=120 * MiB, skipped=2, unreadable=1)
    return Snapshot(**{**fields, **changes})


WALKING = Snapshot(2.4, 0, 117 * MiB, 0, 12345, 0, 0, 0, 0, 0.0, None, {}, phase=WALK,
                   files_found=12345, bytes_found=117 * MiB, skipped=2)
HUGE = upload(elapsed=400_000, bytes_done=8 * TiB, bytes_total=999 * TiB, files_done=1_234_567,
              files_total=99_345_678, blocks_done=123_456, blocks_total=16_000_000, bytes_reused=TiB,
              rate=1023.9 * MiB, eta=3_000_000.0, skipped=123_456, unreadable=78_901,
              workers={**{f"w{i}": 30.0 * MiB for i in range(1, 33)}, "node-17.example": 99.0 * MiB})


def test_at_80_columns_the_upload_shows_every_figure_on_four_lines():
    lines = render(upload(), 80)
    assert all(len(line) <= 80 for line in lines), lines
    assert len(lines) == 4, lines
    assert re.fullmatch(r"uploading  29\.2% ━+─+ +elapsed 0:12  ETA 0:15 *", lines[0]), lines[0]
    assert lines[1].split() == ["820.0", "MiB", "of", "2.7", "GiB", "98.0", "MiB/s"]  # stored + in flight
    assert lines[2] == "files 1,234 of 5,678  blocks 12 of 44  reused 100.0 MiB  skipped 2  unreadable 1"
    assert lines[3].split() == ["w1", "49.0", "MiB/s", "w2", "49.0", "MiB/s"]


def test_the_walk_shows_what_it_found_and_a_pulse_instead_of_a_percentage():
    first, second = render(WALKING, 80), render(Snapshot(**{**WALKING.__dict__, "elapsed": 3.1}), 80)
    assert re.fullmatch(r"walking {10}[━─]+ +elapsed 0:02  ETA - *", first[0]), first[0]
    assert first[1].strip() == "117.0 MiB found"
    assert first[2] == "files 12,345 found  skipped 2  unreadable 0"
    assert first[0] != second[0] and len(first[0]) == len(second[0])   # the pulse moves, nothing else does


@pytest.mark.parametrize("width", [20, 33, 40, 49, 50, 60, 79, 80, 100, 200])
@pytest.mark.parametrize("snap", [WALKING, upload(), HUGE, upload(phase=WALK, rate=0.0, eta=None, workers={}),
                                  upload(phase=DONE, bytes_in_flight=0, bytes_done=2800 * MiB)],
                         ids=["walk", "upload", "huge", "check", "done"])
def test_no_line_is_wider_than_the_terminal(width, snap):
    lines = render(snap, width)
    assert lines and all(len(line) <= width for line in lines), lines
    assert lines[0].startswith(("walking", "uploading", "done"))


def test_narrow_terminals_keep_the_essentials_and_drop_the_details():
    lines = render(upload(), 40)
    text = "\n".join(lines)
    for kept in ("uploading", "29.2%", "820.0 MiB of 2.7 GiB", "98.0 MiB/s", "elapsed 0:12", "ETA 0:15",
                 "files 1,234 of 5,678", "skipped 2", "unreadable 1"):
        assert kept in text, (kept, lines)
    assert "blocks" not in text and "w1" not in text
    assert "━" in lines[0]                              # still a bar
    assert "━" not in render(upload(), 20)[0]           # no room for one


def test_many_workers_take_two_lines_then_are_counted():
    lines = render(HUGE, 80)
    workers = [line for line in lines if line.startswith("w1 ")]
    assert len(workers) == 1
    rest = lines[lines.index(workers[0]):]
    assert len(rest) == 2 and re.search(r"  \+\d+ more$", rest[1]), rest
    shown = sum(len(re.findall(r"\S+ +[\d.]+ [KMG]?i?B/s", line)) for line in rest)
    assert shown + int(re.search(r"\+(\d+) more", rest[1]).group(1)) == len(HUGE.workers)


def test_the_layout_keeps_its_place_as_the_numbers_change():
    """Same totals, other figures: every field starts in the same column."""
    snaps = [upload(bytes_done=d, bytes_in_flight=f, files_done=n, blocks_done=b, rate=r, eta=e,
                    elapsed=t, workers={"w1": r / 2, "w2": r / 2})
             for d, f, n, b, r, e, t in [(0, 0, 0, 0, 0.0, None, 0.2), (5 * MiB, 3 * MiB, 7, 0, 900.0, 1e6, 9.0),
                                         (2 * 1024 * MiB, 64 * MiB, 5000, 40, 1e9, 3.0, 4000.0)]]
    layouts = [[[m.start() for m in re.finditer(r"(?<=  )\S|^\S", line)] for line in render(s, 80)] for s in snaps]
    assert all(len(layout) == len(layouts[0]) for layout in layouts)
    first_lines = [render(s, 80)[0] for s in snaps]
    assert len({line.index("ETA") for line in first_lines}) == 1
    assert len({len(PHASE_LINE.fullmatch(line).group(3)) for line in first_lines}) == 1   # the bar's length
    seconds = [render(s, 80)[1] for s in snaps]
    assert len({line.index(" of ") for line in seconds}) == 1 and len({len(line) for line in seconds}) == 1


@given(width=st.integers(1, 300), done=st.integers(0, 1 << 60), flight=st.integers(0, 1 << 60),
       total=st.integers(0, 1 << 60), files=st.integers(0, 10**9), rate=st.floats(0, 1e13),
       elapsed=st.floats(0, 1e8), workers=st.integers(0, 200), phase=st.sampled_from([WALK, UPLOAD, DONE]))
def test_any_figures_fit_any_width(width, done, flight, total, files, rate, elapsed, workers, phase):
    snap = upload(bytes_done=done, bytes_in_flight=flight, bytes_total=total, files_done=files, files_total=files,
                  files_found=files, bytes_found=total, rate=rate, elapsed=elapsed, eta=elapsed, phase=phase,
                  workers={f"w{i}": rate for i in range(workers)})
    lines = render(snap, width)
    assert all(len(line) <= max(width, 20) for line in lines)
    if phase != DONE:
        assert "100.0%" not in lines[0]      # 100% only at the end


def test_clock():
    assert [clock(s) for s in (0, 7.9, 61, 3599, 3600, 99 * 3600 + 59, 100 * 3600, 30 * 86400)] == \
        ["0:00", "0:07", "1:01", "59:59", "1:00:00", "99:00:59", "4d04h", "30d00h"]


# -- the counters ------------------------------------------------------------------------


class Recorder:
    max_interval = float("inf")

    def __init__(self):
        self.shown: list[Snapshot] = []

    def show(self, snap):
        self.shown.append(snap)

    def close(self, snap):
        self.shown.append(snap)

    def close_quietly(self):
        pass


def test_the_tracker_counts_the_walk_then_bytes_as_workers_read_them():
    shown = Recorder()
    tracker = Tracker(shown, interval=1e9)
    tracker.walk_started()
    tracker.walk_progress(WalkCount(files=300, bytes=5 * MiB, skipped=1, unreadable=0))
    walk = tracker.snapshot()
    assert (walk.phase, walk.files_found, walk.bytes_found, walk.files_total, walk.bytes_total, walk.skipped) == \
        (WALK, 300, 5 * MiB, 300, 5 * MiB, 1)
    assert len(shown.shown) == 1 and shown.shown[0].phase == WALK   # shown at once when the walk starts
    tracker.block_done(MiB, 299, reused=True)                        # a block reused while the walk goes on
    tracker.walked(301, 6 * MiB, 2, empty_files=1)                   # one empty file, in no block
    tracker.worker_joined("worker 41@here")
    tracker.worker_bytes("worker 41@here", 3 * MiB)                   # half of block 0, read
    snap = tracker.snapshot()
    assert (snap.phase, snap.bytes_done, snap.bytes_in_flight, snap.files_done) == (UPLOAD, MiB, 3 * MiB, 301 - 1)
    assert list(snap.workers) == ["w1"] and snap.rate == snap.workers["w1"] > 0
    assert snap.eta is not None
    tracker.worker_bytes("worker 41@here", 2 * MiB)
    tracker.worker_stored("worker 41@here", 5 * MiB)
    tracker.block_done(5 * MiB, 1, reused=False)
    final = tracker.close()
    assert (final.phase, final.done, final.bytes_done, final.bytes_total, final.bytes_in_flight, final.files_done,
            final.blocks_done, final.bytes_uploaded, final.bytes_reused) == \
        (DONE, True, 6 * MiB, 6 * MiB, 0, 301, 2, 5 * MiB, MiB)


def test_workers_are_named_w1_w2_or_by_their_host_and_rates_add_up():
    tracker = Tracker(Recorder())
    tracker.walk_started()
    tracker.walked(1, 100 * MiB, 1, empty_files=0)
    for key in ("a", "b", "c"):
        tracker.worker_joined(key)
    tracker.worker_joined("r1", host="gpu7.example")
    tracker.worker_joined("r2", host="gpu7.example")
    tracker.worker_joined("r3", host="\x1b[2J\x1b]0;owned\x07evil host")   # a remote worker says what it likes
    tracker.worker_dropped("b", left=True)
    tracker.worker_joined("d")                                            # takes the free name
    for i, key in enumerate(("a", "c", "d", "r1", "r2", "r3")):
        tracker.worker_bytes(key, (i + 1) * MiB)
    snap = tracker.snapshot()
    assert set(snap.workers) == {"w1", "w2", "w3", "gpu7.example", "gpu7.example#2", "2J0ownedevilhost"}
    assert snap.rate == pytest.approx(sum(snap.workers.values()), abs=0.11)
    assert snap.bytes_in_flight == 21 * MiB
    tracker.worker_dropped("r1", left=False)       # its block failed: its bytes are to be read again
    tracker.worker_stored("a", 5 * MiB)            # more than it had in flight (after a drop): never below 0
    assert tracker.snapshot().bytes_in_flight == 21 * MiB - 4 * MiB - 1 * MiB


def test_a_new_attempt_starts_the_counters_again_but_not_the_clock():
    tracker = Tracker(Recorder())
    tracker.walk_started()
    tracker.walked(3, 30, 1, empty_files=0)
    tracker.worker_joined("a")
    tracker.file_unreadable()
    assert tracker.snapshot().unreadable == 1
    started = tracker.started
    tracker.walk_started(left_out=1)                # --skip-unreadable: walk again without it
    tracker.walk_progress(WalkCount(2, 20, 0, 1))   # and a directory that cannot be read
    snap = tracker.snapshot()
    assert (snap.phase, snap.files_total, snap.unreadable, snap.workers) == (WALK, 2, 2, {})
    assert tracker.started == started


def test_the_summary_keeps_every_figure_in_lines_under_80_columns():
    result = PutResult(manifest=None, pdh="0" * 32 + "+1234567890", files=99_999_999, bytes=999 * TiB,
                       blocks=16_777_216, blocks_uploaded=15_000_000, bytes_uploaded=900 * TiB,
                       bytes_reused=99 * TiB, bytes_read=900 * TiB, seconds=86399.99)
    lines = _summary(result, result.pdh).splitlines()
    assert all(len(line) <= 80 for line in lines), [len(line) for line in lines]
    assert lines == ["keep-ingest: 99,999,999 files, 999.0 TiB in 16,777,216 blocks",
                     "  uploaded 900.0 TiB (15,000,000 blocks) in 86399.99 s (10.7 GiB/s)",
                     "  reused 99.0 TiB (1,777,216 blocks)",
                     f"  portable data hash {result.pdh}"]


# -- on a real terminal ------------------------------------------------------------------

COLUMNS, ROWS = 80, 40
PHASE_LINE = re.compile(r"(walking|uploading) +(\d+\.\d%)? ([━─]+)  +elapsed (\S+)  ETA (\S+) *")


def run_in_terminal(tmp_path: Path, *args: str, unprivileged: bool = False) -> tuple[int, bytes, str]:
    """``keep-ingest ARGS`` with stderr on a pseudo-terminal of COLUMNS x ROWS (as a
    person at a terminal has it; no COLUMNS variable) and stdout piped: (exit code,
    every byte the terminal received, stdout)."""
    main, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
    env = {k: v for k, v in cli_env(tmp_path, {"TERM": "xterm-256color"}).items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.Popen([*(UNPRIVILEGED if unprivileged else []), sys.executable, "-m", "ingest", *args],
                            stdin=secondary, stdout=subprocess.PIPE, stderr=secondary, env=env)
    os.close(secondary)
    received = b""
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if select.select([main], [], [], 0.1)[0]:
                try:
                    chunk = os.read(main, 65536)
                except OSError:   # the other end closed
                    break
                if not chunk:
                    break
                received += chunk
            elif proc.poll() is not None:
                break
        out = proc.communicate(timeout=30)[0]
    finally:
        os.close(main)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, received, out.decode()


def frames(received: bytes) -> tuple[list[list[str]], list[str]]:
    """Every screen the live display drew (the screen as each redraw, which starts
    by erasing the last one, begins), and the screen at the end: non-empty lines."""
    screen = pyte.Screen(COLUMNS, ROWS)
    stream = pyte.ByteStream(screen)
    drawn = []
    for piece in re.split(rb"(?=\r\x1b\[2K)", received):
        stream.feed(piece)
        drawn.append([line.rstrip() for line in screen.display if line.strip()])
    return drawn[1:-1], drawn[-1]


def fast_profile(tmp_path: Path) -> str:
    """A redraw at every chance: each walk callback and each turn of the dispatch loop."""
    profile = tmp_path / "fast.toml"
    profile.write_text("[put]\nprogress_interval = 0.000001\n")
    return str(profile)


@pytest.fixture
def tree(tmp_path):
    src = tmp_path / "src"
    for i in range(600):
        fill(src / "small" / f"s{i:03d}", 1000, f"s{i}")
    fill(src / "big.bin", 40 * MiB, "big")
    os.mkfifo(src / "pipe")
    os.symlink("loop2", src / "loop1")
    os.symlink("loop1", src / "loop2")
    return src


def test_a_terminal_shows_the_walk_then_byte_level_upload_then_only_the_summary(tmp_path, tree):
    code, received, out = run_in_terminal(tmp_path, "put", "--config", fast_profile(tmp_path),
                                          "--store", str(tmp_path / "store"), "--chunk-size", "65536",
                                          "--workers", "1", "--portable-data-hash", str(tree))
    drawn, end = frames(received)
    assert code == 0, end
    pdh = out.strip()

    def display(screen: list[str]) -> list[str]:   # the live display: from its phase line on
        starts = [i for i, line in enumerate(screen) if PHASE_LINE.fullmatch(line)]
        return screen[starts[0]:] if starts else []

    shown = [d for d in map(display, drawn) if d]
    assert len(shown) > 10
    # Warnings are printed above the display while it runs, and stay.
    warnings = [f"keep-ingest: WARNING: skipping symlink loop: {tree}/loop1",
                f"keep-ingest: WARNING: skipping symlink loop: {tree}/loop2",
                f"keep-ingest: WARNING: skipping FIFO: {tree}/pipe"]
    def above(screen: list[str]) -> str:          # what is above the display (long lines wrapped)
        return "".join(screen[:len(screen) - len(display(screen))])

    assert any(display(screen) and all(w in above(screen) for w in warnings) for screen in drawn)
    # The walk: files and bytes found so far, no percentage.
    walk = [d for d in shown if d[0].startswith("walking")]
    found = [int(m.group(1).replace(",", "")) for d in walk for m in [re.match(r"files ([\d,]+) found", d[2])] if m]
    assert found and max(found) >= 256 and found == sorted(found)
    assert all(not PHASE_LINE.fullmatch(d[0]).group(2) for d in walk)
    # The upload, byte by byte: percentages between the block boundaries (the big
    # file is one block of 40 MiB; the small files make another of 600,000 bytes).
    uploads = [d for d in shown if d[0].startswith("uploading")]
    percents = {PHASE_LINE.fullmatch(d[0]).group(2) for d in uploads}
    assert len({p for p in percents if 2.0 < float(p[:-1]) < 99.0}) >= 3, sorted(percents)
    assert any(PHASE_LINE.fullmatch(d[0]).group(5) != "-" for d in uploads)     # an ETA
    for d in uploads:
        assert re.fullmatch(r" +[\d.]+ [KM]?i?B of 40\.6 MiB +[\d.]+ [KM]?i?B/s", d[1]), d
        assert re.fullmatch(r"files +\d+ of 601  blocks \d of 2  reused 0 B  skipped 3  unreadable 0", d[2]), d
        if len(d) > 3:   # one worker: named w1, and its rate is the run's
            assert d[3].split()[0] == "w1" and d[3].split()[1:] == d[1].split()[-2:], d
    # One layout, 80 columns wide at most (a wider line would have wrapped).
    assert len({d[0].index("ETA") for d in shown}) == 1 and len({len(PHASE_LINE.fullmatch(d[0]).group(3))
                                                                 for d in shown}) == 1
    assert all(len(line) <= COLUMNS for d in shown for line in d)
    assert not any(re.search(r"worker \d+", line) for d in shown for line in d)
    # At the end the display has erased itself: the warnings and the summary are left.
    summary = end[-4:]
    assert "".join(end[:-4]) == "".join(warnings)
    assert [line.split(" (")[0].split(" in ")[0] for line in summary] == [
        "keep-ingest: 601 files, 40.6 MiB", "  uploaded 40.6 MiB", "  reused 0 B", f"  portable data hash {pdh}"]


@pytest.mark.skipif(SETPRIV is None, reason="needs setpriv to drop root's capabilities")
def test_files_that_cannot_be_read_are_counted_as_the_run_goes(tmp_path, tree):
    (tree / "small" / "s007").chmod(0)
    progress = tmp_path / "progress.jsonl"
    code, received, out = run_in_terminal(tmp_path, "put", "--config", fast_profile(tmp_path),
                                          "--store", str(tmp_path / "store"), "--workers", "1",
                                          "--skip-unreadable", "--portable-data-hash", str(tree),
                                          unprivileged=True)
    drawn, end = frames(received)
    assert code == 3, end
    counts = {m.group(1) for screen in drawn for line in screen for m in [re.search(r"unreadable (\d+)$", line)] if m}
    assert counts == {"0", "1"}, counts      # counted when a worker could not read it, and in the walk again
    assert any("skipped 3  unreadable 1" in line for screen in drawn for line in screen)
    assert "keep-ingest: partial: left out 1 unreadable path:" in end
    # The same counts in JSON lines, with the phases.
    code, _, err = finish(spawn_cli(tmp_path, "put", "--store", str(tmp_path / "store2"), "--workers", "1",
                                    "--skip-unreadable", "-q", "--progress", "json", "--progress-file",
                                    str(progress), str(tree), unprivileged=True))
    assert code == 3, err
    lines = [json.loads(line) for line in progress.read_text().splitlines()]
    assert lines[-1]["phase"] == "done" and lines[-1]["unreadable"] == 1 and lines[-1]["skipped"] == 3
