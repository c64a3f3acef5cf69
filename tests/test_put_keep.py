"""``keep-ingest put --keep``: uploads through real keepstore servers on 127.0.0.1."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from conftest import cli_env
from keepstore_fixture import SIGNING_KEY, TOKEN
from trees import MiB, fill, make_awkward_tree, read_tree

from ingest.journal import iter_records
from ingest.keep.client import rendezvous_order, static_services
from ingest.keep.locator import Locator
from ingest.manifest import parse_manifest

pytest.importorskip("arvados")
from sdk_referee import sdk_collection, sdk_keep_for_services, sdk_read_tree  # noqa: E402


def block_locators(manifest_text: str) -> set[str]:
    return {seg.locator for _, segs in parse_manifest(manifest_text).files() for seg in segs}


def holders(servers, md5: str) -> list[int]:
    return [i for i, ks in enumerate(servers) if any(ks.block_path(md5, v).exists()
                                                      for v in range(len(ks.volumes)))]


@pytest.fixture
def fast_retries(tmp_path):
    profile = tmp_path / "fast.toml"
    profile.write_text("[store]\nretries = 2\nbackoff_start = 0.05\n")
    return str(profile)


@pytest.mark.sdk
def test_signed_upload_reads_back_through_the_sdk(cli, keepstore_factory, tmp_path):
    ks = keepstore_factory(signing_key=SIGNING_KEY)
    src = make_awkward_tree(tmp_path / "src", edges=False)
    fill(src / "big", 3 * MiB + 5, "big")
    proc = cli("put", "--keep", ks.url, "--replication", "1", "--block-size", str(MiB), str(src) + "/",
               env={"ARVADOS_API_TOKEN": TOKEN})
    assert proc.returncode == 0, proc.stderr
    manifest = proc.stdout
    assert all(Locator.parse(loc).permission_expiry for loc in block_locators(manifest))
    files, dirs = sdk_read_tree(manifest, sdk_keep_for_services([ks.url], TOKEN))
    assert files == read_tree(src)
    pdh = cli("put", "--keep", ks.url, "--replication", "1", "--block-size", str(MiB),
              "--portable-data-hash", str(src) + "/", env={"ARVADOS_API_TOKEN": TOKEN})
    assert pdh.stdout.strip() == sdk_collection(manifest).portable_data_hash()


def test_replication_2_lands_on_the_first_two_services_in_rendezvous_order(
        cli, keepstores3, tmp_path, fast_retries):
    src = tmp_path / "src"
    for i in range(12):
        fill(src / f"f{i}", 200_000 + i, f"f{i}")
    urls = [ks.url for ks in keepstores3]
    proc = cli("put", "--config", fast_retries, *[a for u in urls for a in ("--keep", u)],
               "--replication", "2", "--block-size", str(256 * 1024), str(src))
    assert proc.returncode == 0, proc.stderr
    services = static_services(urls)
    locators = block_locators(proc.stdout)
    assert len(locators) >= 6
    for loc in locators:
        md5 = loc[:32]
        expected = sorted(urls.index(s.root) for s in rendezvous_order(md5, services)[:2])
        assert holders(keepstores3, md5) == expected, loc


def test_a_service_stopped_mid_run_still_gives_two_replicas(cli, keepstores3, tmp_path, fast_retries):
    src = tmp_path / "src"
    fill(src / "big", 40 * MiB, "big")
    urls = [ks.url for ks in keepstores3]
    args = [sys.executable, "-m", "ingest", "put", "--config", fast_retries,
            *[a for u in urls for a in ("--keep", u)], "--replication", "2",
            "--block-size", str(MiB), "--workers", "2", str(src)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cli_env(tmp_path))
    try:
        deadline = time.monotonic() + 30
        victim = keepstores3[0]
        while time.monotonic() < deadline and proc.poll() is None:
            if sum(1 for _ in victim.volumes[0].rglob("*") if _.is_file()) >= 3:
                break
            time.sleep(0.01)
        victim.kill()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    for loc in block_locators(out):
        assert len(holders(keepstores3, loc[:32])) >= 2, loc


def test_all_services_down_fails_naming_them(cli, keepstores3, tmp_path, fast_retries):
    src = tmp_path / "src"
    fill(src / "f", 1000, "f")
    urls = [ks.url for ks in keepstores3]
    for ks in keepstores3:
        ks.kill()
    started = time.monotonic()
    proc = cli("put", "--config", fast_retries, *[a for u in urls for a in ("--keep", u)],
               "--replication", "2", str(src), timeout=120)
    assert proc.returncode == 1
    # refused before any work starts, naming every service and where the list came from
    assert "no Keep service answers (--keep)" in proc.stderr
    for url in urls:
        assert url in proc.stderr
    assert proc.stdout == ""
    assert time.monotonic() - started < 60
    # nothing is recorded as stored
    journals = list((tmp_path / "xdg-state").rglob("journal"))
    assert not [r for j in journals for r in iter_records(str(j)) if r["t"] == "block"]


def test_token_is_never_logged_nor_written_to_state(cli, keepstore_factory, tmp_path):
    ks = keepstore_factory(signing_key=SIGNING_KEY)
    src = tmp_path / "src"
    fill(src / "f", 3 * MiB, "f")
    proc = cli("put", "-vv", "--keep", ks.url, "--replication", "1", "--block-size", str(MiB), str(src),
               env={"ARVADOS_API_TOKEN": TOKEN})
    assert proc.returncode == 0, proc.stderr
    assert "+A" in proc.stdout and TOKEN not in proc.stderr
    state_files = [p for p in (tmp_path / "xdg-state").rglob("*") if p.is_file()]
    assert state_files and not [p for p in state_files if TOKEN.encode() in p.read_bytes()]


def test_a_service_down_before_the_run_is_named_and_the_others_take_over(cli, keepstores3, tmp_path,
                                                                         fast_retries):
    src = tmp_path / "src"
    fill(src / "f", 2 * MiB, "f")
    urls = [ks.url for ks in keepstores3]
    keepstores3[1].kill()
    proc = cli("put", "--config", fast_retries, *[a for u in urls for a in ("--keep", u)],
               "--replication", "2", "--block-size", str(MiB), str(src))
    assert proc.returncode == 0, proc.stderr
    assert "some Keep services do not answer (--keep)" in proc.stderr and urls[1] in proc.stderr
    for loc in block_locators(proc.stdout):
        assert holders(keepstores3, loc[:32]) == [0, 2]
