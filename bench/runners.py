"""The rows of the benchmark: which command each one runs, and running it once.

Every upload starts from an empty store (a fresh directory, or a fresh keepstore with
a fresh volume) and, for keep-ingest, an empty state directory (its checkpoint
journals), both in the run's scratch directory, so no block is already stored and
nothing is skipped; the re-run rows are the exception, by design.

Rows (``Row.key``):

* ``ki`` / ``ki-w1`` / ``ki-w4``: keep-ingest into its directory store with the default
  profile, which fsyncs each block and its directory (2, 1 or 4 local workers);
* ``ki-nofsync``: the same with ``store.fsync = false``, like arv-put's local store,
  which never fsyncs;
* ``arvput``: arv-put's engine into ``KEEP_LOCAL_STORE`` (2 put threads, its default);
* ``md5sum``: GNU md5sum over the same files on every core, the hashing limit;
* ``ki-keep`` / ``arvput-keep``: both tools through one ``keep-ingest keepstore`` on
  127.0.0.1. CPU seconds and peak memory are the client's alone (keep-ingest's
  coordinator and workers, or arv-put's engine process); the server's are measured
  apart (``server_cpu_s``, ``server_peak_rss``, ``server_peak_pss``);
* ``ki-remote`` / ``ki-remote-plain``: keep-ingest with no local workers and two
  ``keep-ingest worker`` processes connected over TCP on 127.0.0.1, every byte
  streamed to them: with the link's CURVE encryption (the default), and with
  ``--insecure-plaintext-workers``, for what the encryption costs; CPU and memory
  are the coordinator's and the workers' together;
* ``ki-hashlib`` / ``ki-nofsync-hashlib``: ``ki`` and ``ki-nofsync`` with the MD5
  extension off (``KEEP_INGEST_MD5=hashlib``: one block at a time, as without the
  extension); the other keep-ingest rows use the fastest engine this machine has;
* ``ki-rerun`` / ``ki-rerun10``: a re-run (issue 15): ``ki`` is run once unmeasured,
  then (``ki-rerun10``) 10 files spread evenly over the tree get a new mtime (the
  dataset's content stays as it is), then the same ``put``, same store and same state
  directory, so it resumes, is measured (with ``--json``: bytes read and blocks
  uploaded are kept with the run);
* ``walkfloor``: the floor of a re-run: ``python -m bench.walkfloor`` walks the tree
  with ``os.scandir`` and one ``lstat`` per file, measured like a ``put``;
* ``base`` / ``base-nofsync`` / ``base-rerun`` / ``base-rerun10``: with ``--baseline
  SRC``, keep-ingest's rows run from another source tree (a checkout of another
  revision), for before/after figures side by side.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from bench.datasets import Dataset
from bench.keepstore import Keepstore
from bench.measure import Measurement, run_measured

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_FSYNC_PROFILE = "[store]\nfsync = false\n"


@dataclass(frozen=True)
class Row:
    """One kind of run in the table."""

    key: str
    tool: str                  # "keep-ingest[ @baseline]", "arv-put engine" or "md5sum"
    store: str                 # "dir", "dir, no fsync", "local store", "keepstore" or "-"
    workers: int | None = None  # keep-ingest worker processes
    baseline: str | None = None  # the arv-put row this row's ratio is taken against
    md5: str | None = None       # $KEEP_INGEST_MD5 for keep-ingest (None: its default, the fastest)
    rerun: int | None = None     # a re-run after a first put, with this many files touched between

    @property
    def uploads(self) -> bool:
        """Whether the row uploads the tree (and so gives its portable data hash)."""
        return self.tool.startswith(("keep-ingest", "arv-put"))

    @property
    def label(self) -> str:
        who = f"{self.tool} ({self.workers} workers)" if self.workers else self.tool
        where = f"{who}, {self.store}" if self.store != "-" else who
        return f"{where}, MD5 by {self.md5}" if self.md5 else where


ROWS: dict[str, Row] = {r.key: r for r in (
    Row("ki", "keep-ingest", "dir, fsync", 2, "arvput"),
    Row("ki-nofsync", "keep-ingest", "dir, no fsync", 2, "arvput"),
    Row("arvput", "arv-put engine", "local store"),
    Row("md5sum", "md5sum", "-"),
    Row("ki-keep", "keep-ingest", "keepstore", 2, "arvput-keep"),
    Row("arvput-keep", "arv-put engine", "keepstore"),
    Row("ki-w1", "keep-ingest", "dir, fsync", 1, "arvput"),
    Row("ki-w4", "keep-ingest", "dir, fsync", 4, "arvput"),
    Row("ki-remote", "keep-ingest", "dir, fsync, remote over tcp, CURVE", 2, "arvput"),
    Row("ki-remote-plain", "keep-ingest", "dir, fsync, remote over tcp, plaintext", 2, "arvput"),
    Row("ki-hashlib", "keep-ingest", "dir, fsync", 2, "arvput", md5="hashlib"),
    Row("ki-nofsync-hashlib", "keep-ingest", "dir, no fsync", 2, "arvput", md5="hashlib"),
    Row("ki-rerun", "keep-ingest", "dir, fsync, re-run, nothing changed", 2, rerun=0),
    Row("ki-rerun10", "keep-ingest", "dir, fsync, re-run, 10 files touched", 2, rerun=10),
    Row("walkfloor", "walk floor (os.scandir + 1 lstat per file)", "-"),
    # Only with --baseline SRC: keep-ingest from another source tree (another revision).
    Row("base", "keep-ingest @baseline", "dir, fsync", 2, "arvput"),
    Row("base-nofsync", "keep-ingest @baseline", "dir, no fsync", 2, "arvput"),
    Row("base-rerun", "keep-ingest @baseline", "dir, fsync, re-run, nothing changed", 2, rerun=0),
    Row("base-rerun10", "keep-ingest @baseline", "dir, fsync, re-run, 10 files touched", 2, rerun=10),
)}
# keep-ingest's rows that have a --baseline counterpart, and that counterpart.
BASELINE_OF = {"ki": "base", "ki-nofsync": "base-nofsync", "ki-rerun": "base-rerun", "ki-rerun10": "base-rerun10"}
BASELINE_ROWS = tuple(BASELINE_OF.values())
REMOTE_ROWS = ("ki-remote", "ki-remote-plain")


@dataclass
class RunResult:
    """One measured run of one row on one dataset."""

    row: str
    dataset: str
    repetition: int
    wall_s: float
    cpu_s: float
    peak_rss: int                       # bytes; the client's alone in keepstore rows
    peak_pss: int
    pdh: str | None
    server_cpu_s: float | None = None   # keepstore rows: the server's, apart from the client's
    server_peak_rss: int | None = None  # bytes
    server_peak_pss: int | None = None  # bytes
    bytes_read: int | None = None       # re-run rows: what keep-ingest read and uploaded again
    blocks_uploaded: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class RunFailed(RuntimeError):
    """A tool exited non-zero."""


def _env(src: str = REPO_ROOT, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("ARVADOS_") or k in ("KEEP_LOCAL_STORE", "KEEP_INGEST_MD5"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def _keep_ingest(workers: int, store_args: list[str], source: str, as_json: bool = False) -> list[str]:
    return [sys.executable, "-m", "ingest", "put", "-q", "--json" if as_json else "--portable-data-hash",
            "--workers", str(workers), *store_args, source]


def touched_files(paths: list[str], count: int) -> list[str]:
    """``count`` of ``paths`` spread evenly over them (the middle of each of ``count`` equal shares)."""
    count = min(count, len(paths))
    return [paths[(2 * k + 1) * len(paths) // (2 * count)] for k in range(count)]


def _touch(paths: list[str]) -> None:
    """A new mtime (now) for each of ``paths``; their content stays as it is."""
    now = time.time_ns()
    for path in paths:
        os.utime(path, ns=(now, now))


def _with_remote_workers(put: list[str], workers: int, scratch: str, env: dict[str, str],
                         plaintext: bool) -> list[str]:
    """A shell command running ``put`` with no local workers, listening on a free
    loopback port, and ``workers`` remote worker processes connected to it; the key
    pairs go to a config directory in ``scratch`` (set in ``env``)."""
    import shlex
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        endpoint = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    env["XDG_CONFIG_HOME"] = os.path.join(scratch, "config")
    worker = [sys.executable, "-m", "ingest", "worker", "-q", "--connect", endpoint]
    put = put[:-1] + ["--listen", endpoint, put[-1]]
    put[put.index("--workers") + 1] = "0"
    if plaintext:
        worker.append("--insecure-plaintext")
        put.insert(-1, "--insecure-plaintext-workers")
    else:
        from ingest.link import make_key_pair

        key_dir = os.path.join(env["XDG_CONFIG_HOME"], "keep-ingest", "link")
        make_key_pair(key_dir, "coordinator")
        public, _ = make_key_pair(key_dir, "worker")
        os.makedirs(os.path.join(key_dir, "workers"))
        shutil.copy(public, os.path.join(key_dir, "workers"))
    starts = " ".join(f"{shlex.join(worker)} &" for _ in range(workers))
    return ["sh", "-c", f"{starts} {shlex.join(put)}; status=$?; wait; exit $status"]


def _md5sum(dataset: Dataset) -> list[str]:
    cores = os.cpu_count() or 1
    per_call = max(1, math.ceil(dataset.files / (cores * 8)))
    return ["xargs", "-0", "-a", dataset.file_list, "-P", str(cores), "-n", str(per_call), "md5sum"]


def _last_json(m: Measurement) -> dict[str, Any] | None:
    line = m.stdout.strip().splitlines()[-1] if m.stdout.strip() else ""
    return json.loads(line) if line.startswith("{") else None


def _pdh(row: Row, m: Measurement) -> str | None:
    if not row.uploads:
        return None
    doc = _last_json(m)
    if doc is not None:
        return doc["pdh"]
    return m.stdout.strip().splitlines()[-1] if m.stdout.strip() else None


def _check_walk(dataset: Dataset, m: Measurement) -> None:
    files, size = (int(v) for v in m.stdout.split())
    if (files, size) != (dataset.files, dataset.bytes):
        raise RunFailed(f"the walk floor found {files:,} files, {size:,} bytes in {dataset.name}, "
                        f"not {dataset.files:,} and {dataset.bytes:,}")


def _first_put(cmd: list[str], env: dict[str, str], cwd: str, row: Row, dataset: Dataset) -> None:
    """A re-run row's first, unmeasured ``put``, then its touched files; synced after."""
    m = run_measured(cmd, env=env, cwd=cwd)
    if m.returncode != 0:
        raise RunFailed(f"{row.label} on {dataset.name}: the first put exited {m.returncode}:\n{m.stderr[-3000:]}")
    if row.rerun:
        _touch(touched_files(dataset.paths(), row.rerun))
    os.sync()


def run_row(row: Row, dataset: Dataset, work_dir: str, repetition: int,
            baseline_src: str | None = None) -> RunResult:
    """Run ``row`` once on ``dataset`` from an empty store; the store is removed after.

    keep-ingest runs as ``python -m ingest`` from this source tree, or for the
    baseline rows from ``baseline_src``. A re-run row's first ``put`` (and the files it
    touches after it) are not measured.
    """
    scratch = tempfile.mkdtemp(prefix=f"{row.key}-", dir=work_dir)
    source = dataset.data + os.sep   # contents at the collection root, for every tool
    keepstore: Keepstore | None = None
    try:
        store = os.path.join(scratch, "store")
        servers = []
        src = REPO_ROOT
        if row.key in BASELINE_ROWS:
            if not baseline_src:
                raise ValueError(f"row {row.key} needs a baseline source tree")
            src = os.path.abspath(baseline_src)
        env = _env(src)
        if row.md5:
            env["KEEP_INGEST_MD5"] = row.md5
        if row.key in ("ki-keep", "arvput-keep"):
            keepstore = Keepstore(scratch)
            servers = [keepstore.process]
        if row.tool.startswith("keep-ingest"):
            if row.store == "keepstore":
                assert keepstore is not None
                store_args = ["--keep", keepstore.url, "--replication", "1"]
                env["ARVADOS_API_TOKEN"] = "bench-token"
            else:
                store_args = ["--store", store]
                if "no fsync" in row.store:
                    profile = os.path.join(scratch, "nofsync.toml")
                    with open(profile, "w") as f:
                        f.write(NO_FSYNC_PROFILE)
                    store_args += ["--config", profile]
            store_args += ["--state-dir", os.path.join(scratch, "state")]
            cmd = _keep_ingest(row.workers or 2, store_args, source, as_json=row.rerun is not None)
            if row.rerun is not None:
                _first_put(cmd, env, src, row, dataset)
            if row.key in REMOTE_ROWS:
                cmd = _with_remote_workers(cmd, row.workers or 2, scratch, env, plaintext=row.key.endswith("plain"))
        elif row.tool == "arv-put engine":
            target = ["--keep", keepstore.url] if keepstore else ["--local-store", store]
            cmd = [sys.executable, "-m", "bench.arvput_job", *target, source]
            src = REPO_ROOT
        elif row.key == "walkfloor":
            cmd = [sys.executable, "-m", "bench.walkfloor", source]
        else:
            cmd = _md5sum(dataset)
        m = run_measured(cmd, env=env, servers=servers, cwd=src)
        if m.returncode != 0:
            raise RunFailed(f"{row.label} on {dataset.name} exited {m.returncode}:\n{m.stderr[-3000:]}")
        if row.key == "walkfloor":
            _check_walk(dataset, m)
        counters = (_last_json(m) if row.rerun is not None else None) or {}
        return RunResult(row.key, dataset.name, repetition, m.wall_s, m.cpu_s, m.peak_rss, m.peak_pss,
                         _pdh(row, m), m.server_cpu_s, m.server_peak_rss, m.server_peak_pss,
                         bytes_read=counters.get("bytes_read"), blocks_uploaded=counters.get("blocks_uploaded"))
    finally:
        if keepstore is not None:
            keepstore.stop()
        shutil.rmtree(scratch, ignore_errors=True)
