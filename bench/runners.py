"""The rows of the benchmark: which command each one runs, and running it once.

Every upload starts from an empty store (a fresh directory, or a fresh keepstore with
a fresh volume), so no block is already stored and nothing is skipped.

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
* ``base`` / ``base-nofsync``: with ``--baseline SRC``, keep-ingest run from another
  source tree (a checkout of another revision), for before/after figures side by side.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
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
    # Only with --baseline SRC: keep-ingest from another source tree (another revision).
    Row("base", "keep-ingest @baseline", "dir, fsync", 2, "arvput"),
    Row("base-nofsync", "keep-ingest @baseline", "dir, no fsync", 2, "arvput"),
)}
BASELINE_ROWS = ("base", "base-nofsync")
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


def _keep_ingest(workers: int, store_args: list[str], source: str) -> list[str]:
    return [sys.executable, "-m", "ingest", "put", "-q", "--portable-data-hash",
            "--workers", str(workers), *store_args, source]


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


def _pdh(row: Row, m: Measurement) -> str | None:
    if row.tool == "md5sum":
        return None
    line = m.stdout.strip().splitlines()[-1] if m.stdout.strip() else ""
    if line.startswith("{"):
        return json.loads(line)["pdh"]
    return line or None


def run_row(row: Row, dataset: Dataset, work_dir: str, repetition: int,
            baseline_src: str | None = None) -> RunResult:
    """Run ``row`` once on ``dataset`` from an empty store; the store is removed after.

    keep-ingest runs as ``python -m ingest`` from this source tree, or for the
    baseline rows from ``baseline_src``.
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
            cmd = _keep_ingest(row.workers or 2, store_args, source)
            if row.key in REMOTE_ROWS:
                cmd = _with_remote_workers(cmd, row.workers or 2, scratch, env, plaintext=row.key.endswith("plain"))
        elif row.tool == "arv-put engine":
            target = ["--keep", keepstore.url] if keepstore else ["--local-store", store]
            cmd = [sys.executable, "-m", "bench.arvput_job", *target, source]
            src = REPO_ROOT
        else:
            cmd = _md5sum(dataset)
        m = run_measured(cmd, env=env, servers=servers, cwd=src)
        if m.returncode != 0:
            raise RunFailed(f"{row.label} on {dataset.name} exited {m.returncode}:\n{m.stderr[-3000:]}")
        return RunResult(row.key, dataset.name, repetition, m.wall_s, m.cpu_s, m.peak_rss, m.peak_pss,
                         _pdh(row, m), m.server_cpu_s, m.server_peak_rss, m.server_peak_pss)
    finally:
        if keepstore is not None:
            keepstore.stop()
        shutil.rmtree(scratch, ignore_errors=True)
