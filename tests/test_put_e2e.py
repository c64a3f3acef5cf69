"""``keep-ingest put`` end to end: real CLI, real worker processes, real ZeroMQ, real files.

The official Arvados SDK is the referee for reading manifests and for the portable
data hash; arv-put's own engine is the referee for the PDH of a tree.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from trees import BLOCK, make_awkward_tree, read_tree

pytest.importorskip("arvados")
from sdk_referee import sdk_collection, sdk_keep_for_store, sdk_read_tree  # noqa: E402

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def awkward(tmp_path_factory):
    return make_awkward_tree(tmp_path_factory.mktemp("awkward") / "src")


def put(cli, store, *args, timeout=180):
    proc = cli("put", "--store", str(store), *args, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.mark.sdk
def test_sdk_reads_every_file_back_and_agrees_on_the_pdh(cli, awkward, tmp_path):
    store = tmp_path / "store"
    manifest = put(cli, store, "--workers", "2", str(awkward) + "/").stdout
    with sdk_keep_for_store(str(store)) as keep:
        files, dirs = sdk_read_tree(manifest, keep)
    assert files == read_tree(awkward)
    assert {"empty dir", "dir one/inner empty"} <= dirs
    coll = sdk_collection(manifest)
    pdh = put(cli, store, "--portable-data-hash", str(awkward) + "/").stdout.strip()
    assert coll.portable_data_hash() == pdh
    # our text is already the SDK's normalized form
    assert coll.manifest_text(normalize=True) == manifest


@pytest.mark.sdk
def test_pdh_equals_arv_puts_for_a_tree_without_empty_directories(cli, tmp_path):
    src = make_awkward_tree(tmp_path / "src", empty_dirs=False)
    for form in (str(src) + "/", str(src)):
        ours = put(cli, tmp_path / "store", "--json", form).stdout
        theirs = subprocess.run([sys.executable, str(TESTS / "arvput_referee.py"),
                                 str(tmp_path / "arvstore"), form],
                                capture_output=True, text=True, timeout=180, check=True).stdout
        assert json.loads(ours)["pdh"] == json.loads(theirs)["pdh"], form


def test_manifest_is_identical_for_any_worker_count_and_chunk_size(cli, awkward, tmp_path):
    store = tmp_path / "store"
    runs = [("--workers", "1", "--chunk-size", str(BLOCK)),
            ("--workers", "2", "--chunk-size", "4096"),
            ("--workers", "4", "--chunk-size", str(1 << 20))]
    manifests = {put(cli, store, *args, str(awkward) + "/").stdout for args in runs}
    assert len(manifests) == 1


def test_several_sources_and_a_single_file(cli, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "in.txt").write_text("inside\n")
    (tmp_path / "solo.txt").write_text("solo\n")
    manifest = put(cli, tmp_path / "store", str(tmp_path / "d"), str(tmp_path / "solo.txt")).stdout
    # walk order packs d/in.txt then solo.txt into one shared block, listed by both streams
    shared = _loc(b"inside\nsolo\n")
    assert manifest == f". {shared} 7:5:solo.txt\n./d {shared} 0:7:in.txt\n"


def _loc(data: bytes) -> str:
    return f"{hashlib.md5(data).hexdigest()}+{len(data)}"


def test_outputs_json_pdh_and_manifest_file(cli, tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_bytes(b"data")
    out = tmp_path / "out.manifest"
    proc = put(cli, tmp_path / "store", "--json", "--manifest-out", str(out), str(tmp_path / "src"))
    summary = json.loads(proc.stdout)
    assert {k: summary[k] for k in ("files", "bytes", "blocks", "bytes_uploaded")} == \
        {"files": 1, "bytes": 4, "blocks": 1, "bytes_uploaded": 4}
    assert summary["pdh"] == sdk_collection(out.read_text()).portable_data_hash()
    assert isinstance(summary["seconds"], float)
    pdh_only = put(cli, tmp_path / "store", "--portable-data-hash", str(tmp_path / "src")).stdout
    assert pdh_only == summary["pdh"] + "\n"
    quiet = put(cli, tmp_path / "store", "-q", "--manifest-out", str(out), str(tmp_path / "src"))
    assert quiet.stdout == "" and quiet.stderr == ""


def test_default_store_is_under_xdg_data_home(cli, tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_bytes(b"default store")
    proc = cli("put", str(tmp_path / "src"))
    assert proc.returncode == 0, proc.stderr
    md5 = _loc(b"default store").split("+")[0]
    assert (tmp_path / "xdg-data" / "keep-ingest" / "store" / md5[:3] / md5).is_file()


def test_make_ingest_uses_the_default_profile(tmp_path):
    from conftest import REPO_ROOT, cli_env
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_bytes(b"via make")
    env = cli_env(tmp_path)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    proc = subprocess.run(["make", "-s", "-C", str(REPO_ROOT), "ingest", f"SRC={tmp_path / 'src'}",
                           f"VENV={Path(sys.executable).parent.parent}"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("./src ") and ":8:f\n" in proc.stdout
