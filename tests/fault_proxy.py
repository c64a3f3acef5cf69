"""A fault-injecting HTTP proxy for tests, in front of a real keepstore.

``FaultProxy(upstream_url)`` listens on a free 127.0.0.1 port and forwards every
request to the upstream service (a ``keep-ingest keepstore`` subprocess, see
``keepstore_fixture.py``), injecting the faults it is told to. It runs an aiohttp
server on its own event loop in a daemon thread of the test process, and forwards
with an aiohttp client session on that loop.

Faults (all off by default; every field of :class:`Faults`)::

    delay_ms=0           wait this long before handling each request
    fail_rate=0.0        share of requests answered ``fail_status`` without forwarding
    fail_status=503      e.g. 503 (temporary) or 507 (full: the client moves on)
    reset_rate=0.0       share of requests whose connection is reset (TCP RST)...
    reset_at="request"   ...after half the request body was read ("request": nothing
                         is forwarded), or after half the response body was sent
                         ("response": the request was forwarded and took effect)
    corrupt_rate=0.0     share of GET responses (status 200) with one byte flipped
    cut_rate=0.0         share of PUTs whose body is sent upstream only in half before
                         the upstream connection is dropped: the keepstore sees its
                         client vanish mid-body; the client gets a 502
    put_status=None      answer every PUT with this status without forwarding
                         (400 or 422: the keepstore "hash mismatch" answers)
    wrong_locator=False  forward PUTs, then answer 200 with a locator of another block
    replicas=None        forward PUTs, then replace X-Keep-Replicas-Stored with this
    methods=("GET", "HEAD", "PUT")
                         requests the faults apply to; others pass untouched
    after=0              let this many matching requests through first
    limit=None           inject at most this many faults (delays not counted)

One seeded ``random.Random`` decides, for each matching request in arrival order,
whether the rate-based faults (fail, then reset, corrupt, cut) hit it.

Changing faults while a run goes on: ``proxy.set(**faults)`` from the test
replaces the whole fault set (and restarts the ``after``/``limit`` counts),
``proxy.update(**faults)`` changes only the fields given, ``proxy.clear()`` turns
every fault off; or over HTTP: ``POST /_fault_proxy/faults`` with a JSON object
(same fields; ``{"update": true, ...}`` merges) and ``GET /_fault_proxy/stats``.

``proxy.snapshot()`` gives the counts so far: ``requests`` (by method), ``injected``
(by fault: delay, fail, reset, corrupt, cut, put_status, wrong_locator, replicas),
``forwarded``, ``upstream_errors``. ``proxy.wait_for(pred, timeout)`` waits until
``pred(stats)`` holds.

Fixture (registered by ``tests/conftest.py``)::

    def test_x(fault_proxy, keepstore):
        proxy = fault_proxy(keepstore.url, fail_rate=0.3, seed=1)
        ... proxy.url ...

Every proxy a test starts is stopped at teardown, whatever the outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

ADMIN_PREFIX = "/_fault_proxy/"
BODY_MAX = 64 * 1024 * 1024 + 1
# Not forwarded either way: per-connection headers, and the ones aiohttp sets itself.
_HOP_HEADERS = frozenset(h.lower() for h in (
    "Connection", "Keep-Alive", "Proxy-Connection", "TE", "Trailer", "Transfer-Encoding",
    "Upgrade", "Expect", "Host", "Content-Length", "Date", "Server"))


@dataclasses.dataclass
class Faults:
    """What the proxy does to the requests it forwards (see the module docstring)."""

    delay_ms: int = 0
    fail_rate: float = 0.0
    fail_status: int = 503
    reset_rate: float = 0.0
    reset_at: str = "request"
    corrupt_rate: float = 0.0
    cut_rate: float = 0.0
    put_status: int | None = None
    wrong_locator: bool = False
    replicas: str | None = None
    methods: tuple[str, ...] = ("GET", "HEAD", "PUT")
    after: int = 0
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.reset_at not in ("request", "response"):
            raise ValueError(f"reset_at must be 'request' or 'response', not {self.reset_at!r}")
        for name in ("fail_rate", "reset_rate", "corrupt_rate", "cut_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1")
        self.methods = tuple(m.upper() for m in self.methods)


def _reset_connection(request: web.BaseRequest) -> None:
    """Drop the client's connection with a TCP RST (SO_LINGER 0, then abort)."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _other_locator(locator: str) -> str:
    """The same locator with its hash changed (last hex digit bumped)."""
    md5, rest = locator[:32], locator[32:]
    last = "0123456789abcdef"[(int(md5[-1], 16) + 1) % 16]
    return md5[:-1] + last + rest


class FaultProxy:
    """A fault-injecting proxy in a thread of its own; see the module docstring."""

    def __init__(self, upstream: str, *, seed: int = 0, **faults: Any):
        self.upstream = upstream.rstrip("/")
        self.url = ""
        self._faults = Faults(**faults)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._matching = 0     # requests the faults applied to so far
        self._injected_total = 0
        self.stats: dict[str, Any] = self._empty_stats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @staticmethod
    def _empty_stats() -> dict[str, Any]:
        return {"requests": Counter(), "injected": Counter(), "forwarded": 0, "upstream_errors": 0}

    # ---- control (thread-safe)

    @property
    def faults(self) -> Faults:
        with self._lock:
            return dataclasses.replace(self._faults)

    def set(self, **faults: Any) -> None:
        """Replace the whole fault set (unnamed fields go back to their defaults)."""
        new = Faults(**faults)
        with self._lock:
            self._faults = new
            self._matching = 0
            self._injected_total = 0

    def update(self, **faults: Any) -> None:
        """Change only the named fields of the fault set."""
        with self._lock:
            self._faults = dataclasses.replace(self._faults, **faults)

    def clear(self) -> None:
        self.set()

    def snapshot(self) -> dict[str, Any]:
        """A copy of the counters, JSON-friendly."""
        with self._lock:
            return {"requests": dict(self.stats["requests"]), "injected": dict(self.stats["injected"]),
                    "forwarded": self.stats["forwarded"],
                    "upstream_errors": self.stats["upstream_errors"]}

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.snapshot()):
                return True
            time.sleep(0.01)
        return predicate(self.snapshot())

    def _count(self, group: str, key: str | None = None, n: int = 1) -> None:
        with self._lock:
            if key is None:
                self.stats[group] += n
            else:
                self.stats[group][key] += n

    # ---- lifecycle

    def start(self, timeout: float = 10.0) -> FaultProxy:
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("fault proxy did not start")
        if self._error is not None:
            raise RuntimeError(f"fault proxy failed to start: {self._error!r}")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is not None and self._stopped is not None and self._thread is not None \
                and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopped.set)
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError("fault proxy did not stop")

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported by start(), or lost after stop
            self._error = exc
            self._ready.set()
        finally:
            loop.close()

    async def _serve(self) -> None:
        self._stopped = asyncio.Event()
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=120)
        async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
            self._session = session
            app = web.Application(client_max_size=BODY_MAX)
            app.router.add_route("*", "/{tail:.*}", self._handle)
            runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.25)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = runner.addresses[0][1]
            self.url = f"http://127.0.0.1:{port}/"
            self._ready.set()
            try:
                await self._stopped.wait()
            finally:
                await runner.cleanup()

    # ---- request handling

    def _decide(self, method: str) -> tuple[Faults, str | None, bool]:
        """The fault set now, the fault for this request (or None), and whether to delay.

        "untouched" means the request is outside ``methods`` or within ``after``.
        """
        with self._lock:
            self.stats["requests"][method] += 1
            f = dataclasses.replace(self._faults)
            if method not in f.methods:
                return f, "untouched", False
            self._matching += 1
            if self._matching <= f.after:
                return f, "untouched", False
            # One draw per rate, in a fixed order, so a seed gives a reproducible sequence.
            draws = [self._rng.random() for _ in range(4)]
            if f.limit is not None and self._injected_total >= f.limit:
                return f, None, f.delay_ms > 0
            choice = None
            if draws[0] < f.fail_rate:
                choice = "fail"
            elif draws[1] < f.reset_rate:
                choice = "reset"
            elif method == "GET" and draws[2] < f.corrupt_rate:
                choice = "corrupt"
            elif method == "PUT" and draws[3] < f.cut_rate:
                choice = "cut"
            elif method == "PUT" and f.put_status is not None:
                choice = "put_status"
            elif method == "PUT" and (f.wrong_locator or f.replicas is not None):
                choice = "rewrite"
            if choice is not None:
                self._injected_total += 1
            return f, choice, f.delay_ms > 0

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.path.startswith(ADMIN_PREFIX):
            return await self._admin(request)
        method = request.method
        faults, choice, delay = self._decide(method)
        if choice == "untouched":
            return await self._forward(request, await request.read(), faults=None)
        if delay:
            self._count("injected", "delay")
            await asyncio.sleep(faults.delay_ms / 1000)
        if choice == "fail":
            self._count("injected", "fail")
            await self._drain(request)
            return web.Response(status=faults.fail_status,
                                text=f"fault proxy: injected {faults.fail_status}\n")
        if choice == "reset" and faults.reset_at == "request":
            self._count("injected", "reset")
            length = request.content_length or 0
            got = 0
            while got < length // 2:
                chunk = await request.content.readany()
                if not chunk:
                    break
                got += len(chunk)
            _reset_connection(request)
            return web.Response(status=500)  # never reaches the client
        if choice == "put_status":
            self._count("injected", "put_status")
            await self._drain(request)
            status = faults.put_status
            return web.Response(status=status, text=f"content hash did not match specified locator "
                                                    f"(fault proxy: injected {status})\n")
        if choice == "cut":
            return await self._cut_upstream(request, await request.read())
        return await self._forward(request, await request.read(), faults=faults, choice=choice)

    async def _cut_upstream(self, request: web.Request, body: bytes) -> web.Response:
        """Send the upstream the headers and half the body, then drop the connection."""
        self._count("injected", "cut")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        headers["Content-Length"] = str(len(body))

        async def half_then_vanish():
            yield body[:len(body) // 2]
            await asyncio.sleep(0.05)   # let the upstream start reading
            raise ConnectionAbortedError("fault proxy: client vanished mid-body")

        try:
            async with self._session.put(self.upstream + request.rel_url.raw_path_qs, headers=headers,
                                         data=half_then_vanish()) as up:
                await up.read()
        except (aiohttp.ClientError, ConnectionAbortedError):
            pass
        return web.Response(status=502, text="fault proxy: upstream request cut mid-body\n")

    @staticmethod
    async def _drain(request: web.Request) -> None:
        with contextlib.suppress(Exception):
            await request.read()

    async def _forward(self, request: web.Request, body: bytes, *, faults: Faults | None,
                       choice: str | None = None) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        url = self.upstream + request.rel_url.raw_path_qs
        try:
            async with self._session.request(request.method, url, headers=headers,
                                             data=body if request.method not in ("GET", "HEAD") else None,
                                             allow_redirects=False) as up:
                payload = await up.read()
                status = up.status
                out_headers = {k: v for k, v in up.headers.items() if k.lower() not in _HOP_HEADERS
                               and k.lower() != "content-type"}
                content_type = up.headers.get("Content-Type")
        except aiohttp.ClientError as exc:
            self._count("upstream_errors")
            return web.Response(status=502, text=f"fault proxy: upstream error: {exc!r}\n")
        self._count("forwarded")
        if faults is not None and status == 200:
            if choice == "corrupt" and payload:
                self._count("injected", "corrupt")
                flipped = bytearray(payload)
                flipped[len(flipped) // 2] ^= 0xFF
                payload = bytes(flipped)
            elif choice == "rewrite":
                if faults.wrong_locator:
                    self._count("injected", "wrong_locator")
                    payload = (_other_locator(payload.decode("ascii", "replace").strip()) + "\n").encode()
                if faults.replicas is not None:
                    self._count("injected", "replicas")
                    out_headers["X-Keep-Replicas-Stored"] = faults.replicas
        if choice == "reset" and faults is not None:
            # reset_at == "response": the upstream already acted on the request.
            self._count("injected", "reset")
            resp = web.StreamResponse(status=status, headers=out_headers)
            resp.content_length = len(payload)
            if content_type:
                resp.content_type = content_type
            await resp.prepare(request)
            if request.method != "HEAD":
                await resp.write(payload[:len(payload) // 2])
            _reset_connection(request)
            return resp
        resp = web.Response(status=status, body=payload if request.method != "HEAD" else None,
                            headers=out_headers)
        if content_type:
            resp.content_type = content_type.split(";")[0]
        if request.method == "HEAD" and "Content-Length" in up.headers:
            resp.headers["Content-Length"] = up.headers["Content-Length"]
        return resp

    async def _admin(self, request: web.Request) -> web.Response:
        name = request.path[len(ADMIN_PREFIX):]
        if name == "faults" and request.method == "POST":
            try:
                spec = await request.json()
                merge = bool(spec.pop("update", False))
                if "methods" in spec:
                    spec["methods"] = tuple(spec["methods"])
                (self.update if merge else self.set)(**spec)
            except (ValueError, TypeError) as exc:
                return web.Response(status=400, text=f"bad fault spec: {exc}\n")
        if name in ("faults", "stats") and request.method in ("GET", "POST"):
            return web.json_response({"faults": dataclasses.asdict(self.faults), **self.snapshot()})
        return web.Response(status=404, text="unknown fault proxy route\n")


@pytest.fixture
def fault_proxy() -> Iterator[Callable[..., FaultProxy]]:
    """``start(upstream_url, seed=0, **faults) -> FaultProxy``; all stopped at teardown."""
    started: list[FaultProxy] = []

    def start(upstream: str, *, seed: int = 0, **faults: Any) -> FaultProxy:
        proxy = FaultProxy(upstream, seed=seed, **faults)
        started.append(proxy)
        return proxy.start()

    try:
        yield start
    finally:
        errors = []
        for proxy in started:
            try:
                proxy.stop()
            except Exception as exc:  # stop the others anyway
                errors.append(exc)
        if errors:
            raise errors[0]
