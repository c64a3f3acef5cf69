"""``get``: download a collection tree, or part of one, into a directory.

What the user can rely on:

* **Nothing outside DEST**: every name is checked (no absolute path, no empty,
  ``.`` or ``..`` component, no NUL) before anything is written, and a symlink or a
  file where a directory should be is a conflict, never followed.
* **Nothing overwritten by surprise**: an existing file that is not known to hold
  the manifest's content is a conflict; all conflicts are listed and the run stops
  before fetching anything, unless ``--force``. A directory is never replaced.
* **Atomic files**: each file is written to ``.keep-ingest-get-<random>.tmp`` in its
  own directory, pre-sized, filled by the workers block by block (each block's MD5
  and size checked by the store), synced, given its mtime, and renamed into place
  once all its ranges are written. A partial file never has a final name.
* **mtimes**: every file a run writes gets the same mtime, the time that run
  started (a manifest carries no mtimes). Directories keep their natural mtimes.
* **Resume**: before the rename, the file is recorded in the destination's journal
  (see :mod:`ingest.read.getstate`); a later run skips every file whose record
  still matches (same content in the manifest, same size, mtime, inode and
  device) without fetching it, and removes temporary files left by an interrupted
  run. A run that fails still keeps every file it completed.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass

from ingest.errors import IngestError
from ingest.manifest import Manifest, Segment
from ingest.read.blocks import BlockJob, group_by_block, pieces_per_file
from ingest.read.getstate import GetState, content_key
from ingest.read.names import check_safe, display, local_path
from ingest.read.pool import BlockPool, Job, JobFailed, worker_store
from ingest.read.select import select

log = logging.getLogger("keep-ingest.get")

TMP_PREFIX = ".keep-ingest-get-"
TMP_RE = re.compile(r"\.keep-ingest-get-[0-9a-f]{16}\.tmp")
PROGRESS_EVERY_S = 5.0
MAX_LISTED = 10


@dataclass
class GetResult:
    dest: str
    files: int = 0            # files in the selection
    dirs: int = 0             # directories in the selection (below DEST)
    bytes: int = 0            # bytes in the selection
    written: int = 0          # files this run wrote
    already: int = 0          # files already complete, left alone
    blocks_fetched: int = 0
    bytes_fetched: int = 0
    seconds: float = 0.0


@dataclass(slots=True)
class _Target:
    rel: str
    final: str
    segments: list[Segment]
    size: int
    key: str
    tmp: str | None = None
    remaining: int = 0


class Conflict(IngestError):
    """DEST holds something the manifest's tree cannot be written over."""


def _write_pieces(locator: str, writes: list[tuple[str, str, int, int, int]]) -> int:
    """In a worker: fetch one block (MD5 and size checked), pwrite its pieces.

    ``writes`` holds (temporary path, final path for messages, file offset, block
    offset, length). Returns the block's size.
    """
    data = worker_store().get(locator)
    view = memoryview(data)
    fds: dict[str, int] = {}
    final = ""
    try:
        for tmp, final, file_offset, block_offset, length in writes:  # noqa: B007 (final names the file in errors)
            fd = fds.get(tmp)
            if fd is None:
                fd = fds[tmp] = os.open(tmp, os.O_WRONLY | os.O_CLOEXEC)
            chunk = view[block_offset:block_offset + length]
            while chunk:
                n = os.pwrite(fd, chunk, file_offset)
                chunk = chunk[n:]
                file_offset += n
        # Synced here, in parallel, rather than one file at a time by the parent:
        # a file's data must be on disk before its journal record is.
        for fd in fds.values():
            os.fsync(fd)
    except OSError as exc:
        raise IngestError(f"cannot write {final}: {exc.strerror or exc}") from None
    finally:
        for fd in fds.values():
            os.close(fd)
    return len(data)


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise IngestError(f"cannot stat {path}: {exc.strerror}") from None


def _kind(st: os.stat_result) -> str:
    if stat.S_ISLNK(st.st_mode):
        return "a symlink"
    if stat.S_ISREG(st.st_mode):
        return "a file"
    if stat.S_ISDIR(st.st_mode):
        return "a directory"
    return "a special file"


def _listing(items: list[str]) -> str:
    shown = "\n  ".join(items[:MAX_LISTED])
    more = f"\n  ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return f"\n  {shown}{more}"


class _Getter:
    def __init__(self, manifest: Manifest, dest: str, path: str, spec: dict, workers: int, force: bool):
        self.spec = spec
        self.workers = workers
        self.force = force
        self.root = os.path.abspath(dest)
        sel = select(manifest, path)
        for f in sel.files:
            check_safe(f.rel)
        for _, rel in sel.dirs:
            check_safe(rel)
        self.dirs = [rel for _, rel in sel.dirs]
        self.targets = [_Target(f.rel, local_path(self.root, f.rel), f.segments, f.size,
                                content_key(f.segments)) for f in sel.files]
        self.result = GetResult(self.root, files=len(self.targets), dirs=len(self.dirs),
                                bytes=sel.total_bytes)
        self.mtime_ns = time.time_ns()
        self.state: GetState | None = None
        self.targets_to_fetch: list[_Target] = []
        self.jobs: list[BlockJob] = []
        self._last_progress = time.monotonic()

    # -- before anything is written ---------------------------------------------

    def preflight(self, state: GetState) -> tuple[list[_Target], list[str], list[str]]:
        """Files to fetch, and the dirs that exist but are not directories."""
        try:
            st = os.stat(self.root)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise IngestError(f"cannot stat {self.root}: {exc.strerror}") from None
        if st is not None and not stat.S_ISDIR(st.st_mode):
            raise Conflict(f"destination {self.root} exists and is not a directory")
        conflicts: list[str] = []
        fatal: list[str] = []
        replace_dirs: list[str] = []
        for rel in self.dirs:
            path = local_path(self.root, rel)
            st = _lstat(path)
            if st is not None and not stat.S_ISDIR(st.st_mode):
                conflicts.append(f"{path}: is {_kind(st)}; the manifest has a directory there")
                replace_dirs.append(path)
        fetch: list[_Target] = []
        for t in self.targets:
            st = _lstat(t.final)
            if st is None:
                fetch.append(t)
            elif stat.S_ISDIR(st.st_mode):
                fatal.append(f"{t.final}: is a directory; the manifest has a file there")
            elif state.is_complete(t.rel, t.key, st) or (
                    stat.S_ISREG(st.st_mode) and st.st_size == 0 and t.size == 0):
                self.result.already += 1
            else:
                if state.known(t.rel, st) is not None:
                    why = "differs from the manifest (an earlier get wrote other content)"
                elif not stat.S_ISREG(st.st_mode):
                    why = f"is {_kind(st)}"
                elif st.st_size != t.size:
                    why = f"differs from the manifest ({st.st_size} bytes, the manifest has {t.size})"
                else:
                    why = "exists and is not known to match the manifest"
                conflicts.append(f"{t.final}: {why}")
                fetch.append(t)
        if fatal:
            raise Conflict(f"{len(fatal)} path(s) in {self.root} are directories where the manifest "
                           f"has files; they are never replaced:{_listing(fatal)}")
        if conflicts and not self.force:
            raise Conflict(f"refusing to overwrite {len(conflicts)} existing path(s) in {self.root} "
                           f"(use --force to overwrite them):{_listing(conflicts)}")
        return fetch, replace_dirs, conflicts

    # -- writing ------------------------------------------------------------------

    def make_dirs(self, replace: list[str]) -> list[str]:
        """Create DEST and the directories; returns those that existed before."""
        existed = []
        replace_set = set(replace)
        for path in [self.root] + [local_path(self.root, rel) for rel in self.dirs]:
            try:
                if path in replace_set:
                    os.unlink(path)  # --force: a file or symlink where a directory goes
                os.mkdir(path)
            except FileExistsError:
                if path == self.root or stat.S_ISDIR(os.lstat(path).st_mode):
                    existed.append(path)
                    continue
                raise Conflict(f"{path} appeared during the run and is not a directory") from None
            except FileNotFoundError:
                if path != self.root:
                    raise
                os.makedirs(path, exist_ok=True)
            except OSError as exc:
                raise IngestError(f"cannot create directory {path}: {exc.strerror}") from None
        return existed

    def clean_stale(self, dirs: list[str]) -> int:
        """Remove temporary files an interrupted get left (we hold the lock: none is live).

        A file of the manifest that happens to have such a name is not one of them.
        """
        finals = {t.final for t in self.targets}
        removed = 0
        for d in dirs:
            try:
                with os.scandir(d) as it:
                    stale = [e.path for e in it if TMP_RE.fullmatch(e.name) and e.path not in finals
                             and e.is_file(follow_symlinks=False)]
            except OSError:
                continue
            for path in stale:
                try:
                    os.unlink(path)
                    removed += 1
                except FileNotFoundError:
                    pass
        if removed:
            log.info("removed %d temporary file(s) left by an interrupted get", removed)
        return removed

    def create_tmp(self, t: _Target) -> None:
        directory = os.path.dirname(t.final)
        while True:
            # Named before it exists, so an interrupt at any instant leaves no file that
            # the cleanup does not know of.
            t.tmp = os.path.join(directory, f"{TMP_PREFIX}{secrets.token_hex(8)}.tmp")
            try:
                fd = os.open(t.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
                break
            except FileExistsError:
                t.tmp = None  # not ours
                continue
            except OSError as exc:
                t.tmp = None
                raise IngestError(f"cannot create a file in {directory}: {exc.strerror}") from None
        try:
            os.ftruncate(fd, t.size)
        except OSError as exc:
            raise IngestError(f"cannot write {t.final}: {exc.strerror}") from None
        finally:
            os.close(fd)

    def finish(self, t: _Target) -> None:
        """All ranges written (and synced by the workers): set the mtime, record, rename."""
        assert self.state is not None and t.tmp is not None
        try:
            os.utime(t.tmp, ns=(self.mtime_ns, self.mtime_ns))
            st = os.stat(t.tmp)
            self.state.record(t.rel, t.key, st)
            os.replace(t.tmp, t.final)
        except OSError as exc:
            raise IngestError(f"cannot write {t.final}: {exc.strerror}") from None
        t.tmp = None
        self.result.written += 1

    def job_stream(self) -> Iterator[Job]:
        for index, job in enumerate(self.jobs):
            writes = []
            for piece in job.pieces:
                t = self.targets_to_fetch[piece.file]
                if t.tmp is None:
                    self.create_tmp(t)
                writes.append((t.tmp, t.final, piece.file_offset, piece.block_offset, piece.length))
            yield _write_pieces, (job.locator, writes), index

    def on_block(self, index: int, size: int) -> None:
        self.result.blocks_fetched += 1
        self.result.bytes_fetched += size
        for piece in self.jobs[index].pieces:
            t = self.targets_to_fetch[piece.file]
            t.remaining -= 1
            if t.remaining == 0:
                self.finish(t)
        now = time.monotonic()
        if now - self._last_progress >= PROGRESS_EVERY_S:
            self._last_progress = now
            log.info("get: %d of %d blocks fetched, %d files written",
                     self.result.blocks_fetched, len(self.jobs), self.result.written)

    def block_error(self, failed: JobFailed) -> IngestError:
        """The error of a failed block, naming the files that needed it."""
        job = self.jobs[failed.tag]
        names = list(dict.fromkeys(display(self.targets_to_fetch[p.file].final) for p in job.pieces))
        return failed.for_block(job.locator, names)

    def run(self) -> GetResult:
        started = time.monotonic()
        with GetState(self.root) as state:
            self.state = state
            fetch, replace_dirs, replaced = self.preflight(state)
            if replaced:
                log.warning("--force: overwriting %d existing path(s) in %s", len(replaced), self.root)
            existed = self.make_dirs(replace_dirs)
            self.clean_stale(existed)
            self.targets_to_fetch = fetch
            try:
                for t in fetch:
                    if not t.segments:
                        self.create_tmp(t)
                        self.finish(t)
                self.jobs = group_by_block((i, t.segments) for i, t in enumerate(fetch) if t.segments)
                for i, count in pieces_per_file(self.jobs).items():
                    fetch[i].remaining = count
                if self.jobs:
                    workers = max(1, min(self.workers, len(self.jobs)))
                    with BlockPool(self.spec, workers, close_fds=state.fds) as pool:
                        try:
                            pool.run(self.job_stream(), self.on_block)
                        except JobFailed as failed:
                            raise self.block_error(failed) from None
            finally:
                for t in fetch:
                    if t.tmp is not None:
                        try:
                            os.unlink(t.tmp)
                        except OSError:
                            pass
            state.compact()
        self.result.seconds = time.monotonic() - started
        return self.result


def run_get(manifest: Manifest, dest: str, path: str, spec: dict, workers: int,
            force: bool = False) -> GetResult:
    """Download the files under ``path`` ("" for all) into the directory ``dest``."""
    return _Getter(manifest, dest, path, spec, workers, force).run()
