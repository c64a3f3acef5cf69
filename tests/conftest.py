"""Shared fixtures: running the real CLI as a subprocess, with its store in a temp dir.

The keepstore fixtures live in ``keepstore_fixture.py`` (see its docstring):
``keepstore_factory``, ``keepstore``, ``keepstore_signed``, ``keepstores3``; the
fault-injecting proxy in ``fault_proxy.py``: ``fault_proxy``; the test Arvados
cluster in ``arvados_cluster.py``: ``cluster``, ``fresh_cluster``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from fault_proxy import fault_proxy  # noqa: F401
from keepstore_fixture import keepstore, keepstore_factory, keepstore_signed, keepstores3  # noqa: F401

REPO_ROOT = Path(__file__).resolve().parent.parent
# The test Arvados cluster's fixtures (cluster, fresh_cluster): see arvados_cluster.py.
pytest_plugins = ["arvados_cluster"]


def cli_env(tmp_path: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a CLI run: the default store and state under tmp_path."""
    env = dict(os.environ)
    env["XDG_DATA_HOME"] = str(tmp_path / "xdg-data")
    env["XDG_STATE_HOME"] = str(tmp_path / "xdg-state")
    env["XDG_CONFIG_HOME"] = str(tmp_path / "xdg-config")
    env["PYTHONPATH"] = str(REPO_ROOT)
    env.update(extra or {})
    return env


def processes_tagged(tag: str) -> list[int]:
    """Live processes whose environment has KEEP_INGEST_TEST_TAG=tag (a run and its children)."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("KEEP_INGEST_TEST_TAG") == tag:
                found.append(p.pid)
        except psutil.Error:
            pass
    return found


SETPRIV = shutil.which("setpriv")
# A command prefix that runs as root without capabilities, so file permissions apply.
UNPRIVILEGED = [SETPRIV, "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", "--"] if SETPRIV else []


def spawn_cli(tmp_path: Path, *args: str, env: dict[str, str] | None = None,
              unprivileged: bool = False) -> subprocess.Popen:
    """Start ``keep-ingest ARGS...`` in the background (text pipes for stdout and stderr).

    ``unprivileged`` runs it as root without capabilities (via setpriv), so that file
    permissions apply to it as to any user.
    """
    return subprocess.Popen([*(UNPRIVILEGED if unprivileged else []), sys.executable, "-m", "ingest", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env(tmp_path, env))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_all(*procs: subprocess.Popen | None) -> None:
    """Kill and reap the spawned processes that are still running."""
    for proc in procs:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()


def finish(proc: subprocess.Popen, timeout: float = 90) -> tuple[int, str, str]:
    """Wait for a spawned CLI: (exit code, stdout, stderr); killed if it outlives ``timeout``."""
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            out, err = proc.communicate()
    return proc.returncode, out, err


def make_link_keys(base: Path) -> dict[str, Path]:
    """Key pairs for the remote worker link where CLI runs with ``cli_env(base)`` look
    by default: the coordinator's, and one worker's, whose public key the coordinator
    accepts. Returns their paths by name (and ``workers``, the accepted keys' dir)."""
    from ingest.link import make_key_pair

    key_dir = base / "xdg-config" / "keep-ingest" / "link"
    paths: dict[str, Path] = {}
    for name in ("coordinator", "worker"):
        public, secret = make_key_pair(str(key_dir), name)
        paths[f"{name}.key"], paths[f"{name}.key_secret"] = Path(public), Path(secret)
    (key_dir / "workers").mkdir()
    shutil.copy(paths["worker.key"], key_dir / "workers" / "worker.key")
    paths["workers"] = key_dir / "workers"
    return paths


@pytest.fixture(params=["C loops", "Python loops"])
def small_file_loops(request, monkeypatch) -> str:
    """Run a test with the C extension's loops over small files (ingest._smallfiles,
    in the walk and the reader) and again without them."""
    from ingest import reader, walk

    if request.param == "Python loops":
        for module in (reader, walk):
            monkeypatch.setattr(module, "_smallfiles", None)
    elif reader._smallfiles is None:
        pytest.skip("the ingest._smallfiles extension is not built")
    return request.param


@pytest.fixture
def link_keys(tmp_path) -> dict[str, Path]:
    """``make_link_keys`` for CLI runs under tmp_path."""
    return make_link_keys(tmp_path)


@pytest.fixture
def cli(tmp_path):
    """Run ``keep-ingest ARGS...`` as a user would; returns the CompletedProcess."""

    def run(*args: str, timeout: float = 120, env: dict[str, str] | None = None,
            cwd: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ingest", *args], capture_output=True,
                              text=True, encoding="utf-8", timeout=timeout,
                              env=cli_env(tmp_path, env), cwd=cwd)

    return run
