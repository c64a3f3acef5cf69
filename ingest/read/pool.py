"""A bounded pool of worker processes; each job handles one whole block.

Workers are forked (``concurrent.futures.ProcessPoolExecutor`` with the fork
context, as put's local workers are) and open their own block store, from the same
spec, on their first job. Only job descriptions and small results travel between
processes; block bytes stay in the worker that fetched them. At most ``window``
jobs are submitted at a time (twice the workers: one running, one ready per
worker), so neither the queue nor the workers hold more than a few blocks: memory
is bounded by workers x 64 MiB, whatever the size of the tree.

Descriptors the parent holds when the pool starts are inherited by every worker
(fork), under the same numbers, so a job may name one: get passes DEST's
directory descriptor, from which its workers open every file without following
a symlink. ``close_fds`` lists those the workers must close instead.

A worker ignores SIGINT (the parent decides what to do), and exits by itself
within a fraction of a second if its parent disappears (kill -9), so no worker
outlives a run. In the parent, SIGTERM is turned into KeyboardInterrupt while the
pool is open, so it is handled like Ctrl-C (clean up, exit 130).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from ingest.errors import IngestError
from ingest.keep.factory import open_store
from ingest.keep.locator import Locator
from ingest.keep.store import BlockStore

PARENT_POLL_S = 0.2
STOP_GRACE_S = 5.0

_spec: dict[str, Any] | None = None
_store: BlockStore | None = None

Job = tuple[Callable[..., Any], tuple[Any, ...], Any]  # (function, arguments, tag)


def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(PARENT_POLL_S)
        if os.getppid() != parent_pid:
            os._exit(1)


def _init_worker(spec: dict[str, Any], parent_pid: int, close_fds: tuple[int, ...]) -> None:
    global _spec, _store
    _spec, _store = spec, None
    for fd in close_fds:  # e.g. the parent's lock, which must die with the parent
        try:
            os.close(fd)
        except OSError:
            pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="parent-watch", daemon=True).start()


def worker_store() -> BlockStore:
    """The calling worker's block store, opened on first use."""
    global _store
    if _store is None:
        if _spec is None:
            raise RuntimeError("worker_store() called outside a pool worker")
        _store = open_store(_spec, write=False)
    return _store


class JobFailed(Exception):
    """A job raised ``error``; ``tag`` says which job."""

    def __init__(self, tag: Any, error: BaseException):
        super().__init__(str(error))
        self.tag = tag
        self.error = error

    def for_block(self, locator: str, names: list[str]) -> IngestError:
        """The user's error for a failed block job, naming (some of) the files needing it."""
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        needed = f" (needed by {', '.join(names[:3])}{more})"
        if isinstance(self.error, IngestError):
            return IngestError(f"{self.error}{needed}", self.error.exit_code)
        return IngestError(f"block {Locator.parse(locator).stripped()}: "
                           f"{type(self.error).__name__}: {self.error}{needed}")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


class BlockPool:
    """``with BlockPool(spec, workers) as pool: pool.run(jobs, on_result)``."""

    def __init__(self, spec: dict[str, Any], workers: int, window: int | None = None,
                 close_fds: tuple[int, ...] = ()):
        """``close_fds``: descriptors of this process that workers must not keep open."""
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.spec = spec
        self.workers = workers
        self.window = window or 2 * workers
        self.close_fds = tuple(fd for fd in close_fds if fd >= 0)
        self._executor: ProcessPoolExecutor | None = None
        self._old_sigterm: Any = None

    def __enter__(self) -> BlockPool:
        # Forked children would flush a copy of anything still buffered.
        sys.stdout.flush()
        sys.stderr.flush()
        self._executor = ProcessPoolExecutor(
            self.workers, mp_context=multiprocessing.get_context("fork"),
            initializer=_init_worker, initargs=(self.spec, os.getpid(), self.close_fds))
        if threading.current_thread() is threading.main_thread():
            self._old_sigterm = signal.signal(signal.SIGTERM, _interrupt)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._old_sigterm is not None:
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None
        executor, self._executor = self._executor, None
        if executor is None:
            return
        if exc_type is None:
            executor.shutdown(wait=True)
            return
        # Failing or interrupted: drop queued jobs, stop the running ones now.
        procs = list((getattr(executor, "_processes", None) or {}).values())
        executor.shutdown(wait=False, cancel_futures=True)
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()

    def run(self, jobs: Iterable[Job], on_result: Callable[[Any, Any], None]) -> None:
        """Run every job, calling ``on_result(tag, result)`` in this process as each ends.

        After a job fails, no new job starts; the running ones finish (their
        results still reach ``on_result``), then JobFailed is raised for the
        first failure.
        """
        assert self._executor is not None, "use BlockPool as a context manager"
        running: dict[Future, Any] = {}
        failure: JobFailed | None = None
        pending = iter(jobs)
        exhausted = False
        while True:
            while failure is None and not exhausted and len(running) < self.window:
                job = next(pending, None)
                if job is None:
                    exhausted = True
                    break
                fn, args, tag = job
                running[self._executor.submit(fn, *args)] = tag
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                tag = running.pop(fut)
                try:
                    result = fut.result()
                except BrokenProcessPool:
                    raise IngestError("a worker process died unexpectedly (killed, or out of memory?)") from None
                except Exception as exc:  # noqa: BLE001 - reported with its job
                    failure = failure or JobFailed(tag, exc)
                    continue
                on_result(tag, result)
        if failure is not None:
            raise failure
