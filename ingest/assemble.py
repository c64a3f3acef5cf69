"""The manifest of a run, assembled as the run goes, on disk rather than in memory.

The walk hands over each directory and then its files, a batch at a time, with the
packer's parts for each (block index, offset, length); the run hands over each block's locator as the store confirms
it (or the journal, for a reused block). A directory's normalized line is written to
a spool file as soon as the walk has left it and every block it uses has a locator,
and what it held is dropped: memory holds only directories that wait for a block, and
one small entry per directory. ``finish`` writes the lines in tree order (the walk's
order, unless sources merge into one directory or are not given in sorted order),
adds the empty directories' placeholders, and hashes the stripped text for the PDH.

The text is byte for byte what :class:`ingest.manifest.Manifest` renders for the
same tree (the same function writes each line).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice
from operator import le
from typing import IO

from ingest.manifest import (
    EMPTY_DIR_SUFFIX,
    Manifest,
    parse_manifest,
    span_line,
    stream_line,
    stream_name,
    stripped_locator,
)
from ingest.plan import BatchParts, FileParts, file_parts

COPY_CHUNK = 1 << 20


class _Pending:
    """A directory's files, waiting for the walk to leave it or for its blocks."""

    __slots__ = ("name", "names", "spans", "spread", "blocks", "waiting", "walked")

    def __init__(self, name: str):
        self.name = name
        self.names: list[str] | str = []        # its files' names, as they came (joined, once walked)
        self.spans = array("q")                 # and per file (block, offset, length): see plan.BatchParts
        self.spread: dict[int, FileParts] = {}  # the parts of files in more than one block, by file index
        self.blocks: set[int] = set()           # every block it uses
        self.waiting: set[int] = set()          # those without a locator yet
        self.walked = False


@dataclass(slots=True)
class _Lines:
    """Where a directory's lines are in the spools (several when sources merge into it)."""

    signed: list[tuple[int, int]] = field(default_factory=list)    # (offset, length) in the signed spool
    stripped: list[tuple[int, int]] = field(default_factory=list)  # in the stripped one, or NO_STRIP


class ManifestText:
    """A finished manifest: its normalized text in a file, its PDH and size."""

    def __init__(self, directory: str, pdh: str, size: int, stripped_differs: bool):
        self.directory = directory
        self.pdh = pdh
        self.size = size
        self._signed = os.path.join(directory, "manifest")
        self._stripped = os.path.join(directory, "stripped") if stripped_differs else self._signed

    def text(self, strip: bool = False) -> str:
        """The whole text (signed locators unless ``strip``), read into memory."""
        with open(self._stripped if strip else self._signed, encoding="utf-8", newline="") as f:
            return f.read()

    def copy_to(self, out: IO[str]) -> None:
        """Write the text to ``out`` a chunk at a time."""
        with open(self._signed, encoding="utf-8", newline="") as f:
            shutil.copyfileobj(f, out, COPY_CHUNK)

    def parse(self) -> Manifest:
        return parse_manifest(self.text())

    def close(self) -> None:
        """Remove the files."""
        shutil.rmtree(self.directory, ignore_errors=True)


class ManifestAssembler:
    """Builds one run's manifest in a directory it makes (and owns) in ``parent_dir``."""

    def __init__(self, parent_dir: str):
        os.makedirs(parent_dir, mode=0o700, exist_ok=True)
        self.directory = tempfile.mkdtemp(prefix="manifest-", dir=parent_dir)
        self._signed = open(os.path.join(self.directory, "signed.spool"), "w+b")
        self._stripped = open(os.path.join(self.directory, "stripped.spool"), "w+b")
        self._lines: dict[str, _Lines] = {}               # every directory of the tree, "" included
        self._block_size: dict[int, int] = {}
        self._locator: dict[int, str] = {}
        self._users: dict[int, list[_Pending]] = {}       # block -> pending directories using it
        self._in_order = True                              # directories so far came in tree order
        self._last_key: tuple[str, ...] = ()
        self._current = self._enter("")

    # -- what the run hands over ------------------------------------------------------

    def add_dir(self, name: str) -> None:
        """The walk enters a directory (its files follow)."""
        self._leave()
        self._current = self._enter(name)

    def add_files(self, directory: str, names: list[str], placed: BatchParts) -> None:
        """Files of ``directory`` (a batch of the walk): their base names, and where
        the packer put them."""
        if directory != self._current.name:     # a file named as a source, after a directory
            self.add_dir(directory)
        pending = self._current
        if placed.spread:
            count = len(pending.names)
            pending.spread.update((count + i, parts) for i, parts in placed.spread.items())
        pending.names += names
        pending.spans += placed.spans
        for index in placed.blocks:
            if index not in pending.blocks:
                pending.blocks.add(index)
                self._users.setdefault(index, []).append(pending)
                if index not in self._locator:
                    pending.waiting.add(index)

    def block_located(self, index: int, locator: str, size: int) -> None:
        """A block of ``size`` bytes is stored (or reused) under ``locator``."""
        self._locator[index] = locator
        self._block_size[index] = size
        for pending in list(self._users.get(index, ())):   # _write changes that list
            pending.waiting.discard(index)
            if pending.walked and not pending.waiting:
                self._write(pending)

    def finish(self) -> ManifestText:
        """Every directory is walked and every block located: the manifest, in tree order."""
        self._leave()
        if self._users:
            raise RuntimeError(f"{len(self._users)} blocks of the manifest have no locator")
        names = sorted(self._lines, key=_tree_key) if not self._in_order else list(self._lines)
        md5 = hashlib.md5(usedforsecurity=False)
        size = 0
        stripped_differs = any(span != NO_STRIP for lines in self._lines.values() for span in lines.stripped)
        out = open(os.path.join(self.directory, "manifest"), "wb")
        out_stripped = open(os.path.join(self.directory, "stripped"), "wb") if stripped_differs else None
        try:
            for i, name in enumerate(names):
                signed, stripped = self._final_lines(name, names[i + 1] if i + 1 < len(names) else None)
                out.write(signed)
                if out_stripped is not None:
                    out_stripped.write(stripped)
                md5.update(stripped)
                size += len(stripped)
        finally:
            out.close()
            if out_stripped is not None:
                out_stripped.close()
            self._signed.close()
            self._stripped.close()
            for spool in ("signed.spool", "stripped.spool"):
                os.unlink(os.path.join(self.directory, spool))
        return ManifestText(self.directory, f"{md5.hexdigest()}+{size}", size, stripped_differs)

    def discard(self) -> None:
        """Drop everything (the run failed)."""
        self._signed.close()
        self._stripped.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    # -- inside ---------------------------------------------------------------------

    def _enter(self, name: str) -> _Pending:
        key = _tree_key(name)
        if name in self._lines or key < self._last_key:
            self._in_order = False          # merged or out of order: finish sorts
        self._last_key = key
        self._lines.setdefault(name, _Lines())
        return _Pending(name)

    def _leave(self) -> None:
        pending = self._current
        pending.walked = True
        if not pending.waiting:
            self._write(pending)
        elif pending.names:     # it waits for blocks: its names in one string (a name holds no NUL)
            pending.names = "\0".join(pending.names)

    def _write(self, pending: _Pending) -> None:
        """Spool a directory's line and forget its files and its blocks' users."""
        if pending.names:
            stream = stream_name(pending.name)
            names = pending.names.split("\0") if isinstance(pending.names, str) else pending.names
            blocks = {b: (self._locator[b], self._block_size[b]) for b in pending.blocks}
            locators: set[str] = set()
            line = _line_writer(stream, pending, names)
            lines = self._lines[pending.name]
            lines.signed.append(_append(self._signed, line(blocks, locators)))
            stripped = NO_STRIP
            if any(stripped_locator(loc) != loc for loc in locators):
                short = {b: (stripped_locator(loc), size) for b, (loc, size) in blocks.items()}
                stripped = _append(self._stripped, line(short, None))
            lines.stripped.append(stripped)
            pending.names, pending.spans, pending.spread = [], array("q"), {}
        for index in pending.blocks:
            users = self._users[index]
            users.remove(pending)
            if not users:
                del self._users[index], self._locator[index], self._block_size[index]
        pending.blocks = set()

    def _final_lines(self, name: str, following: str | None) -> tuple[bytes, bytes]:
        """A directory's line(s) in the final text, signed and stripped, encoded."""
        lines = self._lines[name]
        if not lines.signed:
            key = _tree_key(name)
            has_subdirs = following is not None and _tree_key(following)[:len(key)] == key
            placeholder = b"" if not name or has_subdirs else (stream_name(name) + EMPTY_DIR_SUFFIX).encode()
            return placeholder, placeholder
        signed = [_read(self._signed, span) for span in lines.signed]
        stripped = [s if span == NO_STRIP else _read(self._stripped, span)
                    for s, span in zip(signed, lines.stripped, strict=True)]
        if len(signed) == 1:
            return signed[0], stripped[0]
        merged = parse_manifest(b"".join(signed).decode("utf-8"))   # sources merged into this directory
        return merged.text().encode(), merged.text(strip=True).encode()


LineWriter = Callable[[dict[int, tuple[str, int]], set[str] | None], str]


def _line_writer(stream: str, pending: _Pending, names: list[str]) -> LineWriter:
    """How to write a directory's line given its blocks (see stream_line): from its
    columns when its files are in name order and none is in several blocks (nearly
    always), else file by file."""
    if not pending.spread and all(map(le, names, islice(names, 1, None))):
        spans = pending.spans
        return lambda blocks, locators: span_line(stream, names, spans, blocks, locators)
    parts = list(file_parts(pending.spans, pending.spread))
    if names != sorted(names):            # files named as sources, in the order given
        order = sorted(range(len(names)), key=names.__getitem__)
        names, parts = [names[i] for i in order], [parts[i] for i in order]
    files = list(zip(names, parts, strict=True))
    return lambda blocks, locators: stream_line(stream, files, blocks, locators)


NO_STRIP = (-1, -1)   # a spooled line whose stripped form is itself


def _tree_key(name: str) -> tuple[str, ...]:
    """Sort key of a directory path in tree order (a directory before what is in it)."""
    return tuple(name.split("/")) if name else ()


def _append(spool: IO[bytes], text: str) -> tuple[int, int]:
    """Write ``text`` at the end of a spool (where it always is until ``finish``);
    return its (offset, length) there."""
    data = text.encode("utf-8")
    offset = spool.tell()
    spool.write(data)
    return offset, len(data)


def _read(spool: IO[bytes], span: tuple[int, int]) -> bytes:
    spool.seek(span[0])
    return spool.read(span[1])
