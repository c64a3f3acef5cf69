"""keepstore server internals without sockets: parsing, tokens, memory budget, in-process handlers."""

import asyncio
import base64
import errno
import hashlib
import os
from unittest import mock

import pytest
from aiohttp import streams
from aiohttp.test_utils import make_mocked_request
from multidict import MultiDict

from ingest.errors import StoreFull
from ingest.keep.dirstore import DirectoryBlockWriter
from ingest.keep.locator import BLOCK_SIZE_MAX
from ingest.keepstore.pace import Pace, TooSlow
from ingest.keepstore.server import (
    KeepstoreServer,
    LocatorInfo,
    MemoryBudget,
    ServerConfig,
    Volume,
    mount_order,
    parse_listen,
    parse_locator_info,
    parse_storage_classes,
    request_tokens,
)

pytestmark = pytest.mark.timeout(20)

MD5 = "acbd18db4cc2f85cedef654fccc4a4d8"


def test_parse_locator_info():
    assert parse_locator_info(MD5) == LocatorInfo(MD5, 0, False, False)
    info = parse_locator_info(f"{MD5}+3+A{'a' * 40}@12345678+Kzzzzz")
    assert (info.hash, info.size, info.signed, info.remote) == (MD5, 3, True, False)
    assert parse_locator_info(f"{MD5}+3+Rzzzzz-{'a' * 40}@12345678").remote
    assert parse_locator_info(f"{MD5}+Kzzzzz").size == 0
    for bad in (MD5 + "+", MD5 + "++3", MD5 + "+3+", MD5.upper(), MD5[:31], MD5 + "x",
                f"{MD5}+Kzz+3", "+" + MD5, f"{MD5}/foo"):
        with pytest.raises(ValueError):
            parse_locator_info(bad)


def test_request_tokens_order_and_sources():
    basic = "Basic " + base64.b64encode(b"user:basic-pass").decode()
    cookie = base64.urlsafe_b64encode(b"cookie-tok").decode()
    q = MultiDict([("api_token", "q1"), ("api_token", "q2")])
    assert request_tokens({"Authorization": "Bearer b-tok"}, q, {"arvados_api_token": cookie}) \
        == ["b-tok", "q1", "q2", "cookie-tok"]
    assert request_tokens({"Authorization": "OAuth2 o-tok"}, MultiDict(), {}) == ["o-tok"]
    assert request_tokens({"Authorization": basic}, MultiDict(), {}) == ["basic-pass"]
    assert request_tokens({"Authorization": "bearer lower"}, MultiDict(), {}) == []
    assert request_tokens({"Authorization": "Bearer"}, MultiDict(), {}) == []
    assert request_tokens({}, MultiDict(), {"arvados_api_token": "!!notbase64"}) == []
    assert request_tokens({}, MultiDict(), {}) == []


def test_parse_storage_classes_and_listen():
    assert parse_storage_classes(" a, b ,,c ") == ["a", "b", "c"]
    assert parse_storage_classes("") == []
    assert parse_listen("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_listen("[::1]:25107") == ("::1", 25107)
    assert parse_listen(":8080") == ("0.0.0.0", 8080)
    for bad in ("localhost", "1.2.3.4:99999", "host:port"):
        with pytest.raises(ValueError):
            parse_listen(bad)


def test_mount_order_is_keepstores(tmp_path):
    vols = [Volume.for_directory(str(tmp_path / f"v{i}")) for i in range(4)]
    order = mount_order(MD5, vols)
    weights = [hashlib.md5((MD5 + v.uuid[12:]).encode()).hexdigest() for v in order]
    assert weights == sorted(weights)
    assert all(len(v.uuid) == 27 and v.uuid.startswith("zzzzz-nyw5e-") for v in vols)


def test_memory_budget_fifo_and_cancellation():
    async def main():
        budget = MemoryBudget(2 * BLOCK_SIZE_MAX)
        a = await budget.acquire(BLOCK_SIZE_MAX)
        b = await budget.acquire(BLOCK_SIZE_MAX)
        assert budget.in_use == 2 * BLOCK_SIZE_MAX
        order = []

        async def take(name, n):
            lease = await budget.acquire(n)
            order.append(name)
            return lease

        big = asyncio.create_task(take("big", BLOCK_SIZE_MAX))
        await asyncio.sleep(0)
        small = asyncio.create_task(take("small", 10))
        cancelled = asyncio.create_task(take("cancelled", 10))
        await asyncio.sleep(0)
        cancelled.cancel()
        await asyncio.sleep(0)
        assert order == []
        a.release()
        a.release()  # idempotent
        await asyncio.sleep(0)
        assert order == ["big"]           # FIFO: the small one does not jump the queue
        b.release()
        await asyncio.sleep(0)
        assert order == ["big", "small"]
        (await big).release()
        (await small).release()
        assert budget.in_use == 0
        assert budget.peak == 2 * BLOCK_SIZE_MAX

        # A lease held until a thread's future completes.
        lease = await budget.acquire(100)
        fut = asyncio.get_running_loop().create_future()
        lease.hold_until(fut)
        lease.release()
        assert budget.in_use == 100
        fut.set_result(None)
        await asyncio.sleep(0)
        assert budget.in_use == 0

    asyncio.run(main())


def _put_request(md5, body: bytes, declared: int):
    loop = asyncio.get_running_loop()
    payload = streams.StreamReader(mock.Mock(), 2 ** 16, loop=loop)
    payload.feed_data(body)
    payload.feed_eof()
    return make_mocked_request("PUT", f"/{md5}", headers={"Content-Length": str(declared)},
                               payload=payload)


def test_content_length_mismatch_is_400(tmp_path):
    async def main():
        server = KeepstoreServer(ServerConfig(volumes=[str(tmp_path / "v")], fsync=False))
        try:
            resp = await server._dispatch(_put_request(MD5, b"fo", 3))
            assert resp.status == 400
            assert b"did not match specified data size" in resp.body
            resp = await server._dispatch(_put_request(MD5, b"foo", 3))
            assert resp.status == 200 and resp.text == f"{MD5}+3\n"
        finally:
            server.executor.shutdown()

    asyncio.run(main())


def test_enospc_on_every_volume_is_507(tmp_path, monkeypatch):
    def full(self, data):
        raise StoreFull("no space left on device")

    monkeypatch.setattr(DirectoryBlockWriter, "write", full)

    async def main():
        server = KeepstoreServer(ServerConfig(volumes=[str(tmp_path / "a"), str(tmp_path / "b")],
                                              fsync=False))
        try:
            resp = await server._dispatch(_put_request(MD5, b"foo", 3))
            assert resp.status == 507
        finally:
            server.executor.shutdown()

    asyncio.run(main())
    assert not [f for d in ("a", "b") for f in os.listdir(tmp_path / d)]


def test_enospc_on_first_volume_moves_to_the_next(tmp_path, monkeypatch):
    real_write = DirectoryBlockWriter.write
    calls = []

    def first_full(self, data):
        calls.append(self._store.root)
        if len(calls) == 1:
            self.abort()
            raise StoreFull(os.strerror(errno.ENOSPC))
        return real_write(self, data)

    monkeypatch.setattr(DirectoryBlockWriter, "write", first_full)

    async def main():
        server = KeepstoreServer(ServerConfig(volumes=[str(tmp_path / "a"), str(tmp_path / "b")],
                                              fsync=False))
        try:
            resp = await server._dispatch(_put_request(MD5, b"foo", 3))
            assert resp.status == 200
            assert resp.headers["X-Keep-Replicas-Stored"] == "1"
            order = [v.store.root for v in mount_order(MD5, server.volumes)]
        finally:
            server.executor.shutdown()
        return order

    order = asyncio.run(main())
    assert calls == order
    assert os.path.exists(os.path.join(order[1], MD5[:3], MD5))


# ---- the minimum transfer rate


def test_pace_judges_each_window_that_a_transfer_is_still_running_at_its_end():
    pace = Pace(rate=100, window=2.0, start=10.0)
    assert pace.deadline == 12.0
    pace.add(150, 11.0)          # within the window: never judged yet
    pace.add(60, 12.5)           # past its end with 210 >= 200 bytes: the next window starts
    assert (pace.start, pace.moved, pace.deadline) == (12.5, 0, 14.5)
    pace.add(199, 14.0)
    with pytest.raises(TooSlow, match="100 bytes/s over the last 2 s, below the minimum of 100"):
        pace.check(14.5)         # 199 < 200 bytes in the window


def test_pace_with_rate_zero_never_judges():
    pace = Pace(rate=0, window=1.0, start=0.0)
    assert pace.deadline == float("inf")
    pace.add(0, 10**9)
