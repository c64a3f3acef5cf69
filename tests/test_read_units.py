"""The read side's pieces, in process: names, selection, block grouping, manifest
loading and saving, the first-difference search, the get journal."""

from __future__ import annotations

import hashlib
import io
import os
import re
import subprocess
import sys
import types

import pytest

from ingest.config import Settings
from ingest.errors import EXIT_LOCKED, BlockCorrupt, IngestError, UsageError
from ingest.keep.dirstore import DirectoryStore
from ingest.keep.locator import BLOCK_SIZE_MAX
from ingest.manifest import Manifest, Segment, parse_manifest
from ingest.read.blocks import Piece, group_by_block, pieces_per_file
from ingest.read.cat import stream_file
from ingest.read.getstate import GetState, content_key
from ingest.read.names import UnsafePath, check_safe, collection_path, display
from ingest.read.select import NotInManifest, select
from ingest.read.source import ManifestLoadError, load_manifest, save_manifest
from ingest.read.verify import _first_difference


def loc(data: bytes) -> str:
    return f"{hashlib.md5(data).hexdigest()}+{len(data)}"


def dir_settings(path) -> Settings:
    settings = Settings()
    settings.store.path = str(path)
    return settings


# -- names ----------------------------------------------------------------------------


@pytest.mark.parametrize("arg, expect", [
    ("", ""), (".", ""), ("./", ""), ("/", ""), ("a", "a"), ("./a/b/", "a/b"), ("/a/b", "a/b"),
])
def test_collection_paths_are_normalized(arg, expect):
    assert collection_path(arg) == expect


@pytest.mark.parametrize("arg", ["a/../b", "..", "a//b", "./a/./b"])
def test_collection_paths_with_dot_dot_or_empty_components_are_usage_errors(arg):
    with pytest.raises(UsageError, match="invalid collection path"):
        collection_path(arg)


@pytest.mark.parametrize("rel", ["../x", "a/../x", "/etc/passwd", "a//b", "./a", "a/", "", "nul\x00byte"])
def test_unsafe_names_are_refused_naming_them(rel):
    with pytest.raises(UnsafePath) as err:
        check_safe(rel)
    assert display(rel) in str(err.value) or repr(rel) in str(err.value)


def test_display_escapes_control_characters_and_backslash_only():
    assert display("a b\tc\nd\\e\x7fü:") == "a b\\011c\\012d\\134e\\177ü:"


# -- selection ------------------------------------------------------------------------


SAMPLE = (f". {loc(b'abc')} 0:3:top\n"
          f"./d {loc(b'abc')} 0:1:x 1:2:y\n"
          f"./d/e {loc(b'')} 0:0:\\056\n")


def test_select_everything_a_directory_or_a_file():
    m = parse_manifest(SAMPLE)
    everything = select(m, "")
    assert [f.rel for f in everything.files] == ["top", "d/x", "d/y"]
    assert everything.dirs == [("d", "d"), ("d/e", "d/e")]
    sub = select(m, "d")
    assert [(f.path, f.rel) for f in sub.files] == [("d/x", "x"), ("d/y", "y")]
    assert sub.dirs == [("d/e", "e")] and not sub.is_file and sub.total_bytes == 3
    one = select(m, "d/y")
    assert one.is_file and [(f.rel, f.size) for f in one.files] == [("y", 2)]
    with pytest.raises(NotInManifest, match="'d/z': no such file or directory"):
        select(m, "d/z")


# -- block grouping -------------------------------------------------------------------


def test_pieces_are_grouped_by_block_in_order_of_first_use_whatever_the_signature():
    a, b = loc(b"a" * 10), loc(b"b" * 10)
    signed_a = a + "+A" + "0" * 40 + "@12345678"
    files = [
        (0, [Segment(a, 10, 5, 5), Segment(b, 10, 0, 10)]),
        (1, [Segment(signed_a, 10, 0, 5)]),
        (2, []),
    ]
    jobs = group_by_block(files)
    assert [(j.locator, j.pieces) for j in jobs] == [
        (a, [Piece(0, 0, 5, 5), Piece(1, 0, 0, 5)]),
        (b, [Piece(0, 5, 0, 10)]),
    ]
    assert pieces_per_file(jobs) == {0: 2, 1: 1}


# -- first difference -----------------------------------------------------------------


@pytest.mark.parametrize("size, at", [(1, 0), (100, 0), (100, 99), (4096, 1234), (1 << 20, (1 << 20) - 1)])
def test_first_difference_finds_the_first_differing_byte(size, at):
    a = bytes(range(256)) * (size // 256) + bytes(size % 256)
    b = bytearray(a)
    b[at] ^= 1
    if at + 10 < size:
        b[at + 10] ^= 1  # a later difference does not matter
    assert _first_difference(a, bytes(b)) == at


# -- loading and saving manifests -----------------------------------------------------


@pytest.mark.parametrize("text, expect", [
    (". acbd18db4cc2f85cedef654fccc4a4d8+3 0:9:a\n", "line 1: invalid file token '0:9:a'"),
    (". acbd18db4cc2f85cedef654fccc4a4d8+3 0:3:a", "line 1: missing newline"),
    ("./x acbd18db4cc2f85cedef654fccc4a4d8+3\n", "line 1: stream './x' has no file tokens"),
    (". acbd18db4cc2f85cedef654fccc4a4d8+3 0:3:a\n\n", "line 2: empty token"),
    (". acbd18db4cc2f85cedef654fccc4a4d8+3 0:3:../evil\n", "line 1: invalid file token '0:3:../evil'"),
    ("./.. acbd18db4cc2f85cedef654fccc4a4d8+3 0:3:evil\n", "line 1: invalid stream name './..'"),
    ("./a//b acbd18db4cc2f85cedef654fccc4a4d8+3 0:3:evil\n", "line 1: invalid stream name './a//b'"),
])
def test_malformed_manifests_name_the_line(tmp_path, text, expect):
    path = tmp_path / "m.txt"
    path.write_text(text)
    with pytest.raises(ManifestLoadError) as err:
        load_manifest(str(path), None)
    assert str(err.value).startswith(f"malformed manifest {path}: {expect}"), str(err.value)
    assert err.value.exit_code == 1


def test_a_manifest_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "m.txt"
    path.write_bytes(b". acbd18db4cc2f85cedef654fccc4a4d8+3 0:3:a\n. acbd18db4cc2f85cedef654fccc4a4d8+3 0:3:\xff\n")
    with pytest.raises(ManifestLoadError, match="line 2: not valid UTF-8"):
        load_manifest(str(path), None)


def test_a_missing_manifest_file_is_named(tmp_path):
    with pytest.raises(ManifestLoadError, match="no such file"):
        load_manifest(str(tmp_path / "nope.txt"), None)


def test_a_manifest_from_stdin(monkeypatch):
    monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(buffer=io.BytesIO(SAMPLE.encode())))
    loaded = load_manifest("-", None)
    assert loaded.source == "stdin" and loaded.manifest.text() == SAMPLE


def test_save_manifest_stores_the_portable_text_and_returns_its_pdh(tmp_path):
    store = DirectoryStore(str(tmp_path / "store"), fsync=False)
    signed = SAMPLE.replace(loc(b"abc"), loc(b"abc") + "+A" + "1" * 40 + "@12345678")
    manifest = parse_manifest(signed)
    pdh = save_manifest(store, manifest)
    assert pdh == manifest.portable_data_hash()
    assert store.get(pdh).decode() == manifest.text(strip=True) == SAMPLE
    # and it loads back by its PDH, from the store the settings describe
    loaded = load_manifest(pdh, dir_settings(tmp_path / "store"))
    assert loaded.manifest.text() == SAMPLE and loaded.source == f"block {pdh}"
    # an empty manifest is the empty block
    assert save_manifest(store, Manifest()) == "d41d8cd98f00b204e9800998ecf8427e+0"


def test_save_manifest_refuses_more_than_64_mib(tmp_path):
    store = DirectoryStore(str(tmp_path / "store"), fsync=False)
    huge = types.SimpleNamespace(text=lambda strip=False: "x" * (BLOCK_SIZE_MAX + 1))
    with pytest.raises(IngestError, match="at most 67,108,864 bytes"):
        save_manifest(store, huge)
    assert not any(files for _, _, files in os.walk(tmp_path / "store"))


def test_loading_by_pdh_names_a_missing_or_corrupt_manifest_block(tmp_path):
    store = DirectoryStore(str(tmp_path / "store"), fsync=False)
    settings = dir_settings(tmp_path / "store")
    with pytest.raises(ManifestLoadError, match=re.escape(f"cannot load manifest {loc(b'nope')} from ") + ".* not found"):
        load_manifest(loc(b"nope"), settings)
    pdh = save_manifest(store, parse_manifest(SAMPLE))
    with open(store.block_path(pdh[:32]), "r+b") as f:
        f.write(b"#")
    with pytest.raises(ManifestLoadError, match=f"{pdh[:32]} is corrupt"):
        load_manifest(pdh, settings)


def test_save_manifest_through_a_signing_keepstore_returns_the_signed_locator(keepstore_factory, tmp_path):
    from keepstore_fixture import SIGNING_KEY, TOKEN

    from ingest.keep.factory import open_store

    ks = keepstore_factory(signing_key=SIGNING_KEY)
    spec = {"type": "keep", "services": [ks.url], "token": TOKEN, "replication": 1, "backoff_start": 0}
    store = open_store(spec)
    try:
        manifest = parse_manifest(SAMPLE)
        locator = save_manifest(store, manifest)
    finally:
        store.close()
    assert locator.startswith(manifest.portable_data_hash() + "+A")
    settings = Settings()
    settings.store.type, settings.store.services, settings.store.token = "keep", [ks.url], TOKEN
    settings.store.replication, settings.store.retries = 1, 0
    assert load_manifest(locator, settings).manifest.text() == SAMPLE


# -- cat ------------------------------------------------------------------------------


def test_stream_file_writes_segments_in_order_and_names_a_corrupt_block(tmp_path):
    store = DirectoryStore(str(tmp_path / "store"), fsync=False)
    blocks = [b"0123456789", b"abcdefghij"]
    locs = []
    for data in blocks:
        w = store.open_block()
        w.write(data)
        locs.append(w.commit(hashlib.md5(data).hexdigest()).locator)
    segs = [Segment(locs[0], 10, 2, 3), Segment(locs[0], 10, 8, 2), Segment(locs[1], 10, 0, 4),
            Segment(locs[0], 10, 0, 1)]
    out = io.BytesIO()
    assert stream_file(store, segs, out) == 10
    assert out.getvalue() == b"23489abcd0"
    assert stream_file(store, [], io.BytesIO()) == 0
    with open(store.block_path(locs[1][:32]), "r+b") as f:
        f.write(b"#")
    with pytest.raises(BlockCorrupt, match=f"{locs[1][:32]}.* \\(reading 'f'\\)"):
        stream_file(store, segs, io.BytesIO(), name="f")


# -- the get journal ------------------------------------------------------------------


def test_the_journal_recognizes_unchanged_files_only(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    dest = tmp_path / "dest"
    dest.mkdir()
    f = dest / "f"
    f.write_bytes(b"abc")
    key = content_key([Segment(loc(b"abc"), 3, 0, 3)])
    assert key == content_key([Segment(loc(b"abc") + "+A" + "2" * 40 + "@12345678", 3, 0, 3)])
    with GetState(str(dest)) as state:
        state.record("f", key, os.stat(f))
        assert state.is_complete("f", key, os.stat(f))
        assert not state.is_complete("f", "other", os.stat(f))
    with GetState(str(dest)) as state:  # reloaded from disk
        assert state.is_complete("f", key, os.stat(f))
        f.write_bytes(b"abd")  # same size, new mtime
        os.utime(f, ns=(1, 1))
        assert not state.is_complete("f", key, os.stat(f))
        assert state.known("f", os.stat(f)) is None
        state.compact(lambda rel: os.lstat(dest / rel))
        assert state.entries == {}
    # a truncated last line is ignored
    with open(GetState(str(dest)).journal_path, "a") as j:
        j.write('{"path": "g", "key": "k", "si')
    with GetState(str(dest)) as state:
        assert state.entries == {}


def test_two_gets_into_one_destination_exclude_each_other(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))  # as the cli fixture's
    manifest = tmp_path / "m.txt"
    manifest.write_text(SAMPLE)
    with GetState(str(tmp_path / "dest")):
        proc = cli("get", "--store", str(tmp_path / "store"), str(manifest), str(tmp_path / "dest"))
    assert proc.returncode == EXIT_LOCKED
    assert f"another keep-ingest get is writing into {tmp_path / 'dest'}" in proc.stderr


def test_a_manifest_file_named_like_a_temporary_file_survives_a_resume(tmp_path, monkeypatch):
    from ingest.read.get import run_get

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    store = DirectoryStore(str(tmp_path / "store"), fsync=False)
    w = store.open_block()
    w.write(b"abc")
    locator = w.commit(hashlib.md5(b"abc").hexdigest()).locator
    name = ".keep-ingest-get-0123456789abcdef.tmp"
    manifest = parse_manifest(f". {locator} 0:3:{name}\n")
    spec = {"type": "directory", "path": str(tmp_path / "store"), "fsync": False}
    dest = tmp_path / "dest"
    assert run_get(manifest, str(dest), "", spec, 1).written == 1
    again = run_get(manifest, str(dest), "", spec, 1)
    assert (again.written, again.already) == (0, 1)
    assert (dest / name).read_bytes() == b"abc"


def test_the_get_state_is_private_whatever_the_umask(tmp_path):
    """Run as a user would, under umask 022: the state directories are 0700 and the
    journal (also once rewritten at the end of the run) and the lock are 0600; a
    journal an older version left 0644 is tightened."""
    from conftest import cli_env

    store = DirectoryStore(str(tmp_path / "store"), fsync=False)
    w = store.open_block()
    w.write(b"abc")
    manifest = tmp_path / "m.txt"
    manifest.write_text(f". {w.commit(hashlib.md5(b'abc').hexdigest()).locator} 0:3:f\n")
    base = tmp_path / "xdg-state" / "keep-ingest"

    def get(dest: str) -> None:
        proc = subprocess.run([sys.executable, "-m", "ingest", "get", "--store", str(tmp_path / "store"),
                               str(manifest), str(tmp_path / dest)], capture_output=True, text=True,
                              timeout=60, env=cli_env(tmp_path), preexec_fn=lambda: os.umask(0o022))
        assert proc.returncode == 0, proc.stderr

    def modes() -> dict[str, int]:
        found = {str(p.relative_to(base)): p.stat().st_mode & 0o777 for p in base.rglob("*")}
        return {"keep-ingest": base.stat().st_mode & 0o777, **found}

    get("dest")
    got = modes()
    assert {name: mode for name, mode in got.items() if name in ("keep-ingest", "get")} == {
        "keep-ingest": 0o700, "get": 0o700}
    files = {name: mode for name, mode in got.items() if name.startswith("get/")}
    assert sorted(name.rsplit(".", 1)[1] for name in files) == ["jsonl", "lock"]
    assert set(files.values()) == {0o600}
    journal = base / next(name for name in files if name.endswith(".jsonl"))
    journal.chmod(0o644)
    (base / "get").chmod(0o755)
    get("dest")  # the same destination: the same journal, reopened
    assert journal.stat().st_mode & 0o777 == 0o600 and (base / "get").stat().st_mode & 0o777 == 0o700
