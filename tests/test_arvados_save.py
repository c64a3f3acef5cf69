"""Saving collections on a test Arvados cluster (tests/arvados_cluster.py): the
official arv-put proves the test server speaks the real API, then keep-ingest
saves, updates and resumes saves there, read back by the official SDK."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from arvados_api_server import PROJECT_UUID, USER_TOKEN, USER_UUID
from conftest import finish, spawn_cli
from trees import MiB, fill, make_awkward_tree, read_tree

from ingest.journal import iter_records

pytest.importorskip("arvados")

BIN = Path(sys.executable).parent


def run(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)


def keep_ingest(tmp_path: Path, cluster, *args: str, **env: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "ingest", "put", "--workers", "2", *args], cluster.env(tmp_path, **env))


def sdk_read(cluster, tmp_path: Path, uuid: str) -> tuple[dict[str, bytes], str]:
    """Every file of the collection, read by the official SDK by uuid, and its PDH (in a child
    process, so the SDK reads its settings from the environment as a user's would)."""
    code = (
        "import json, sys, arvados, arvados.collection\n"
        "c = arvados.collection.Collection(sys.argv[1])\n"
        "def walk(node, prefix):\n"
        "    for name, item in node.items():\n"
        "        path = prefix + name\n"
        "        if isinstance(item, arvados.collection.Subcollection):\n"
        "            yield from walk(item, path + '/')\n"
        "        else:\n"
        "            with c.open(path, 'rb') as f:\n"
        "                yield path, f.read().hex()\n"
        "print(json.dumps({'pdh': c.portable_data_hash(), 'files': dict(walk(c, ''))}))\n")
    proc = run([sys.executable, "-c", code, uuid], cluster.env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    return {p: bytes.fromhex(h) for p, h in doc["files"].items()}, doc["pdh"]


@pytest.fixture
def tree(tmp_path) -> Path:
    root = make_awkward_tree(tmp_path / "src", empty_dirs=False, edges=False)
    fill(root / "big" / "large.bin", 40 * MiB, "large")
    return root


def test_official_arv_put_saves_into_the_test_cluster_and_the_sdk_reads_it_back(fresh_cluster, tmp_path, tree):
    proc = run([str(BIN / "arv-put"), "--no-progress", "--name", "by arv-put", str(tree) + "/"],
               fresh_cluster.env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    uuid = proc.stdout.strip()
    record = fresh_cluster.state.collections[uuid]
    assert record["name"] == "by arv-put" and record["owner_uuid"] == USER_UUID
    assert "+A" not in record["manifest_text"]            # the server stripped the signatures
    files, pdh = sdk_read(fresh_cluster, tmp_path, uuid)
    assert files == read_tree(tree)
    assert pdh == record["portable_data_hash"]


def test_keep_ingest_saves_the_same_collection_as_arv_put(fresh_cluster, tmp_path, tree):
    ref = run([str(BIN / "arv-put"), "--no-progress", "--portable-data-hash", str(tree) + "/"],
              fresh_cluster.env(tmp_path / "arv"))
    assert ref.returncode == 0, ref.stderr
    proc = keep_ingest(tmp_path, fresh_cluster, "--name", "by keep-ingest", str(tree) + "/")
    assert proc.returncode == 0, proc.stderr
    uuid = proc.stdout.strip()
    record = fresh_cluster.state.collections[uuid]
    assert record["name"] == "by keep-ingest" and record["owner_uuid"] == USER_UUID
    assert record["portable_data_hash"] == ref.stdout.strip()      # the same PDH as arv-put's
    assert f"collection {uuid} saved as 'by keep-ingest'\n  in {USER_UUID}\n" in proc.stderr
    assert f"  API server's portable data hash {record['portable_data_hash']}\n" in proc.stderr
    assert all(len(line) <= 80 for line in proc.stderr.splitlines()), proc.stderr   # the summary fits a terminal
    files, pdh = sdk_read(fresh_cluster, tmp_path, uuid)
    assert files == read_tree(tree) and pdh == record["portable_data_hash"]
    dest = tmp_path / "got"
    dest.mkdir()
    got = run([str(BIN / "arv-get"), f"{uuid}/", str(dest) + "/"], fresh_cluster.env(tmp_path))
    assert got.returncode == 0, got.stderr
    assert read_tree(dest) == read_tree(tree)
    # Replicated as the cluster asks (defaultCollectionReplication 2 on 2 disk services).
    assert len(fresh_cluster.stored_blocks()) == 2 * len(set(fresh_cluster.stored_blocks()))
    # The token went into no state file and no output.
    state = tmp_path / "xdg-state"
    assert all(USER_TOKEN.encode() not in p.read_bytes() for p in state.rglob("*") if p.is_file())
    assert USER_TOKEN not in proc.stdout + proc.stderr


def test_portable_data_hash_project_and_journal(fresh_cluster, tmp_path, tree):
    proc = keep_ingest(tmp_path, fresh_cluster, "--portable-data-hash", "--project-uuid", PROJECT_UUID,
                       str(tree))
    assert proc.returncode == 0, proc.stderr
    (record,) = fresh_cluster.state.collections.values()
    assert proc.stdout.strip() == record["portable_data_hash"]
    assert record["owner_uuid"] == PROJECT_UUID and record["name"].startswith("Saved at ")
    journal = next((tmp_path / "xdg-state").rglob("journal"))
    saved = [r for r in iter_records(str(journal)) if r["t"] == "saved"]
    assert [(r["uuid"], r["pdh"]) for r in saved] == [(record["uuid"], record["portable_data_hash"])]


def test_update_collection_adds_new_and_replaces_changed_files(fresh_cluster, tmp_path):
    src = tmp_path / "src"
    fill(src / "keep.txt", 100, "keep")
    fill(src / "change.txt", 200, "v1")
    first = keep_ingest(tmp_path, fresh_cluster, str(src) + "/")
    assert first.returncode == 0, first.stderr
    uuid = first.stdout.strip()
    # Another client adds a file the local tree does not have: it must stay.
    fill(tmp_path / "x.txt", 50, "x")
    other = run([str(BIN / "arv-put"), "--no-progress", "--update-collection", uuid, str(tmp_path / "x.txt")],
                fresh_cluster.env(tmp_path / "o"))
    assert other.returncode == 0, other.stderr
    fill(src / "change.txt", 300, "v2")
    fill(src / "new" / "added.txt", 400, "added")
    proc = keep_ingest(tmp_path, fresh_cluster, "--update-collection", uuid, str(src) + "/")
    assert proc.returncode == 0, proc.stderr
    # keep.txt is repacked with the changed small file, so its segments are new too.
    assert proc.stdout.strip() == uuid and f"collection {uuid} updated\n  3 file(s) new or replaced\n" in proc.stderr
    assert len(fresh_cluster.state.collections) == 1
    files, _ = sdk_read(fresh_cluster, tmp_path, uuid)
    assert files == {**read_tree(src), "x.txt": (tmp_path / "x.txt").read_bytes()}


@pytest.mark.parametrize("when", ["before", "after"])
def test_kill_9_during_the_save_then_a_rerun_leaves_one_collection(fresh_cluster, tmp_path, tree, when):
    fresh_cluster.state.hold_create = (when, 30.0)
    proc = spawn_cli(tmp_path, "put", "--workers", "2", str(tree) + "/", env=fresh_cluster.env(tmp_path))
    try:
        event = fresh_cluster.state.created if when == "after" else fresh_cluster.state.create_received
        assert event.wait(60), "the run never reached the save"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        finish(proc, timeout=30)
    fresh_cluster.state.hold_create = None
    assert len(fresh_cluster.state.collections) == (1 if when == "after" else 0)
    blocks = fresh_cluster.stored_blocks()
    status = run([sys.executable, "-m", "ingest", "status", "--json"], fresh_cluster.env(tmp_path))
    assert json.loads(status.stdout)["save_pending"] is True, status.stdout
    again = keep_ingest(tmp_path, fresh_cluster, str(tree) + "/")
    assert again.returncode == 0, again.stderr
    assert len(fresh_cluster.state.collections) == 1
    (record,) = fresh_cluster.state.collections.values()
    assert again.stdout.strip() == record["uuid"]
    assert fresh_cluster.stored_blocks() == blocks          # nothing uploaded again
    files, _ = sdk_read(fresh_cluster, tmp_path, record["uuid"])
    assert files == read_tree(tree)
    status = run([sys.executable, "-m", "ingest", "status", "--json"], fresh_cluster.env(tmp_path))
    info = json.loads(status.stdout)
    assert info["collection"]["uuid"] == record["uuid"] and info["finished"] and not info["save_pending"]


def test_a_lost_create_answer_is_looked_up_not_repeated(fresh_cluster, tmp_path, tree):
    fresh_cluster.state.fail_create_answers = 1      # the record is made, the answer is a 503
    proc = keep_ingest(tmp_path, fresh_cluster, str(tree) + "/")
    assert proc.returncode == 0, proc.stderr
    assert len(fresh_cluster.state.collections) == 1
    assert proc.stdout.strip() in fresh_cluster.state.collections


def test_a_manifest_over_max_request_size_is_refused_before_any_upload(fresh_cluster, tmp_path):
    src = tmp_path / "src"
    for i in range(200):
        fill(src / f"a-rather-long-file-name-to-make-the-manifest-big-{i:04d}.txt", 10 + i, f"f{i}")
    fresh_cluster.state.max_request_size = 4000
    before = fresh_cluster.stored_blocks()
    proc = keep_ingest(tmp_path, fresh_cluster, str(src) + "/")
    assert proc.returncode == 1
    assert "over the cluster's limit of 4,000 bytes" in proc.stderr and "nothing was uploaded" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert fresh_cluster.stored_blocks() == before
    assert not [r for r in fresh_cluster.state.requests if r[0] == "POST"]
    # The server refuses such a body itself, too (413), as a real one does.
    ok = keep_ingest(tmp_path, fresh_cluster, "--stream", str(src) + "/")
    assert ok.returncode == 0, ok.stderr
    from ingest.arvados.client import ApiClient
    from ingest.errors import ApiError
    with ApiClient(fresh_cluster.host, USER_TOKEN, insecure=True) as client:
        with pytest.raises(ApiError) as err:
            client.send("POST", "collections", {"collection": {"manifest_text": ok.stdout}})
    assert err.value.status == 413


def test_storage_classes_are_sent_checked_and_saved(fresh_cluster, tmp_path, tree):
    proc = keep_ingest(tmp_path, fresh_cluster, "--storage-classes", "default", "--replication", "1",
                       str(tree) + "/")
    assert proc.returncode == 0, proc.stderr
    (record,) = fresh_cluster.state.collections.values()
    assert record["storage_classes_desired"] == ["default"] and record["replication_desired"] == 1
    refused = keep_ingest(tmp_path / "r", fresh_cluster, "--storage-classes", "archive", str(tree) + "/")
    # No volume has that class: keepstore refuses (507) and the run fails naming each service.
    assert refused.returncode == 1
    assert "could not store block" in refused.stderr and fresh_cluster.keepstores[0].url in refused.stderr
    assert len(fresh_cluster.state.collections) == 1


def test_settings_conf_is_read_as_the_sdk_reads_it(fresh_cluster, tmp_path, tree):
    conf = tmp_path / "xdg-config" / "arvados" / "settings.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text(f"# test cluster\nARVADOS_API_HOST={fresh_cluster.host}\nARVADOS_API_TOKEN={USER_TOKEN}\n"
                    "ARVADOS_API_HOST_INSECURE=yes\n")
    env = fresh_cluster.env(tmp_path)
    for name in ("ARVADOS_API_HOST", "ARVADOS_API_TOKEN", "ARVADOS_API_HOST_INSECURE"):
        del env[name]
    proc = run([sys.executable, "-m", "ingest", "put", str(tree) + "/"], env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() in fresh_cluster.state.collections
    shown = run([sys.executable, "-m", "ingest", "config", "show"], env)
    assert f"api.host = \"{fresh_cluster.host}\"" in shown.stdout and str(conf) in shown.stdout
    assert USER_TOKEN not in shown.stdout


def test_reruns_of_a_saved_run_create_new_collections_like_arv_put(fresh_cluster, tmp_path):
    src = tmp_path / "src"
    fill(src / "a", 10, "a")
    uuids = []
    for _ in range(2):
        proc = keep_ingest(tmp_path, fresh_cluster, str(src) + "/")
        assert proc.returncode == 0, proc.stderr
        uuids.append(proc.stdout.strip())
    assert len(set(uuids)) == 2 and len(fresh_cluster.state.collections) == 2


def test_dry_run_and_stream_against_the_cluster_save_nothing(fresh_cluster, tmp_path, tree):
    pending = keep_ingest(tmp_path, fresh_cluster, "--dry-run", str(tree) + "/")
    assert pending.returncode == 2, pending.stderr
    stream = keep_ingest(tmp_path, fresh_cluster, "--stream", str(tree) + "/")
    assert stream.returncode == 0 and "+A" in stream.stdout
    assert not fresh_cluster.state.collections
    done = keep_ingest(tmp_path, fresh_cluster, "--dry-run", str(tree) + "/")
    assert done.returncode == 0, done.stderr          # the same run: everything is stored already
