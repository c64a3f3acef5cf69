"""bench.report: keepstore rows carry the server's figures apart from the client's."""

from __future__ import annotations

import json

from bench.datasets import Dataset
from bench.report import MiB, summarize, table, targets
from bench.runners import RunResult

DATASETS = {"large": Dataset("large", "/nonexistent", 4, 2_000_000_000, "4 files")}


def run(row: str, rep: int, wall: float, cpu: float, rss_mib: int, server: tuple | None = None) -> RunResult:
    r = RunResult(row, "large", rep, wall, cpu, rss_mib * MiB, rss_mib * MiB // 2, None if row == "md5sum" else "pdh")
    if server:
        r.server_cpu_s, r.server_peak_rss, r.server_peak_pss = server[0], server[1] * MiB, server[2] * MiB
    return r


RESULTS = [
    run("ki", 0, 4.0, 7.0, 150), run("arvput", 0, 8.0, 11.0, 500), run("md5sum", 0, 2.0, 4.0, 5),
    run("ki-keep", 0, 5.0, 8.0, 160, (6.0, 60, 50)), run("arvput-keep", 0, 10.0, 12.0, 520, (5.0, 70, 65)),
    run("ki", 1, 4.4, 7.2, 152), run("arvput", 1, 8.0, 11.0, 505), run("md5sum", 1, 2.2, 4.0, 5),
    run("ki-keep", 1, 5.0, 8.4, 170, (7.0, 64, 52)), run("arvput-keep", 1, 15.0, 12.5, 530, (5.5, 72, 66)),
]


def by_row(summaries):
    return {s.row: s for s in summaries}


def test_summary_keeps_client_and_server_apart():
    s = by_row(summarize(RESULTS, DATASETS))
    keep = s["ki-keep"]
    assert keep.cpu_s == 8.2 and keep.peak_mib == 170          # the client's: median CPU, largest peak
    assert keep.server_cpu_s == 6.5                             # the server's: median CPU
    assert keep.server_peak_rss_mib == 64 and keep.server_peak_pss_mib == 52  # largest peaks
    assert s["arvput-keep"].server_peak_rss_mib == 72
    for key in ("ki", "arvput", "md5sum"):
        assert s[key].server_cpu_s is None and s[key].server_peak_rss_mib is None
    # Ratios as before: within each repetition, against the same kind of store.
    assert keep.vs_arvput == (10.0 / 5.0 + 15.0 / 5.0) / 2
    assert s["ki"].vs_arvput == (8.0 / 4.0 + 8.0 / 4.4) / 2
    assert keep.vs_md5sum == (2.0 / 5.0 + 2.2 / 5.0) / 2
    doc = json.loads(json.dumps(keep.as_dict()))
    assert doc["server_cpu_s"] == 6.5 and doc["server_peak_rss_mib"] == 64 and doc["server_peak_pss_mib"] == 52


def test_table_has_a_server_column_and_a_note():
    text = table(summarize(RESULTS, DATASETS))
    lines = text.splitlines()
    assert "server: CPU s / RSS / PSS MiB" in lines[0]
    assert all(line.count("|") == lines[0].count("|") for line in lines if line.startswith("|"))
    keep = next(line for line in lines if "keep-ingest (2 workers), keepstore" in line)
    cells = [c.strip() for c in keep.strip("|").split("|")]
    assert cells[5:8] == ["8.2", "170", "85"]      # CPU s, RSS, PSS: the client's
    assert cells[-1] == "6.5 / 64 / 52"
    plain = next(line for line in lines if "dir, fsync" in line)
    assert plain.rstrip().endswith("| - |")
    assert "the client's alone" in lines[-1]
    # Without keepstore rows: no note.
    assert "client's alone" not in table(summarize([r for r in RESULTS if "keep" not in r.row], DATASETS))


def test_memory_target_includes_the_keepstore_client():
    checks = targets(summarize(RESULTS, DATASETS), {"time_per_file": {}})
    memory = [c for c in checks if "peak memory" in c["target"]]
    assert any("keepstore" in c["target"] and c["value"] == 170 and c["met"] for c in memory)


def test_md5_lane_targets_compare_with_the_extension_off_or_the_baseline():
    lanes = RESULTS + [run("ki-hashlib", 0, 5.0, 16.0, 150), run("ki-hashlib", 1, 5.0, 15.0, 150)]
    checks = {c["target"]: c for c in targets(summarize(lanes, DATASETS), {"time_per_file": {}})}
    cpu = next(c for t, c in checks.items() if t.startswith("large, keep-ingest (2 workers), dir, fsync: CPU"))
    assert "MD5 by hashlib's" in cpu["target"] and cpu["value"] == round(7.1 / 15.5, 3) and cpu["met"]
    md5sum = next(c for t, c in checks.items() if t.endswith("of all-cores md5sum (MD5 lanes)"))
    assert md5sum["value"] == round((2.0 / 4.0 + 2.2 / 4.4) / 2, 3) and md5sum["met"] is False
    # with a baseline run, the before is the other revision's row
    based = lanes + [run("base", 0, 6.0, 20.0, 150), run("base", 1, 6.0, 20.0, 150)]
    cpu = next(c for c in targets(summarize(based, DATASETS), {"time_per_file": {}})
               if c["target"].startswith("large, keep-ingest (2 workers), dir, fsync: CPU"))
    assert "@baseline" in cpu["target"] and cpu["value"] == round(7.1 / 20.0, 3)
