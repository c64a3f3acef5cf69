"""``python -m bench``: run the benchmark, print the table, write the JSON.

For each dataset and each repetition, every row runs once, side by side, in an order
rotated by one place per repetition (so no tool always runs first or last). Before
each run the dataset is read once (the same warm page cache for every tool; the
cache cannot be dropped without root), and the machine's dirty pages are synced
before and after (so one run's writeback does not land in the next one's time).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

from bench import datasets as ds
from bench import report
from bench.runners import BASELINE_OF, REPO_ROOT, ROWS, RunResult, run_row

# The millions-of-files datasets (tiny1m, tiny2m, tiny4m) run only when named in --datasets.
DEFAULT_DATASETS = ["large", "small", "tiny", "tiny10k", "mixed"]
BASE_ROWS = ["ki", "ki-nofsync", "arvput", "md5sum", "ki-keep", "arvput-keep"]
# Issue 15: a fresh put, the re-runs and their floor. arv-put is left out: at 1,000,000
# files it takes minutes and gigabytes (bench/NOTES.md).
FILES_ROWS = ["ki", "ki-rerun", "ki-rerun10", "walkfloor"]
ROWS_FOR = {
    "large": BASE_ROWS + ["ki-hashlib", "ki-nofsync-hashlib", "ki-w1", "ki-w4", "ki-remote", "ki-remote-plain"],
    "mixed": BASE_ROWS + ["ki-hashlib", "ki-nofsync-hashlib", "ki-remote", "ki-remote-plain"],
    "tiny10k": ["ki", "ki-nofsync", "arvput", "md5sum"],  # only for time per file
    "tiny1m": FILES_ROWS,
    "tiny2m": FILES_ROWS,
    "tiny4m": FILES_ROWS,
}
# Rows any dataset runs when --rows names them (e.g. the re-runs on tiny, for 100,000 files).
ON_REQUEST = ["ki-rerun", "ki-rerun10", "walkfloor"]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default=",".join(DEFAULT_DATASETS),
                   help=f"comma-separated, from: {', '.join(ds.GENERATORS)} "
                        f"(default: {','.join(DEFAULT_DATASETS)})")
    p.add_argument("--rows", default="",
                   help="comma-separated row keys to run (default: all that apply): " + ", ".join(ROWS))
    p.add_argument("--reps", type=int, default=3, help="repetitions; medians are reported (default 3)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply file counts and big file sizes (default 1)")
    p.add_argument("--quick", action="store_true", help="--scale 0.1 --reps 1 unless given")
    p.add_argument("--bench-dir", default=os.environ.get("BENCH_DIR") or "/tmp/keep-ingest-bench",
                   help="datasets (cached) and scratch stores ($BENCH_DIR, default %(default)s)")
    p.add_argument("--out", help="JSON output (default bench-results/bench-<time>.json)")
    p.add_argument("--baseline", metavar="SRC",
                   help="also run keep-ingest from this source tree (e.g. `git archive REV | tar -x "
                        "-C SRC`), as rows 'base' and 'base-nofsync', for before/after figures")
    args = p.parse_args(argv)
    if args.quick:
        if "--scale" not in (argv or sys.argv):
            args.scale = 0.1
        if "--reps" not in (argv or sys.argv):
            args.reps = 1
    return args


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def rows_for(name: str, only: list[str], baseline: bool) -> list[str]:
    """The rows to run on dataset ``name``: its own, or those of ``only`` among its own and
    the rows on request; with ``baseline``, their @baseline twins after the first two."""
    rows = ROWS_FOR.get(name, BASE_ROWS)
    if only:
        rows = list(dict.fromkeys(rows + ON_REQUEST))
    if baseline:
        rows = rows[:2] + [BASELINE_OF[r] for r in rows if r in BASELINE_OF] + rows[2:]
    return [r for r in rows if r in only] if only else rows


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    names = [n for n in args.datasets.split(",") if n]
    only = [r for r in args.rows.split(",") if r]
    for n in names:
        if n not in ds.GENERATORS:
            raise SystemExit(f"unknown dataset {n!r}; known: {', '.join(ds.GENERATORS)}")
    for r in only:
        if r not in ROWS:
            raise SystemExit(f"unknown row {r!r}; known: {', '.join(ROWS)}")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or os.path.join(REPO_ROOT, "bench-results", f"bench-{stamp}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    work = os.path.join(args.bench_dir, "runs")
    os.makedirs(work, exist_ok=True)   # before describing the machine: df needs the directory
    machine = report.machine(args.bench_dir)
    _log(f"machine: {report.machine_text(machine)}")

    sets: dict[str, ds.Dataset] = {}
    results: list[RunResult] = []
    started = time.monotonic()
    for name in names:
        dataset = sets[name] = ds.ensure(name, args.bench_dir, args.scale, log=_log)
        rows = rows_for(name, only, bool(args.baseline))
        _log(f"== {name}: {dataset.description}; {dataset.files:,} files, {dataset.bytes / 1e6:,.0f} MB")
        for rep in range(args.reps):
            shift = rep % len(rows)
            for key in rows[shift:] + rows[:shift]:
                ds.warm(dataset)
                os.sync()
                r = run_row(ROWS[key], dataset, work, rep, args.baseline)
                os.sync()
                results.append(r)
                again = "" if r.bytes_read is None else (
                    f"; read {r.bytes_read / 1e6:,.1f} MB, uploaded {r.blocks_uploaded} blocks")
                server = "" if r.server_cpu_s is None else (
                    f"; server CPU {r.server_cpu_s:.1f} s, RSS {(r.server_peak_rss or 0) / report.MiB:.0f} MiB, "
                    f"PSS {(r.server_peak_pss or 0) / report.MiB:.0f} MiB")
                _log(f"  [{name} {rep + 1}/{args.reps}] {ROWS[key].label}: {r.wall_s:.2f} s, "
                     f"{dataset.bytes / 1e6 / r.wall_s:.0f} MB/s, {dataset.files / r.wall_s:,.0f} files/s, "
                     f"CPU {r.cpu_s:.1f} s, peak RSS {r.peak_rss / report.MiB:.0f} MiB, "
                     f"PSS {r.peak_pss / report.MiB:.0f} MiB{again}{server}")
        _write(out, args, machine, sets, results, started)
    summaries, sc, checks = _write(out, args, machine, sets, results, started)

    print(f"\nMachine: {report.machine_text(machine)}")
    print(f"Repetitions: {args.reps} (medians; ratios are medians of per-repetition ratios); "
          f"scale {args.scale:g}\n")
    print(report.table(summaries))
    reruns = report.reruns_table(summaries)
    if reruns:
        print("\nFresh put, re-runs and the walk floor (x floor: re-run time over the floor's):\n" + reruns)
    print("\nScaling:\n" + report.scaling_text(sc))
    scaled = "" if args.scale == 1 else f" (the targets are for scale 1; this run is at {args.scale:g})"
    print(f"\nTargets{scaled}:\n" + report.targets_text(checks))
    mismatched = _pdh_mismatches(summaries)
    if mismatched:
        print("\nPORTABLE DATA HASH MISMATCH: " + "; ".join(mismatched))
    print(f"\nJSON: {out}")
    return 1 if mismatched else 0


def _pdh_mismatches(summaries: list[report.Summary]) -> list[str]:
    """Datasets where the tools' portable data hashes differ (they should not)."""
    bad = []
    for name in dict.fromkeys(s.dataset for s in summaries):
        pdhs = {s.pdh for s in summaries if s.dataset == name and ROWS[s.row].uploads}
        if len(pdhs) > 1:
            bad.append(f"{name}: {sorted(str(p) for p in pdhs)}")
    return bad


def _write(out: str, args: argparse.Namespace, machine: dict, sets: dict[str, ds.Dataset],
           results: list[RunResult], started: float) -> tuple:
    summaries = report.summarize(results, sets)
    sc = report.scaling(summaries)
    checks = report.targets(summaries, sc)
    doc = {
        "machine": machine,
        "settings": {"reps": args.reps, "scale": args.scale, "bench_dir": args.bench_dir,
                     "baseline": args.baseline,
                     "cache": "warm: every dataset read once before each run; sync before and after",
                     "keepstore_rows": "cpu_s and peak_* are the client's alone; the keepstore "
                                       "server's are server_cpu_s and server_peak_* (not added in)"},
        "datasets": {n: {"description": d.description, "files": d.files, "bytes": d.bytes}
                     for n, d in sets.items()},
        "rows": {k: {"label": r.label, "baseline": r.baseline} for k, r in ROWS.items()},
        "summary": [s.as_dict() for s in summaries],
        "scaling": sc,
        "targets": checks,
        "runs": [r.as_dict() for r in results],
        "seconds": round(time.monotonic() - started, 1),
    }
    with open(out + ".tmp", "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(out + ".tmp", out)
    return summaries, sc, checks


if __name__ == "__main__":
    sys.exit(main())
