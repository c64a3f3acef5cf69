"""Unit tests for ingest.manifest: escaping, strict parsing, normalization, the tree API."""

from __future__ import annotations

import hashlib
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.manifest import (
    Manifest,
    ManifestError,
    Segment,
    escape_name,
    parse_manifest,
    portable_data_hash,
    span_line,
    stream_line,
    unescape_name,
)

pytestmark = pytest.mark.timeout(20)

EMPTY = "d41d8cd98f00b204e9800998ecf8427e+0"
A = "a" * 32 + "+3"
B = "b" * 32 + "+5"
C = "c" * 32 + "+4"
SIG1 = "+A" + "1" * 40 + "@65f00000"
SIG2 = "+A" + "2" * 40 + "@65f00000"


def seg(locator: str, offset: int, length: int) -> Segment:
    return Segment(locator, int(locator.split("+")[1]), offset, length)


def normalized(text: str) -> str:
    return parse_manifest(text).text()


# -- escaping -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "escaped"),
    [
        ("plain.txt", "plain.txt"),
        ("a b", "a\\040b"),
        ("tab\there", "tab\\011here"),
        ("new\nline", "new\\012line"),
        ("cr\r", "cr\\015"),
        ("c:d", "c\\072d"),
        ("back\\slash", "back\\134slash"),
        ("\x00\x1f", "\\000\\037"),
        ("del\x7f", "del\x7f"),
        ("caf\u00e9 \u65e5\u672c \U0001f389", "caf\u00e9\\040\u65e5\u672c\\040\U0001f389"),
        ("\u00a0nbsp", "\u00a0nbsp"),
        ("\\056", "\\134056"),
    ],
)
def test_escape_examples_round_trip(name: str, escaped: str) -> None:
    assert escape_name(name) == escaped
    assert unescape_name(escaped) == name


def test_escape_round_trips_every_bmp_character() -> None:
    everything = "".join(chr(c) for c in range(0x10000) if not 0xD800 <= c < 0xE000) + "\U0010ffff"
    escaped = escape_name(everything)
    assert unescape_name(escaped) == everything
    assert not any(c in escaped for c in " \t\n:")


def test_unescape_leaves_other_backslashes_alone() -> None:
    assert unescape_name("a\\zb") == "a\\zb"
    assert unescape_name("\\400") == "\\400"  # first digit must be 0-3
    assert unescape_name("\\05") == "\\05"
    assert unescape_name("\\141\\142c") == "abc"  # any character below 256 may be escaped
    assert unescape_name("\\\\056") == "\\."


# -- parse errors ---------------------------------------------------------------

PARSE_ERRORS = [
    # (text, line, token named in the message)
    (f". {A} 0:3:f\n. zzz 0:1:g\n", 2, "zzz"),
    (f". {'a' * 32} 0:3:f\n", 1, "a" * 32),  # size hint required
    (f". {'a' * 32}+Z+3 0:3:f\n", 1, f"{'a' * 32}+Z+3"),  # size hint must come first
    (f". {A} 0:3\n", 1, "0:3"),
    (f". {A} x:3:f\n", 1, "x:3:f"),
    (f". {A} 0:3:f {B}\n", 1, B),  # locator after the file tokens
    (f". {A} 1:3:f\n", 1, "1:3:f"),  # beyond the blocks
    (f". {A} {B} 0:9:f\n", 1, "0:9:f"),
    (f". {A} 4:0:f\n", 1, "4:0:f"),
    (f". {A} 0:3:f", 1, "0:3:f"),  # missing final newline
    (f". {A} 0:3:f\n. {A} 0:3:g", 2, "0:3:g"),
    (f". {A} 0:3:f\n\n", 2, ""),  # empty line
    (f". {A}  0:3:f\n", 1, ""),  # double space
    (f". {A} 0:3:f\t\n", 1, "0:3:f\t"),  # raw control character
    (". 0:3:f\n", 1, "."),  # no locators
    (f"./d {A}\n", 1, "./d"),  # no file tokens
    (f"d {A} 0:3:f\n", 1, "d"),  # stream name must start with ./
    (f"./ {A} 0:3:f\n", 1, "./"),
    (f"./a//b {A} 0:3:f\n", 1, "./a//b"),
    (f"./a/../b {A} 0:3:f\n", 1, "./a/../b"),
    (f"./a/. {A} 0:3:f\n", 1, "./a/."),
    (f". {A} 0:3:a/./b\n", 1, "0:3:a/./b"),
    (f". {A} 0:3:a/../b\n", 1, "0:3:a/../b"),
    (f". {A} 0:3:a//b\n", 1, "0:3:a//b"),
    (f". {A} 0:3:/a\n", 1, "0:3:/a"),
    (f". {A} 0:3:a/\n", 1, "0:3:a/"),
    (f". {A} 0:3:..\n", 1, "0:3:.."),
    (f". {A} 0:0:/.\n", 1, "0:0:/."),
    # name conflicts, in every order
    (f". {A} 0:3:a 0:3:a/b\n", 1, "0:3:a/b"),
    (f". {A} 0:3:a/b 0:3:a\n", 1, "0:3:a"),
    (f". {A} 0:3:a\n./a {A} 0:3:b\n", 2, "./a"),
    (f"./a {A} 0:3:b\n. {A} 0:3:a\n", 2, "0:3:a"),
    (f". {A} 0:3:a\n. {A} 0:0:a/\\056\n", 2, "0:0:a/\\056"),
    (f". {A} 0:3:a\n./a {EMPTY} 0:0:\\056\n", 2, "./a"),  # the SDK silently ignores these two
]


@pytest.mark.parametrize(("text", "line", "token"), PARSE_ERRORS)
def test_parse_errors_name_line_and_token(text: str, line: int, token: str) -> None:
    with pytest.raises(ManifestError) as info:
        parse_manifest(text)
    message = str(info.value)
    assert message.startswith(f"line {line}: ")
    assert repr(token) in message


def test_missing_size_hint_is_explained() -> None:
    with pytest.raises(ManifestError, match="size hint required"):
        parse_manifest(f". {'a' * 32} 0:3:f\n")


def test_manifest_error_is_a_value_error() -> None:
    assert issubclass(ManifestError, ValueError)


# -- normalization --------------------------------------------------------------


def test_tree_order_not_flat_sort() -> None:
    text = (
        f"./a-b {A} 0:3:f\n"
        f"./a\\040b {A} 0:3:f\n"
        f"./a/emptysub {EMPTY} 0:0:\\056\n"
        f"./a {A} 0:3:f\n"
    )
    assert normalized(text) == (
        f"./a {A} 0:3:f\n"
        f"./a/emptysub {EMPTY} 0:0:\\056\n"
        f"./a\\040b {A} 0:3:f\n"
        f"./a-b {A} 0:3:f\n"
    )


def test_names_sort_unescaped() -> None:
    # "a b" < "a!b" on raw names, although "\040" > "!" once escaped.
    assert normalized(f". {A} 0:3:a!b 0:3:a\\040b\n") == f". {A} 0:3:a\\040b 0:3:a!b\n"


def test_identical_blocks_are_listed_once() -> None:
    text = f". {A} 0:3:x\n. {B} {A} 5:3:y 0:5:z\n"
    assert normalized(text) == f". {A} {B} 0:3:x 0:3:y 3:5:z\n"


def test_blocks_listed_in_order_of_first_use_by_sorted_files() -> None:
    text = f". {B} {C} {A} 0:5:z 5:4:y 9:3:x\n"
    assert normalized(text) == f". {A} {C} {B} 0:3:x 3:4:y 7:5:z\n"


def test_file_spanning_blocks_is_one_token() -> None:
    text = f". {A} {B} {C} 1:2:f 3:5:f 8:1:f\n"
    assert normalized(text) == f". {A} {B} {C} 1:8:f\n"


def test_non_contiguous_segments_stay_separate() -> None:
    assert normalized(f". {A} {B} 3:5:f 0:3:f\n") == f". {B} {A} 0:8:f\n"
    assert normalized(f". {A} {B} 0:1:f 2:1:f\n") == f". {A} 0:1:f 2:1:f\n"


def test_repeated_file_tokens_append_across_lines() -> None:
    text = f". {A} 0:3:f\n./d {C} 0:4:g\n. {B} 0:5:f\n"
    m = parse_manifest(text)
    assert m.find("f") == [seg(A, 0, 3), seg(B, 0, 5)]
    assert m.text() == f". {A} {B} 0:8:f\n./d {C} 0:4:g\n"


def test_names_with_slashes_create_directories() -> None:
    text = f". {A} 0:3:x/y/z 0:1:x/w\n./x {B} 0:5:v\n"
    assert normalized(text) == f"./x {B} {A} 0:5:v 5:1:w\n./x/y {A} 0:3:z\n"


def test_empty_files_and_empty_dirs() -> None:
    text = f". {A} 0:0:e 0:3:f 0:0:d/\\056 0:0:x/y/.\n./x/y/z {EMPTY} 0:0:\\056\n"
    assert normalized(text) == (
        f". {A} 0:0:e 0:3:f\n"
        f"./d {EMPTY} 0:0:\\056\n"
        f"./x/y/z {EMPTY} 0:0:\\056\n"
    )
    assert normalized(f"./d {A} 0:0:e\n") == f"./d {EMPTY} 0:0:e\n"


def test_directory_with_only_subdirectories_has_no_line() -> None:
    m = parse_manifest(f"./p/q {A} 0:3:f\n./p {EMPTY} 0:0:\\056\n")
    assert m.text() == f"./p/q {A} 0:3:f\n"
    assert list(m.directories()) == ["p", "p/q"]


def test_root_placeholder_adds_nothing() -> None:
    assert normalized(f". {EMPTY} 0:0:\\056\n") == ""
    assert normalized(f". {EMPTY} 0:0:.\n") == ""


def test_empty_manifest() -> None:
    m = parse_manifest("")
    assert m.text() == "" and m.text(strip=True) == ""
    assert m.portable_data_hash() == "d41d8cd98f00b204e9800998ecf8427e+0"
    assert portable_data_hash("") == "d41d8cd98f00b204e9800998ecf8427e+0"
    assert Manifest().portable_data_hash() == "d41d8cd98f00b204e9800998ecf8427e+0"


def test_signed_and_stripped_forms() -> None:
    a1, a2 = A + SIG1, A + SIG2
    text = f". {a1} 0:3:x\n. {a2} 0:3:y\n./d {B}{SIG1}+K@xyzzy 0:5:z\n"
    m = parse_manifest(text)
    # The signed form keeps locators verbatim and tells the two signatures apart ...
    assert m.text() == f". {a1} {a2} 0:3:x 3:3:y\n./d {B}{SIG1}+K@xyzzy 0:5:z\n"
    # ... the stripped form reduces them to one block.
    portable = f". {A} 0:3:x 0:3:y\n./d {B} 0:5:z\n"
    assert m.text(strip=True) == portable
    digest = hashlib.md5(portable.encode()).hexdigest()
    assert m.portable_data_hash() == portable_data_hash(text) == f"{digest}+{len(portable)}"
    assert m.text_and_pdh() == (m.text(), m.portable_data_hash())
    plain = parse_manifest(portable)
    assert plain.text_and_pdh() == (portable, m.portable_data_hash())


def test_stripped_size_drops_leading_zeros() -> None:
    m = parse_manifest(f". {'a' * 32}+003 0:3:f\n")
    assert m.text() == f". {'a' * 32}+003 0:3:f\n"
    assert m.text(strip=True) == f". {A} 0:3:f\n"


def test_arv_put_reference_pdh() -> None:
    # arv-put 3.2.1 output for a small tree (KEEP_PROTOCOL / ARV_PUT notes).
    text = (
        ". 0f723ae7f9bf07744445e93ac5595156+12 18c39511a949d5c80dc8e855fe8acf5a+67108864 "
        "04448996f70da941bf19590ada143ac2+2891136 0:6:a.txt 12:70000000:big.bin 0:0:empty.txt\n"
        "./sub 0f723ae7f9bf07744445e93ac5595156+12 6:6:b.txt\n"
    )
    assert normalized(text) == text
    assert portable_data_hash(text) == "e856f9ef031e2ff59ccf4f4750bbb0d2+217"


def test_zero_size_blocks_carry_no_data() -> None:
    # A zero-size block in the middle of a stream contributes no segment.
    m = parse_manifest(f". {A} {EMPTY} {B} 0:8:f 3:5:g\n")
    assert m.find("f") == [seg(A, 0, 3), seg(B, 0, 5)]
    assert m.find("g") == [seg(B, 0, 5)]
    assert m.text() == f". {A} {B} 0:8:f 3:5:g\n"


def test_escaped_names_in_stream_and_file_tokens() -> None:
    text = f"./sp\\040ace/c\\072d {A} 0:3:new\\012line 0:0:back\\134slash\n"
    m = parse_manifest(text)
    assert m.is_dir("sp ace/c:d")
    assert m.find("sp ace/c:d/new\nline") == [seg(A, 0, 3)]
    assert m.find("sp ace/c:d/back\\slash") == []
    assert m.text() == f"./sp\\040ace/c\\072d {A} 0:0:back\\134slash 0:3:new\\012line\n"


def test_unicode_whitespace_is_part_of_a_name() -> None:
    # Only " " separates tokens; NBSP and friends are ordinary name characters.
    text = f". {A} 0:3:a\u00a0b 0:3:c\u2028d\n"
    assert [p for p, _ in parse_manifest(text).files()] == ["a\u00a0b", "c\u2028d"]
    assert normalized(text) == text


# -- the tree API -----------------------------------------------------------------


def test_add_file_builds_the_tree() -> None:
    m = Manifest()
    m.add_file("b/c.txt", [seg(A, 0, 3)])
    m.add_file("a.txt", [seg(B, 1, 2), seg(A, 0, 1)])
    m.add_file("b/c.txt", [seg(B, 0, 5)])  # appends
    m.add_file("empty", [])
    m.add_dir("b/e/f")
    m.add_dir("b")
    m.add_dir("")
    assert m.text() == (
        f". {B} {A} 1:2:a.txt 5:1:a.txt 0:0:empty\n"
        f"./b {A} {B} 0:8:c.txt\n"
        f"./b/e/f {EMPTY} 0:0:\\056\n"
    )
    assert list(m.files()) == [
        ("a.txt", [seg(B, 1, 2), seg(A, 0, 1)]),
        ("empty", []),
        ("b/c.txt", [seg(A, 0, 3), seg(B, 0, 5)]),
    ]
    assert list(m.directories()) == ["b", "b/e", "b/e/f"]
    assert parse_manifest(m.text()).text() == m.text()


def test_lookups() -> None:
    m = parse_manifest(f". {A} 0:3:f 0:0:d/e/\\056\n")
    assert m.find("f") == [seg(A, 0, 3)]
    assert m.find("d") is None and m.find("nope") is None and m.find("d/e/x") is None
    assert m.is_dir("") and m.is_dir("d") and m.is_dir("d/e")
    assert not m.is_dir("f") and not m.is_dir("x")
    found = m.find("f")
    assert found is not None
    found.append(seg(B, 0, 5))  # a copy: the tree is unchanged
    assert m.find("f") == [seg(A, 0, 3)]


def test_tree_order_of_files_and_directories() -> None:
    m = Manifest()
    for path in ["a-b/f", "a/z", "a b/f", "a/sub/f", "top", "a/e/x"]:
        m.add_file(path, [])
    assert [p for p, _ in m.files()] == ["top", "a/z", "a/e/x", "a/sub/f", "a b/f", "a-b/f"]
    assert list(m.directories()) == ["a", "a/e", "a/sub", "a b", "a-b"]


@pytest.mark.parametrize("path", ["", "/a", "a/", "a//b", "./a", "a/./b", "a/..", "."])
def test_add_rejects_bad_paths(path: str) -> None:
    with pytest.raises(ManifestError, match="invalid path"):
        Manifest().add_file(path, [])
    if path:
        with pytest.raises(ManifestError, match="invalid path"):
            Manifest().add_dir(path)


def test_add_rejects_name_conflicts() -> None:
    m = Manifest()
    m.add_file("a/b", [])
    with pytest.raises(ManifestError, match="'a/b' is a file"):
        m.add_file("a/b/c", [])
    with pytest.raises(ManifestError, match="'a/b' is a file"):
        m.add_dir("a/b")
    with pytest.raises(ManifestError, match="'a' is a directory"):
        m.add_file("a", [])


@pytest.mark.parametrize(
    "bad",
    [
        Segment("zzz+3", 3, 0, 3),
        Segment("a" * 32, 3, 0, 3),
        Segment(A, 4, 0, 3),  # block_size disagrees with the locator
        Segment(A, 3, 1, 3),  # beyond the block
        Segment(A, 3, -1, 1),
        Segment(A, 3, 0, -1),
    ],
)
def test_add_file_rejects_bad_segments(bad: Segment) -> None:
    with pytest.raises(ManifestError, match="'f'"):
        Manifest().add_file("f", [bad])


def test_add_file_drops_zero_length_segments() -> None:
    m = Manifest()
    m.add_file("f", [seg(A, 1, 0), seg(B, 0, 5), seg(EMPTY, 0, 0)])
    assert m.find("f") == [seg(B, 0, 5)]
    assert m.text() == f". {B} 0:5:f\n"


def test_deep_tree_needs_no_recursion() -> None:
    path = "/".join(["d"] * 3000)
    m = Manifest()
    m.add_file(path + "/f", [seg(A, 0, 3)])
    text = m.text()
    assert text == f"./{path} {A} 0:3:f\n"
    assert parse_manifest(text).text() == text
    assert len(list(m.directories())) == 3000


def test_segment_is_frozen_and_slotted() -> None:
    s = seg(A, 0, 3)
    with pytest.raises(AttributeError):
        s.length = 1  # type: ignore[misc]
    assert not hasattr(s, "__dict__")


def test_text_of_100k_files_is_fast() -> None:
    m = Manifest()
    for d in range(1000):
        block = f"{hashlib.md5(str(d).encode()).hexdigest()}+100000{SIG1}"
        for f in range(100):
            m.add_file(f"dir{d:04d}/file {f:03d}", [Segment(block, 100000, f * 1000, 1000)])
    start = time.perf_counter()
    text = m.text()
    elapsed = time.perf_counter() - start
    assert text.count("\n") == 1000
    assert elapsed < 2.0, f"text() took {elapsed:.2f}s for 100,000 files"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.text(st.sampled_from("ab :\\\t"), min_size=1, max_size=3),
                          st.integers(-2, 3), st.integers(0, 9), st.integers(1, 9)), max_size=12),
       st.lists(st.sampled_from([A, B]), min_size=4, max_size=4))
def test_span_line_writes_what_stream_line_does(files, locators):
    """The assembler's line from columns equals the file-by-file line, for empty files
    (a negative block), names to escape, and two blocks under one locator."""
    files = sorted(dict((name, rest) for name, *rest in files).items())
    names = [name for name, _ in files]
    spans = [n for _, (block, offset, length) in files for n in
             ((block, offset, length) if block >= 0 else (-2, 0, 0))]
    blocks = {b: (locators[b], 10 + b) for b in range(4)}
    parts = [((b, o, n),) if b >= 0 else () for b, o, n in zip(spans[0::3], spans[1::3], spans[2::3], strict=True)]
    seen, seen_by_span = set(), set()
    assert span_line("./s", names, spans, blocks, seen_by_span) == \
        stream_line("./s", list(zip(names, parts, strict=True)), blocks, seen)
    assert seen_by_span == seen
