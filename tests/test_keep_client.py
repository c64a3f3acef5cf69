"""The HTTP Keep client: rendezvous, replication, retries, errors, against real and fake services."""

from __future__ import annotations

import hashlib
import http.server
import logging
import os
import re
import threading
import time
from collections.abc import Callable

import pytest
from keepstore_fixture import SIGNING_KEY, TOKEN

from ingest.errors import BlockNotFound, ConfigError, StoreError
from ingest.keep.client import KeepClient, rendezvous_order, static_services
from ingest.keep.factory import open_store
from ingest.keep.signing import verify_signature
from ingest.keep.store import StoredBlock

pytestmark = pytest.mark.timeout(60)

FAST = {"retries": 3, "backoff_start": 0.01, "backoff_max": 0.05, "connect_timeout": 2, "read_timeout": 10}


def md5_of(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def keep_spec(urls, **kw):
    spec = {"type": "keep", "services": list(urls), "token": TOKEN, "replication": 1, **FAST}
    spec.update(kw)
    return spec


def put(store, data: bytes, chunk: int = 1000) -> StoredBlock:
    w = store.open_block()
    for i in range(0, len(data), chunk):
        w.write(memoryview(data)[i:i + chunk])
    return w.commit(md5_of(data))


# ---- a scripted fake Keep service (a test double, not the server under test)

class FakeKeep:
    """Answers each request with the next scripted reply; records what it got.

    A reply is (status, headers, body) or a callable(request_info) returning one.
    The last reply repeats when the script runs out.
    """

    def __init__(self, script, delay: float = 0.0):
        self.script = list(script)
        self.delay = delay
        self.requests: list[dict] = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _serve(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                info = {"method": self.command, "path": self.path, "headers": dict(self.headers),
                        "body": body, "start": time.monotonic()}
                fake.requests.append(info)
                if fake.delay:
                    time.sleep(fake.delay)
                reply = fake.script.pop(0) if len(fake.script) > 1 else fake.script[0]
                if callable(reply):
                    reply = reply(info)
                status, headers, payload = reply
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                info["end"] = time.monotonic()

            do_PUT = do_GET = do_HEAD = _serve

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def fakes():
    made: list[FakeKeep] = []

    def make(script, delay: float = 0.0) -> FakeKeep:
        f = FakeKeep(script, delay)
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()


def ok_put(replicas: str | None = "1") -> Callable[[dict], tuple]:
    def reply(info):
        md5 = info["path"].lstrip("/")[:32]
        headers = {"X-Keep-Replicas-Stored": replicas} if replicas is not None else {}
        return 200, headers, f"{md5}+{len(info['body'])}\n".encode()
    return reply


# ---- rendezvous

@pytest.mark.sdk
def test_rendezvous_order_equals_the_sdk():
    import arvados.keep

    urls = [f"http://10.0.0.{i}:25107/" for i in range(1, 8)]
    sdk = arvados.keep.KeepClient(proxy=" ".join(urls), api_token="x", num_retries=0)
    ours = static_services(urls)
    for i in range(300):
        md5 = md5_of(b"%d" % i)
        expected = sdk.weighted_service_roots(arvados.keep.KeepLocator(f"{md5}+1"))
        assert [s.root for s in rendezvous_order(md5, ours)] == expected
        writable = sdk.weighted_service_roots(arvados.keep.KeepLocator(f"{md5}+1"), need_writable=True)
        assert [s.root for s in rendezvous_order(md5, ours)] == writable


def test_rendezvous_uses_the_last_15_uuid_characters():
    svcs = static_services(["http://a/", "http://b/"], uuids=["zzzzz-bi6l4-000000000000001",
                                                            "yyyyy-bi6l4-000000000000001"])
    # Same last 15 characters: same weight, so the stable sort keeps list order.
    assert [s.root for s in rendezvous_order("0" * 32, svcs)] == ["http://a/", "http://b/"]
    assert static_services(["http://x"])[0].root == "http://x/"
    assert static_services(["http://x"])[0].uuid == "00000-bi6l4-000000000000000"


# ---- against real keepstores

def test_replication_2_lands_on_the_first_two_services(keepstores3):
    urls = [k.url for k in keepstores3]
    by_url = {k.url: k for k in keepstores3}
    store = open_store(keep_spec(urls, replication=2))
    try:
        for i in range(25):
            data = os.urandom(1000 + i)
            stored = put(store, data)
            md5 = md5_of(data)
            assert stored.replicas == 2
            assert stored.locator == f"{md5}+{len(data)}"
            order = [s.root for s in rendezvous_order(md5, static_services(urls))]
            have = [u for u in urls if by_url[u].block_path(md5).exists()]
            assert sorted(have) == sorted(order[:2]), f"block {i}"
            assert store.get(stored.locator) == data
    finally:
        store.close()


def test_one_service_down_still_gets_two_replicas(keepstores3):
    urls = [k.url for k in keepstores3]
    down = keepstores3[0]
    assert down.stop() == 0
    live = keepstores3[1:]
    store = open_store(keep_spec(urls, replication=2))
    try:
        moved = 0
        for i in range(20):
            data = b"still two %d" % i
            md5 = md5_of(data)
            stored = put(store, data)
            assert stored.replicas == 2
            assert all(k.block_path(md5).exists() for k in live)
            order = [s.root for s in rendezvous_order(md5, static_services(urls))]
            moved += down.url in order[:2]
            assert store.get(stored.locator) == data
        assert moved, "no block had the stopped service among its first two"
    finally:
        store.close()


def test_all_services_down_raises_naming_them(keepstores3):
    urls = [k.url for k in keepstores3]
    for k in keepstores3:
        k.stop()
    store = open_store(keep_spec(urls, replication=2))
    t0 = time.monotonic()
    with pytest.raises(StoreError) as err:
        put(store, b"nowhere to go")
    assert time.monotonic() - t0 < 5
    msg = str(err.value)
    for u in urls:
        assert u in msg
    assert "stored 0" in msg and "Connection refused" in msg
    assert TOKEN not in msg
    with pytest.raises(StoreError) as err:
        store.get(md5_of(b"x") + "+1")
    assert not isinstance(err.value, BlockNotFound)
    assert all(u in str(err.value) for u in urls)
    store.close()


def test_get_errors_and_corruption(keepstores3):
    urls = [k.url for k in keepstores3]
    store = open_store(keep_spec(urls, replication=2))
    try:
        with pytest.raises(BlockNotFound):
            store.get(md5_of(b"absent") + "+6")
        data = b"will be corrupted on one copy"
        stored = put(store, data)
        md5 = md5_of(data)
        first = next(k for u in [s.root for s in rendezvous_order(md5, static_services(urls))]
                     for k in keepstores3 if k.url == u and k.block_path(md5).exists())
        first.block_path(md5).write_bytes(b"X" * len(data))
        assert store.get(stored.locator) == data     # falls through to the good copy
        with pytest.raises(StoreError):
            store.get("not a locator")
        assert store.get("d41d8cd98f00b204e9800998ecf8427e+0") == b""
    finally:
        store.close()


def test_signed_locators_round_trip(keepstore_factory):
    ks = keepstore_factory(signing_key=SIGNING_KEY)
    store = open_store(keep_spec([ks.url]))
    try:
        data = b"signed by the server"
        stored = put(store, data)
        assert "+A" in stored.locator
        verify_signature(stored.locator, TOKEN, SIGNING_KEY.encode())
        assert store.get(stored.locator) == data
        with pytest.raises(StoreError, match="HTTP 400"):
            store.get(f"{md5_of(data)}+{len(data)}")
    finally:
        store.close()
    anon = open_store(keep_spec([ks.url], token=None))
    try:
        with pytest.raises(StoreError, match="HTTP 401"):
            anon.get(stored.locator)
    finally:
        anon.close()


# ---- against fakes: protocol details

def test_headers_and_request_id(fakes):
    f = fakes([ok_put()])
    store = KeepClient([f.url], TOKEN, replication=1, **FAST)
    data = b"headers"
    stored = store.put(data)
    assert stored == StoredBlock(f"{md5_of(data)}+7", 1)
    h = f.requests[0]["headers"]
    assert f.requests[0]["method"] == "PUT" and f.requests[0]["path"] == "/" + md5_of(data)
    assert h["Authorization"] == f"Bearer {TOKEN}"
    assert h["X-Keep-Desired-Replicas"] == "1"
    assert h["Content-Length"] == "7"
    assert re.fullmatch(r"req-[a-z0-9]{20}", h["X-Request-Id"])
    assert f.requests[0]["body"] == data
    store.close()


def test_temporary_errors_are_retried_with_the_same_request_id(fakes):
    f = fakes([(503, {}, b"busy"), (500, {}, b"oops"), ok_put()])
    store = KeepClient([f.url], TOKEN, replication=1, **FAST)
    assert store.put(b"retry me").replicas == 1
    assert len(f.requests) == 3
    assert len({r["headers"]["X-Request-Id"] for r in f.requests}) == 1
    assert {r["headers"]["X-Keep-Desired-Replicas"] for r in f.requests} == {"1"}
    store.close()


@pytest.mark.parametrize("status", [400, 401, 403, 404, 405, 411, 413, 422, 507])
def test_permanent_errors_move_to_the_next_service(fakes, status):
    bad = fakes([(status, {}, b"no")])
    good = fakes([ok_put()])
    data = b"permanent %d" % status
    urls = [bad.url, good.url]
    # Find uuids that put the bad service first for this block.
    store = KeepClient(urls, TOKEN, replication=1, **FAST)
    if rendezvous_order(md5_of(data), store.services)[0].root != bad.url:
        store.close()
        store = KeepClient(urls[::-1], TOKEN, replication=1, **FAST)
        assert rendezvous_order(md5_of(data), store.services)[0].root == bad.url
    assert store.put(data).replicas == 1
    assert len(bad.requests) == 1 and len(good.requests) == 1
    store.close()


@pytest.mark.parametrize("status", [400, 422])
def test_hash_mismatch_statuses(fakes, status):
    f = fakes([(status, {}, b"content hash did not match")])
    store = KeepClient([f.url], TOKEN, replication=1, **FAST)
    with pytest.raises(StoreError, match=f"HTTP {status} hash mismatch"):
        store.put(b"data", md5_of(b"other data"))
    assert len(f.requests) == 1
    store.close()


def test_missing_replicas_header_counts_one(fakes):
    a, b = fakes([ok_put(None)]), fakes([ok_put(None)])
    store = KeepClient([a.url, b.url], TOKEN, replication=2, **FAST)
    assert store.put(b"two copies").replicas == 2
    assert len(a.requests) == len(b.requests) == 1
    store.close()


def test_disk_services_written_in_parallel_proxies_serially(fakes):
    a, b = fakes([ok_put()], delay=0.3), fakes([ok_put()], delay=0.3)
    disk = KeepClient([a.url, b.url], TOKEN, replication=2, **FAST)
    t0 = time.monotonic()
    assert disk.put(b"parallel").replicas == 2
    assert time.monotonic() - t0 < 0.55
    disk.close()
    proxy = KeepClient([a.url, b.url], TOKEN, replication=2, service_type="proxy", **FAST)
    t0 = time.monotonic()
    assert proxy.put(b"serial").replicas == 2
    assert time.monotonic() - t0 >= 0.55
    ra, rb = a.requests[-1], b.requests[-1]
    assert ra["end"] <= rb["start"] or rb["end"] <= ra["start"]
    proxy.close()


def test_one_proxy_storing_two_replicas_is_enough(fakes):
    p1, p2 = fakes([ok_put("2")]), fakes([ok_put("2")])
    store = KeepClient([p1.url, p2.url], TOKEN, replication=2, service_type="proxy", **FAST)
    assert store.put(b"proxy").replicas == 2
    assert len(p1.requests) + len(p2.requests) == 1
    assert (p1.requests or p2.requests)[0]["headers"]["X-Keep-Desired-Replicas"] == "2"
    store.close()


def test_partial_success_names_what_was_stored(fakes):
    good, bad = fakes([ok_put()]), fakes([(503, {}, b"down")])
    store = KeepClient([good.url, bad.url], TOKEN, replication=2, **FAST)
    with pytest.raises(StoreError) as err:
        store.put(b"half")
    msg = str(err.value)
    assert f"{good.url}: stored 1" in msg and f"{bad.url}: HTTP 503: down" in msg
    assert len(good.requests) == 1 and len(bad.requests) == FAST["retries"] + 1
    store.close()


def test_too_few_services_for_the_replication_says_so_not_that_none_answered(fakes):
    only = fakes([ok_put()])
    store = KeepClient([only.url], TOKEN, replication=2, **FAST)
    assert store.max_replicas() == 1
    with pytest.raises(StoreError) as err:
        store.put(b"lonely")
    msg = str(err.value)
    assert "no service answered" not in msg
    assert f"{only.url}: stored 1" in msg and "only 1 writable service(s) for 2 copies" in msg
    store.close()


def test_a_proxy_is_asked_how_many_copies_it_can_hold_with_the_empty_block(fakes):
    for answer, expected in ((ok_put("2"), 2), (ok_put("1"), 1), ((500, {}, b"no"), None)):
        proxy = fakes([answer])
        store = KeepClient([proxy.url], TOKEN, replication=2, service_type="proxy", **FAST)
        assert store.max_replicas() == expected
        (request,) = proxy.requests
        assert request["method"] == "PUT" and request["path"] == "/d41d8cd98f00b204e9800998ecf8427e"
        assert request["body"] == b"" and request["headers"]["X-Keep-Desired-Replicas"] == "2"
        store.close()


def test_token_never_in_messages_or_logs(fakes, caplog):
    f = fakes([lambda info: (500, {}, ("echo " + info["headers"]["Authorization"]).encode())])
    store = KeepClient([f.url], TOKEN, replication=1, **FAST)
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(StoreError) as err:
            store.put(b"secret")
        with pytest.raises(StoreError) as err2:
            store.get(md5_of(b"secret") + "+6")
    assert TOKEN not in str(err.value) and TOKEN not in str(err2.value)
    assert "<token>" in str(err.value)
    assert TOKEN not in caplog.text
    store.close()


def test_get_checks_length_and_md5(fakes):
    data = b"the real bytes"
    liar = fakes([(200, {}, b"other bytes...")])
    honest = fakes([(200, {}, data)])
    loc = f"{md5_of(data)}+{len(data)}"
    store = KeepClient([liar.url, honest.url], TOKEN, **FAST)
    order = [s.root for s in rendezvous_order(md5_of(data), store.services)]
    assert store.get(loc) == data
    assert len(honest.requests) == 1
    if order[0] == liar.url:
        assert len(liar.requests) == 1
    assert honest.requests[0]["headers"]["Accept"] == "application/octet-stream"
    store.close()
    only_liar = KeepClient([liar.url], TOKEN, **FAST)
    with pytest.raises(StoreError, match="does not match"):
        only_liar.get(loc)
    only_liar.close()


# ---- spec and writer

def test_spec_validation():
    with pytest.raises(ConfigError, match="unknown setting"):
        open_store({"type": "keep", "services": ["http://a/"], "replicaton": 2})
    with pytest.raises(ConfigError, match="services"):
        open_store({"type": "keep", "services": []})
    with pytest.raises(ConfigError, match="service_type"):
        open_store({"type": "keep", "services": ["http://a/"], "service_type": "gateway"})
    with pytest.raises(ConfigError, match="replication"):
        open_store({"type": "keep", "services": ["http://a/"], "replication": 0})
    with pytest.raises(ConfigError, match="http"):
        open_store({"type": "keep", "services": ["a:25107"]})
    store = open_store({"type": "keep", "services": "http://a:1 http://b:2/", "token": "t",
                        "replication": 2, "service_uuids": ["zzzzz-bi6l4-aaaaaaaaaaaaaaa",
                                                            "zzzzz-bi6l4-bbbbbbbbbbbbbbb"]})
    assert isinstance(store, KeepClient)
    assert [s.root for s in store.services] == ["http://a:1/", "http://b:2/"]
    assert store.describe() == "keep services http://a:1/ http://b:2/"
    assert "t" not in store.describe().split()
    store.close()


def test_writer_empty_block_and_abort(fakes):
    f = fakes([ok_put()])
    store = KeepClient([f.url], TOKEN, replication=3, **FAST)
    w = store.open_block()
    assert w.commit("d41d8cd98f00b204e9800998ecf8427e") == StoredBlock(
        "d41d8cd98f00b204e9800998ecf8427e+0", 3)
    w = store.open_block()
    w.write(b"abc")
    w.abort()
    with pytest.raises(StoreError):
        w.write(b"more")
    assert f.requests == []
    w = store.open_block()
    with pytest.raises(StoreError, match="larger than"):
        w.write(memoryview(bytearray(64 * 1024 * 1024 + 1)))
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.open_block()
