"""Keep faults: ``keep-ingest put --keep`` through a fault-injecting proxy.

Each test puts a real keepstore (``keepstore_fixture``) behind a ``FaultProxy``
(``fault_proxy.py``) on 127.0.0.1 and runs the real CLI against the proxy, with
fast retries from a profile. What can be handled (slow answers, a share of 503s,
connections reset mid-body, a full service when another has room) must give a
correct manifest; what cannot (every service failing, a service answering with
the wrong locator, a hash-mismatch status or no replicas) must end the run with
exit 1 within a bounded time, naming the service and the error, and leave a
journal that lists only blocks really stored, and that a later run can resume from.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time

import pytest
import urllib3
from fault_helpers import assert_journal_holds_only_stored_blocks, fast_profile, journaled_locators, read_back, run_cli
from trees import fill, read_tree

from ingest.errors import BlockCorrupt, StoreError
from ingest.keep.client import KeepClient, rendezvous_order, static_services
from ingest.keep.locator import Locator
from ingest.manifest import parse_manifest

pytestmark = [pytest.mark.fault, pytest.mark.timeout(60)]

KiB = 1024
BLOCK = 256 * KiB


def make_tree(root, files: int = 10):
    """About 1.5 MiB in ``files`` files: with 256 KiB blocks, 7 or so blocks."""
    for i in range(files):
        fill(root / f"d{i % 3}" / f"f{i}", 60 * KiB + 17 * KiB * i, f"fault-{i}")
    fill(root / "large", 700 * KiB + 3, "large")  # over half a block: blocks of its own
    return root


def put_args(profile: str, urls, src, *extra: str, replication: int = 1) -> list[str]:
    return ["put", "--config", profile, *[a for u in urls for a in ("--keep", u)],
            "--replication", str(replication), "--block-size", str(BLOCK), "--workers", "2",
            *extra, str(src) + "/"]


def block_md5s(manifest_text: str) -> set[str]:
    return {seg.locator[:32] for _, segs in parse_manifest(manifest_text).files() for seg in segs}


def check_complete(run, src, services):
    """A successful run whose manifest reads back, byte for byte, as the source tree."""
    assert run.returncode == 0, run.stderr
    assert run.leftovers == []
    assert read_back(run.stdout, services) == read_tree(src)


# ---- the proxy itself

def test_proxy_modes_can_be_changed_over_http_while_running(fault_proxy, keepstore):
    proxy = fault_proxy(keepstore.url)
    http = urllib3.PoolManager(retries=False)
    data = b"proxy self-test"
    md5 = hashlib.md5(data).hexdigest()
    loc = http.request("PUT", proxy.url + md5, body=data)
    assert loc.status == 200 and loc.data.decode().strip() == f"{md5}+{len(data)}"
    r = http.request("POST", proxy.url + "_fault_proxy/faults",
                     body=json.dumps({"fail_rate": 1.0, "fail_status": 507, "methods": ["GET"]}))
    assert r.status == 200 and json.loads(r.data)["faults"]["fail_status"] == 507
    assert http.request("GET", f"{proxy.url}{md5}+{len(data)}").status == 507
    http.request("POST", proxy.url + "_fault_proxy/faults", body=json.dumps({"update": True, "fail_rate": 0}))
    got = http.request("GET", f"{proxy.url}{md5}+{len(data)}")
    assert got.status == 200 and got.data == data
    stats = json.loads(http.request("GET", proxy.url + "_fault_proxy/stats").data)
    assert stats["injected"] == {"fail": 1} and stats["requests"] == {"PUT": 1, "GET": 2}


# ---- what retries and other services handle

def test_slow_responses_still_complete(fault_proxy, keepstore, tmp_path):
    src = make_tree(tmp_path / "src")
    proxy = fault_proxy(keepstore.url, delay_ms=150)
    run = run_cli(tmp_path, *put_args(fast_profile(tmp_path / "p.toml"), [proxy.url], src))
    check_complete(run, src, [keepstore.url])
    assert proxy.snapshot()["injected"]["delay"] >= len(block_md5s(run.stdout))


def test_503_on_a_third_of_requests_still_gives_the_right_manifest(fault_proxy, keepstore, tmp_path):
    src = make_tree(tmp_path / "src", files=16)
    proxy = fault_proxy(keepstore.url, fail_rate=0.3, fail_status=503, seed=11)
    # 9 tries each: a block fails 9 times in a row with p = 0.3**9 (2e-5).
    run = run_cli(tmp_path, *put_args(fast_profile(tmp_path / "p.toml", retries=8), [proxy.url], src))
    check_complete(run, src, [keepstore.url])
    stats = proxy.snapshot()
    assert stats["injected"]["fail"] >= 1
    assert stats["requests"]["PUT"] == stats["injected"]["fail"] + len(block_md5s(run.stdout))
    assert len(assert_journal_holds_only_stored_blocks(tmp_path / "xdg-state", keepstore.volumes)) \
        == len(block_md5s(run.stdout))


@pytest.mark.parametrize("where", ["request", "response"])
def test_connections_reset_mid_body_are_retried(fault_proxy, keepstore, tmp_path, where):
    src = make_tree(tmp_path / "src")
    # The first 4 PUTs are reset: with 5 retries no block can run out of tries.
    proxy = fault_proxy(keepstore.url, reset_rate=1.0, reset_at=where, limit=4, methods=["PUT"])
    run = run_cli(tmp_path, *put_args(fast_profile(tmp_path / "p.toml", retries=5), [proxy.url], src))
    check_complete(run, src, [keepstore.url])
    assert proxy.snapshot()["injected"]["reset"] == 4


def test_507_from_one_service_moves_blocks_to_the_other(fault_proxy, keepstore_factory, tmp_path):
    full, fine = keepstore_factory.many(2)
    proxy = fault_proxy(full.url, fail_rate=1.0, fail_status=507, methods=["PUT"])
    src = make_tree(tmp_path / "src")
    urls = [proxy.url, fine.url]
    run = run_cli(tmp_path, *put_args(fast_profile(tmp_path / "p.toml"), urls, src))
    check_complete(run, src, [fine.url])
    md5s = block_md5s(run.stdout)
    services = static_services(urls)
    prefer_full = [m for m in md5s if rendezvous_order(m, services)[0].root == proxy.url]
    assert prefer_full, "the tree should have blocks whose first choice is the full service"
    # Each of those was offered to the full service once (507: never again), then
    # went to the other one; the full service's volume got nothing.
    assert proxy.snapshot()["requests"]["PUT"] == len(prefer_full)
    assert not [p for p in full.volumes[0].rglob("*") if p.is_file()]
    assert_journal_holds_only_stored_blocks(tmp_path / "xdg-state", fine.volumes)


def test_a_corrupting_service_is_caught_on_read(fault_proxy, keepstore_factory):
    ks1, ks2 = keepstore_factory.many(2)
    data = b"bytes a server will damage on the way out" * 1000
    with KeepClient([ks1.url, ks2.url], None, replication=2, retries=0) as client:
        loc = client.put(data).locator
    proxy = fault_proxy(ks1.url, corrupt_rate=1.0)
    with KeepClient([proxy.url], None, retries=1, backoff_start=0.01) as only_bad:
        with pytest.raises(BlockCorrupt) as err:
            only_bad.get(loc)
    assert Locator.parse(loc).stripped() in str(err.value) and proxy.url in str(err.value)
    assert proxy.snapshot()["injected"]["corrupt"] == 1  # not retried: the service is wrong
    # With a good copy elsewhere the read falls through to it, whatever the order.
    with KeepClient([proxy.url, ks2.url], None, retries=0) as mixed:
        assert mixed.get(loc) == data


def test_reads_retry_through_resets_and_503s(fault_proxy, keepstore):
    data = bytes(range(256)) * 2000
    with KeepClient([keepstore.url], None, retries=0) as client:
        loc = client.put(data).locator
    proxy = fault_proxy(keepstore.url, reset_rate=1.0, reset_at="response", limit=2, methods=["GET"])
    with KeepClient([proxy.url], None, retries=4, backoff_start=0.01) as client:
        assert client.get(loc) == data
        assert proxy.snapshot()["injected"] == {"reset": 2}
        proxy.set(fail_rate=1.0, fail_status=503, limit=3, methods=["GET"])
        assert client.get(loc) == data
        assert proxy.snapshot()["injected"] == {"reset": 2, "fail": 3}


def test_keepstore_survives_clients_vanishing_mid_body(fault_proxy, keepstore_factory):
    # One buffer: a body whose memory lease leaked would block every later 64 MiB PUT.
    ks = keepstore_factory(max_buffers=1)
    proxy = fault_proxy(ks.url, cut_rate=1.0, methods=["PUT"])
    with KeepClient([proxy.url], None, retries=0) as client:
        for i in range(3):
            with pytest.raises(StoreError, match="HTTP 502"):
                client.put(b"%d" % i * (4 * 1024 * 1024))
    assert proxy.snapshot()["injected"]["cut"] == 3
    assert [p for p in ks.volumes[0].rglob("*") if p.is_file()] == []  # not even a temp file
    full = os.urandom(1024) * (64 * 1024)
    with KeepClient([ks.url], None, retries=0, read_timeout=20) as client:
        stored = client.put(full)
    assert stored.locator == f"{hashlib.md5(full).hexdigest()}+{len(full)}"


def test_a_stalled_service_times_out_and_the_block_goes_elsewhere(fault_proxy, keepstore_factory):
    ks1, ks2 = keepstore_factory.many(2)
    proxy = fault_proxy(ks1.url, delay_ms=2000, methods=["PUT"])
    urls = [proxy.url, ks2.url]
    services = static_services(urls)
    data = next(d for d in (b"stall %d" % i for i in range(100))
                if rendezvous_order(hashlib.md5(d).hexdigest(), services)[0].root == proxy.url)
    opts = {"retries": 1, "backoff_start": 0.01, "read_timeout": 0.3}
    started = time.monotonic()
    with KeepClient(urls, None, **opts) as client:
        stored = client.put(data)
    assert stored.replicas == 1 and time.monotonic() - started < 1.5
    started = time.monotonic()
    with KeepClient([proxy.url], None, **opts) as client:
        with pytest.raises(StoreError) as err:
            client.put(data + b"!")
    assert time.monotonic() - started < 2.0
    assert proxy.url in str(err.value) and "timed out" in str(err.value).lower()


def test_closing_the_client_stops_a_put_that_is_backing_off(fault_proxy, keepstore):
    """What a worker told to stop needs: no more rounds once the client is closed."""
    proxy = fault_proxy(keepstore.url, fail_rate=1.0, fail_status=503)
    client = KeepClient([proxy.url], None, retries=10, backoff_start=5.0)
    outcome: list[BaseException] = []

    def put():
        try:
            client.put(b"never stored")
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=put)
    worker.start()
    try:
        assert proxy.wait_for(lambda s: s["requests"].get("PUT", 0) >= 1)
        started = time.monotonic()
        client.close()
        worker.join(5)
        assert not worker.is_alive() and time.monotonic() - started < 2
    finally:
        client.close()
        worker.join(30)
    assert isinstance(outcome[0], StoreError) and "closed" in str(outcome[0])
    assert proxy.snapshot()["requests"]["PUT"] == 1


# ---- what cannot be handled: bounded failure, an honest journal, resumable

def test_when_nothing_succeeds_the_run_fails_in_bounded_time_and_resumes_later(
        fault_proxy, keepstore, tmp_path):
    src = make_tree(tmp_path / "src")
    profile = fast_profile(tmp_path / "p.toml", retries=3)
    # The first 3 PUTs get through, then the service answers 503 to everything.
    proxy = fault_proxy(keepstore.url, fail_rate=1.0, fail_status=503, after=3, methods=["PUT"])
    run = run_cli(tmp_path, *put_args(profile, [proxy.url], src))
    assert run.returncode == 1, run.stderr
    assert run.leftovers == []
    assert run.seconds < 30
    assert proxy.url in run.stderr and "HTTP 503" in run.stderr
    assert run.stdout == ""
    journaled = assert_journal_holds_only_stored_blocks(tmp_path / "xdg-state", keepstore.volumes)
    assert 1 <= len(journaled) <= 3
    # The journal is valid for the next run: once the service recovers, the same
    # command finishes, storing only what was missing.
    puts_before = proxy.snapshot()["requests"]["PUT"]
    proxy.clear()
    again = run_cli(tmp_path, *put_args(profile, [proxy.url], src))
    check_complete(again, src, [keepstore.url])
    md5s = block_md5s(again.stdout)
    assert {Locator.parse(loc).md5 for loc in journaled} <= md5s
    assert proxy.snapshot()["requests"]["PUT"] - puts_before == len(md5s) - len(journaled)


@pytest.mark.parametrize("faults, message", [
    ({"wrong_locator": True}, "unexpected body"),
    ({"put_status": 422}, "HTTP 422 hash mismatch"),
    ({"put_status": 400}, "HTTP 400 hash mismatch"),
    ({"replicas": "0"}, "X-Keep-Replicas-Stored: 0"),
], ids=["wrong-locator", "422", "400", "no-replicas"])
def test_a_service_that_answers_puts_wrongly_fails_the_run_naming_it(
        fault_proxy, keepstore, tmp_path, faults, message):
    src = tmp_path / "src"
    fill(src / "f", 100 * KiB, "f")
    proxy = fault_proxy(keepstore.url, **faults)
    run = run_cli(tmp_path, *put_args(fast_profile(tmp_path / "p.toml"), [proxy.url], src))
    assert run.returncode == 1, run.stderr
    assert run.leftovers == []
    assert proxy.url in run.stderr and message in run.stderr
    assert run.seconds < 30
    # These answers are permanent for the service: one PUT, no retry.
    assert proxy.snapshot()["requests"]["PUT"] == 1
    assert journaled_locators(tmp_path / "xdg-state") == []

