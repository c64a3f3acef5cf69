"""Arvados manifests: escaping, a strict parser, a collection tree, normalized text, PDH.

The normalized text is what the official Python SDK emits for
``Collection.manifest_text(normalize=True)``: tree order (each directory's files
sorted by name, then its subdirectories, depth first), one line per directory that
holds files, blocks listed once per line in order of first use, contiguous ranges
merged, empty directories written as a ``\\056`` placeholder file.
"""

from __future__ import annotations

import hashlib
import re
from bisect import bisect_right
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from functools import lru_cache
from itertools import chain
from operator import add
from typing import NamedTuple

from ingest.keep.locator import EMPTY_BLOCK_LOCATOR, Locator, LocatorError, is_md5_hex

__all__ = [
    "ManifestError",
    "Segment",
    "Manifest",
    "escape_name",
    "unescape_name",
    "parse_manifest",
    "portable_data_hash",
    "stream_name",
    "stream_line",
    "span_line",
    "stripped_locator",
    "EMPTY_DIR_SUFFIX",
]

# Characters escaped as \ooo in names: backslash, colon, controls and space.
_ESCAPES = {c: f"\\{c:03o}" for c in range(0x21)}
_ESCAPES[ord("\\")] = "\\134"
_ESCAPES[ord(":")] = "\\072"
_NEEDS_ESCAPE = re.compile(r"[\x00-\x20\\:]").search
_UNESCAPE_RE = re.compile(r"\\([0-3][0-7][0-7])")
_FILE_TOKEN_RE = re.compile(r"([0-9]+):([0-9]+):(.+)", re.DOTALL)
_RAW_CONTROL_RE = re.compile(r"[\x00-\x1f]")
EMPTY_DIR_SUFFIX = f" {EMPTY_BLOCK_LOCATOR} 0:0:\\056\n"


class ManifestError(ValueError):
    """Invalid manifest text or an inconsistent tree operation."""


def escape_name(name: str) -> str:
    """Escape a stream or file name: ``[\\\\:\\x00-\\x20]`` become ``\\ooo``; the rest is kept."""
    return name.translate(_ESCAPES) if _NEEDS_ESCAPE(name) else name   # a search is 5x cheaper


def unescape_name(token: str) -> str:
    """Decode every ``\\ooo`` escape (first digit 0-3); other backslashes stay literal."""
    if "\\" not in token:
        return token
    return _UNESCAPE_RE.sub(lambda m: chr(int(m.group(1), 8)), token)


class Segment(NamedTuple):
    """A piece of a file: ``length`` bytes at ``offset`` within one block (a named
    tuple: one is made per file of a manifest, and a tuple is made fastest)."""

    locator: str  # as stored, possibly with +A signature hints
    block_size: int  # size of that block (the locator's size)
    offset: int  # offset of the data within the block
    length: int


class _Dir:
    """One directory: file name -> segments, subdirectory name -> _Dir."""

    __slots__ = ("files", "dirs")

    def __init__(self) -> None:
        self.files: dict[str, list[Segment]] = {}
        self.dirs: dict[str, _Dir] = {}


def _split_path(path: str) -> list[str]:
    """Split a relative '/'-separated path; reject empty, '.' and '..' components."""
    parts = path.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise ManifestError(f"invalid path {path!r}: empty, '.' or '..' component")
    return parts


@lru_cache(maxsize=4096)
def _locator_size(locator: str) -> int:
    """The size a locator declares; ManifestError if it is not a valid locator."""
    try:
        return Locator.parse(locator).size
    except LocatorError as exc:
        raise ManifestError(str(exc)) from None


def stream_name(path: str) -> str:
    """The stream token of a directory path ("" is the root, ``.``)."""
    return f"./{escape_name(path)}" if path else "."


def stripped_locator(locator: str) -> str:
    """``md5+size`` of an already validated locator, size without leading zeros."""
    cut = locator.find("+", 33)
    core = locator if cut < 0 else locator[:cut]
    if core[33] == "0" and len(core) > 34:
        core = f"{core[:32]}+{int(core[33:])}"
    return core


class Manifest:
    """A collection tree: directories, and files made of segments."""

    __slots__ = ("_root",)

    def __init__(self) -> None:
        self._root = _Dir()

    # -- building -------------------------------------------------------------

    def add_file(self, path: str, segments: Sequence[Segment]) -> None:
        """Add segments to the file at ``path`` (created, with its parents, if new).

        Zero-length segments carry no data and are dropped.
        """
        *parents, name = _split_path(path)
        kept = list(segments)  # our own copy; a new file adopts it
        for seg in kept:
            try:
                size = _locator_size(seg.locator)
            except ManifestError as exc:
                raise ManifestError(f"invalid segment for {path!r}: {exc}") from None
            if seg.block_size != size or seg.offset < 0 or seg.length < 0 or seg.offset + seg.length > size:
                raise ManifestError(f"invalid segment for {path!r}: {seg!r}")
        if not all(seg.length for seg in kept):
            kept = [seg for seg in kept if seg.length]
        self._append(parents, name, kept)

    def add_dir(self, path: str) -> None:
        """Ensure the directory at ``path`` exists ("" is the root)."""
        if path:
            self._mkdirs(_split_path(path))

    def _mkdirs(self, parts: Sequence[str]) -> _Dir:
        node = self._root
        for i, part in enumerate(parts):
            sub = node.dirs.get(part)
            if sub is None:
                if part in node.files:
                    raise ManifestError(f"{'/'.join(parts[: i + 1])!r} is a file, not a directory")
                sub = node.dirs[part] = _Dir()
            node = sub
        return node

    def _append(self, parents: Sequence[str], name: str, segments: list[Segment]) -> list[Segment]:
        """Append ``segments`` to a file, which adopts the list if new; return the file's list."""
        node = self._mkdirs(parents)
        segs = node.files.get(name)
        if segs is None:
            if name in node.dirs:
                raise ManifestError(f"{'/'.join([*parents, name])!r} is a directory, not a file")
            segs = node.files[name] = segments
        else:
            segs.extend(segments)
        return segs

    # -- lookups --------------------------------------------------------------

    def _lookup_dir(self, parts: Sequence[str]) -> _Dir | None:
        node = self._root
        for part in parts:
            sub = node.dirs.get(part)
            if sub is None:
                return None
            node = sub
        return node

    def find(self, path: str) -> list[Segment] | None:
        """The segments of the file at ``path``, or None if there is no such file."""
        *parents, name = _split_path(path)
        node = self._lookup_dir(parents)
        segs = None if node is None else node.files.get(name)
        return None if segs is None else list(segs)

    def is_dir(self, path: str) -> bool:
        """True if ``path`` is a directory ("" is the root)."""
        return not path or self._lookup_dir(_split_path(path)) is not None

    def _walk(self) -> Iterator[tuple[str, _Dir]]:
        """(path, dir) in tree order, root first as ""."""
        stack = [("", self._root)]
        while stack:
            path, node = stack.pop()
            yield path, node
            prefix = path + "/" if path else ""
            stack.extend((prefix + name, node.dirs[name]) for name in sorted(node.dirs, reverse=True))

    def files(self) -> Iterator[tuple[str, list[Segment]]]:
        """(path, segments) of every file, in tree order."""
        for path, node in self._walk():
            prefix = path + "/" if path else ""
            for name in sorted(node.files):
                yield prefix + name, list(node.files[name])

    def directories(self) -> Iterator[str]:
        """Every directory path in tree order, the root excluded."""
        walk = self._walk()
        next(walk)
        for path, _ in walk:
            yield path

    # -- output ---------------------------------------------------------------

    def text(self, strip: bool = False) -> str:
        """Normalized manifest text; ``strip`` reduces locators to ``md5+size``."""
        return self._render({} if strip else None, None)

    def text_and_pdh(self) -> tuple[str, str]:
        """The normalized text and the portable data hash, building the text only once
        when no locator carries hints (the text is then its own stripped form)."""
        locators: set[str] = set()
        text = self._render(None, locators)
        stripped = text if all(stripped_locator(loc) == loc for loc in locators) else self.text(strip=True)
        return text, _hash_text(stripped)

    def _render(self, strip_cache: dict[str, str] | None, locators: set[str] | None) -> str:
        """The normalized text, stripping locators when given a cache for that, and
        collecting every locator written into ``locators`` when given."""
        out: list[str] = []
        stack = [(".", self._root)]
        while stack:
            stream, node = stack.pop()
            if node.files:
                out.append(_segment_line(stream, node.files, strip_cache, locators))
            elif not node.dirs and node is not self._root:
                out.append(stream + EMPTY_DIR_SUFFIX)
            dirs = node.dirs
            stack.extend((f"{stream}/{escape_name(name)}", dirs[name]) for name in sorted(dirs, reverse=True))
        return "".join(out)

    def portable_data_hash(self) -> str:
        """``md5(stripped normalized text)+length``."""
        return _hash_text(self.text(strip=True))


def _hash_text(stripped_text: str) -> str:
    data = stripped_text.encode()
    return f"{hashlib.md5(data, usedforsecurity=False).hexdigest()}+{len(data)}"


BlockParts = Iterable[tuple[Hashable, int, int]]
"""Where a file's bytes lie: ``(block key, offset in block, length)`` in file order."""


def stream_line(stream: str, files: Iterable[tuple[str, BlockParts]],
                blocks: Mapping[Hashable, tuple[str, int]], locators: set[str] | None) -> str:
    """One normalized line for a directory: its files in name order, each with its
    parts; ``blocks`` gives each block key's locator (as it is to be written) and size.

    Blocks are listed in order of first use, a locator once (equal locators share a
    position); a file's contiguous parts are written as one range. ``locators``, when
    given, collects every locator written.
    """
    placed = _LineBlocks(blocks)
    file_tokens: list[str] = []
    last_key: Hashable = _NO_BLOCK
    last_pos = 0
    for name, parts in files:
        ename = escape_name(name)
        start = end = -1
        for key, offset, length in parts:
            if key != last_key:
                last_key, last_pos = key, placed.position(key)
            pos = last_pos + offset
            if pos == end:
                end += length
            else:
                if start >= 0:
                    file_tokens.append(f"{start}:{end - start}:{ename}")
                start, end = pos, pos + length
        file_tokens.append(f"{start}:{end - start}:{ename}" if start >= 0 else f"0:0:{ename}")
    return placed.line(stream, file_tokens, locators)


class _LineBlocks:
    """The block tokens of one line, in order of first use: a locator written once
    (equal locators share a position), each at the sum of the sizes before it."""

    def __init__(self, blocks: Mapping[Hashable, tuple[str, int]]):
        self.blocks = blocks
        self.tokens: list[str] = []
        self.at_locator: dict[str, int] = {}
        self.stream_size = 0

    def position(self, key: Hashable) -> int:
        """Where block ``key`` starts in the stream (placing it there if it is new)."""
        loc, size = self.blocks[key]
        pos = self.at_locator.get(loc)
        if pos is None:
            pos = self.at_locator[loc] = self.stream_size
            self.tokens.append(loc)
            self.stream_size += size
        return pos

    def line(self, stream: str, file_tokens: Iterable[str], locators: set[str] | None) -> str:
        """The whole line: the stream, its blocks (the empty block if none), its files."""
        if not self.tokens:
            self.tokens.append(EMPTY_BLOCK_LOCATOR)
        if locators is not None:
            locators.update(self.tokens)
        return " ".join(chain((stream,), self.tokens, file_tokens)) + "\n"


_NO_BLOCK = object()


def span_line(stream: str, names: list[str], spans: Sequence[int], blocks: Mapping[int, tuple[str, int]],
              locators: set[str] | None) -> str:
    """stream_line for files of one part at most, sorted by name, given as columns: their
    names and their spans, three numbers a file (block index, offset, length; a
    negative index for an empty file). The same text, made a column at a time."""
    block_of = spans[0::3]
    placed = _LineBlocks(blocks)
    start = {key: placed.position(key) if key >= 0 else 0     # an empty file: 0:0:name
             for key in dict.fromkeys(block_of)}                # in order of first use
    escaped = [escape_name(name) for name in names] if _NEEDS_ESCAPE("".join(names)) else names
    positions = map(add, map(start.__getitem__, block_of), spans[1::3])
    file_tokens = [f"{pos}:{length}:{name}" for pos, length, name in zip(positions, spans[2::3], escaped, strict=True)]
    return placed.line(stream, file_tokens, locators)

def _segment_line(stream: str, files: dict[str, list[Segment]], strip_cache: dict[str, str] | None,
                  locators: set[str] | None) -> str:
    """stream_line for a parsed directory, whose segments name their blocks by locator."""
    blocks: dict[str, tuple[str, int]] = {}
    for segs in files.values():
        for seg in segs:
            loc = seg.locator
            if loc not in blocks:
                if strip_cache is None:
                    blocks[loc] = (loc, seg.block_size)
                else:
                    short = strip_cache.get(loc)
                    if short is None:
                        short = strip_cache[loc] = stripped_locator(loc)
                    blocks[loc] = (short, seg.block_size)
    return stream_line(stream, ((name, [(s.locator, s.offset, s.length) for s in files[name]])
                                for name in sorted(files)), blocks, locators)


def _parse_locator(token: str) -> Locator:
    """Parse one block token; ManifestError (without line) explaining what is wrong."""
    try:
        return Locator.parse(token)
    except LocatorError:
        if is_md5_hex(token):
            raise ManifestError("size hint required") from None
        raise ManifestError("not a block locator (md5+size[+hints])") from None


def _stream_parts(token: str) -> list[str]:
    """Directory components of a stream name token ("." is the root)."""
    name = unescape_name(token)
    if name == ".":
        return []
    if not name.startswith("./"):
        raise ManifestError("stream name must be '.' or start with './'")
    return _split_path(name[2:])


def parse_manifest(text: str) -> Manifest:
    """Parse manifest text strictly into a Manifest; ManifestError names line and token."""
    manifest = Manifest()
    if not text:
        return manifest
    lines = text.split("\n")
    if lines[-1]:
        raise ManifestError(f"line {len(lines)}: missing newline at end of {lines[-1].split(' ')[-1]!r}")
    for lineno, line in enumerate(lines[:-1], 1):
        _parse_line(manifest, lineno, line)
    return manifest


def _parse_line(manifest: Manifest, lineno: int, line: str) -> None:
    """Parse one stream line into ``manifest``."""
    tokens = line.split(" ")
    if _RAW_CONTROL_RE.search(line):
        bad = next(t for t in tokens if _RAW_CONTROL_RE.search(t))
        raise ManifestError(f"line {lineno}: token {bad!r} has a raw control character (must be \\ooo escaped)")
    if "" in tokens:
        raise ManifestError(f"line {lineno}: empty token '' in {line!r} (extra space or empty line)")
    try:
        stream_parts = _stream_parts(tokens[0])
        manifest._mkdirs(stream_parts)
    except ManifestError as exc:
        raise ManifestError(f"line {lineno}: invalid stream name {tokens[0]!r}: {exc}") from None

    locators: list[str] = []
    sizes: list[int] = []
    starts: list[int] = []
    total = 0
    i = 1
    while i < len(tokens) and ":" not in tokens[i]:
        try:
            size = _parse_locator(tokens[i]).size
        except ManifestError as exc:
            raise ManifestError(f"line {lineno}: invalid locator {tokens[i]!r}: {exc}") from None
        locators.append(tokens[i])
        sizes.append(size)
        starts.append(total)
        total += size
        i += 1
    if not locators:
        raise ManifestError(f"line {lineno}: stream {tokens[0]!r} has no block locators")
    if i == len(tokens):
        raise ManifestError(f"line {lineno}: stream {tokens[0]!r} has no file tokens")

    for token in tokens[i:]:
        try:
            _add_file_token(manifest, stream_parts, token, locators, sizes, starts, total)
        except ManifestError as exc:
            raise ManifestError(f"line {lineno}: invalid file token {token!r}: {exc}") from None


def _add_file_token(
    manifest: Manifest,
    stream_parts: list[str],
    token: str,
    locators: list[str],
    sizes: list[int],
    starts: list[int],
    total: int,
) -> None:
    """Apply one ``pos:size:name`` token of a stream to the tree."""
    m = _FILE_TOKEN_RE.fullmatch(token)
    if not m:
        raise ManifestError("expected pos:size:name")
    pos, size = int(m.group(1)), int(m.group(2))
    if pos + size > total:
        raise ManifestError(f"range {pos}+{size} is beyond the stream's {total} bytes of blocks")
    name = unescape_name(m.group(3))
    if name == ".":
        return  # placeholder for the stream's own directory
    if name.endswith("/."):
        manifest._mkdirs(stream_parts + _split_path(name[:-2]))
        return
    *parents, base = _split_path(name)
    segs = manifest._append(stream_parts + parents, base, [])
    if size == 0:
        return
    end = pos + size
    b = bisect_right(starts, pos) - 1
    while pos < end:
        block_start, block_size = starts[b], sizes[b]
        take = min(end, block_start + block_size) - pos
        if take > 0:
            segs.append(Segment(locators[b], block_size, pos - block_start, take))
            pos += take
        b += 1


def portable_data_hash(manifest_text: str) -> str:
    """PDH of arbitrary manifest text: parse, normalize stripped, hash."""
    return parse_manifest(manifest_text).portable_data_hash()
