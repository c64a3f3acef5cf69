"""get's destination, reached only through directory descriptors, never a symlink.

DEST itself is opened once, at the start of a run (following a symlink only if
the user's DEST already is one). Everything below it is reached one component at
a time from DEST's descriptor: each directory with ``O_DIRECTORY | O_NOFOLLOW``
relative to its parent's descriptor, each file created, opened, timed, renamed
and removed relative to its directory's descriptor, the last component never
followed. So a directory swapped for a symlink during a run (between the
conflict check and the writes, or while files are written) is never entered: the
opening fails with ELOOP or ENOTDIR and the run stops with :class:`Replaced`,
naming the path.

A directory is identified by its device and inode when first opened; every
later opening must find that same directory, and :meth:`DestDir.check_dirs`
re-walks all of them at the end of a run. A descriptor already open keeps
pointing at its directory even if that directory is renamed meanwhile: the
kernel lets a directory move to another parent only for a user allowed to write
into it and into the new parent, so whatever is written there could have been
written there by that user anyway; the final check still fails the run.

Forked workers inherit DEST's descriptor (it is open before the pool starts) and
walk from it the same way (:func:`walk_to`), and open files with
:func:`open_checked_file`, which also checks that the file is the one the parent
created (device and inode): a temporary file replaced by a symlink, or by a hard
link to another file, is never written to.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import OrderedDict
from typing import NamedTuple

from ingest.errors import IngestError
from ingest.read.names import check_safe

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
CACHED_DIRS = 64  # directory descriptors the parent keeps open (most recently used)
_NOT_THERE = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)


class Replaced(IngestError):
    """Something under DEST changed kind or identity during the run."""


class Ident(NamedTuple):
    """Which file or directory: device and inode."""

    dev: int
    ino: int

    @classmethod
    def of(cls, st: os.stat_result) -> Ident:
        return cls(st.st_dev, st.st_ino)


def show(root: str, rel: str) -> str:
    """The path of ``rel`` (components joined by ``/``, "" for DEST) for messages."""
    return os.path.join(root, *rel.split("/")) if rel else root


def _now(parent_fd: int, name: str) -> str:
    """What the entry ``name`` of ``parent_fd`` has become, for a message."""
    try:
        mode = os.stat(name, dir_fd=parent_fd, follow_symlinks=False).st_mode
    except OSError:
        return "has disappeared"
    if stat.S_ISLNK(mode):
        return "is now a symlink"
    if stat.S_ISDIR(mode):
        return "is now a directory"
    return "is now a file" if stat.S_ISREG(mode) else "is now a special file"


def _replaced(root: str, rel: str, parent_fd: int, exc: OSError) -> IngestError:
    """The error for entry ``rel`` that could not be opened from its parent's descriptor."""
    if exc.errno not in _NOT_THERE:
        return IngestError(f"cannot open {show(root, rel)}: {exc.strerror}")
    now = _now(parent_fd, rel.rpartition("/")[2])
    return Replaced(f"{show(root, rel)} {now}: it was replaced during the run; nothing is written through it")


def walk_to(root_fd: int, root: str, rel: str) -> int:
    """A new descriptor of directory ``rel`` below ``root_fd``, following no symlink."""
    if rel:
        check_safe(rel)  # no "..", so the walk can only go down
    fd = os.dup(root_fd)
    done: list[str] = []
    try:
        for part in rel.split("/") if rel else ():
            done.append(part)
            try:
                child = os.open(part, DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                raise _replaced(root, "/".join(done), fd, exc) from None
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_checked_file(dir_fd: int, root: str, dir_rel: str, name: str, ident: Ident, flags: int) -> int:
    """Open file ``name`` of directory ``dir_rel`` (whose descriptor is ``dir_fd``),
    never through a symlink; it must be the file ``ident``."""
    rel = f"{dir_rel}/{name}" if dir_rel else name
    try:
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as exc:
        raise _replaced(root, rel, dir_fd, exc) from None
    if Ident.of(os.fstat(fd)) != ident:
        os.close(fd)
        raise Replaced(f"{show(root, rel)} was replaced by another file during the run; "
                       "nothing is written to it")
    return fd


class DestDir:
    """DEST, opened at the start of a run; every path below it goes through descriptors.

    ``rel`` arguments are checked collection paths relative to DEST (``a/b``, "" for
    DEST itself); names are single components.
    """

    def __init__(self, root: str):
        self.root = root
        self.root_fd = -1
        self._idents: dict[str, Ident] = {}
        self._fds: OrderedDict[str, int] = OrderedDict()

    def __enter__(self) -> DestDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def show(self, rel: str) -> str:
        return show(self.root, rel)

    # -- DEST itself ----------------------------------------------------------------

    def open_existing(self) -> bool:
        """Open DEST if it exists (False if not); Replaced if it is not a directory."""
        try:
            self._set_root(os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        except FileNotFoundError:
            return False
        except NotADirectoryError:
            raise Replaced(f"destination {self.root} exists and is not a directory") from None
        except OSError as exc:
            raise IngestError(f"cannot open {self.root}: {exc.strerror}") from None
        return True

    def create(self) -> None:
        """Create DEST (and missing parents); DEST then must not be a symlink."""
        try:
            os.makedirs(self.root, exist_ok=True)
            self._set_root(os.open(self.root, DIR_FLAGS))
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise Replaced(f"destination {self.root} was replaced by a symlink or a file "
                               "while it was being created") from None
            raise IngestError(f"cannot create directory {self.root}: {exc.strerror}") from None

    def _set_root(self, fd: int) -> None:
        self.root_fd = fd
        self._idents[""] = Ident.of(os.fstat(fd))

    # -- directories ----------------------------------------------------------------

    def dir_fd(self, rel: str) -> int:
        """The (cached) descriptor of directory ``rel``; it must be the one first seen."""
        if rel == "":
            return self.root_fd
        fd = self._fds.get(rel)
        if fd is not None:
            self._fds.move_to_end(rel)
            return fd
        fd = walk_to(self.root_fd, self.root, rel)
        self._remember(rel, fd)
        return fd

    def _remember(self, rel: str, fd: int) -> None:
        ident = Ident.of(os.fstat(fd))
        known = self._idents.setdefault(rel, ident)
        if known != ident:
            os.close(fd)
            raise Replaced(f"{self.show(rel)} was replaced by another directory during the run")
        self._fds[rel] = fd
        while len(self._fds) > CACHED_DIRS:
            os.close(self._fds.popitem(last=False)[1])

    def make_dir(self, rel: str, replace: bool = False) -> bool:
        """Create directory ``rel`` (its parent exists); True if it existed already.

        ``replace``: remove the file or symlink found there first (``--force``).
        """
        parent, _, name = rel.rpartition("/")
        pfd = self.dir_fd(parent)
        existed = False
        try:
            if replace:
                os.unlink(name, dir_fd=pfd)
            os.mkdir(name, dir_fd=pfd)
        except FileExistsError:
            existed = True
        except OSError as exc:
            raise IngestError(f"cannot create directory {self.show(rel)}: {exc.strerror}") from None
        try:
            fd = os.open(name, DIR_FLAGS, dir_fd=pfd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise Replaced(f"{self.show(rel)} appeared during the run and is not a directory "
                               f"({_now(pfd, name)}); nothing is written through it") from None
            raise _replaced(self.root, rel, pfd, exc) from None
        self._remember(rel, fd)
        return existed

    def check_dirs(self, rels: list[str]) -> None:
        """Every directory (parents before children) is still the one this run used."""
        for rel in rels:
            fd = walk_to(self.root_fd, self.root, rel)
            try:
                if Ident.of(os.fstat(fd)) != self._idents.get(rel):
                    raise Replaced(f"{self.show(rel)} was replaced by another directory during the run")
            finally:
                os.close(fd)

    # -- entries --------------------------------------------------------------------

    def lstat(self, rel: str) -> os.stat_result | None:
        """The entry at ``rel``, not followed; None if it or a directory above is missing
        (or is not a directory)."""
        if self.root_fd < 0:
            return None
        check_safe(rel)
        parent, _, name = rel.rpartition("/")
        try:
            pfd = self.dir_fd(parent)
        except Replaced:
            return None
        try:
            return os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in _NOT_THERE:
                return None
            raise IngestError(f"cannot stat {self.show(rel)}: {exc.strerror}") from None

    def create_file(self, dir_rel: str, name: str, size: int) -> Ident:
        """Create the new file ``name`` in ``dir_rel``, ``size`` bytes long (sparse).

        FileExistsError if the name is taken (by anything, a symlink included).
        """
        dfd = self.dir_fd(dir_rel)
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o666, dir_fd=dfd)
        try:
            os.ftruncate(fd, size)
            return Ident.of(os.fstat(fd))
        finally:
            os.close(fd)

    def open_file(self, dir_rel: str, name: str, ident: Ident) -> int:
        """Open the file this run created as ``ident`` (read-only)."""
        return open_checked_file(self.dir_fd(dir_rel), self.root, dir_rel, name, ident, os.O_RDONLY)

    def rename(self, dir_rel: str, old: str, new: str, ident: Ident) -> None:
        """Rename ``old`` to ``new`` in ``dir_rel``; ``new`` must then be ``ident``."""
        dfd = self.dir_fd(dir_rel)
        os.replace(old, new, src_dir_fd=dfd, dst_dir_fd=dfd)
        st = os.stat(new, dir_fd=dfd, follow_symlinks=False)
        if Ident.of(st) != ident:
            raise Replaced(f"{self.show(f'{dir_rel}/{new}' if dir_rel else new)}: the temporary "
                           "file was replaced just before its rename; the file there is not get's")

    def unlink(self, dir_rel: str, name: str) -> None:
        os.unlink(name, dir_fd=self.dir_fd(dir_rel))

    def names(self, dir_rel: str) -> list[str]:
        """The names of the regular files in ``dir_rel`` (symlinks not followed)."""
        with os.scandir(self.dir_fd(dir_rel)) as it:
            return [e.name for e in it if e.is_file(follow_symlinks=False)]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1
