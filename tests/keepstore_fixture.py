"""Real ``keep-ingest keepstore`` servers for tests, on free loopback ports.

Each server is a ``python -m ingest keepstore`` subprocess listening on
``127.0.0.1:0``; the fixture reads the URL it prints, and stops it at teardown
(SIGTERM, then SIGKILL after a grace period), waiting for the process even when
the test failed. Its stderr goes to a log file whose text is shown if start-up
fails (``KeepstoreProcess.log()`` gives it to a test too).

Pytest fixtures (registered by ``tests/conftest.py``):

``keepstore_factory``
    A function ``start(**options) -> KeepstoreProcess``; every server it starts
    is stopped when the test ends. ``start.many(count, **options)`` starts
    several alike servers in parallel and returns a list. Options (all keyword,
    all optional):

    ``volumes=1``                 number of fresh temp volume directories, or a
                                  list of directory paths to serve
    ``signing_key=None``          blob signing key (str); turns signing on
    ``signing_ttl=None``          ``--blob-signing-ttl`` seconds
    ``root_token=None``           SystemRootToken for the admin routes
    ``max_buffers=None``          ``--max-buffers``
    ``extra_args=()``             more command-line arguments
    ``fsync=False``               fsync blocks (off by default to keep tests fast)
    ``startup_timeout=20``        seconds to wait for the "listening" line

``keepstore``
    One running server without signing: ``keepstore.url``, ``keepstore.volumes``.

``keepstore_signed``
    One server with signing on (key ``SIGNING_KEY``) and admin token
    ``ROOT_TOKEN``; clients should send ``TOKEN``.

``keepstores3``
    Three unsigned servers (a list), for replication and rendezvous tests.

Outside pytest, ``running_keepstores(tmp_dir, count, **options)`` is a context
manager yielding a list of started servers; ``start_keepstore`` /
``start_keepstores`` return started servers the caller must ``stop()``.

A ``KeepstoreProcess`` has ``url`` (``http://127.0.0.1:PORT/``), ``volumes``
(paths), ``block_path(md5, volume=0)``, ``pid``, ``running()``, ``log()``,
``signal(sig)``, ``wait(timeout)``, ``stop()`` (SIGTERM, returns the exit
status) and ``kill()``.

Example::

    def test_upload(keepstore_factory):
        ks = [keepstore_factory(signing_key=SIGNING_KEY) for _ in range(2)]
        spec = {"type": "keep", "services": [k.url for k in ks], "token": TOKEN,
                "replication": 2, "backoff_start": 0}
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SIGNING_KEY = "test-signing-key-0123456789abcdefghijklmnopqrstuvwxyz"
ROOT_TOKEN = "test-system-root-token"
TOKEN = "test-user-token-v2"
_LISTEN_RE = re.compile(r"keepstore listening on (http://\S+/)")
_counter = itertools.count()


class KeepstoreStartError(RuntimeError):
    """The server exited or did not announce its URL in time."""


@dataclass
class KeepstoreProcess:
    """One running keepstore subprocess."""

    url: str
    proc: subprocess.Popen
    volumes: list[Path]
    log_path: Path
    signing_key: str | None = None
    signing_ttl: int | None = None
    root_token: str | None = None
    args: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        if self.running():
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 10) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self, timeout: float = 10) -> int:
        """SIGTERM, wait up to ``timeout``, then SIGKILL; returns the exit status."""
        if self.running():
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.running():
            self.proc.kill()
        self.proc.wait(timeout=10)

    def block_path(self, md5: str, volume: int = 0) -> Path:
        return self.volumes[volume] / md5[:3] / md5


def spawn_keepstore(base_dir: str | os.PathLike, *, volumes: int | Sequence[str | os.PathLike] = 1,
                    signing_key: str | None = None, signing_ttl: int | None = None,
                    root_token: str | None = None, max_buffers: int | None = None,
                    extra_args: Sequence[str] = (), fsync: bool = False) -> KeepstoreProcess:
    """Launch one server under ``base_dir`` (a fresh subdirectory) without waiting.

    ``url`` is empty until :func:`wait_ready` has read it from the server's log.
    """
    home = Path(tempfile.mkdtemp(prefix=f"ks{next(_counter)}-", dir=base_dir))
    if isinstance(volumes, int):
        vol_paths = [home / f"vol{i}" for i in range(volumes)]
    else:
        vol_paths = [Path(v) for v in volumes]
    args = [sys.executable, "-m", "ingest", "keepstore", "-v", "--listen", "127.0.0.1:0"]
    for v in vol_paths:
        args += ["--volume", str(v)]
    if signing_key is not None:
        key_file = home / "signing.key"
        key_file.write_text(signing_key + "\n")
        args += ["--blob-signing-key-file", str(key_file)]
    if signing_ttl is not None:
        args += ["--blob-signing-ttl", str(signing_ttl)]
    if root_token is not None:
        tok_file = home / "root.token"
        tok_file.write_text(root_token + "\n")
        args += ["--system-root-token-file", str(tok_file)]
    if max_buffers is not None:
        args += ["--max-buffers", str(max_buffers)]
    if not fsync:
        args.append("--no-fsync")
    args += list(extra_args)
    log_path = home / "keepstore.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                                cwd=str(home), env=env)
    return KeepstoreProcess(url="", proc=proc, volumes=vol_paths, log_path=log_path,
                            signing_key=signing_key, signing_ttl=signing_ttl,
                            root_token=root_token, args=args)


def wait_ready(ks: KeepstoreProcess, timeout: float = 20.0) -> KeepstoreProcess:
    """Wait for the server's "listening on" line and set ``ks.url``.

    On failure (exit, timeout) the process is killed and reaped, and
    KeepstoreStartError carries its log.
    """
    deadline = time.monotonic() + timeout
    try:
        while True:
            text = ks.log()
            m = _LISTEN_RE.search(text)
            if m:
                ks.url = m.group(1)
                return ks
            if ks.proc.poll() is not None:
                raise KeepstoreStartError(f"keepstore exited with status {ks.proc.returncode}:\n{text}")
            if time.monotonic() > deadline:
                raise KeepstoreStartError(f"keepstore did not start within {timeout}s:\n{text}")
            time.sleep(0.02)
    except BaseException:
        if ks.proc.poll() is None:
            ks.proc.kill()
        ks.proc.wait(timeout=10)
        raise


def start_keepstore(base_dir: str | os.PathLike, *, startup_timeout: float = 20.0,
                    **options) -> KeepstoreProcess:
    """Start one server and wait for its URL; the caller must ``stop()`` it."""
    return wait_ready(spawn_keepstore(base_dir, **options), startup_timeout)


def start_keepstores(base_dir: str | os.PathLike, count: int, *, startup_timeout: float = 20.0,
                     **options) -> list[KeepstoreProcess]:
    """Start ``count`` alike servers in parallel; all are stopped again if any fails."""
    procs = [spawn_keepstore(base_dir, **options) for _ in range(count)]
    try:
        for ks in procs:
            wait_ready(ks, startup_timeout)
    except BaseException:
        _stop_all(procs)
        raise
    return procs


@contextlib.contextmanager
def running_keepstores(base_dir: str | os.PathLike, count: int = 1, **options) -> Iterator[list[KeepstoreProcess]]:
    """Start ``count`` servers; stop them all on exit, whatever happened."""
    started: list[KeepstoreProcess] = []
    try:
        started = start_keepstores(base_dir, count, **options)
        yield started
    finally:
        _stop_all(started)


def _stop_all(servers: list[KeepstoreProcess]) -> None:
    for ks in servers:
        if ks.running():
            ks.proc.send_signal(signal.SIGTERM)
    for ks in servers:
        try:
            ks.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            ks.proc.kill()
            ks.proc.wait(timeout=10)


@pytest.fixture
def keepstore_factory(tmp_path_factory) -> Iterator[Callable[..., KeepstoreProcess]]:
    """``start(**options) -> KeepstoreProcess``; all are stopped at teardown.

    ``start.many(count, **options)`` starts several alike servers in parallel.
    """
    base = tmp_path_factory.mktemp("keepstores")
    started: list[KeepstoreProcess] = []

    def start(**options) -> KeepstoreProcess:
        ks = spawn_keepstore(base, **{k: v for k, v in options.items() if k != "startup_timeout"})
        started.append(ks)
        return wait_ready(ks, options.get("startup_timeout", 20.0))

    def many(count: int, **options) -> list[KeepstoreProcess]:
        procs = [spawn_keepstore(base, **{k: v for k, v in options.items() if k != "startup_timeout"})
                 for _ in range(count)]
        started.extend(procs)
        for ks in procs:
            wait_ready(ks, options.get("startup_timeout", 20.0))
        return procs

    start.many = many
    try:
        yield start
    finally:
        _stop_all(started)


@pytest.fixture
def keepstore(keepstore_factory) -> KeepstoreProcess:
    """One unsigned server with one volume."""
    return keepstore_factory()


@pytest.fixture
def keepstore_signed(keepstore_factory) -> KeepstoreProcess:
    """One server with signing on (SIGNING_KEY) and admin token ROOT_TOKEN."""
    return keepstore_factory(signing_key=SIGNING_KEY, root_token=ROOT_TOKEN)


@pytest.fixture
def keepstores3(keepstore_factory) -> list[KeepstoreProcess]:
    """Three unsigned servers."""
    return keepstore_factory.many(3)
