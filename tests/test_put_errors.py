"""Bad input through the real CLI: a clear message naming the path or key, a documented code."""

from __future__ import annotations

import json
import os

import pytest


@pytest.fixture
def src(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    (d / "ok.txt").write_text("fine\n")
    return d


def store_files(store):
    return [f for _, _, files in os.walk(store) for f in files] if store.exists() else []


def test_missing_source_exits_1_naming_it(cli, tmp_path):
    proc = cli("put", "--store", str(tmp_path / "store"), str(tmp_path / "nope"))
    assert proc.returncode == 1
    assert f"source '{tmp_path / 'nope'}': no such file or directory" in proc.stderr


def test_non_utf8_name_exits_1_before_any_upload(cli, tmp_path, src):
    with open(os.fsencode(str(src)) + b"/caf\xe9.txt", "wb") as f:
        f.write(b"latin-1 name")
    proc = cli("put", "--store", str(tmp_path / "store"), str(src))
    assert proc.returncode == 1
    assert "not valid UTF-8" in proc.stderr and "caf\\xe9.txt" in proc.stderr
    assert store_files(tmp_path / "store") == []


def test_fifo_is_skipped_with_a_warning_and_never_hangs(cli, tmp_path, src):
    os.mkfifo(src / "pipe")
    proc = cli("put", "--store", str(tmp_path / "store"), str(src), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"skipping FIFO: {src / 'pipe'}" in proc.stderr
    assert "pipe" not in proc.stdout and "ok.txt" in proc.stdout


@pytest.mark.parametrize("profile, message", [
    ("[put]\nwrokers = 2\n", "unknown setting 'put.wrokers'"),
    ("[put]\nworkers = \"many\"\n", "put.workers must be"),
    ("[put]\nchunk_size = \"4M\"\n", "put.chunk_size must be an integer"),
    ("[nope]\nx = 1\n", "unknown section [nope]"),
    ("[put\n", "invalid TOML"),
])
def test_bad_profile_exits_2_naming_file_and_key(cli, tmp_path, src, profile, message):
    config = tmp_path / "bad.toml"
    config.write_text(profile)
    proc = cli("put", "--config", str(config), "--store", str(tmp_path / "store"), str(src))
    assert proc.returncode == 2
    assert str(config) in proc.stderr and message in proc.stderr


def test_bad_flag_value_exits_2_naming_the_flag(cli, tmp_path, src):
    proc = cli("put", "--store", str(tmp_path / "store"), "--block-size", "99999999999", str(src))
    assert proc.returncode == 2 and "--block-size" in proc.stderr


def test_remote_only_without_listen_is_a_usage_error(cli, tmp_path, src):
    proc = cli("put", "--store", str(tmp_path / "store"), "--workers", "0", str(src))
    assert proc.returncode == 2 and "listen" in proc.stderr


def test_bad_exclude_pattern_exits_2(cli, tmp_path, src):
    proc = cli("put", "--store", str(tmp_path / "store"), "--exclude", "/abs", str(src))
    assert proc.returncode == 2 and "--exclude '/abs'" in proc.stderr


def test_store_that_is_a_file_exits_1_naming_it(cli, tmp_path, src):
    (tmp_path / "notadir").write_text("x")
    proc = cli("put", "--store", str(tmp_path / "notadir"), str(src))
    assert proc.returncode == 1 and str(tmp_path / "notadir") in proc.stderr


def test_unknown_flag_is_a_usage_error(cli, src):
    proc = cli("put", "--frobnicate", str(src))
    assert proc.returncode == 2 and "unrecognized arguments" in proc.stderr


def test_help_lists_exit_codes(cli):
    proc = cli("put", "--help")
    assert proc.returncode == 0 and "75   another run holds the lock" in proc.stdout


@pytest.mark.fault
def test_a_directory_of_100000_entries(cli, tmp_path):
    big = tmp_path / "big"
    big.mkdir()
    for i in range(100_000):  # mostly empty files: the walk, plan and manifest are what is tested
        with open(big / f"entry-{i:06d}", "wb") as f:
            if i % 100 == 0:
                f.write(i.to_bytes(4, "little"))
    proc = cli("put", "--store", str(tmp_path / "store"), "--json", "--manifest-out",
               str(tmp_path / "m"), str(big), timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["files"] == 100_000 and summary["bytes"] == 4_000
    from ingest.manifest import parse_manifest
    files = dict(parse_manifest((tmp_path / "m").read_text()).files())
    assert len(files) == 100_000
    assert sum(s.length for segs in files.values() for s in segs) == 4_000
