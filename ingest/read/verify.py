"""``verify``: compare the files of a manifest with a source tree.

The sources are walked as ``put`` walks them: the same forms (``dir`` is
``./dir/...``, ``dir/`` its contents, a file ``./NAME``), the same symlink and
exclude rules. When the tree differs and the manifest looks made from the other
form of a lone directory (``put dir`` against ``verify dir/``, or the other way
round), the report carries a hint saying what to type. Files on one side only are reported as missing (in the manifest, not in
the source) or extra (in the source, not in the manifest), at the topmost path
only: a whole missing directory is one entry. Files on both sides are compared
byte for byte: workers fetch each block once (MD5 checked) and compare its
pieces with the source files at the right offsets, reading 1 MiB at a time, so
memory is bounded by workers x (64 MiB + 1 MiB) whatever the file sizes. A file
differs when a byte or the size differs; the report gives the first differing
offset (for a truncated or extended file, at most the shorter size).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from ingest.errors import IngestError, SourceError
from ingest.manifest import Manifest, Segment
from ingest.read.blocks import BlockJob, group_by_block
from ingest.read.pool import BlockPool, Job, JobFailed, worker_store
from ingest.walk import Excludes, SourceFile, walk_sources
from ingest.words import quoted

log = logging.getLogger("keep-ingest.verify")

READ_CHUNK = 1 << 20
PROGRESS_EVERY_S = 5.0


@dataclass(frozen=True, slots=True)
class Difference:
    kind: str                          # "missing", "extra" or "differs"
    path: str                          # collection path; a directory ends with "/"
    offset: int | None = None          # differs: first differing byte
    manifest_size: int | None = None
    source_size: int | None = None
    detail: str = ""                   # differs: a file on one side, a directory on the other


@dataclass
class VerifyReport:
    files: int = 0                     # files in the manifest
    compared: int = 0                  # files present on both sides
    identical: int = 0
    bytes_compared: int = 0
    blocks_fetched: int = 0
    seconds: float = 0.0
    differences: list[Difference] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # source entries the walk skipped
    other_form: str = ""               # the source form the manifest looks made from, when not the given one

    @property
    def ok(self) -> bool:
        return not self.differences

    def count(self, kind: str) -> int:
        return sum(1 for d in self.differences if d.kind == kind)


def _first_difference(a: bytes, b: bytes) -> int:
    """Index of the first differing byte of two different, equally long strings."""
    lo, hi = 0, len(a)
    while hi - lo > 64:
        mid = (lo + hi) // 2
        if a[lo:mid] != b[lo:mid]:
            hi = mid
        else:
            lo = mid
    for i in range(lo, hi):
        if a[i] != b[i]:
            return i
    raise ValueError("no difference")


def _compare_pieces(locator: str, pieces: list[tuple[int, str, int, int, int]]) -> list[tuple[int, int]]:
    """In a worker: fetch one block, compare each piece with its source file.

    ``pieces`` holds (file index, source path, file offset, block offset, length).
    Returns (file index, first differing offset) for each file that differs here.
    """
    data = worker_store().get(locator)
    found: dict[int, int] = {}
    fds: dict[str, int] = {}
    src = ""
    try:
        for index, src, file_offset, block_offset, length in pieces:
            if found.get(index, file_offset + 1) <= file_offset:
                continue  # an earlier difference in this file is already known
            fd = fds.get(src)
            if fd is None:
                fd = fds[src] = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
            pos = 0
            while pos < length:
                want = min(READ_CHUNK, length - pos)
                got = os.pread(fd, want, file_offset + pos)
                expected = data[block_offset + pos:block_offset + pos + len(got)]
                if got != expected:
                    diff = file_offset + pos + _first_difference(got, expected)
                elif len(got) < want:
                    diff = file_offset + pos + len(got)  # the source file ends here
                else:
                    pos += want
                    continue
                found[index] = min(found.get(index, diff), diff)
                break
    except OSError as exc:
        raise SourceError(f"cannot read {src}: {exc.strerror or exc}") from None
    finally:
        for fd in fds.values():
            os.close(fd)
    return list(found.items())


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else ""


def _under(path: str, dirs: set[str]) -> bool:
    """True if a proper ancestor of ``path`` is in ``dirs``."""
    while "/" in path:
        path = _parent(path)
        if path in dirs:
            return True
    return False


def _tree_key(diff: Difference) -> list[str]:
    return diff.path.rstrip("/").split("/")


def _other_form(manifest: Manifest, sources: list[str]) -> str:
    """The source form (``dir`` or ``dir/``) the manifest looks made from, when it is
    not the one given for a lone directory; "" otherwise."""
    if len(sources) != 1 or not os.path.isdir(sources[0]):
        return ""
    src = sources[0]
    base = os.path.basename(os.path.abspath(src))
    top = {p.split("/", 1)[0] for p, _ in manifest.files()} | {d.split("/", 1)[0] for d in manifest.directories()}
    if not src.endswith(os.sep):
        return os.path.join(src, "") if top and base not in top else ""
    whole = top == {base} and manifest.is_dir(base) and not os.path.lexists(os.path.join(src, base))
    return src.rstrip(os.sep) if whole else ""


class _Verifier:
    def __init__(self, manifest: Manifest, sources: list[str], spec: dict, workers: int,
                 follow_links: bool, excludes: Excludes):
        self.manifest = manifest
        self.sources = sources
        self.spec = spec
        self.workers = workers
        self.follow_links = follow_links
        self.excludes = excludes
        self.report = VerifyReport()
        self.jobs: list[BlockJob] = []
        self.names: list[str] = []   # per compared file: collection path
        self.paths: list[str] = []   # per compared file: source path
        self.first: dict[int, int] = {}
        self._last_progress = time.monotonic()

    def structure(self) -> list[tuple[str, list[Segment], SourceFile]]:
        """Report what exists on one side only; return files on both sides."""
        walk = walk_sources(self.sources, self.follow_links, self.excludes)
        self.report.skipped = walk.skipped
        mfiles = dict(self.manifest.files())
        mdirs = set(self.manifest.directories())
        sfiles = {f.name: f for f in walk.files}
        sdirs = set(walk.directories)
        self.report.files = len(mfiles)
        diffs = self.report.differences
        file_vs_dir = {p for p in mfiles if p in sdirs}
        dir_vs_file = {d for d in mdirs if d in sfiles}
        for p in sorted(file_vs_dir):
            diffs.append(Difference("differs", p, detail="a file in the manifest, a directory in the source"))
        for p in sorted(dir_vs_file):
            diffs.append(Difference("differs", p, detail="a directory in the manifest, a file in the source"))
        kinds = file_vs_dir | dir_vs_file
        missing_dirs = mdirs - sdirs - dir_vs_file
        extra_dirs = sdirs - mdirs - file_vs_dir
        hidden_missing = missing_dirs | kinds
        hidden_extra = extra_dirs | kinds
        for d in missing_dirs:
            if not _under(d, hidden_missing):
                diffs.append(Difference("missing", d + "/"))
        for d in extra_dirs:
            if not _under(d, hidden_extra):
                diffs.append(Difference("extra", d + "/"))
        for p in mfiles:
            if p not in sfiles and p not in sdirs and not _under(p, hidden_missing):
                diffs.append(Difference("missing", p))
        for p in sfiles:
            if p not in mfiles and p not in mdirs and not _under(p, hidden_extra):
                diffs.append(Difference("extra", p))
        both = []
        for p, segs in mfiles.items():
            source = sfiles.get(p)
            if source is not None:
                both.append((p, segs, source))
        return both

    def job_stream(self) -> Iterator[Job]:
        for i, job in enumerate(self.jobs):
            pieces = [(p.file, self.paths[p.file], p.file_offset, p.block_offset, p.length)
                      for p in job.pieces]
            yield _compare_pieces, (job.locator, pieces), i

    def on_block(self, index: int, found: list[tuple[int, int]]) -> None:
        self.report.blocks_fetched += 1
        for file_index, offset in found:
            self.first[file_index] = min(self.first.get(file_index, offset), offset)
        now = time.monotonic()
        if now - self._last_progress >= PROGRESS_EVERY_S:
            self._last_progress = now
            log.info("verify: %d of %d blocks compared", self.report.blocks_fetched, len(self.jobs))

    def block_error(self, failed: JobFailed) -> IngestError:
        job = self.jobs[failed.tag]
        names = list(dict.fromkeys(quoted(self.names[p.file]) for p in job.pieces))
        return failed.for_block(job.locator, names)

    def run(self) -> VerifyReport:
        started = time.monotonic()
        both = self.structure()
        self.names = [p for p, _, _ in both]
        self.paths = [source.path for _, _, source in both]
        sizes = [source.size for _, _, source in both]
        jobs = group_by_block((i, segs) for i, (_, segs, _) in enumerate(both))
        for job in jobs:
            # Bytes past the end of a shorter source file cannot move the first difference.
            job.pieces = [p for p in job.pieces if p.file_offset < sizes[p.file]]
        self.jobs = [job for job in jobs if job.pieces]
        self.report.bytes_compared = sum(p.length for job in self.jobs for p in job.pieces)
        if self.jobs:
            workers = max(1, min(self.workers, len(self.jobs)))
            with BlockPool(self.spec, workers) as pool:
                try:
                    pool.run(self.job_stream(), self.on_block)
                except JobFailed as failed:
                    raise self.block_error(failed) from None
        self.report.compared = len(both)
        for i, (path, segs, source) in enumerate(both):
            msize = sum(s.length for s in segs)
            offset = self.first.get(i)
            if msize != source.size:
                shorter = min(msize, source.size)
                offset = shorter if offset is None else min(offset, shorter)
            if offset is None:
                self.report.identical += 1
            else:
                self.report.differences.append(Difference("differs", path, offset, msize, source.size))
        self.report.differences.sort(key=_tree_key)
        if self.report.differences:
            self.report.other_form = _other_form(self.manifest, self.sources)
        self.report.seconds = time.monotonic() - started
        return self.report


def run_verify(manifest: Manifest, sources: list[str], spec: dict, workers: int, follow_links: bool = True,
               excludes: Excludes | None = None) -> VerifyReport:
    """Compare every file of ``manifest`` with the sources, walked as ``put`` walks them."""
    return _Verifier(manifest, sources, spec, workers, follow_links, excludes or Excludes(())).run()
