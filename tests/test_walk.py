"""Walk order, source forms, excludes, symlinks, special files, bad names."""

import os
import re
import socket
from array import array

import pytest

from ingest.errors import SourceError, UsageError
from ingest.walk import Excludes, Fingerprints, walk_sources

pytestmark = pytest.mark.usefixtures("small_file_loops")   # each test with the C loop and without


def touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def names(result):
    return [f.name for f in result.files]


@pytest.fixture
def tree(tmp_path):
    src = tmp_path / "src"
    for rel in ["b.txt", "a.txt", "a b.txt", "z/1", "a-dir/2", "a-dir/sub/3", "A/4"]:
        touch(src / rel)
    (src / "empty").mkdir()
    return src


def test_tree_order_files_first_then_subdirectories_sorted(tree):
    result = walk_sources([str(tree) + "/"])
    assert names(result) == ["a b.txt", "a.txt", "b.txt", "A/4", "a-dir/2", "a-dir/sub/3", "z/1"]
    assert result.directories == ["A", "a-dir", "a-dir/sub", "empty", "z"]


def test_dir_without_slash_goes_under_its_name(tree):
    result = walk_sources([str(tree)])
    assert names(result)[0] == "src/a b.txt"
    assert result.directories[0] == "src"


def test_single_file_source_and_several_sources(tree, tmp_path):
    other = tmp_path / "other"
    touch(other / "c.txt")
    result = walk_sources([str(tree / "a.txt"), str(other)])
    assert names(result) == ["a.txt", "other/c.txt"]
    assert result.files[0].path == str(tree / "a.txt")


def test_fingerprint_is_taken_from_stat(tree):
    f = walk_sources([str(tree / "b.txt")]).files[0]
    st = os.stat(tree / "b.txt")
    assert (f.size, f.fingerprint.mtime_ns, f.fingerprint.inode) == (st.st_size, st.st_mtime_ns, st.st_ino)


def test_missing_source_names_the_path(tmp_path):
    with pytest.raises(SourceError, match="source '.*nope': no such file or directory"):
        walk_sources([str(tmp_path / "nope")])


def test_two_sources_giving_the_same_path_are_refused(tmp_path):
    touch(tmp_path / "a" / "x")
    touch(tmp_path / "b" / "x")
    with pytest.raises(SourceError, match="same manifest path 'x'"):
        walk_sources([str(tmp_path / "a") + "/", str(tmp_path / "b") + "/"])


def test_name_exclude_matches_anywhere(tree):
    result = walk_sources([str(tree) + "/"], excludes=Excludes(["*.txt", "sub"]))
    assert names(result) == ["A/4", "a-dir/2", "z/1"]


def test_path_exclude_matches_relative_to_the_source(tree):
    result = walk_sources([str(tree) + "/"], excludes=Excludes(["a-dir/*", "./b.txt"]))
    assert names(result) == ["a b.txt", "a.txt", "A/4", "z/1"]


@pytest.mark.parametrize("pattern", ["/abs/*", "../x/y"])
def test_bad_exclude_patterns_are_usage_errors(pattern):
    with pytest.raises(UsageError):
        Excludes([pattern])


def test_symlinks_followed_and_loops_skipped(tree, tmp_path):
    os.symlink(tree / "z", tree / "link-to-z")
    os.symlink(tree, tree / "a-dir" / "loop")         # points at an ancestor
    os.symlink(tmp_path / "missing", tree / "dangling")
    result = walk_sources([str(tree) + "/"])
    assert "link-to-z/1" in names(result)
    reasons = {os.path.basename(p): r for p, r in result.skipped}
    assert reasons == {"loop": "symlink loop", "dangling": "dangling symlink"}


def test_a_loop_between_symlinks_is_skipped_like_a_directory_loop(tree):
    os.symlink("loop2", tree / "loop1")
    os.symlink("loop1", tree / "loop2")
    os.symlink("loop1/x", tree / "through-loop")
    result = walk_sources([str(tree) + "/"])
    reasons = {os.path.basename(p): r for p, r in result.skipped}
    assert reasons == {"loop1": "symlink loop", "loop2": "symlink loop", "through-loop": "symlink loop"}
    assert "a.txt" in names(result) and not result.unreadable


def test_an_entry_that_cannot_be_stat_ed_is_unreadable_not_fatal(tree):
    # A name too long to resolve through a symlink: stat fails with ENAMETOOLONG.
    os.symlink("x" * 300, tree / "too-long")
    result = walk_sources([str(tree) + "/"])
    assert list(result.unreadable) == [str(tree / "too-long")]
    assert "a.txt" in names(result)


@pytest.mark.parametrize("kind", ["fifo", "dangling", "loop", "symlink-no-follow"])
def test_a_source_that_would_yield_nothing_is_an_error_naming_it(tmp_path, kind):
    source = tmp_path / kind
    if kind == "fifo":
        os.mkfifo(source)
    elif kind == "dangling":
        os.symlink(tmp_path / "missing", source)
    elif kind == "loop":
        os.symlink(kind, source)
    else:
        touch(tmp_path / "target")
        os.symlink(tmp_path / "target", source)
    with pytest.raises(SourceError, match=f"source '{re.escape(str(source))}': "):
        walk_sources([str(source)], follow_links=kind != "symlink-no-follow")


def test_no_follow_links_skips_every_symlink(tree):
    os.symlink(tree / "z", tree / "link-to-z")
    os.symlink(tree / "a.txt", tree / "link-to-a")
    result = walk_sources([str(tree) + "/"], follow_links=False)
    assert not [n for n in names(result) if n.startswith("link")]
    assert len(result.skipped) == 2


def test_special_files_are_skipped_and_never_opened(tree):
    os.mkfifo(tree / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tree / "sock"))
    os.symlink("/dev/null", tree / "device")
    try:
        result = walk_sources([str(tree) + "/"])
    finally:
        sock.close()
    kinds = sorted(r for _, r in result.skipped)
    assert kinds == ["FIFO", "device file", "socket"]
    assert not {"fifo", "sock", "device"} & set(names(result))


def test_non_utf8_names_are_refused_each_named(tree):
    bad = os.fsencode(str(tree)) + b"/bad\xff.txt"
    with open(bad, "wb") as f:
        f.write(b"x")
    with pytest.raises(SourceError, match=r"(?s)cannot be stored.*bad\\xff\.txt.*not valid UTF-8"):
        walk_sources([str(tree) + "/"])


def test_directories_above_a_source_may_have_any_name(tmp_path):
    # Only the names under the source are stored: the path to it is the user's business.
    above = os.path.join(os.fsencode(tmp_path), b"latin1-\xe9")
    os.makedirs(os.path.join(above, b"src", b"d"))
    with open(os.path.join(above, b"src", b"d", b"f"), "wb") as f:
        f.write(b"x")
    result = walk_sources([os.fsdecode(above) + "/src"])
    assert names(result) == ["src/d/f"]
    assert result.files[0].path == os.fsdecode(os.path.join(above, b"src", b"d", b"f"))


def test_unreadable_directory_is_listed_and_left_out(tree):
    if os.geteuid() == 0:
        pytest.skip("root reads any directory (the CLI tests drop privileges for this)")
    os.chmod(tree / "z", 0)
    try:
        result = walk_sources([str(tree) + "/"])
    finally:
        os.chmod(tree / "z", 0o755)
    assert list(result.unreadable) == [str(tree / "z")]
    assert "z" not in result.directories and "z/1" not in names(result)


def test_leave_out_omits_paths(tree):
    result = walk_sources([str(tree) + "/"], leave_out=[str(tree / "a.txt"), str(tree / "z")])
    assert "a.txt" not in names(result) and "z/1" not in names(result) and "z" not in result.directories


def test_leave_out_omits_only_its_own_files_from_their_directory(tree):
    touch(tree / "a-dir" / "1")
    result = walk_sources([str(tree)], leave_out=[str(tree / "a-dir" / "2")])
    assert names(result) == ["src/a b.txt", "src/a.txt", "src/b.txt", "src/A/4", "src/a-dir/1", "src/a-dir/sub/3",
                             "src/z/1"]


def test_deep_tree_does_not_recurse(tmp_path):
    path = tmp_path / "deep"
    rel = "/".join(["d"] * 300)
    touch(path / rel / "leaf")
    result = walk_sources([str(path) + "/"])
    assert names(result) == [rel + "/leaf"]


@pytest.mark.parametrize("name", ["nb\u00a0space", "line\u2028sep", "ideo\u3000space"])
def test_names_with_non_ascii_whitespace_are_refused(tree, name):
    (tree / name).write_bytes(b"x")
    with pytest.raises(SourceError, match=r"(?s)cannot be stored in a manifest.*non-ASCII whitespace"):
        walk_sources([str(tree) + "/"])


@pytest.mark.parametrize("mtime", [0, -10**18, 2**63 - 1, 2**63, 10**19])
def test_fingerprint_columns_keep_every_value_a_stat_can_give(mtime):
    rows = [(5, mtime, 7, 2**64 - 1, 2**63), (0, 1, 2, 3, 4)]
    columns = Fingerprints.of_rows(rows)
    assert list(columns) == rows and [columns[i] for i in range(2)] == rows and len(columns) == 2
    assert list(columns.sizes) == [5, 0] and list(columns.devices) == [2**63, 4]


def test_fingerprint_columns_are_machine_integers_when_they_fit():
    columns = Fingerprints.of_rows([(5, 6, 7, 8, 9)] * 1000)
    assert all(isinstance(c, array) and c.itemsize == 8 for c in columns.columns())
