"""bench, issue 15: the millions-of-files datasets, the re-run rows and the walk floor."""

from __future__ import annotations

import os

import pytest

from bench import datasets as ds
from bench import walkfloor
from bench.__main__ import DEFAULT_DATASETS, rows_for
from bench.runners import ROWS, run_row, touched_files

KiB = 1 << 10


def test_stamped_shape_is_tinys():
    spec = ds.GENERATORS["tiny1m"][1]
    assert isinstance(spec, ds.Stamped)
    assert (spec.files(1), spec.dirs(1), spec.size) == (1_000_000, 1000, KiB)
    assert spec.relpath(0, 1) == "t000/f000.txt"
    assert spec.relpath(999_999, 1) == "t999/f999.txt"
    # 2,000 directories: the directory number grows a digit, for every directory alike
    spec2 = ds.GENERATORS["tiny2m"][1]
    assert spec2.relpath(0, 1) == "t0000/f000.txt" and spec2.relpath(1_999_999, 1) == "t1999/f999.txt"
    assert ds.GENERATORS["tiny4m"][1].files(1) == 4_000_000
    # scaled: fewer files, the last directory partly filled
    assert (spec.files(0.0015), spec.dirs(0.0015)) == (1500, 2)


def test_stamped_content_is_distinct_and_of_the_size():
    spec = ds.Stamped(10)
    base = bytes(range(256)) * 4
    contents = [spec.content(i, base) for i in range(10)]
    assert all(len(c) == KiB for c in contents)
    assert len(set(contents)) == 10
    assert contents[7].startswith(b"000000000000007\n") and contents[7][16:] == base[16:]


def test_millions_are_not_in_the_default_list():
    assert not {"tiny1m", "tiny2m", "tiny4m"} & set(DEFAULT_DATASETS)


def test_a_stamped_dataset_is_generated_once_and_cached(tmp_path):
    logged: list[str] = []
    d = ds.ensure("tiny1m", str(tmp_path), scale=0.0025, log=logged.append)
    assert (d.files, d.bytes) == (2500, 2500 * KiB)
    paths = d.paths()
    assert paths == sorted(paths) and len(paths) == 2500
    assert paths[0].endswith(os.path.join("data", "t000", "f000.txt"))
    assert paths[-1].endswith(os.path.join("data", "t002", "f499.txt"))
    assert sorted(os.listdir(d.data)) == ["t000", "t001", "t002"]
    assert len(os.listdir(os.path.join(d.data, "t002"))) == 500
    with open(paths[1234], "rb") as f:
        content = f.read()
    assert len(content) == KiB and content.startswith(b"000000000001234\n")
    assert walkfloor.walk(d.data) == (2500, 2500 * KiB)
    # the same seed gives the same bytes; a second call finds the cache and writes nothing
    logged.clear()
    again = ds.ensure("tiny1m", str(tmp_path), scale=0.0025, log=logged.append)
    assert again == d and logged == []


def test_walk_floor_counts_files_not_directories_nor_link_targets(tmp_path, capsys):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "empty").mkdir()
    (tmp_path / "a" / "x").write_bytes(b"12345")
    (tmp_path / "a" / "b" / "y").write_bytes(b"")
    (tmp_path / "big").write_bytes(b"z" * 3000)
    (tmp_path / "link").symlink_to(tmp_path / "big")          # one file: the link itself, lstat
    (tmp_path / "dirlink").symlink_to(tmp_path / "a")         # not walked into
    link_size = os.lstat(tmp_path / "link").st_size + os.lstat(tmp_path / "dirlink").st_size
    assert walkfloor.walk(str(tmp_path)) == (5, 5 + 3000 + link_size)
    assert walkfloor.main([str(tmp_path) + os.sep]) == 0
    assert capsys.readouterr().out == f"5 {5 + 3000 + link_size}\n"
    assert walkfloor.main([]) == 2


def test_touched_files_are_spread_evenly():
    paths = [f"p{i:04d}" for i in range(1000)]
    picked = touched_files(paths, 10)
    assert picked == [f"p{i:04d}" for i in range(50, 1000, 100)]
    assert touched_files(paths[:3], 10) == paths[:3]
    assert touched_files(paths, 0) == []


def test_rows_for_the_millions_and_on_request():
    assert rows_for("tiny1m", [], False) == ["ki", "ki-rerun", "ki-rerun10", "walkfloor"]
    assert "arvput" not in rows_for("tiny4m", [], False)
    # the re-runs and the floor on tiny (100,000 files) only when asked for
    assert "ki-rerun" not in rows_for("tiny", [], False)
    assert rows_for("tiny", ["ki", "ki-rerun", "walkfloor"], False) == ["ki", "ki-rerun", "walkfloor"]
    # --baseline: every keep-ingest row's twin; the other datasets' rows as before
    assert rows_for("tiny1m", [], True) == ["ki", "ki-rerun", "base", "base-rerun", "base-rerun10",
                                            "ki-rerun10", "walkfloor"]
    assert rows_for("tiny", [], True) == ["ki", "ki-nofsync", "base", "base-nofsync", "arvput", "md5sum",
                                          "ki-keep", "arvput-keep"]
    assert rows_for("tiny10k", ["base"], True) == ["base"]
    assert all(ROWS[r].rerun is not None for r in ("ki-rerun", "ki-rerun10", "base-rerun", "base-rerun10"))
    assert not ROWS["walkfloor"].uploads and not ROWS["md5sum"].uploads and ROWS["base-rerun"].uploads


@pytest.fixture
def small_tree(tmp_path):
    return ds.ensure("tiny1m", str(tmp_path / "bench"), scale=0.00005, log=lambda _: None)


def test_rerun_rows_resume_and_the_floor_checks_its_count(small_tree, tmp_path):
    work = tmp_path / "runs"
    work.mkdir()
    fresh = run_row(ROWS["ki"], small_tree, str(work), 0)
    unchanged = run_row(ROWS["ki-rerun"], small_tree, str(work), 0)
    touched = run_row(ROWS["ki-rerun10"], small_tree, str(work), 0)
    floor = run_row(ROWS["walkfloor"], small_tree, str(work), 0)
    assert fresh.pdh and fresh.pdh == unchanged.pdh == touched.pdh   # mtimes are not in the manifest
    assert fresh.bytes_read is None and floor.pdh is None
    assert unchanged.bytes_read == 0 and unchanged.blocks_uploaded == 0   # it resumed: nothing read
    assert touched.bytes_read is not None and touched.bytes_read >= 10 * KiB
    assert floor.wall_s > 0 and floor.peak_rss > 0
    assert os.listdir(work) == []            # every row's store and state are removed after it
