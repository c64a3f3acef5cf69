"""The walk in a process of its own: the same items, tallies and errors as the walk
in-process, and a child that never outlives its coordinator."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from ingest import walk as walk_module
from ingest.errors import SourceError
from ingest.walk import BATCH_FILES, FileBatch, Fingerprint, TreeWalk
from ingest.walker import WalkProcess


def _touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _walkers() -> list[psutil.Process]:
    """This process's walk children still alive (a zombie is not)."""
    alive = []
    for child in psutil.Process().children():
        try:
            if "ingest.walker" in child.cmdline() and child.status() != psutil.STATUS_ZOMBIE:
                alive.append(child)
        except psutil.Error:
            pass
    return alive


@pytest.fixture
def odd_tree(tmp_path):
    """Many files in one directory, symlinks good and bad, a loop, a FIFO, and a
    directory whose filesystem path is not UTF-8."""
    src = tmp_path / "src"
    for i in range(BATCH_FILES + 5):
        _touch(src / "many" / f"f{i:05d}", b"y" * (i % 7))
    _touch(src / "a.txt", b"abc")
    _touch(src / "sub" / "b.txt", b"b")
    (src / "link-to-a").symlink_to("a.txt")
    (src / "dangling").symlink_to("nowhere")
    (src / "sub" / "loop").symlink_to("..")
    os.mkfifo(src / "fifo")
    for name, ns in (("future.txt", 10**19), ("past.txt", -10**18)):   # years 2286 and 1938
        _touch(src / name)
        os.utime(src / name, ns=(ns, ns))
    odd = os.path.join(os.fsencode(tmp_path), b"not-utf8-\xff")
    os.makedirs(os.path.join(odd, b"d"))
    with open(os.path.join(odd, b"d", b"c.txt"), "wb") as f:
        f.write(b"cc")
    return src, os.fsdecode(odd)


def _outcome(walk):
    """Everything a walk yields and tallies, and the last progress it reported."""
    progress = []
    walk.on_progress = progress.append
    items = [tuple(item) for item in walk]
    return items, walk.skipped, walk.unreadable, walk.files_found, walk.bytes_found, progress[-1]


def _logged_outcome(walk, caplog):
    """_outcome, and the warnings the walk logged, sorted."""
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        outcome = _outcome(walk)
    return outcome, sorted(r.getMessage() for r in caplog.records)


def test_the_c_extensions_walk_yields_what_the_python_walk_does(odd_tree, caplog, monkeypatch):
    if walk_module._smallfiles is None:
        pytest.skip("the ingest._smallfiles extension is not built")
    src, odd = odd_tree
    sources = [str(src), odd + "/d/"]
    fast, logged_fast = _logged_outcome(TreeWalk(sources), caplog)
    monkeypatch.setattr(walk_module, "_smallfiles", None)
    slow, logged_slow = _logged_outcome(TreeWalk(sources), caplog)
    assert fast == slow and logged_fast == logged_slow
    batches = [item for item in fast[0] if len(item) == 4]
    assert max(len(names) for _, _, names, _ in batches) == BATCH_FILES
    assert any(isinstance(fps.mtimes, list) for *_, fps in batches)     # the year-2286 file's batch


def test_the_walk_process_yields_what_the_walk_does(odd_tree, caplog):
    src, odd = odd_tree
    sources = [str(src), odd + "/d/"]
    here, logged_here = _logged_outcome(TreeWalk(sources), caplog)
    there, logged_there = _logged_outcome(WalkProcess(sources), caplog)
    assert there == here
    assert len([item for item in here[0] if len(item) == 4 and item[1] == "src/many"]) == 2   # two batches
    assert {reason for _, reason in here[1]} == {"dangling symlink", "FIFO", "symlink loop"}
    assert here[0][-1][0] == odd + "/d/"       # a root that is not UTF-8, carried as it is
    top = next(FileBatch(*item) for item in here[0] if len(item) == 4 and item[1] == "src")
    for name in ("future.txt", "past.txt"):
        assert top.fingerprint(top.names.index(name)) == Fingerprint.of(os.stat(src / name))
    assert logged_there == logged_here and len(logged_here) == 3   # the coordinator logs what the child saw
    assert _walkers() == []


def test_excludes_no_follow_and_leave_out_reach_the_child(odd_tree):
    src, _ = odd_tree
    left_out = str(src / "sub" / "b.txt")
    args = ([str(src) + "/"], False)
    here = _outcome(TreeWalk(*args, leave_out=[left_out]))
    there = _outcome(WalkProcess(*args, exclude=["many"], leave_out=[left_out]))
    assert there[0] == [item for item in here[0] if (item[0] if len(item) == 1 else item[1]) != "many"]
    assert there[0][0][2] == ["a.txt", "future.txt", "past.txt"] and there[0][1:] == [("sub",)] and there[3] == 3
    assert {reason for _, reason in there[1]} == {"symlink (--no-follow-links)", "FIFO"}


def test_an_error_of_the_walk_is_raised_where_the_walk_raised_it(tmp_path):
    _touch(tmp_path / "one" / "same" / "x")
    _touch(tmp_path / "two" / "same", b"file")
    sources = [str(tmp_path / "one") + "/", str(tmp_path / "two") + "/"]
    walk = WalkProcess(sources)
    items = []
    with pytest.raises(SourceError) as raised:
        for item in walk:
            items.append(tuple(item))
    with pytest.raises(SourceError) as expected:
        list(TreeWalk(sources))
    assert str(raised.value) == str(expected.value) and "two sources give the same manifest path" in str(raised.value)
    assert raised.value.exit_code == expected.value.exit_code
    assert items == [("same",), (str(tmp_path / "one") + "/", "same", ["x"], items[1][3])]
    assert _walkers() == []


def test_names_that_cannot_be_stored_fail_the_walk_once_it_is_over(tmp_path):
    _touch(tmp_path / "src" / "good")
    bad = os.path.join(os.fsencode(tmp_path / "src"), b"bad-\xff")
    open(bad, "wb").close()
    walk = WalkProcess([str(tmp_path / "src") + "/"])
    items = []
    with pytest.raises(SourceError, match=r"(?s)1 name\(s\) cannot be stored.*/src/bad-\\xff  \(not valid UTF-8\)"):
        for item in walk:
            items.append(item)
    assert [item.names for item in items] == [["good"]]


def test_a_bug_in_the_child_is_one_line_not_a_traceback(capfd):
    with pytest.raises(RuntimeError, match=r"^the walk process failed: TypeError: ") as raised:
        list(WalkProcess([7]))       # not a path: the child's walk fails as a bug would
    assert "\n" not in str(raised.value)
    assert "Traceback" not in capfd.readouterr().err
    assert _walkers() == []


def _wide_tree(root, files=8000):
    """A directory whose listing is far more than the pipe holds (long names)."""
    root.mkdir()
    for i in range(files):
        open(root / f"{i:06d}{'n' * 200}", "wb").close()


def test_stopping_early_stops_the_child(tmp_path):
    _wide_tree(tmp_path / "wide")
    items = iter(WalkProcess([str(tmp_path / "wide")]))
    assert next(items) == ("wide",)
    assert len(_walkers()) == 1       # blocked on the full pipe
    items.close()
    assert _walkers() == []


def test_the_child_ends_by_itself_when_its_coordinator_is_killed(tmp_path):
    _wide_tree(tmp_path / "wide")
    script = ("import sys, time\nfrom ingest.walker import WalkProcess\n"
              "items = iter(WalkProcess([sys.argv[1]]))\nnext(items)\nprint('started', flush=True)\n"
              "time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "wide")], stdout=subprocess.PIPE,
                              text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        assert parent.stdout.readline() == "started\n"
        child = [p for p in psutil.Process(parent.pid).children() if "ingest.walker" in p.cmdline()][0]
        assert child.status() != psutil.STATUS_ZOMBIE
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if child.status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.02)
        else:
            child.kill()
            pytest.fail("the walk process outlived its coordinator by 10 s")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
