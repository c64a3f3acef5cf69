"""bench.report, issue 15: re-runs over the walk floor, growth per file, the targets at 1,000,000 files."""

from __future__ import annotations

import pytest

from bench.__main__ import _pdh_mismatches
from bench.datasets import Dataset
from bench.report import MiB, files_scaling, scaling, scaling_text, summarize, table, targets
from bench.report import reruns_table as reruns
from bench.runners import RunResult

SETS = {name: Dataset(name, "/nonexistent", files, files * 1024, f"{files:,} files")
        for name, files in (("tiny", 100_000), ("tiny1m", 1_000_000), ("tiny2m", 2_000_000),
                            ("tiny4m", 4_000_000), ("large", 4))}


def run(row: str, dataset: str, rep: int, wall: float, rss_mib: float, read: int | None = None) -> RunResult:
    pdh = None if row == "walkfloor" else "pdh"
    blocks = None if read is None else -(-read // (64 * MiB))
    return RunResult(row, dataset, rep, wall, wall * 1.1, int(rss_mib * MiB), int(rss_mib * MiB) // 2, pdh,
                     bytes_read=read, blocks_uploaded=blocks)


def million(rep: int, fresh: float, rerun: float, touched: float, floor: float) -> list[RunResult]:
    return [run("ki", "tiny1m", rep, fresh, 1200), run("ki-rerun", "tiny1m", rep, rerun, 2100, 0),
            run("ki-rerun10", "tiny1m", rep, touched, 2200, 10 * 64 * MiB),
            run("walkfloor", "tiny1m", rep, floor, 12)]


RESULTS = million(0, 22.0, 14.0, 17.0, 2.0) + million(1, 23.0, 13.0, 16.0, 2.6)


def by_row(summaries, dataset="tiny1m"):
    return {s.row: s for s in summaries if s.dataset == dataset}


def test_rerun_over_the_floor_is_the_median_of_per_repetition_ratios():
    s = by_row(summarize(RESULTS, SETS))
    assert s["ki-rerun"].vs_floor == pytest.approx((14.0 / 2.0 + 13.0 / 2.6) / 2)
    assert s["ki-rerun10"].vs_floor == pytest.approx((17.0 / 2.0 + 16.0 / 2.6) / 2)
    assert s["ki"].vs_floor is None and s["walkfloor"].vs_floor is None
    assert s["ki-rerun"].bytes_read == 0 and s["ki-rerun"].blocks_uploaded == 0
    assert s["ki-rerun10"].bytes_read == 10 * 64 * MiB and s["ki-rerun10"].blocks_uploaded == 10
    assert s["ki"].files_s == pytest.approx(1_000_000 / 22.5)
    assert s["walkfloor"].peak_mib == 12 and s["ki-rerun10"].peak_mib == 2200


def test_reruns_table_puts_fresh_reruns_and_floor_side_by_side():
    text = reruns(summarize(RESULTS + [run("ki", "large", 0, 4.0, 80)], SETS))
    lines = text.splitlines()
    assert "x floor" in lines[0] and "MB read" in lines[0] and "blocks uploaded" in lines[0]
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    body = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [cells[:2] for cells in body] == [
        ["tiny1m", "keep-ingest (2 workers), dir, fsync"],
        ["tiny1m", "keep-ingest (2 workers), dir, fsync, re-run, nothing changed"],
        ["tiny1m", "keep-ingest (2 workers), dir, fsync, re-run, 10 files touched"],
        ["tiny1m", "walk floor (os.scandir + 1 lstat per file)"]]     # not large: it has no re-run
    assert body[0][3] == "44,444" and body[0][7:] == ["-", "-", "-"]
    assert body[1][2] == "13.50" and body[1][5] == "2100" and body[1][7:] == ["6.00x", "0.0", "0"]
    assert body[2][7:] == [f"{(17.0 / 2.0 + 16.0 / 2.6) / 2:.2f}x", "671.1", "10"]
    # and in the main table, like every row
    assert "walk floor (os.scandir + 1 lstat per file)" in table(summarize(RESULTS, SETS))
    assert reruns(summarize([run("ki", "large", 0, 4.0, 80)], SETS)) == ""


def test_growth_per_file_and_ten_million():
    # 10 us and 1,000 bytes per file on top of 2 s and 100 MiB, at 1, 2 and 4 million
    line = [run("ki", name, 0, 2.0 + 10e-6 * SETS[name].files, 100 + 1000 * SETS[name].files / MiB)
            for name in ("tiny1m", "tiny2m", "tiny4m")]
    fs = files_scaling(summarize(line, SETS))
    ki = fs["ki"]
    assert ki["us_per_file"] == pytest.approx(10.0) and ki["bytes_per_file"] == pytest.approx(1000, abs=1)
    assert ki["wall_s_at_10000000"] == pytest.approx(102.0)
    assert ki["peak_mib_at_10000000"] == pytest.approx(100 + 1e10 / MiB, abs=1)
    assert [p["files"] for p in ki["points"]] == [1_000_000, 2_000_000, 4_000_000]
    text = scaling_text(scaling(summarize(line, SETS)))
    assert "10 us" not in text and "10.00 us and 1,000 bytes per file" in text and "at 10,000,000 files" in text
    # one size is not a line; scaled-down runs (under 100,000 files) say nothing of millions
    assert files_scaling(summarize(line[:1], SETS)) == {}
    small = {"tiny": Dataset("tiny", "/x", 1000, 1024000, "1,000 files"), "tiny1m": SETS["tiny1m"]}
    assert files_scaling(summarize([run("ki", "tiny", 0, 1.0, 80), line[0]], small)) == {}


def checks_of(results):
    return {c["target"]: c for c in targets(summarize(results, SETS), {"time_per_file": {}})}


def test_targets_at_a_million_files():
    checks = checks_of(RESULTS)
    files_s = next(c for t, c in checks.items() if "files/s" in t)
    assert files_s["value"] == pytest.approx(44444.444, abs=0.01) and files_s["met"] is False
    peaks = {t: c for t, c in checks.items() if "<= 300 MiB" in t}
    assert len(peaks) == 3 and not any(c["met"] for c in peaks.values())
    assert not any("400 MiB" in t for t in checks)        # issue 6's bound is not for millions
    # the floor (median 2.3 s) is above 2 s: 1.5x the floor, and 1 s more with files touched
    rerun = next(c for t, c in checks.items() if "nothing changed: <=" in t)
    touched = next(t for t in checks if "10 files touched: <=" in t)
    assert "<= 3.45 s" in next(t for t in checks if "nothing changed: <=" in t) and "<= 4.45 s" in touched
    assert rerun["value"] == 13.5 and rerun["met"] is False
    # with a fast floor, 3 s and 4 s; met when under
    fast = checks_of(million(0, 10.0, 2.5, 3.9, 1.2))
    assert next(c for t, c in fast.items() if "nothing changed: <= 3.00 s" in t)["met"] is True
    assert next(c for t, c in fast.items() if "touched: <= 4.00 s" in t)["met"] is True
    assert next(c for t, c in fast.items() if "files/s" in t)["met"] is True


def test_peak_flat_from_a_hundred_thousand_files():
    results = million(0, 10.0, 2.5, 3.9, 1.2) + [run("ki", "tiny", 0, 2.0, 250), run("ki-rerun", "tiny", 0, 0.5, 1000)]
    flat = {t: c for t, c in checks_of(results).items() if "flat from 100,000 files" in t}
    assert len(flat) == 2
    fresh = next(c for t, c in flat.items() if "re-run" not in t)
    assert fresh["value"] == pytest.approx(1200 / 250) and fresh["met"] is False
    rerun = next(c for t, c in flat.items() if "nothing changed" in t)
    assert rerun["value"] == pytest.approx(2.1) and rerun["met"] is False


def test_the_floor_has_no_portable_data_hash_and_is_no_mismatch():
    summaries = summarize(RESULTS, SETS)
    assert by_row(summaries)["walkfloor"].pdh is None
    assert _pdh_mismatches(summaries) == []
    other = summarize(RESULTS + [run("ki-rerun10", "tiny1m", 2, 16.0, 2200, 0)], SETS)
    for s in other:
        if s.row == "ki-rerun10":
            s.pdh = "other"
    assert _pdh_mismatches(other) == ["tiny1m: ['other', 'pdh']"]
