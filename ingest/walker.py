"""The walk in a process of its own, so that its ``stat`` calls run on another core
while ``put`` packs, keys and assembles what it has already found.

:class:`WalkProcess` is iterated as a :class:`~ingest.walk.TreeWalk` is, and keeps
the same tallies (found, skipped, unreadable), logging as the walk would. It spawns
``python -m ingest.walker`` (spawned, not forked: a fork would copy the
coordinator's memory and threads), which runs the walk and sends what it yields over
a pipe as msgpack frames, a directory's files a batch at a time. The pipe's capacity
bounds how far the walk runs ahead. An error of the walk (a bad source, names that
cannot be stored) is raised by ``WalkProcess`` where the walk raised it.

The child runs in a process group of its own, so that a Ctrl-C or a SIGTERM sent to
the command's group reaches the coordinator alone, which stops it (``close``); it
ends quietly when the coordinator goes away (its next write fails).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import logging
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Iterable, Iterator
from typing import Any

import msgpack

import ingest
from ingest.errors import IngestError, SourceError, UsageError
from ingest.gcpause import collector_paused
from ingest.walk import Excludes, FileBatch, Fingerprints, TreeDir, TreeItem, TreeWalk, WalkProgress, WalkTally

log = logging.getLogger(__name__)

# Frames from the child: [kind, ...]
DIR, BATCH, ROOT, SKIP, UNREADABLE, FAILED, CRASHED, END = range(8)
PIPE_BYTES = 1 << 20        # the pipe's capacity asked for: how far the walk may run ahead
READ_BYTES = 1 << 18
MAX_FRAME = 64 << 20        # far above a batch's (BATCH_FILES names of at most 255 bytes)
FLUSH_BYTES = 1 << 15       # the child writes what it has once it holds this much...
FLUSH_SECONDS = 0.05        # ...or once it has held something this long
_ERRORS = {cls.__name__: cls for cls in (IngestError, SourceError, UsageError)}


class WalkProcess(WalkTally):
    """A walk of ``sources`` (see TreeWalk's arguments) run by a child process."""

    def __init__(self, sources: Iterable[str], follow_links: bool = True, exclude: Iterable[str] = (),
                 leave_out: Iterable[str] = (), on_progress: WalkProgress | None = None):
        super().__init__(on_progress)
        self.job = {"sources": list(sources), "follow_links": follow_links, "exclude": list(exclude),
                    "leave_out": list(leave_out)}
        Excludes(self.job["exclude"])     # UsageError for a bad pattern, here rather than from the child
        self._child: subprocess.Popen[bytes] | None = None

    def __iter__(self) -> Iterator[TreeItem]:
        reader = self._start()
        try:
            with collector_paused():
                yield from self._items(reader)
        finally:
            reader.close()
            self.close()

    def _start(self) -> io.RawIOBase:
        read_fd, write_fd = os.pipe()
        with contextlib.suppress(OSError):   # a smaller pipe only makes the walk run less far ahead
            fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        package_parent = os.path.dirname(os.path.dirname(os.path.abspath(ingest.__file__)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_parent,
                                                                          os.environ.get("PYTHONPATH")]))}
        try:
            self._child = subprocess.Popen([sys.executable, "-m", "ingest.walker", str(write_fd)],
                                           stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                           pass_fds=(write_fd,), env=env, process_group=0)
        finally:
            os.close(write_fd)
        reader = open(read_fd, "rb", buffering=0)     # closed by __iter__
        assert self._child.stdin is not None
        try:
            self._child.stdin.write(_escaping_packer().pack(self.job))
            self._child.stdin.close()
        except BrokenPipeError:
            pass   # the child died at once: its end of the pipe says so
        return reader

    def _items(self, reader: io.RawIOBase) -> Iterator[TreeItem]:
        frames = msgpack.Unpacker(reader, read_size=READ_BYTES, max_buffer_size=MAX_FRAME, use_list=False,
                                  unicode_errors="surrogateescape")
        root = ""
        for frame in frames:
            kind = frame[0]
            if kind == BATCH:
                batch = FileBatch(root, frame[1], list(frame[2]), Fingerprints(*frame[3:8]))
                self.found(batch)
                yield batch
            elif kind == DIR:
                yield TreeDir(frame[1])
            elif kind == ROOT:
                root = frame[1]
            elif kind == SKIP:
                self.skip(frame[1], frame[2])
            elif kind == UNREADABLE:
                self.cannot_read(frame[1], frame[2], frame[3])
            elif kind == END:
                self.report()
                return
            elif kind == FAILED:
                raise _ERRORS.get(frame[1], IngestError)(frame[3], frame[2])
            else:
                log.debug("the walk process failed:\n%s", frame[1])
                raise RuntimeError(f"the walk process failed: {frame[1].splitlines()[-1]}")
        raise RuntimeError(f"the walk process ended before the walk did ({self._ended()})")

    def _ended(self) -> str:
        assert self._child is not None
        try:
            code = self._child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return "it does not exit"
        return f"killed by signal {-code}" if code < 0 else f"exit status {code}"

    def close(self) -> None:
        """Stop the child (if it still runs) and reap it."""
        child, self._child = self._child, None
        if child is None:
            return
        if child.poll() is None:
            child.kill()
        child.wait()


def _escaping_packer() -> msgpack.Packer:
    # Paths and messages may hold names that are not UTF-8, as the os module gives
    # them (surrogate escapes): this private pipe carries them as they are.
    return msgpack.Packer(unicode_errors="surrogateescape")


class _Sender:
    """The child's end of the pipe: frames gathered, and written a few at a time."""

    def __init__(self, fd: int):
        self.fd = fd
        self.strict = msgpack.Packer()     # for names a walk yields: always UTF-8
        self.escaping = _escaping_packer()
        self.pending = bytearray()
        self.since = time.monotonic()

    def send(self, frame: list[Any], escaped: bool = False) -> None:
        if not self.pending:
            self.since = time.monotonic()
        self.pending += (self.escaping if escaped else self.strict).pack(frame)
        if len(self.pending) >= FLUSH_BYTES or time.monotonic() - self.since >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        written = 0
        with memoryview(self.pending) as view:
            while written < len(view):
                written += os.write(self.fd, view[written:])
        self.pending.clear()


class _ForwardingWalk(TreeWalk):
    """The child's walk: what it skips or cannot read goes to the coordinator, which logs it."""

    def __init__(self, sender: _Sender, job: dict[str, Any]):
        super().__init__(job["sources"], job["follow_links"], Excludes(job["exclude"]), job["leave_out"])
        self.sender = sender

    def skip(self, path: str, reason: str) -> None:
        self.sender.send([SKIP, path, reason], escaped=True)

    def cannot_read(self, path: str, action: str, why: str) -> None:
        self.sender.send([UNREADABLE, path, action, why], escaped=True)

    def run(self) -> None:
        root = None
        for item in self:
            if isinstance(item, TreeDir):
                self.sender.send([DIR, item.name])
                continue
            if item.root != root:
                root = item.root
                self.sender.send([ROOT, root], escaped=True)
            self.sender.send([BATCH, item.directory, item.names, *map(list, item.fingerprints.columns())])


def _child_main(fd: int) -> None:
    sender = _Sender(fd)
    try:
        job = msgpack.unpackb(sys.stdin.buffer.read(), unicode_errors="surrogateescape")
        try:
            _ForwardingWalk(sender, job).run()
            sender.send([END])
        except IngestError as exc:
            sender.send([FAILED, type(exc).__name__, exc.exit_code, str(exc)], escaped=True)
        except Exception:   # a bug: the coordinator says so in one line, and logs this with -vv
            sender.send([CRASHED, traceback.format_exc()], escaped=True)
        sender.flush()
    except BaseException:  # noqa: BLE001 (the coordinator went away, or the pipe broke: it says so)
        os._exit(1)
    os._exit(0)


if __name__ == "__main__":
    _child_main(int(sys.argv[1]))
