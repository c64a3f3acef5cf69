"""Deterministic walk of the source trees, in the manifest's own tree order.

In each directory: its regular files sorted by name, then its subdirectories sorted
by name, depth first. ``dir`` puts a tree under ``./dir``, ``dir/`` puts its
contents at the root, a file becomes ``./<basename>`` (arv-put's conventions).
Symlinks are followed by default, with loop detection (a loop through directories
or between symlinks is skipped with a warning); FIFOs, sockets and devices are
skipped with a warning and never opened. A source named on the command line that
would yield nothing (missing, a dangling symlink or loop, a FIFO...) is an error,
and so are names that are not valid UTF-8 (reported once the walk is over).

A :class:`TreeWalk` yields the tree as it walks it: a directory, then its files in
batches (:class:`FileBatch`: the names and fingerprints of up to ``BATCH_FILES``
files of one directory, as columns), holding nothing per file once a batch is taken:
``put`` plans and uploads while it walks, and its per-file work is done a batch at a
time. ``walk_sources`` collects the same files into lists of :class:`SourceFile`, for
callers that want the whole tree at once.
"""

from __future__ import annotations

import errno
import fnmatch
import logging
import os
import re
import stat
from array import array
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ingest.errors import SourceError, UsageError
from ingest.gcpause import collector_paused
from ingest.words import quoted

try:
    from ingest import _smallfiles
except ImportError:  # not built: no C compiler when installed, or another platform
    _smallfiles = None

log = logging.getLogger(__name__)


class Fingerprint(NamedTuple):
    """What identifies one version of a file without reading it.

    A named tuple, compared in C (the walk keeps its fields in plain tuples, in a
    batch's column; one is built for a file listed, read or checked).
    """

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    device: int

    @classmethod
    def of(cls, st: os.stat_result) -> Fingerprint:
        return cls(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


class SourceFile(NamedTuple):
    """A regular file to upload: where it is, and its path in the manifest (made from
    a FileBatch for the callers that want one object a file).

    The filesystem path is ``root + name``, with ``root`` shared by a source's files.
    """

    root: str           # the filesystem path the manifest path is relative to, "/"-terminated (or "")
    name: str           # manifest path, '/'-separated, relative to the root, unescaped
    fingerprint: Fingerprint

    @property
    def path(self) -> str:
        """The filesystem path to open."""
        return self.root + self.name

    @property
    def size(self) -> int:
        return self.fingerprint.size


class TreeDir(NamedTuple):
    """A directory of the tree, yielded before its files: its manifest path ("" is never yielded)."""

    name: str


def _column(typecode: str, values: Sequence[int]) -> Sequence[int]:
    """Integers in a machine array, or in a list when one does not fit (a time after
    the year 2262 does not fit 64 signed bits of nanoseconds)."""
    if isinstance(values, array) and values.typecode == typecode:
        return values
    try:
        return array(typecode, values)
    except OverflowError:
        return list(values)


class Fingerprints:
    """The fingerprints of a batch's files as five columns of machine integers, 40
    bytes a file rather than a tuple of five Python ints (about 230): a walk's files
    wait in these until their blocks are stored. A row (``[i]``, or iterating) is a
    plain tuple of a Fingerprint's fields."""

    __slots__ = ("sizes", "mtimes", "ctimes", "inodes", "devices")

    def __init__(self, sizes: Sequence[int], mtimes: Sequence[int], ctimes: Sequence[int],
                 inodes: Sequence[int], devices: Sequence[int]):
        if not len(sizes) == len(mtimes) == len(ctimes) == len(inodes) == len(devices):
            raise ValueError("fingerprint columns of different lengths")
        self.sizes = _column("q", sizes)
        self.mtimes = _column("q", mtimes)
        self.ctimes = _column("q", ctimes)
        self.inodes = _column("Q", inodes)
        self.devices = _column("Q", devices)

    @classmethod
    def of_rows(cls, rows: Iterable[tuple[int, int, int, int, int]]) -> Fingerprints:
        return cls(*(list(zip(*rows, strict=True)) or [()] * 5))

    def columns(self) -> tuple[Sequence[int], ...]:
        """sizes, mtimes, ctimes, inodes, devices."""
        return self.sizes, self.mtimes, self.ctimes, self.inodes, self.devices

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> tuple[int, int, int, int, int]:
        return self.sizes[i], self.mtimes[i], self.ctimes[i], self.inodes[i], self.devices[i]

    def __iter__(self) -> Iterator[tuple[int, int, int, int, int]]:
        return zip(*self.columns(), strict=True)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Fingerprints) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"Fingerprints({list(self)!r})"


_TYPECODES = ("q", "q", "q", "Q", "Q")       # Fingerprints' columns, in Fingerprint's field order


class FileBatch(NamedTuple):
    """Files of one directory in name order, as columns: a walk yields a directory's
    files in one or more of these (of at most ``BATCH_FILES``), and a file named as a
    source in one of its own."""

    root: str                        # as SourceFile's
    directory: str                   # their directory's manifest path ("" at the root)
    names: list[str]                 # their base names
    fingerprints: Fingerprints

    @property
    def prefix(self) -> str:
        """What a base name is joined to for its manifest path."""
        return f"{self.directory}/" if self.directory else ""

    def fingerprint(self, i: int) -> Fingerprint:
        return Fingerprint._make(self.fingerprints[i])

    def file(self, i: int) -> SourceFile:
        return SourceFile(self.root, self.prefix + self.names[i], self.fingerprint(i))

    def files(self) -> list[SourceFile]:
        return [self.file(i) for i in range(len(self.names))]


TreeItem = FileBatch | TreeDir
BATCH_FILES = 4096     # files of a directory per FileBatch


def _empty_columns() -> tuple[array, ...]:
    return tuple(array(typecode, bytes(8 * BATCH_FILES)) for typecode in _TYPECODES)


class _Rows:
    """The fingerprints of the batch being collected, as rows of five columns of
    BATCH_FILES machine integers that ``_smallfiles.stat_run`` fills in place too
    (kept from batch to batch). A value that does not fit turns them into lists,
    which hold any int, until the batch is taken."""

    __slots__ = ("columns", "count")

    def __init__(self) -> None:
        self.columns: tuple[Any, ...] = _empty_columns()
        self.count = 0

    @property
    def in_place(self) -> bool:
        """True while the columns are machine arrays, which stat_run can fill."""
        return isinstance(self.columns[0], array)

    def add(self, st: os.stat_result) -> None:
        """Append the fingerprint of ``st``."""
        values = Fingerprint.of(st)
        try:
            for column, value in zip(self.columns, values, strict=True):
                column[self.count] = value
        except OverflowError:
            self.columns = tuple(map(list, self.columns))
            for column, value in zip(self.columns, values, strict=True):
                column[self.count] = value
        self.count += 1

    def take(self) -> Fingerprints:
        """The rows collected, which are then forgotten."""
        taken = Fingerprints(*(column[:self.count] for column in self.columns))
        self.count = 0
        if not self.in_place:
            self.columns = _empty_columns()
        return taken


@dataclass(slots=True)
class WalkResult:
    """Every file to upload, in walk order, and every directory seen."""

    files: list[SourceFile] = field(default_factory=list)
    directories: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    unreadable: dict[str, str] = field(default_factory=dict)      # directory path -> reason

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


class WalkCount(NamedTuple):
    """What a walk has found so far (for a progress display)."""

    files: int
    bytes: int
    skipped: int
    unreadable: int


WalkProgress = Callable[[WalkCount], None]
PROGRESS_EVERY = 256    # files found, at least, between two calls of a walk's progress callback (after a batch)


class Excludes:
    """arv-put's ``--exclude`` semantics.

    A pattern without a directory part (``*.tmp``) matches a file or directory name
    anywhere. A pattern with one (``sub/*.txt``, ``./top.gif``) matches, component by
    component, paths relative to each source directory.
    """

    def __init__(self, patterns: Iterable[str]):
        names, self._paths = [], []
        for pattern in patterns:
            if pattern.startswith(os.sep):
                raise UsageError(f"--exclude {quoted(pattern)}: absolute patterns are not allowed")
            if os.path.dirname(pattern):
                parts = [p for p in pattern.split(os.sep) if p not in ("", ".")]
                if ".." in parts:
                    raise UsageError(f"--exclude {quoted(pattern)}: patterns may not contain '..'")
                self._paths.append(parts)
            else:
                names.append(fnmatch.translate(pattern))
        self._names = re.compile("|".join(names)) if names else None

    def __bool__(self) -> bool:
        return bool(self._names or self._paths)

    def excluded(self, relpath: str, name: str) -> bool:
        """True if the entry ``name`` at ``relpath`` (relative to its source dir) is excluded."""
        if self._names is not None and self._names.match(name):
            return True
        if self._paths:
            parts = relpath.split("/")
            for pat in self._paths:
                if len(pat) == len(parts) and all(
                        fnmatch.fnmatchcase(n, p) for n, p in zip(parts, pat, strict=True)):
                    return True
        return False


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def _listing(dirpath: str) -> tuple[int, list[str]]:
    """A descriptor of the directory (the caller closes it) and its entries' names, sorted."""
    dir_fd = os.open(dirpath, _DIR_FLAGS)
    try:
        names = os.listdir(dir_fd)
    except BaseException:
        os.close(dir_fd)
        raise
    names.sort()
    return dir_fd, names


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device file"
    return "special file"


def _unstatable(exc: OSError, is_link: bool) -> str:
    """Why a path that cannot be stat-ed is skipped, or "" when it is unreadable."""
    if isinstance(exc, FileNotFoundError):
        return "dangling symlink" if is_link else "vanished during the walk"
    if exc.errno == errno.ELOOP and is_link:
        return "symlink loop"
    return ""


def source_stat(source: str, follow_links: bool) -> os.stat_result:
    """The stat of a source named on the command line (a symlink followed unless
    ``follow_links`` is off); SourceError naming it when it cannot be uploaded: it
    does not exist, cannot be stat-ed, or is neither a regular file nor a directory
    (a source that would yield nothing is an error, not a warning)."""
    is_link = os.path.islink(source)
    if is_link and not follow_links:
        raise SourceError(f"source {quoted(source)}: a symlink, and --no-follow-links is given")
    try:
        st = os.stat(source)
    except FileNotFoundError:
        why = "a dangling symlink" if is_link else "no such file or directory"
        raise SourceError(f"source {quoted(source)}: {why}") from None
    except OSError as exc:
        why = _unstatable(exc, is_link) or exc.strerror or str(exc)
        raise SourceError(f"source {quoted(source)}: {why}") from None
    if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
        raise SourceError(f"source {quoted(source)}: a {_kind(st.st_mode)} (a collection holds only "
                          "regular files and directories)")
    return st


def check_sources(sources: Iterable[str], follow_links: bool) -> None:
    """Refuse, before any work starts, a source that cannot be uploaded (see source_stat)."""
    for source in sources:
        source_stat(source, follow_links)


# Whitespace outside ASCII: manifests cannot escape it (octal escapes are bytes, and
# the SDK's parser splits tokens on any whitespace), so such names cannot round-trip.
_NON_ASCII = re.compile(r"[^\x00-\x7f]", re.ASCII)


def _storable(name: str, path: str, bad: list[str]) -> bool:
    """True if ``name``, the last part of a manifest path, can be stored in a manifest;
    otherwise record ``path`` (its filesystem path: the directories above the source
    are not stored, and may hold any bytes) in ``bad``."""
    if name.isascii():   # nearly every name: encodable, and no non-ASCII whitespace
        return True
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        bad.append(os.fsencode(path).decode("utf-8", "backslashreplace") + "  (not valid UTF-8)")
        return False
    if any(c.isspace() for c in _NON_ASCII.findall(name)):
        bad.append(path.encode("unicode_escape").decode("ascii") + "  (non-ASCII whitespace)")
        return False
    return True


class WalkTally:
    """What a walk has found, skipped and could not read so far; a progress callback
    hears the counts every ``PROGRESS_EVERY`` files or so."""

    def __init__(self, on_progress: WalkProgress | None = None):
        self.skipped: list[tuple[str, str]] = []       # (path, reason)
        self.unreadable: dict[str, str] = {}           # path -> reason
        self.on_progress = on_progress
        self.files_found = self.bytes_found = 0
        self.entries_left = PROGRESS_EVERY   # before the next progress call

    def report(self) -> None:
        """Tell the progress callback what has been found so far."""
        self.entries_left = PROGRESS_EVERY
        if self.on_progress is not None:
            self.on_progress(WalkCount(self.files_found, self.bytes_found, len(self.skipped), len(self.unreadable)))

    def found(self, batch: FileBatch) -> None:
        """Count a batch of files."""
        self.files_found += len(batch.names)
        self.bytes_found += sum(batch.fingerprints.sizes)
        self.entries_left -= len(batch.names)
        if self.entries_left <= 0:
            self.report()

    def skip(self, path: str, reason: str) -> None:
        """A path left out with a warning (a FIFO, a loop, a dangling symlink...)."""
        log.warning("skipping %s: %s", reason, path)
        self.skipped.append((path, reason))

    def cannot_read(self, path: str, action: str, why: str) -> None:
        """A path that could not be stat-ed or listed (``action``: "stat", "read directory")."""
        log.error("cannot %s %s: %s", action, path, why)
        self.unreadable[path] = why


class TreeWalk(WalkTally):
    """One walk of the sources: iterate it for the tree's items, in walk order; what
    it skipped or could not read is in ``skipped`` and ``unreadable`` as it goes."""

    def __init__(self, sources: Iterable[str], follow_links: bool = True, excludes: Excludes | None = None,
                 leave_out: Iterable[str] = (), on_progress: WalkProgress | None = None):
        super().__init__(on_progress)
        self.sources = list(sources)
        self.follow_links = follow_links
        self.excludes = excludes or Excludes(())
        self.leave_out = frozenset(leave_out)
        self._leave_out_in = frozenset(path.rpartition("/")[0] + "/" for path in self.leave_out)  # their dirs, "/"-ended
        self.bad_names: list[str] = []
        # Only sources that share a directory can give one path twice: with a single
        # source, no path is remembered (memory stays flat in the file count).
        self.seen: dict[str, tuple[str, bool]] | None = {} if len(self.sources) > 1 else None
        self._rows = _Rows()

    def __iter__(self) -> Iterator[TreeItem]:
        """The tree's directories and files in walk order; SourceError on bad input,
        and once the walk is over if names cannot be stored."""
        with collector_paused():
            for source in self.sources:
                yield from self.walk_source(source)
        self.report()
        if self.bad_names:
            shown = "\n  ".join(self.bad_names[:20])
            more = f"\n  ... and {len(self.bad_names) - 20} more" if len(self.bad_names) > 20 else ""
            raise SourceError(
                f"{len(self.bad_names)} name(s) cannot be stored in a manifest (not valid UTF-8, "
                f"or non-ASCII whitespace the Arvados SDK cannot parse); rename them or --exclude "
                f"them:\n  {shown}{more}")

    def claim(self, name: str, path: str, is_dir: bool) -> None:
        """Record a manifest path; two sources may share a directory, nothing else."""
        if self.seen is None:
            return
        other = self.seen.get(name)
        if other is not None and not (is_dir and other[1]):
            raise SourceError(f"two sources give the same manifest path {quoted(name)}: {other[0]} and {path}")
        self.seen[name] = (path, is_dir)

    def batch(self, root: str, directory: str, names: list[str], fingerprints: Fingerprints) -> FileBatch:
        """The files ``names`` of a directory, with their ``fingerprints``: counted and
        claimed (with several sources), a batch at a time."""
        batch = FileBatch(root, directory, names, fingerprints)
        if self.seen is not None:
            prefix = batch.prefix
            for name in names:
                self.claim(prefix + name, root + prefix + name, False)
        self.found(batch)
        return batch

    def stat_entry(self, path: str, is_link: bool) -> os.stat_result | None:
        """Stat an entry of a directory, following a symlink only when asked; None
        when it is skipped (with a warning) or cannot be stat-ed (listed as unreadable)."""
        if is_link and not self.follow_links:
            self.skip(path, "symlink (--no-follow-links)")
            return None
        try:
            return os.stat(path) if is_link else os.lstat(path)
        except OSError as exc:
            why = _unstatable(exc, is_link)
            if why:
                self.skip(path, why)
            else:
                self.cannot_read(path, "stat", exc.strerror or str(exc))
            return None

    def walk_source(self, source: str) -> Iterator[TreeItem]:
        path = os.path.abspath(source)
        if path in self.leave_out:
            return
        st = source_stat(source, self.follow_links)
        if stat.S_ISDIR(st.st_mode):
            prefix = "" if source.endswith(os.sep) else os.path.basename(path)
            if prefix and not _storable(prefix, path, self.bad_names):
                return
            yield from self.walk_dir(path, prefix)
        elif stat.S_ISREG(st.st_mode):
            name = os.path.basename(path)
            if _storable(name, path, self.bad_names):
                yield self.batch(path[:-len(name)], "", [name], Fingerprints.of_rows([Fingerprint.of(st)]))

    def _entries(self, root: str, dirpath: str, dir_fd: int, entries: list[str], manifest_dir: str,
                 relbase: str, ancestors: frozenset[tuple[int, int]]) -> Generator[FileBatch, None, list]:
        """The files of one directory, in batches (each entry lstat-ed relative to its
        descriptor: no path lookup per file, and a symlink known by that lstat);
        returns its subdirectories to walk, as stack items.

        With the C extension, nothing to exclude and nothing to leave out in this
        directory, runs of plain regular files are lstat-ed by ``_smallfiles.stat_run``
        straight into the batch's columns; the loop below takes every other entry."""
        excludes = self.excludes if self.excludes else None
        S_ISREG, S_ISDIR, S_ISLNK, stat_at = stat.S_ISREG, stat.S_ISDIR, stat.S_ISLNK, os.stat
        subdirs = []
        base = f"{manifest_dir}/" if manifest_dir else ""
        prefix = dirpath if dirpath.endswith("/") else dirpath + "/"
        leave_out = self.leave_out
        fast = _smallfiles is not None and excludes is None and prefix not in self._leave_out_in
        stat_run = _smallfiles.stat_run if fast else None
        rows = self._rows
        names: list[str] = []
        i, end = 0, len(entries)
        while i < end:
            if stat_run is not None and rows.in_place:
                stop, rows.count = stat_run(dir_fd, entries, i, rows.columns, rows.count)
                names += entries[i:stop]
                i = stop
                if rows.count == BATCH_FILES:
                    yield self.batch(root, manifest_dir, names, rows.take())
                    names = []
                    continue
                if i == end:
                    break
            entry_name = entries[i]
            i += 1
            if excludes is not None and excludes.excluded(f"{relbase}/{entry_name}" if relbase else entry_name,
                                                          entry_name):
                continue
            if leave_out and prefix + entry_name in leave_out:
                continue
            if not entry_name.isascii() and not _storable(entry_name, prefix + entry_name, self.bad_names):
                continue
            st: os.stat_result | None
            try:
                st = stat_at(entry_name, dir_fd=dir_fd, follow_symlinks=False)
            except OSError:   # stat_entry says why
                st = self.stat_entry(prefix + entry_name, False)
            if st is not None and S_ISLNK(st.st_mode):
                st = self.stat_entry(prefix + entry_name, True)
            if st is None:
                continue
            if S_ISREG(st.st_mode):
                names.append(entry_name)
                rows.add(st)
                if rows.count == BATCH_FILES:
                    yield self.batch(root, manifest_dir, names, rows.take())
                    names = []
            elif S_ISDIR(st.st_mode):
                relpath = f"{relbase}/{entry_name}" if relbase else entry_name
                ident = (st.st_dev, st.st_ino)
                if ident in ancestors:
                    self.skip(prefix + entry_name, "symlink loop")
                    continue
                subdirs.append((prefix + entry_name, base + entry_name, relpath, ancestors | {ident}))
            else:
                self.skip(prefix + entry_name, _kind(st.st_mode))
        if names:
            yield self.batch(root, manifest_dir, names, rows.take())
        return subdirs

    def walk_dir(self, top: str, prefix: str) -> Iterator[TreeItem]:
        """Depth-first, files before subdirectories, each sorted by name."""
        top_st = os.stat(top)
        # Every path under top is root + its manifest path (which begins with prefix).
        root = top[:-len(prefix)] if prefix else top if top.endswith("/") else top + "/"
        # Each stack item: (dir path, manifest path, path relative to the source, ancestor ids)
        stack = [(top, prefix, "", frozenset({(top_st.st_dev, top_st.st_ino)}))]
        while stack:
            dirpath, manifest_dir, relbase, ancestors = stack.pop()
            try:
                dir_fd, entries = _listing(dirpath)
            except OSError as exc:
                self.cannot_read(dirpath, "read directory", exc.strerror or str(exc))
                continue
            try:
                if manifest_dir:
                    self.claim(manifest_dir, dirpath, True)
                    yield TreeDir(manifest_dir)
                subdirs = yield from self._entries(root, dirpath, dir_fd, entries, manifest_dir, relbase, ancestors)
            finally:
                os.close(dir_fd)
            stack.extend(reversed(subdirs))


def walk_sources(sources: Iterable[str], follow_links: bool = True,
                 excludes: Excludes | None = None, leave_out: Iterable[str] = (),
                 on_progress: WalkProgress | None = None) -> WalkResult:
    """The whole tree of a walk (see TreeWalk), in lists; SourceError naming the path
    on bad input.

    Directories that cannot be read are listed in ``unreadable`` (the caller decides);
    paths in ``leave_out`` (e.g. unreadable files the user agreed to skip) are omitted.
    ``on_progress`` hears what has been found so far every ``PROGRESS_EVERY`` files or so,
    and once at the end.
    """
    walk = TreeWalk(sources, follow_links, excludes, leave_out, on_progress)
    result = WalkResult(skipped=walk.skipped, unreadable=walk.unreadable)
    for item in walk:
        if isinstance(item, TreeDir):
            result.directories.append(item.name)
        else:
            result.files += item.files()
    return result
