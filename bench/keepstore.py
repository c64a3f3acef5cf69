"""A ``keep-ingest keepstore`` server on a free loopback port, for the keepstore rows.

Both tools upload through the same server, a fresh one (with a fresh volume) for
each run so that no block is already stored. The server does not fsync (both tools
get the same server, and the rows compare the clients).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from types import TracebackType

import psutil

_LISTEN_RE = re.compile(r"keepstore listening on (http://\S+/)")


class Keepstore:
    """A running server: ``url``, ``process`` (psutil), ``volume``; a context manager."""

    def __init__(self, work_dir: str, startup_timeout: float = 30.0):
        self.home = tempfile.mkdtemp(prefix="keepstore-", dir=work_dir)
        self.volume = os.path.join(self.home, "vol")
        os.makedirs(self.volume)
        self._log_path = os.path.join(self.home, "keepstore.log")
        with open(self._log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ingest", "keepstore", "--listen", "127.0.0.1:0",
                 "--volume", self.volume, "--no-fsync"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        self.url = self._wait_for_url(startup_timeout)
        self.process = psutil.Process(self.proc.pid)

    def _wait_for_url(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            with open(self._log_path, errors="replace") as f:
                text = f.read()
            if (m := _LISTEN_RE.search(text)):
                return m.group(1)
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"keepstore did not start:\n{text}")
            time.sleep(0.02)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s; always reaps the process."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Keepstore:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
