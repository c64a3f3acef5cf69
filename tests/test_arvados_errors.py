"""The test cluster refuses what a real one refuses, and keep-ingest says so early and clearly."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest
from arvados_api_server import OTHER_TOKEN, USER_TOKEN, sign
from trees import fill

from ingest.arvados.client import ApiClient
from ingest.arvados.settings import find_settings_file, read_settings_file
from ingest.errors import ApiError, ConfigError
from ingest.manifest import Manifest, Segment
from ingest.save import overlay, parse_trash_at


def put(tmp_path, env, *args):
    return subprocess.run([sys.executable, "-m", "ingest", "put", "--workers", "1", *args],
                          capture_output=True, text=True, timeout=120, env=env)


@pytest.fixture
def src(tmp_path):
    fill(tmp_path / "src" / "a.txt", 1000, "a")
    return tmp_path / "src"


@pytest.fixture
def signed_manifest(fresh_cluster, tmp_path, src):
    """A manifest keepstore signed for USER_TOKEN (put --stream saves nothing)."""
    proc = put(tmp_path, fresh_cluster.env(tmp_path), "--stream", str(src) + "/")
    assert proc.returncode == 0, proc.stderr
    assert "+A" in proc.stdout and not fresh_cluster.state.collections
    return proc.stdout


def create(cluster, manifest: str, token: str = USER_TOKEN):
    with ApiClient(cluster.host, token, insecure=True, retries=0) as client:
        return client.send("POST", "collections", {"collection": {"manifest_text": manifest}})


def test_the_server_accepts_good_signatures_and_refuses_forged_expired_missing_or_foreign_ones(
        fresh_cluster, signed_manifest):
    record = create(fresh_cluster, signed_manifest)
    assert "+A" in record["manifest_text"] and "+A" not in record["unsigned_manifest_text"]
    loc = signed_manifest.split(" ")[1]
    md5 = loc[:32]
    forged = signed_manifest.replace(loc, loc[:-20] + "0" * 11 + loc[-9:])
    expired = signed_manifest.replace(loc, loc.split("+A")[0] + sign(md5, USER_TOKEN, int(time.time()) - 10))
    missing = signed_manifest.replace(loc, loc.split("+A")[0])
    for bad in (forged, expired, missing):
        with pytest.raises(ApiError) as err:
            create(fresh_cluster, bad)
        assert err.value.status == 403 and err.value.exit_code == 77
        assert "PermissionDenied" in str(err.value)
    with pytest.raises(ApiError) as err:       # signed for another token
        create(fresh_cluster, signed_manifest, OTHER_TOKEN)
    assert err.value.status == 403
    assert len(fresh_cluster.state.collections) == 1
    # The empty block needs no signature.
    assert create(fresh_cluster, ". d41d8cd98f00b204e9800998ecf8427e+0 0:0:empty\n")["portable_data_hash"]


def test_a_name_clash_is_422_without_ensure_unique_name_and_renamed_with_it(fresh_cluster, signed_manifest):
    with ApiClient(fresh_cluster.host, USER_TOKEN, insecure=True) as client:
        attrs = {"collection": {"manifest_text": signed_manifest, "name": "same"}}
        first = client.send("POST", "collections", attrs)
        with pytest.raises(ApiError) as err:
            client.send("POST", "collections", attrs)
        assert err.value.status == 422 and "duplicate key" in str(err.value) and "HTTP 422" in str(err.value)
        renamed = client.send("POST", "collections", attrs, {"ensure_unique_name": "true"})
    assert renamed["name"] == f"same ({renamed['uuid'][-15:]})" and first["name"] == "same"


def test_bad_token_is_exit_77_before_any_upload(fresh_cluster, tmp_path, src):
    before = fresh_cluster.stored_blocks()
    proc = put(tmp_path, fresh_cluster.env(tmp_path, token="v2/zzzzz-gj3su-000000000000009/s3cr3tvalue"), str(src))
    assert proc.returncode == 77, proc.stderr
    assert "HTTP 401" in proc.stderr and "Not logged in" in proc.stderr and "ARVADOS_API_TOKEN" in proc.stderr
    assert "s3cr3tvalue" not in proc.stderr and "Traceback" not in proc.stderr
    assert fresh_cluster.stored_blocks() == before


def test_unknown_project_is_exit_1_naming_it(fresh_cluster, tmp_path, src):
    project = "zzzzz-j7d0g-999999999999999"
    proc = put(tmp_path, fresh_cluster.env(tmp_path), "--project-uuid", project, str(src))
    assert proc.returncode == 1
    assert f"--project-uuid {project}: no such project" in proc.stderr and "404" in proc.stderr
    assert not [r for r in fresh_cluster.state.requests if r[0] == "POST"]


def test_unreachable_host_is_exit_69(fresh_cluster, tmp_path, src):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]      # closed again: nothing listens there
    env = fresh_cluster.env(tmp_path, ARVADOS_API_HOST=f"127.0.0.1:{port}")
    proc = subprocess.run([sys.executable, "-m", "ingest", "put", str(src)], capture_output=True, text=True,
                          timeout=60, env={**env})
    assert proc.returncode == 69
    assert f"cannot reach the Arvados API server 127.0.0.1:{port}" in proc.stderr


def test_tls_failure_suggests_insecure_for_test_clusters_only(fresh_cluster, tmp_path, src):
    env = fresh_cluster.env(tmp_path)
    del env["ARVADOS_API_HOST_INSECURE"]
    proc = put(tmp_path, env, str(src))
    assert proc.returncode == 1
    assert "TLS failure" in proc.stderr and "ARVADOS_API_HOST_INSECURE=1" in proc.stderr
    assert "for test clusters only" in proc.stderr


def test_api_host_with_a_scheme_and_a_missing_token_are_usage_errors(fresh_cluster, tmp_path, src):
    proc = put(tmp_path, fresh_cluster.env(tmp_path, ARVADOS_API_HOST=f"https://{fresh_cluster.host}"), str(src))
    assert proc.returncode == 2 and "without https://" in proc.stderr
    proc = put(tmp_path, fresh_cluster.env(tmp_path, ARVADOS_API_TOKEN=""), str(src))
    assert proc.returncode == 2 and "needs a token" in proc.stderr


def test_collection_flags_without_a_cluster_are_usage_errors(cli, tmp_path, src):
    proc = cli("put", "--store", str(tmp_path / "store"), "--name", "x", str(src))
    assert proc.returncode == 2 and "needs an Arvados cluster" in proc.stderr


def test_settings_file_lookup_and_syntax(tmp_path):
    conf = tmp_path / "cfg" / "arvados" / "settings.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text("# c\n\nARVADOS_API_HOST=h.example:443\nARVADOS_API_TOKEN=a=b\n")
    env = {"HOME": str(tmp_path / "nohome"), "XDG_CONFIG_HOME": str(tmp_path / "cfg"), "XDG_CONFIG_DIRS": "/nonexistent"}
    assert find_settings_file(env) == str(conf)
    assert read_settings_file(str(conf)) == {"ARVADOS_API_HOST": "h.example:443", "ARVADOS_API_TOKEN": "a=b"}
    conf.write_text("ARVADOS_API_HOST\n")
    with pytest.raises(ConfigError, match="line 1: expected KEY=VALUE"):
        read_settings_file(str(conf))


def test_overlay_adds_replaces_and_keeps():
    def seg(md5: str, n: int) -> Segment:
        return Segment(f"{md5 * 32}+{n}", n, 0, n)
    base, top = Manifest(), Manifest()
    base.add_file("keep", [seg("a", 3)])
    base.add_file("change", [seg("b", 4)])
    base.add_file("clash/inner", [seg("c", 5)])
    top.add_file("change", [seg("d", 6)])
    top.add_file("new/file", [seg("e", 7)])
    top.add_file("clash", [seg("f", 8)])       # a file where the collection has a directory: top wins
    merged, changed = overlay(base, top)
    assert dict(merged.files()) == {"change": [seg("d", 6)], "clash": [seg("f", 8)], "keep": [seg("a", 3)],
                                    "new/file": [seg("e", 7)]}
    assert changed == 3


def test_trash_at_reads_like_arv_put():
    import datetime
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    assert parse_trash_at("2027-01-31T18:00:00+01:00", now) == datetime.datetime(2027, 1, 31, 17, tzinfo=datetime.UTC)
    assert parse_trash_at("2027-01-31", now).astimezone().strftime("%H:%M:%S") == "23:59:59"
    with pytest.raises(ConfigError, match="in the future"):
        parse_trash_at("2025-01-01", now)
    with pytest.raises(ConfigError, match="expected a date"):
        parse_trash_at("tomorrow", now)


def test_hosts_and_uuids_match_whole_never_with_a_trailing_newline():
    from ingest.arvados.client import check_host
    from ingest.arvados.collections import check_collection_uuid
    from ingest.errors import IngestError

    assert check_host("api.example:443", "$ARVADOS_API_HOST") == "api.example:443"
    assert check_collection_uuid("zzzzz-4zz18-0123456789abcde", "--update-collection")
    for bad in ("api.example\n", "api.example:443\n"):
        with pytest.raises(IngestError):
            check_host(bad, "$ARVADOS_API_HOST")
    with pytest.raises(IngestError):
        check_collection_uuid("zzzzz-4zz18-0123456789abcde\n", "--update-collection")
