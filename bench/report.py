"""Summaries of the measured runs: medians, ratios, targets, the table and the JSON.

Ratios are taken *within* each repetition (the two runs were side by side, under the
same background load) and the median of those per-repetition ratios is reported:

* ``x arv-put``: the row's throughput over arv-put engine's, same dataset and same
  kind of store (directory rows against arv-put's local store, keepstore rows
  against arv-put through the same keepstore);
* ``% md5sum``: the row's throughput as a share of all-cores md5sum's;
* ``x floor``: a re-run row's time over the walk floor's (``walkfloor``: the same tree
  walked with ``os.scandir`` and one stat per file), issue 15.

In keepstore rows, CPU seconds and peak memory are the client's alone (keep-ingest's
coordinator and workers, or arv-put's engine process); the keepstore server's are
reported apart (``server_cpu_s``, ``server_peak_rss_mib``, ``server_peak_pss_mib``; a
column of their own in the table), never added in.

MB are 10^6 bytes; MiB (memory) are 2^20 bytes.
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from bench.datasets import Dataset
from bench.runners import ROWS, RunResult

MiB = 1 << 20
TARGET_LARGE_VS_ARVPUT = 3.0
TARGET_LARGE_VS_MD5SUM = 0.40
TARGET_LARGE_VS_MD5SUM_LANES = 1.0   # issue 16, with MD5 in SIMD lanes
TARGET_LARGE_CPU_SHARE = 0.5         # issue 16: CPU seconds at most half of before
TARGET_SMALL_VS_ARVPUT = 5.0
TARGET_PEAK_MIB = 400
TARGET_FLAT_TOLERANCE = 1.25   # time per file at 100k within 25% of 10k's
# Issue 15, at 1,000,000 files (tiny1m), peak memory summed over all processes.
MILLIONS_DATASET = "tiny1m"
TARGET_MILLIONS_PEAK_MIB = 300
TARGET_MILLIONS_FILES_S = 80_000
TARGET_RERUN_S = 3.0            # nothing changed; or 1.5x the walk floor if that floor is above 2 s
TARGET_RERUN_FLOOR_S = 2.0
TARGET_RERUN_VS_FLOOR = 1.5
TARGET_RERUN_TOUCHED_EXTRA_S = 1.0   # 10 files touched: 4 s, one more than nothing changed
# Tiny's shape at 100,000 files and more: the per-file figures, extrapolated to 10 million.
FILES_SERIES = ("tiny", "tiny1m", "tiny2m", "tiny4m")
FILES_SERIES_MIN = 100_000     # fewer files (a scaled run) say too little of millions
FILES_ROWS = ("ki", "ki-rerun", "ki-rerun10", "walkfloor", "base", "base-rerun", "base-rerun10")
EXTRAPOLATE_TO = 10_000_000


def _median(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _max_mib(values: Iterable[int | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return max(vals) / MiB if vals else None


@dataclass
class Summary:
    """One table line: a row on a dataset, over its repetitions."""

    dataset: str
    row: str
    label: str
    repetitions: int
    files: int
    bytes: int
    wall_s: float
    cpu_s: float
    peak_mib: float           # the largest peak over the repetitions
    peak_mib_median: float
    peak_pss_mib: float       # the largest PSS sum over the repetitions
    mb_s: float
    files_s: float
    us_per_file: float
    vs_arvput: float | None
    vs_md5sum: float | None
    pdh: str | None
    # keepstore rows only (None otherwise): the server's, apart from the client's figures above
    server_cpu_s: float | None = None         # median over the repetitions
    server_peak_rss_mib: float | None = None  # the largest over the repetitions
    server_peak_pss_mib: float | None = None
    # re-run rows only: time over the walk floor's (median of per-repetition ratios),
    # and what the re-run read and uploaded again (medians)
    vs_floor: float | None = None
    bytes_read: float | None = None
    blocks_uploaded: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def summarize(results: list[RunResult], datasets: dict[str, Dataset]) -> list[Summary]:
    """One Summary per (dataset, row), in the order rows were first run."""
    by_rep: dict[tuple[str, int], dict[str, RunResult]] = {}
    order: list[tuple[str, str]] = []
    for r in results:
        by_rep.setdefault((r.dataset, r.repetition), {})[r.row] = r
        if (r.dataset, r.row) not in order:
            order.append((r.dataset, r.row))
    out = []
    for ds_name, key in order:
        ds = datasets[ds_name]
        row = ROWS[key]
        mine = [r for r in results if r.dataset == ds_name and r.row == key]
        vs_arv, vs_md5, vs_floor = [], [], []
        for r in mine:
            peers = by_rep[(ds_name, r.repetition)]
            if row.baseline and row.baseline in peers:
                vs_arv.append(peers[row.baseline].wall_s / r.wall_s)
            if key != "md5sum" and "md5sum" in peers:
                vs_md5.append(peers["md5sum"].wall_s / r.wall_s)
            if row.rerun is not None and "walkfloor" in peers:
                vs_floor.append(r.wall_s / peers["walkfloor"].wall_s)
        wall = statistics.median(r.wall_s for r in mine)
        pdhs = {r.pdh for r in mine}
        out.append(Summary(
            dataset=ds_name, row=key, label=row.label, repetitions=len(mine),
            files=ds.files, bytes=ds.bytes, wall_s=wall,
            cpu_s=statistics.median(r.cpu_s for r in mine),
            peak_mib=max(r.peak_rss for r in mine) / MiB,
            peak_mib_median=statistics.median(r.peak_rss for r in mine) / MiB,
            peak_pss_mib=max(r.peak_pss for r in mine) / MiB,
            mb_s=ds.bytes / 1e6 / wall, files_s=ds.files / wall, us_per_file=wall / ds.files * 1e6,
            vs_arvput=_median(vs_arv), vs_md5sum=_median(vs_md5),
            pdh=pdhs.pop() if len(pdhs) == 1 else "MISMATCH between repetitions",
            server_cpu_s=_median(r.server_cpu_s for r in mine),
            server_peak_rss_mib=_max_mib(r.server_peak_rss for r in mine),
            server_peak_pss_mib=_max_mib(r.server_peak_pss for r in mine),
            vs_floor=_median(vs_floor), bytes_read=_median(r.bytes_read for r in mine),
            blocks_uploaded=_median(r.blocks_uploaded for r in mine)))
    return out


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, spec) + suffix


SERVER_NOTE = ("keepstore rows: CPU s and peak memory are the client's alone (keep-ingest's "
               "coordinator and workers, or arv-put's engine process); the keepstore server's own "
               "CPU seconds and peak RSS / PSS (MiB) are in the last column, not added in.")


def _server(s: Summary) -> str:
    if s.server_cpu_s is None:
        return "-"
    return (f"{s.server_cpu_s:.1f} / {_fmt(s.server_peak_rss_mib, '.0f')} / "
            f"{_fmt(s.server_peak_pss_mib, '.0f')}")


def table(summaries: list[Summary]) -> str:
    """The main table, as GitHub-flavoured Markdown, with a note under it when it has keepstore rows."""
    head = ("| dataset | row | wall s | MB/s | files/s | CPU s | peak RSS MiB | peak PSS MiB "
            "| x arv-put | % md5sum | server: CPU s / RSS / PSS MiB |\n"
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    lines = [head]
    for s in summaries:
        lines.append(
            f"| {s.dataset} | {s.label} | {s.wall_s:.2f} | {s.mb_s:.0f} | {s.files_s:,.0f} | "
            f"{s.cpu_s:.1f} | {s.peak_mib:.0f} | {s.peak_pss_mib:.0f} | {_fmt(s.vs_arvput, '.2f', 'x')} | "
            f"{_fmt(None if s.vs_md5sum is None else 100 * s.vs_md5sum, '.0f', '%')} | {_server(s)} |")
    if any(s.server_cpu_s is not None for s in summaries):
        lines += ["", SERVER_NOTE]
    return "\n".join(lines)


def reruns_table(summaries: list[Summary]) -> str:
    """Issue 15's rows side by side, per dataset: the fresh put, the re-runs (with their time
    over the walk floor's) and the floor; empty when no re-run or floor row ran."""
    shown = [s for s in summaries if s.dataset in {t.dataset for t in summaries
                                                   if ROWS[t.row].rerun is not None or t.row == "walkfloor"}
             and (s.row in FILES_ROWS or ROWS[s.row].rerun is not None)]
    if not shown:
        return ""
    lines = ["| dataset | row | wall s | files/s | CPU s | peak RSS MiB | peak PSS MiB | x floor | MB read "
             "| blocks uploaded |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in shown:
        lines.append(
            f"| {s.dataset} | {s.label} | {s.wall_s:.2f} | {s.files_s:,.0f} | {s.cpu_s:.1f} | {s.peak_mib:.0f} | "
            f"{s.peak_pss_mib:.0f} | {_fmt(s.vs_floor, '.2f', 'x')} | "
            f"{_fmt(None if s.bytes_read is None else s.bytes_read / 1e6, ',.1f')} | "
            f"{_fmt(s.blocks_uploaded, ',.0f')} |")
    return "\n".join(lines)


def _find(summaries: list[Summary], dataset: str, row: str) -> Summary | None:
    return next((s for s in summaries if s.dataset == dataset and s.row == row), None)


def _fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares line through ``points``: (slope, intercept)."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    return slope, my - slope * mx


def files_scaling(summaries: list[Summary]) -> dict[str, Any]:
    """For each of issue 15's rows run on two or more of tiny's sizes (of 100,000 files and up):
    time and peak memory at each size, their growth per file (least squares) and the line
    taken to 10 million files."""
    out: dict[str, Any] = {}
    for key in FILES_ROWS:
        found = [s for name in FILES_SERIES if (s := _find(summaries, name, key)) and s.files >= FILES_SERIES_MIN]
        if len({s.files for s in found}) < 2:
            continue
        us, wall0 = _fit([(s.files, s.wall_s) for s in found])
        per_file, peak0 = _fit([(s.files, s.peak_mib * MiB) for s in found])
        out[key] = {
            "label": ROWS[key].label,
            "points": [{"files": s.files, "wall_s": round(s.wall_s, 3), "peak_mib": round(s.peak_mib, 1),
                        "us_per_file": round(s.us_per_file, 2)} for s in found],
            "us_per_file": round(us * 1e6, 3), "bytes_per_file": round(per_file, 1),
            f"wall_s_at_{EXTRAPOLATE_TO}": round(wall0 + us * EXTRAPOLATE_TO, 1),
            f"peak_mib_at_{EXTRAPOLATE_TO}": round((peak0 + per_file * EXTRAPOLATE_TO) / MiB, 0)}
    return out


def files_scaling_text(fs: dict[str, Any]) -> str:
    lines = []
    for t in fs.values():
        at = ", ".join(f"{p['files']:,} files {p['wall_s']:.2f} s / {p['peak_mib']:.0f} MiB" for p in t["points"])
        lines.append(f"{t['label']}: {at}; growth {t['us_per_file']:.2f} us and {t['bytes_per_file']:,.0f} "
                     f"bytes per file; at {EXTRAPOLATE_TO:,} files: {t[f'wall_s_at_{EXTRAPOLATE_TO}']:,.1f} s, "
                     f"{t[f'peak_mib_at_{EXTRAPOLATE_TO}']:,.0f} MiB")
    return "\n".join(lines)


def scaling(summaries: list[Summary]) -> dict[str, Any]:
    """Throughput at 1, 2 and 4 workers (large), time per file at 10k vs 100k files, and
    issue 15's rows from 100,000 files up (:func:`files_scaling`)."""
    out: dict[str, Any] = {"workers": {}, "time_per_file": {}, "files": files_scaling(summaries)}
    for key, n in (("ki-w1", 1), ("ki", 2), ("ki-w4", 4)):
        if (s := _find(summaries, "large", key)):
            out["workers"][n] = round(s.mb_s, 1)
    for key in ("ki", "ki-nofsync", "base", "base-nofsync", "arvput"):
        small, big = _find(summaries, "tiny10k", key), _find(summaries, "tiny", key)
        if small and big:
            marginal = (big.wall_s - small.wall_s) / (big.files - small.files) * 1e6 \
                if big.files > small.files else None
            out["time_per_file"][key] = {
                "label": ROWS[key].label,
                f"us_per_file_{small.files}": round(small.us_per_file, 1),
                f"us_per_file_{big.files}": round(big.us_per_file, 1),
                "ratio": round(big.us_per_file / small.us_per_file, 3),
                "marginal_us_per_file": None if marginal is None else round(marginal, 1)}
    return out


def scaling_text(sc: dict[str, Any]) -> str:
    lines = []
    if sc["workers"]:
        lines.append("keep-ingest on large, dir store with fsync: " + ", ".join(
            f"{n} worker{'s' if n > 1 else ''} {v:.0f} MB/s" for n, v in sorted(sc["workers"].items())))
    for t in sc["time_per_file"].values():
        counts = [k for k in t if k.startswith("us_per_file_")]
        lines.append(f"{t['label']}: " + ", ".join(
            f"{t[k]:.1f} us/file at {int(k.rsplit('_', 1)[1]):,} files" for k in counts)
            + f" (ratio {t['ratio']:.2f}; marginal {_fmt(t['marginal_us_per_file'], '.1f')} us/file)")
    if sc.get("files"):
        lines.append(files_scaling_text(sc["files"]))
    return "\n".join(lines) or ("(not run: needs the large dataset, both tiny and tiny10k, "
                                 "or issue 15's rows on two of tiny, tiny1m, tiny2m, tiny4m)")


def targets(summaries: list[Summary], sc: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value and whether it is met."""
    checks: list[dict[str, Any]] = []

    def add(what: str, value: float | None, ok: bool | None) -> None:
        checks.append({"target": what, "value": None if value is None else round(value, 3), "met": ok})

    for key in ("ki-nofsync", "ki"):
        if (s := _find(summaries, "large", key)):
            add(f"large, {s.label}: >= {TARGET_LARGE_VS_ARVPUT:g}x arv-put engine",
                s.vs_arvput, None if s.vs_arvput is None else s.vs_arvput >= TARGET_LARGE_VS_ARVPUT)
            add(f"large, {s.label}: >= {TARGET_LARGE_VS_MD5SUM:.0%} of all-cores md5sum",
                s.vs_md5sum, None if s.vs_md5sum is None else s.vs_md5sum >= TARGET_LARGE_VS_MD5SUM)
            add(f"large, {s.label}: >= {TARGET_LARGE_VS_MD5SUM_LANES:.0%} of all-cores md5sum (MD5 lanes)",
                s.vs_md5sum, None if s.vs_md5sum is None else s.vs_md5sum >= TARGET_LARGE_VS_MD5SUM_LANES)
            # before: the other revision's row if it ran, else the same code with the extension off
            before = (_find(summaries, "large", key.replace("ki", "base")) or
                      _find(summaries, "large", f"{key}-hashlib"))
            if before:
                share = s.cpu_s / before.cpu_s
                add(f"large, {s.label}: CPU seconds <= {TARGET_LARGE_CPU_SHARE:g} x {before.label}'s "
                    f"({s.cpu_s / (s.bytes / 2**30):.2f} vs {before.cpu_s / (before.bytes / 2**30):.2f} "
                    "CPU s per GiB)", share, share <= TARGET_LARGE_CPU_SHARE)
    for ds in ("small", "tiny"):
        for key in ("ki-nofsync", "ki"):
            if (s := _find(summaries, ds, key)):
                add(f"{ds}, {s.label}: >= {TARGET_SMALL_VS_ARVPUT:g}x arv-put engine files/s",
                    s.vs_arvput, None if s.vs_arvput is None else s.vs_arvput >= TARGET_SMALL_VS_ARVPUT)
    for s in summaries:
        # The target is for the tool's own processes: the keepstore row counts its client alone.
        # (Millions of files have issue 15's targets instead.)
        if s.row in ("ki", "ki-nofsync", "ki-keep") and s.dataset not in FILES_SERIES[1:]:
            add(f"{s.dataset}, {s.label}: peak memory <= {TARGET_PEAK_MIB} MiB", s.peak_mib,
                s.peak_mib <= TARGET_PEAK_MIB)
    for key, t in sc["time_per_file"].items():
        if key.startswith("ki"):
            add(f"{t['label']}: time per file flat from 10k to 100k files (ratio <= "
                f"{TARGET_FLAT_TOLERANCE:g})", t["ratio"], t["ratio"] <= TARGET_FLAT_TOLERANCE)
    checks += millions_targets(summaries)
    return checks


def millions_targets(summaries: list[Summary]) -> list[dict[str, Any]]:
    """Issue 15's targets at 1,000,000 files, each with the measured value and whether it is met."""
    checks: list[dict[str, Any]] = []
    ds = MILLIONS_DATASET

    def add(what: str, value: float | None, ok: bool | None) -> None:
        checks.append({"target": what, "value": None if value is None else round(value, 3), "met": ok})

    if (s := _find(summaries, ds, "ki")):
        add(f"{ds}, {s.label}: >= {TARGET_MILLIONS_FILES_S:,} files/s", s.files_s,
            s.files_s >= TARGET_MILLIONS_FILES_S)
    for key in ("ki", "ki-rerun", "ki-rerun10"):
        if (s := _find(summaries, ds, key)):
            add(f"{ds}, {s.label}: peak memory <= {TARGET_MILLIONS_PEAK_MIB} MiB", s.peak_mib,
                s.peak_mib <= TARGET_MILLIONS_PEAK_MIB)
            if (small := _find(summaries, "tiny", key)):
                ratio = s.peak_mib / small.peak_mib
                add(f"{ds}, {s.label}: peak memory flat from {small.files:,} files (ratio <= "
                    f"{TARGET_FLAT_TOLERANCE:g})", ratio, ratio <= TARGET_FLAT_TOLERANCE)
    floor = _find(summaries, ds, "walkfloor")
    goal = TARGET_RERUN_S
    if floor and floor.wall_s > TARGET_RERUN_FLOOR_S:
        goal = max(goal, TARGET_RERUN_VS_FLOOR * floor.wall_s)
    floor_text = f"{floor.wall_s:.2f} s" if floor else "not measured"
    for key, extra in (("ki-rerun", 0.0), ("ki-rerun10", TARGET_RERUN_TOUCHED_EXTRA_S)):
        if (s := _find(summaries, ds, key)):
            add(f"{ds}, {s.label}: <= {goal + extra:.2f} s ({TARGET_RERUN_S + extra:g} s, or "
                f"{TARGET_RERUN_VS_FLOOR:g}x the walk floor{f' + {extra:g} s' if extra else ''} if the floor "
                f"is above {TARGET_RERUN_FLOOR_S:g} s; floor {floor_text})", s.wall_s, s.wall_s <= goal + extra)
    return checks


def targets_text(checks: list[dict[str, Any]]) -> str:
    mark = {True: "MET    ", False: "NOT MET", None: "n/a    "}
    return "\n".join(f"{mark[c['met']]} {c['target']}: {_fmt(c['value'], '.3g')}" for c in checks)


def _cmd(args: list[str]) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine(bench_dir: str) -> dict[str, Any]:
    """What the benchmark ran on."""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kb = int(re.search(r"MemTotal:\s+(\d+)", f.read()).group(1))  # type: ignore[union-attr]
            mem = f"{kb / (1 << 20):.1f} GiB"
    except (OSError, AttributeError):
        pass
    df = _cmd(["df", "--output=source,fstype,target", bench_dir]).splitlines()
    try:
        sdk = metadata.version("arvados-python-client")
    except metadata.PackageNotFoundError:
        sdk = None
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory": mem,
        "filesystem": " ".join(df[-1].split()) if len(df) > 1 else "",
        "kernel": platform.release(), "python": platform.python_version(),
        "arvados_python_client": sdk,
        "md5sum": _cmd(["md5sum", "--version"]).splitlines()[0] if _cmd(["md5sum", "--version"]) else "",
        "load_average_at_start": os.getloadavg(),
        "md5": _md5_engine(),
    }


def _md5_engine() -> str:
    """keep-ingest's MD5 engine here, e.g. ``avx512 (16 lanes), detected``."""
    from ingest import md5lanes

    engine = md5lanes.select("auto")
    return f"{engine.describe()}, {engine.origin}"


def machine_text(m: dict[str, Any]) -> str:
    return (f"{m['cpu']}, {m['cores']} cores, {m['memory']} RAM; bench dir on {m['filesystem']}; "
            f"Linux {m['kernel']}, Python {m['python']}, arvados-python-client {m['arvados_python_client']}, "
            f"{m['md5sum']}; keep-ingest MD5: {m.get('md5', '?')}")
