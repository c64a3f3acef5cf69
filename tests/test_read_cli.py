"""The read side end to end: put with the real CLI, then ls, cat, get and verify.

Real files, real worker processes, the directory store and a real keepstore.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli_env
from keepstore_fixture import SIGNING_KEY, TOKEN
from trees import fill, make_awkward_tree, read_tree

SMALL_BLOCK = 64 * 1024
MULTI = "multi/big.bin"
MULTI_SIZE = 5 * SMALL_BLOCK + 123  # six blocks of its own at the small block size


def make_tree(root: Path) -> Path:
    """The awkward tree (names, empty files and directories) plus a multi-block file."""
    make_awkward_tree(root, edges=False)
    fill(root / MULTI, MULTI_SIZE, "multi")
    return root


def tree_state(root: Path) -> tuple[dict[str, bytes], set[str]]:
    """Every file's bytes and every directory (relative paths), empty ones included."""
    dirs = set()
    for dirpath, dirnames, _ in os.walk(root):
        for d in dirnames:
            dirs.add(str((Path(dirpath) / d).relative_to(root)))
    return read_tree(root), dirs


def put(cli, tmp_path: Path, src: Path, *store: str, env: dict | None = None) -> Path:
    """Upload ``src/`` with the small block size; the manifest goes to a file."""
    manifest = tmp_path / "manifest.txt"
    proc = cli("put", "-q", *store, "--block-size", str(SMALL_BLOCK), "--manifest-out", str(manifest),
               str(src) + "/", env=env)
    assert proc.returncode == 0, proc.stderr
    return manifest


def ok(proc):
    assert proc.returncode == 0, proc.stderr
    return proc


def run_bytes(home: Path, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    """Run the CLI as the ``cli`` fixture does, with stdout as bytes."""
    return subprocess.run([sys.executable, "-m", "ingest", *args], input=stdin, capture_output=True,
                          timeout=60, env=cli_env(home))


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """One tree put into one directory store for the module: (src, manifest, store args).

    Tests only read them; a test that damages the store works on its own copy.
    """
    home = tmp_path_factory.mktemp("stored")
    src = make_tree(home / "src")
    store = ("--store", str(home / "store"))
    manifest = home / "manifest.txt"
    proc = run_bytes(home, "put", "-q", *store, "--block-size", str(SMALL_BLOCK), "--manifest-out",
                     str(manifest), str(src) + "/")
    assert proc.returncode == 0, proc.stderr
    return src, manifest, store


# -- round trips -------------------------------------------------------------------


def test_put_then_get_reproduces_the_tree_from_the_directory_store(cli, tmp_path, stored):
    src, manifest, store = stored
    dest = tmp_path / "dest"
    proc = ok(cli("get", *store, "--workers", "2", str(manifest), str(dest)))
    assert tree_state(dest) == tree_state(src)
    assert {"empty dir", "dir one/inner empty"} <= tree_state(dest)[1]
    assert "31 written, 0 already complete" in proc.stderr
    # no temporary file is left, and every file has the run's one mtime
    assert not [p for p in dest.rglob(".keep-ingest-get-*")]
    assert len({p.stat().st_mtime_ns for p in dest.rglob("*") if p.is_file()}) == 1
    # verify passes on the untouched source tree (and on the copy)
    for tree in (src, dest):
        proc = ok(cli("verify", *store, str(manifest), f"{tree}/"))
        assert proc.stdout == ""
        assert "identical: 31 files" in proc.stderr


def test_put_then_get_reproduces_the_tree_from_a_signing_keepstore(cli, tmp_path, keepstore_factory):
    ks = keepstore_factory(signing_key=SIGNING_KEY)
    env = {"ARVADOS_API_TOKEN": TOKEN}
    src = make_tree(tmp_path / "src")
    store = ("--keep", ks.url, "--replication", "1")
    manifest = put(cli, tmp_path, src, *store, env=env)
    assert "+A" in manifest.read_text()  # signed locators, used as they are
    dest = tmp_path / "dest"
    ok(cli("get", *store, "--workers", "2", str(manifest), str(dest), env=env))
    assert tree_state(dest) == tree_state(src)
    ok(cli("verify", *store, str(manifest), f"{src}/", env=env))
    # without the token, the keepstore refuses: the error names the block
    proc = cli("get", *store, str(manifest), str(tmp_path / "dest2"))
    assert proc.returncode == 1
    assert re.search(r"block [0-9a-f]{32}\+\d+", proc.stderr), proc.stderr


def test_get_a_subtree_or_one_file(cli, tmp_path, stored):
    src, manifest, store = stored
    ok(cli("get", *store, str(manifest), str(tmp_path / "sub"), "dir one/"))
    assert tree_state(tmp_path / "sub") == tree_state(src / "dir one")
    ok(cli("get", *store, str(manifest), str(tmp_path / "one"), "./" + MULTI))
    assert read_tree(tmp_path / "one") == {"big.bin": (src / MULTI).read_bytes()}
    proc = cli("get", *store, str(manifest), str(tmp_path / "x"), "no/such")
    assert proc.returncode == 1 and "'no/such': no such file or directory in the manifest" in proc.stderr


def test_get_and_ls_a_manifest_stored_in_keep_by_its_portable_data_hash(cli, tmp_path, stored):
    from ingest.keep.dirstore import DirectoryStore
    from ingest.manifest import parse_manifest
    from ingest.read.source import save_manifest

    src, manifest, store = stored
    pdh = save_manifest(DirectoryStore(store[1], fsync=False), parse_manifest(manifest.read_text()))
    assert pdh == ok(cli("put", "-q", *store, "--block-size", str(SMALL_BLOCK), "--portable-data-hash",
                         str(src) + "/")).stdout.strip()
    ok(cli("get", *store, pdh, str(tmp_path / "dest"), "dir one"))
    assert tree_state(tmp_path / "dest") == tree_state(src / "dir one")


# -- ls and cat ---------------------------------------------------------------------


def test_ls_lists_files_and_directories_with_sizes(cli, stored):
    src, manifest, store = stored
    listing = json.loads(ok(cli("ls", "--json", str(manifest))).stdout)
    files = {e["path"]: e["size"] for e in listing if e["type"] == "file"}
    dirs = {e["path"] for e in listing if e["type"] == "directory"}
    assert files == {path: len(data) for path, data in read_tree(src).items()}
    assert dirs == tree_state(src)[1]
    by_path = {e["path"]: e for e in listing}
    assert by_path["dir one"]["size"] == sum(len(d) for p, d in read_tree(src / "dir one").items())
    # text forms: one line per entry, control characters escaped
    plain = ok(cli("ls", str(manifest))).stdout.splitlines()
    assert len(plain) == len(listing)
    assert "new\\012line" in plain and "empty dir/" in plain
    long = ok(cli("ls", "-l", str(manifest), "multi")).stdout.splitlines()
    assert [line.split() for line in long] == [["-", str(MULTI_SIZE), MULTI]]  # the contents of multi/
    long = ok(cli("ls", "-l", str(manifest))).stdout.splitlines()
    assert ["d", str(MULTI_SIZE), "multi/"] in [line.split() for line in long]


def test_cat_streams_one_file_exactly_with_the_manifest_from_stdin(cli, tmp_path, stored):
    src, manifest, store = stored
    for path in (MULTI, "dir one/sub:dir/tab\there"):
        proc = run_bytes(tmp_path, "cat", *store, "-", path, stdin=manifest.read_bytes())
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == (src / path).read_bytes()
    proc = cli("cat", *store, str(manifest), "multi")
    assert proc.returncode == 1 and "'multi' is a directory in the manifest" in proc.stderr


# -- verify -------------------------------------------------------------------------


def test_verify_reports_each_kind_of_difference(cli, tmp_path, stored):
    src, manifest, store = stored
    tree = tmp_path / "tree"
    shutil.copytree(src, tree, symlinks=True)
    changed = tree / MULTI
    with open(changed, "r+b") as f:  # one byte changed in the fourth block
        f.seek(3 * SMALL_BLOCK + 77)
        old = f.read(1)
        f.seek(3 * SMALL_BLOCK + 77)
        f.write(bytes([old[0] ^ 0xFF]))
    os.truncate(tree / "ünï dir" / "deep\tfile", 1234)
    (tree / "dir one" / "sub:dir" / "plain.txt").unlink()
    (tree / "z-small-after" / "new file").write_bytes(b"extra")
    proc = cli("verify", *store, "--workers", "2", str(manifest), f"{tree}/")
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.splitlines() == [
        "missing: dir one/sub:dir/plain.txt",
        f"differs: {MULTI}: first difference at byte {3 * SMALL_BLOCK + 77} "
        f"(manifest {MULTI_SIZE} bytes, source {MULTI_SIZE} bytes)",
        "extra: z-small-after/new file",
        "differs: ünï dir/deep\\011file: first difference at byte 1234 (manifest 5000 bytes, source 1234 bytes)",
    ]
    assert "4 differences: 1 missing, 1 extra, 2 differing" in proc.stderr
    report = json.loads(cli("verify", *store, "--json", str(manifest), f"{tree}/").stdout)
    assert report["identical"] is False
    assert report["missing"] == ["dir one/sub:dir/plain.txt"]
    assert report["extra"] == ["z-small-after/new file"]
    assert {d["path"]: d["offset"] for d in report["differs"]} == {
        MULTI: 3 * SMALL_BLOCK + 77, "ünï dir/deep\tfile": 1234}


def test_verify_reports_whole_directories_once_and_a_longer_file(cli, tmp_path, stored):
    src, manifest, store = stored
    tree = tmp_path / "tree"
    shutil.copytree(src, tree)
    shutil.rmtree(tree / "dir one")
    (tree / "new dir" / "deeper").mkdir(parents=True)
    (tree / "new dir" / "deeper" / "f").write_text("x")
    with open(tree / "plain.txt", "ab") as f:
        f.write(b"more")
    proc = cli("verify", *store, str(manifest), f"{tree}/")
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == [
        "missing: dir one/",
        "extra: new dir/",
        "differs: plain.txt: first difference at byte 10 (manifest 10 bytes, source 14 bytes)",
    ]


# -- errors -------------------------------------------------------------------------


def _flip_a_byte(store: Path, md5: str) -> None:
    path = store / md5[:3] / md5
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_corrupt_block_is_an_error_naming_the_block_and_the_file(tmp_path, stored):
    src, manifest, (_, store_dir) = stored
    store = tmp_path / "store"
    shutil.copytree(store_dir, store)
    line = next(line for line in manifest.read_text().splitlines() if line.startswith("./multi "))
    md5 = line.split()[3][:32]  # the multi-block file's third block
    _flip_a_byte(store, md5)
    for args in (("get", str(manifest), str(tmp_path / "dest")), ("cat", str(manifest), MULTI),
                 ("verify", str(manifest), f"{src}/")):
        proc = run_bytes(tmp_path, args[0], "--store", str(store), *args[1:])
        err = proc.stderr.decode()
        assert proc.returncode == 1, args
        assert f"block {store}/{md5[:3]}/{md5} is corrupt" in err, err
        assert "big.bin" in err, err
    # get kept what it completed, and left no partial file under a final name
    dest = tmp_path / "dest"
    assert not (dest / MULTI).exists()
    assert not list(dest.rglob(".keep-ingest-get-*"))
    assert read_tree(dest)["plain.txt"] == (src / "plain.txt").read_bytes()


def test_a_malformed_manifest_is_an_error_naming_the_line(cli, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text(". acbd18db4cc2f85cedef654fccc4a4d8+3 0:3:a\n./b nothex+3 0:3:c\n")
    for cmd in (("ls", str(bad)), ("get", str(bad), str(tmp_path / "d")), ("cat", str(bad), "a")):
        proc = cli(*cmd, "--store", str(tmp_path / "store"))
        assert proc.returncode == 1, cmd
        assert f"malformed manifest {bad}: line 2: invalid locator 'nothex+3'" in proc.stderr, proc.stderr
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("line, expect", [
    (". acbd18db4cc2f85cedef654fccc4a4d8+3 0:3:a/../../evil\n", "invalid path 'a/../../evil'"),
    (". acbd18db4cc2f85cedef654fccc4a4d8+3 0:3:/tmp/evil\n", "invalid path '/tmp/evil'"),
])
def test_names_escaping_dest_are_refused(cli, tmp_path, line, expect):
    store = tmp_path / "store"
    (store / "acb").mkdir(parents=True)
    (store / "acb" / "acbd18db4cc2f85cedef654fccc4a4d8").write_bytes(b"foo")
    bad = tmp_path / "bad.txt"
    bad.write_text(". acbd18db4cc2f85cedef654fccc4a4d8+3 0:3:fine\n" + line)
    dest = tmp_path / "box" / "dest"
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = cli("get", "--store", str(store), str(bad), str(dest))
    assert proc.returncode == 1
    assert "line 2" in proc.stderr and expect in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written anywhere
    assert not (tmp_path / "box").exists()


def test_an_existing_different_file_is_not_overwritten_without_force(cli, tmp_path, stored):
    src, manifest, store = stored
    dest = tmp_path / "dest"
    (dest / "dir one").mkdir(parents=True)
    (dest / "plain.txt").write_bytes(b"mine, not theirs")           # differs in size
    (dest / "a b").write_bytes(b"x" * len((src / "a b").read_bytes()))  # same size, unknown
    (dest / "empty.txt").touch()                                     # identical (empty)
    proc = cli("get", *store, str(manifest), str(dest))
    assert proc.returncode == 1
    assert "refusing to overwrite 2 existing path(s)" in proc.stderr
    assert f"{dest}/plain.txt: differs from the manifest (16 bytes, the manifest has 10)" in proc.stderr
    assert f"{dest}/a b: exists and is not known to match the manifest" in proc.stderr
    # refused before anything was fetched or created
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*")) == ["a b", "dir one", "empty.txt",
                                                                         "plain.txt"]
    proc = ok(cli("get", *store, "--force", str(manifest), str(dest)))
    assert "30 written, 1 already complete" in proc.stderr
    assert tree_state(dest) == tree_state(src)


def test_a_directory_where_a_file_goes_is_never_replaced(cli, tmp_path, stored):
    src, manifest, store = stored
    dest = tmp_path / "dest"
    (dest / "plain.txt").mkdir(parents=True)
    proc = cli("get", *store, "--force", str(manifest), str(dest))
    assert proc.returncode == 1 and f"{dest}/plain.txt: is a directory" in proc.stderr


def test_a_symlink_where_a_directory_goes_is_not_followed(cli, tmp_path, stored):
    src, manifest, store = stored
    dest = tmp_path / "dest"
    outside = tmp_path / "outside"
    outside.mkdir()
    dest.mkdir()
    (dest / "dir one").symlink_to(outside)
    proc = cli("get", *store, str(manifest), str(dest))
    assert proc.returncode == 1 and "dir one: is a symlink" in proc.stderr
    ok(cli("get", *store, "--force", str(manifest), str(dest)))
    assert list(outside.iterdir()) == []
    assert tree_state(dest) == tree_state(src)


def test_put_save_manifest_then_ls_by_portable_data_hash(cli, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "hello.txt").write_text("hello\n")
    store = ["--store", str(tmp_path / "store")]
    proc = cli("put", *store, "--save-manifest", "--json", str(src))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["manifest_locator"] == summary["pdh"]  # unsigned store: the locator is the PDH
    listing = cli("ls", *store, summary["pdh"])
    assert listing.returncode == 0, listing.stderr
    assert "src/hello.txt" in listing.stdout
