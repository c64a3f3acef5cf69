"""Property tests for ingest.manifest with the official Arvados SDK as referee.

Random trees (awkward and non-ASCII names, nesting, empty files and directories,
files spanning blocks, shared blocks, signed locators) are written as random
NON-normalized manifests: shuffled and repeated streams, files split over several
lines and streams, unmerged segments, over-escaped names. Our parse + normalize
must give exactly what the SDK gives.

Generation stays inside what the SDK handles correctly (see the module notes in
the final report): no zero-size blocks except the empty locator alone on a line,
no Unicode whitespace in names read back by the SDK parser, and only hints the
SDK's KeepLocator accepts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("arvados")

from sdk_referee import sdk_build, sdk_collection, sdk_forms, sdk_tree  # noqa: E402

from ingest.keep.locator import EMPTY_BLOCK_LOCATOR  # noqa: E402
from ingest.manifest import Manifest, Segment, escape_name, parse_manifest, portable_data_hash  # noqa: E402

pytestmark = [pytest.mark.sdk, pytest.mark.timeout(60)]

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

AWKWARD = list(" \t\n\r:\\\x00\x1f\x7f!-_.~+056abAB") + ["\u00e9", "\u00df", "\u65e5", "\u0301", "\U0001f389", "\u00ff"]
UNICODE_SPACES = ["\u00a0", "\u0085", "\u2028", "\u3000", "\x1c"]


def _sdk_parsable(c: str) -> bool:
    """The SDK splits tokens on any str whitespace; escaping only covers <= 0x20."""
    return ord(c) <= 0x20 or not c.isspace()


def name_strategy(allow_unicode_space: bool = False) -> st.SearchStrategy[str]:
    chars = st.characters(exclude_categories=("Cs",), exclude_characters="/")
    if not allow_unicode_space:
        chars = chars.filter(_sdk_parsable)
    extra = AWKWARD + (UNICODE_SPACES if allow_unicode_space else [])
    random_names = st.text(st.one_of(st.sampled_from(extra), chars), min_size=1, max_size=5)
    common = st.sampled_from(["a", "b", "a b", "a!b", "a-b", "a.b", "\\056", "x:y"])
    return st.one_of(common, random_names).filter(lambda n: n not in (".", ".."))


NAMES = name_strategy()
NAMES_WITH_UNICODE_SPACE = name_strategy(allow_unicode_space=True)
MD5S = st.binary(min_size=16, max_size=16).map(bytes.hex)
SIGNATURES = st.lists(st.binary(min_size=24, max_size=24).map(bytes.hex), min_size=3, max_size=3)


@dataclass
class Block:
    md5: str
    size: int
    variants: list[str]  # locator strings for the same block: unsigned, signed, ...


@dataclass
class Tree:
    blocks: list[Block]
    files: dict[tuple[str, ...], list[Segment]] = field(default_factory=dict)
    dirs: list[tuple[str, ...]] = field(default_factory=list)

    def manifest(self) -> Manifest:
        m = Manifest()
        for path, segs in self.files.items():
            m.add_file("/".join(path), segs)
        for path in self.dirs:
            m.add_dir("/".join(path))
        return m


@st.composite
def blocks_strategy(draw: st.DrawFn) -> list[Block]:
    md5s = draw(st.lists(MD5S, min_size=1, max_size=5, unique=True))
    blocks = []
    for md5 in md5s:
        size = draw(st.integers(1, 40))
        base = f"{md5}+{size}"
        sigs = [f"+A{raw[:40]}@{raw[40:]}" for raw in draw(SIGNATURES)]
        variants = [base, base + sigs[0], base + sigs[1], base + sigs[2] + "+K@xyzzy"]
        if draw(st.booleans()):
            variants.append(f"{md5}+0{size}")  # leading zero in the size hint
        blocks.append(Block(md5, size, variants))
    return blocks


@st.composite
def file_segments(draw: st.DrawFn, blocks: list[Block]) -> list[Segment]:
    """Random segments, or a run spanning consecutive blocks, or nothing (empty file)."""
    kind = draw(st.sampled_from(["empty", "random", "span"]))
    segs: list[Segment] = []
    if kind == "random":
        for _ in range(draw(st.integers(1, 4))):
            block = draw(st.sampled_from(blocks))
            offset = draw(st.integers(0, block.size - 1))
            length = draw(st.integers(1, block.size - offset))
            segs.append(Segment(draw(st.sampled_from(block.variants)), block.size, offset, length))
    elif kind == "span":
        first = draw(st.integers(0, len(blocks) - 1))
        last = draw(st.integers(first, len(blocks) - 1))
        variant = draw(st.integers(0, 3))
        for i in range(first, last + 1):
            block = blocks[i]
            start = draw(st.integers(0, block.size - 1)) if i == first else 0
            end = draw(st.integers(start + 1, block.size)) if i == last else block.size
            segs.append(Segment(block.variants[variant], block.size, start, end - start))
    return segs


@st.composite
def trees(draw: st.DrawFn, allow_unicode_space: bool = False) -> Tree:
    tree = Tree(draw(blocks_strategy()))
    names = NAMES_WITH_UNICODE_SPACE if allow_unicode_space else NAMES
    kinds: dict[tuple[str, ...], str] = {}
    for _ in range(draw(st.integers(0, 12))):
        path = tuple(draw(st.lists(names, min_size=1, max_size=4)))
        is_file = draw(st.booleans())
        prefixes = [path[:i] for i in range(1, len(path))]
        if any(kinds.get(p) == "f" for p in prefixes) or (path in kinds and (is_file or kinds[path] == "f")):
            continue
        for p in prefixes:
            kinds[p] = "d"
        if is_file:
            kinds[path] = "f"
            tree.files[path] = draw(file_segments(tree.blocks))
        else:
            kinds[path] = "d"
            tree.dirs.append(path)
    return tree


def _escape(draw: st.DrawFn, parts: tuple[str, ...]) -> str:
    """Escape path components, sometimes escaping every character below 256."""
    if draw(st.booleans()):
        return "/".join(escape_name(p) for p in parts)
    return "/".join("".join(f"\\{ord(c):03o}" if ord(c) < 256 else c for c in p) for p in parts)


@st.composite
def messy_manifest(draw: st.DrawFn, tree: Tree) -> str:
    """A valid but non-normalized manifest text for ``tree``."""
    # Each item: (order key, stream components, relative name parts, segments or None for a marker).
    items: list[tuple[float, tuple[str, ...], tuple[str, ...], list[Segment] | None]] = []
    for path, segs in tree.files.items():
        cut = draw(st.integers(0, len(path) - 1))
        stream, rel = path[:cut], path[cut:]
        n_chunks = draw(st.integers(1, max(1, len(segs))))
        bounds = sorted(draw(st.lists(st.integers(1, max(1, len(segs) - 1)), min_size=n_chunks - 1,
                                      max_size=n_chunks - 1))) if len(segs) > 1 else []
        chunks = [segs[a:b] for a, b in zip([0, *bounds], [*bounds, len(segs)], strict=True)]
        keys = sorted(draw(st.lists(st.floats(0, 1), min_size=len(chunks), max_size=len(chunks))))
        items.extend((key, stream, rel, chunk) for key, chunk in zip(keys, chunks, strict=True))
    markers = list(tree.dirs)
    if draw(st.booleans()):
        markers.append(())  # a placeholder for the root itself
    for path in markers:
        cut = draw(st.integers(0, len(path)))
        items.append((draw(st.floats(0, 1)), path[:cut], path[cut:], None))
    items.sort(key=lambda item: item[0])

    # Group consecutive items of the same stream into lines, sometimes splitting a stream.
    lines: list[tuple[tuple[str, ...], list]] = []
    for _, stream, rel, segs in items:
        if not lines or lines[-1][0] != stream or draw(st.integers(0, 4)) == 0:
            lines.append((stream, []))
        lines[-1][1].append((rel, segs))

    out = []
    for stream, entries in lines:
        locators: list[str] = []
        sizes: dict[str, int] = {}
        for _, segs in entries:
            for s in segs or ():
                if s.locator not in sizes:
                    locators.append(s.locator)
                    sizes[s.locator] = s.block_size
        if draw(st.booleans()):
            locators = draw(st.permutations(locators))
        if draw(st.integers(0, 3)) == 0:
            extra = draw(st.sampled_from(tree.blocks))
            if extra.variants[0] not in sizes:
                locators.append(extra.variants[0])
                sizes[extra.variants[0]] = extra.size
        if not locators:
            locators = [EMPTY_BLOCK_LOCATOR]
            sizes[EMPTY_BLOCK_LOCATOR] = 0
        starts, total = {}, 0
        for loc in locators:
            starts[loc] = total
            total += sizes[loc]
        merge = draw(st.booleans())
        tokens = ["./" + _escape(draw, stream) if stream else "."] + locators
        for rel, segs in entries:
            if segs is None:
                name = _escape(draw, rel) + draw(st.sampled_from(["/.", "/\\056"])) if rel else draw(
                    st.sampled_from([".", "\\056"]))
                tokens.append(f"0:0:{name}")
                continue
            name = _escape(draw, rel)
            if not segs:
                tokens.append(f"{draw(st.integers(0, total))}:0:{name}")
                continue
            ranges: list[list[int]] = []
            for s in segs:
                pos = starts[s.locator] + s.offset
                if merge and ranges and ranges[-1][0] + ranges[-1][1] == pos:
                    ranges[-1][1] += s.length
                else:
                    ranges.append([pos, s.length])
            tokens.extend(f"{pos}:{length}:{name}" for pos, length in ranges)
        out.append(" ".join(tokens) + "\n")
    return "".join(out)


@st.composite
def tree_and_manifest(draw: st.DrawFn) -> tuple[Tree, str]:
    tree = draw(trees())
    return tree, draw(messy_manifest(tree))


@SETTINGS
@given(tree_and_manifest())
def test_parse_and_normalize_match_sdk(case: tuple[Tree, str]) -> None:
    tree, text = case
    sdk_text, sdk_portable, sdk_pdh = sdk_forms(text)
    ours = parse_manifest(text)
    assert ours.text() == sdk_text
    assert ours.text(strip=True) == sdk_portable
    assert ours.portable_data_hash() == sdk_pdh
    assert portable_data_hash(text) == sdk_pdh
    assert ours.text_and_pdh() == (sdk_text, sdk_pdh)

    # The tree we built the text from normalizes to the same text ...
    built = tree.manifest()
    assert built.text() == sdk_text
    # ... which the SDK leaves unchanged (a fixed point of normalization).
    assert sdk_forms(sdk_text) == (sdk_text, sdk_portable, sdk_pdh)
    assert parse_manifest(sdk_text).text() == sdk_text


@SETTINGS
@given(tree_and_manifest())
def test_parsed_tree_matches_sdk_tree(case: tuple[Tree, str]) -> None:
    _, text = case
    sdk_files, sdk_dirs = sdk_tree(sdk_collection(text))
    ours = parse_manifest(text)
    files = {path: [(s.locator, s.offset, s.length) for s in segs] for path, segs in ours.files()}
    assert files == sdk_files
    assert sorted(ours.directories()) == sdk_dirs
    for path, segs in ours.files():
        assert ours.find(path) == segs
        assert all(s.block_size == int(s.locator.split("+")[1]) for s in segs)


@SETTINGS
@given(trees(allow_unicode_space=True))
def test_built_text_matches_sdk_built_through_its_api(tree: Tree) -> None:
    # No manifest parsing on the SDK side, so names may hold Unicode whitespace here.
    coll = sdk_build(
        (("/".join(path), [(s.locator, s.block_size, s.offset, s.length) for s in segs])
         for path, segs in tree.files.items()),
        ("/".join(path) for path in tree.dirs),
    )
    ours = tree.manifest()
    assert ours.text() == coll.manifest_text(normalize=True)
    assert ours.text(strip=True) == coll.portable_manifest_text()
    assert ours.portable_data_hash() == coll.portable_data_hash()


def test_empty_tree_matches_sdk() -> None:
    assert sdk_forms("") == ("", "", "d41d8cd98f00b204e9800998ecf8427e+0")
    assert (Manifest().text(), Manifest().text(strip=True), Manifest().portable_data_hash()) == sdk_forms("")
