"""``get``: download a collection tree, or part of one, into a directory.

What the user can rely on:

* **Nothing outside DEST**: every name is checked (no absolute path, no empty,
  ``.`` or ``..`` component, no NUL) before anything is written, and a symlink or a
  file where a directory should be is a conflict, never followed. Every write goes
  through directory descriptors opened from DEST down without following symlinks
  (:mod:`ingest.read.destdir`), so a directory or a temporary file swapped for a
  symlink during the run stops the run, naming it, and nothing is written,
  created, renamed or timed outside DEST.
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
from ingest.read.destdir import DestDir, Ident, Replaced, open_checked_file, walk_to
from ingest.read.getstate import GetState, content_key
from ingest.read.names import check_safe, display
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
    rel: str                  # relative to DEST
    dir_rel: str              # its directory, relative to DEST ("" for DEST)
    name: str
    final: str                # the path, for messages
    segments: list[Segment]
    size: int
    key: str
    tmp: str | None = None    # the temporary file's name in dir_rel, once created
    ident: Ident | None = None
    remaining: int = 0


class Conflict(IngestError):
    """DEST holds something the manifest's tree cannot be written over."""


# (directory relative to DEST, temporary name, its device and inode, final path for
# messages, file offset, block offset, length)
Write = tuple[str, str, int, int, str, int, int, int]


def _write_pieces(root_fd: int, root: str, locator: str, writes: list[Write]) -> int:
    """In a worker: fetch one block (MD5 and size checked), pwrite its pieces.

    ``root_fd`` is DEST's descriptor, inherited from the parent; every file is
    opened from it without following a symlink, and must be the file the parent
    created. Returns the block's size.
    """
    data = worker_store().get(locator)
    view = memoryview(data)
    dirs: dict[str, int] = {}
    fds: dict[tuple[str, str], int] = {}
    final = ""
    try:
        for dir_rel, tmp, dev, ino, final, file_offset, block_offset, length in writes:  # noqa: B007 (final names the file in errors)
            fd = fds.get((dir_rel, tmp))
            if fd is None:
                dfd = dirs.get(dir_rel)
                if dfd is None:
                    dfd = dirs[dir_rel] = walk_to(root_fd, root, dir_rel)
                fd = fds[dir_rel, tmp] = open_checked_file(dfd, root, dir_rel, tmp, Ident(dev, ino), os.O_WRONLY)
            chunk = view[block_offset:block_offset + length]
            while chunk:
                n = os.pwrite(fd, chunk, file_offset)
                chunk = chunk[n:]
                file_offset += n
        # Synced here, in parallel, rather than one file at a time by the parent:
        # a file's data must be on disk before its journal record is.
        for fd in fds.values():
            os.fsync(fd)
    except Replaced as exc:
        raise Replaced(f"cannot write {final}: {exc}") from None
    except OSError as exc:
        raise IngestError(f"cannot write {final}: {exc.strerror or exc}") from None
    finally:
        for fd in [*fds.values(), *dirs.values()]:
            os.close(fd)
    return len(data)


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
        self.dest = DestDir(self.root)
        sel = select(manifest, path)
        for f in sel.files:
            check_safe(f.rel)
        for _, rel in sel.dirs:
            check_safe(rel)
        self.dirs = [rel for _, rel in sel.dirs]
        self.targets = []
        for f in sel.files:
            dir_rel, _, name = f.rel.rpartition("/")
            self.targets.append(_Target(f.rel, dir_rel, name, self.dest.show(f.rel), f.segments, f.size,
                                        content_key(f.segments)))
        self.result = GetResult(self.root, files=len(self.targets), dirs=len(self.dirs),
                                bytes=sel.total_bytes)
        self.mtime_ns = time.time_ns()
        self.state: GetState | None = None
        self.targets_to_fetch: list[_Target] = []
        self.jobs: list[BlockJob] = []
        self._last_progress = time.monotonic()

    # -- before anything is written ---------------------------------------------

    def preflight(self, state: GetState) -> tuple[list[_Target], list[str], list[str]]:
        """Files to fetch, the dirs that exist but are not directories, the conflicts."""
        self.dest.open_existing()
        conflicts: list[str] = []
        fatal: list[str] = []
        replace_dirs: list[str] = []
        for rel in self.dirs:
            st = self.dest.lstat(rel)
            if st is not None and not stat.S_ISDIR(st.st_mode):
                conflicts.append(f"{self.dest.show(rel)}: is {_kind(st)}; the manifest has a directory there")
                replace_dirs.append(rel)
        fetch: list[_Target] = []
        for t in self.targets:
            st = self.dest.lstat(t.rel)
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
        if self.dest.root_fd < 0:
            self.dest.create()
        else:
            existed.append("")
        replace_set = set(replace)
        for rel in self.dirs:
            if self.dest.make_dir(rel, replace=rel in replace_set):
                existed.append(rel)
        return existed

    def clean_stale(self, dirs: list[str]) -> int:
        """Remove temporary files an interrupted get left (we hold the lock: none is live).

        A file of the manifest that happens to have such a name is not one of them.
        """
        finals = {(t.dir_rel, t.name) for t in self.targets}
        removed = 0
        for d in dirs:
            try:
                stale = [name for name in self.dest.names(d)
                         if TMP_RE.fullmatch(name) and (d, name) not in finals]
            except OSError:
                continue
            for name in stale:
                try:
                    self.dest.unlink(d, name)
                    removed += 1
                except FileNotFoundError:
                    pass
        if removed:
            log.info("removed %d temporary file(s) left by an interrupted get", removed)
        return removed

    def create_tmp(self, t: _Target) -> None:
        while True:
            # Named before it exists, so an interrupt at any instant leaves no file that
            # the cleanup does not know of.
            t.tmp = f"{TMP_PREFIX}{secrets.token_hex(8)}.tmp"
            try:
                t.ident = self.dest.create_file(t.dir_rel, t.tmp, t.size)
                return
            except FileExistsError:
                t.tmp = None  # not ours
            except Replaced as exc:
                t.tmp = None
                raise Replaced(f"cannot write {t.final}: {exc}") from None
            except OSError as exc:
                t.tmp = None
                raise IngestError(f"cannot create a file in {self.dest.show(t.dir_rel)}: "
                                  f"{exc.strerror}") from None

    def finish(self, t: _Target) -> None:
        """All ranges written (and synced by the workers): set the mtime, record, rename."""
        assert self.state is not None and t.tmp is not None and t.ident is not None
        try:
            fd = self.dest.open_file(t.dir_rel, t.tmp, t.ident)
            try:
                os.utime(fd, ns=(self.mtime_ns, self.mtime_ns))
                st = os.fstat(fd)
            finally:
                os.close(fd)
            self.state.record(t.rel, t.key, st)
            self.dest.rename(t.dir_rel, t.tmp, t.name, t.ident)
        except Replaced as exc:
            raise Replaced(f"cannot write {t.final}: {exc}") from None
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
                assert t.tmp is not None and t.ident is not None
                writes.append((t.dir_rel, t.tmp, t.ident.dev, t.ident.ino, t.final,
                               piece.file_offset, piece.block_offset, piece.length))
            yield _write_pieces, (self.dest.root_fd, self.root, job.locator, writes), index

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

    def remove_tmp(self, fetch: list[_Target]) -> None:
        """After a failure: remove this run's temporary files (through DEST's descriptors)."""
        for t in fetch:
            if t.tmp is not None:
                try:
                    self.dest.unlink(t.dir_rel, t.tmp)
                except (OSError, IngestError):
                    pass

    def run(self) -> GetResult:
        started = time.monotonic()
        with GetState(self.root) as state, self.dest:
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
                self.dest.check_dirs(self.dirs)
            finally:
                self.remove_tmp(fetch)
            state.compact(self.dest.lstat)
        self.result.seconds = time.monotonic() - started
        return self.result


def run_get(manifest: Manifest, dest: str, path: str, spec: dict, workers: int,
            force: bool = False) -> GetResult:
    """Download the files under ``path`` ("" for all) into the directory ``dest``."""
    return _Getter(manifest, dest, path, spec, workers, force).run()
