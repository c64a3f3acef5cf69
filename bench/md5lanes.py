"""``python -m bench.md5lanes``: MD5 throughput per core, for every engine and lane count.

Each engine of ``ingest.md5lanes`` this machine runs (the extension's kernels:
avx512, avx2, portable; and hashlib) hashes N streams of ``--chunk`` bytes per
call, N from 1 to 16, in one thread; the figure is bytes hashed per CPU second of
this process (user + system, ``time.process_time``), the best of ``--reps`` timed
rounds after one round of warm-up. The chunks stay in memory, so this is the
hashing alone: no reads, no writes.

Run it under the shared bench lock:
``flock /tmp/keep-ingest-bench.lock .venv/bin/python -m bench.md5lanes``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

from ingest import md5lanes

STREAMS = tuple(range(1, 17))


def throughput(engine: md5lanes.Engine, streams: int, chunks: list[bytes], rounds: int, reps: int) -> float:
    """Bytes per CPU second hashing ``streams`` chunks per call, best of ``reps``."""
    data = chunks[:streams]
    hashers = [engine.new() for _ in data]
    best = float("inf")
    for rep in range(reps + 1):          # the first round warms up
        started = time.process_time()
        for _ in range(rounds):
            engine.update_many(hashers, data)
        spent = time.process_time() - started
        if rep:
            best = min(best, spent)
    return streams * len(data[0]) * rounds / best


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.md5lanes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chunk", type=int, default=1 << 20, help="bytes per stream per call (default 1 MiB)")
    p.add_argument("--megabytes", type=int, default=256,
                   help="about this many MB hashed per timed round (default 256)")
    p.add_argument("--reps", type=int, default=3, help="timed rounds; the best is reported (default 3)")
    p.add_argument("--out", help="JSON output (default bench-results/md5lanes-<time>.json)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    chunks = [os.urandom(args.chunk) for _ in range(max(STREAMS))]
    engines = [md5lanes.select(name) for name in md5lanes.available()]
    print(f"MD5 per core, MB/s (10^6 bytes per CPU second), {args.chunk:,}-byte chunks; "
          f"columns: streams hashed per call", file=sys.stderr)
    results: dict[str, dict[int, float]] = {}
    for engine in engines:
        results[engine.name] = {}
        for n in STREAMS:
            rounds = max(1, args.megabytes * 10**6 // (n * args.chunk))
            results[engine.name][n] = throughput(engine, n, chunks, rounds, args.reps)
        print(f"  {engine.describe()}: done", file=sys.stderr)
    print(table(results))
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                   "bench-results", f"md5lanes-{stamp}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"chunk": args.chunk, "reps": args.reps, "cpu": _cpu_model(),
                   "bytes_per_cpu_second": results}, f, indent=1)
    print(f"\nJSON: {out}")
    return 0


def table(results: dict[str, dict[int, float]]) -> str:
    """A markdown table: one row per engine, one column per stream count, MB/s."""
    counts = sorted({n for per in results.values() for n in per})
    lines = ["| engine | " + " | ".join(str(n) for n in counts) + " |",
             "| --- | " + " | ".join("---:" for _ in counts) + " |"]
    for name, per in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{per[n] / 1e6:,.0f}" for n in counts) + " |")
    return "\n".join(lines)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


if __name__ == "__main__":
    sys.exit(main())
