"""A keepstore-compatible HTTP server over directory volumes.

It speaks the routes and status codes of the current keepstore generation
(KEEP_PROTOCOL.md section 2) so that the official Arvados clients, and ours, can
store and read blocks through it. Each volume is a :class:`DirectoryStore` in the
keepstore Directory-volume layout, so a real keepstore could serve the same
directories.

Implemented: ``PUT /<md5>``, ``GET``/``HEAD /<locator>`` (also with a doubled
leading slash), the admin routes ``GET /index[/<prefix>]``, ``/index?prefix=``,
``GET /mounts``, ``GET /mounts/<uuid>/blocks[/<prefix>]``, ``DELETE /<locator>``
(always 405: this server has no trash), and ``OPTIONS`` (CORS preflight). Not
implemented, so answered 400 like any unknown route: keep-balance's ``PUT /pull``,
``PUT /trash`` and ``PUT /untrash/<locator>``, and remote-cluster (``+R``) reads.
The non-standard ``TOUCH`` method also gets 400: aiohttp's HTTP parser (llhttp)
rejects unknown methods before any handler runs.

Memory: a block body is held in memory between receipt and the volume write (the
MD5 must be checked before anything is stored), as keepstore does. Every PUT and
GET first reserves its block's size from a :class:`MemoryBudget` of
``max_buffers`` x 64 MiB; requests beyond that wait, unread, with at most a
socket read buffer each, and at most ``max_queued`` of them (then 503). Disk I/O
and hashing run in a thread pool, never on the event loop.

Hostile clients: a body that arrives, or a response that is read, slower than
``min_rate`` on average over a ``rate_window`` is aborted (:mod:`.pace`; a PUT
gets 408, a GET's connection is reset), and the peer is logged, so slow clients
cannot keep the memory budget; connections are bounded in number, idle time and
header size (:mod:`.connections`); a client leaving mid-response is logged as
such, never as a server error.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import hashlib
import json
import logging
import os
import re
import signal
import socket
import struct
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from ingest.errors import BlockCorrupt, BlockNotFound, StoreError, StoreFull
from ingest.keep.dirstore import DirectoryStore
from ingest.keep.locator import BLOCK_SIZE_MAX, EMPTY_BLOCK_MD5
from ingest.keep.signing import DEFAULT_TTL, SignatureError, SignatureExpired, sign_locator, verify_signature
from ingest.keepstore.connections import (
    MAX_HEADERS,
    ConnectionGuard,
    fitting_limit,
    limit_pipelining,
    raise_fd_limit,
)
from ingest.keepstore.defaults import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_BUFFERS,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_QUEUED,
    DEFAULT_MIN_RATE,
    DEFAULT_RATE_WINDOW,
    DEFAULT_READ_TIMEOUT,
    DEFAULT_SHUTDOWN_TIMEOUT,
)
from ingest.keepstore.pace import Pace, TooSlow

log = logging.getLogger("keep-ingest.keepstore")

SEND_CHUNK = 256 * 1024
READ_BUFSIZE = 256 * 1024
LINGERING_TIME = 1.0
LISTEN_BACKLOG = 128
ACCEPT_BURST = 8

CORS_HEADERS = {
    "Access-Control-Allow-Methods": "GET, HEAD, PUT, OPTIONS",
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Headers": ("Authorization, Content-Length, Content-Type, "
                                     "X-Keep-Desired-Replicas, X-Keep-Signature, "
                                     "X-Keep-Storage-Classes"),
    "Access-Control-Expose-Headers": ("X-Keep-Locator, X-Keep-Replicas-Stored, "
                                      "X-Keep-Storage-Classes-Confirmed"),
    "Access-Control-Max-Age": "86486400",
}

# Route patterns, matched against the raw request path (no query string).
_LOCATOR_PATH = re.compile(r"/(?P<loc>[0-9a-f]{32}.*)", re.S)
_LOCATOR_PATH_DOUBLE = re.compile(r"//(?P<loc>[0-9a-f]{32}.*)", re.S)
_INDEX_PATH = re.compile(r"/index(?:/(?P<prefix>[0-9a-f]{0,32}))?")
_MOUNT_BLOCKS_PATH = re.compile(r"/mounts/(?P<uuid>[^/]+)/blocks(?:/(?P<prefix>[0-9a-f]{0,32}))?")


class HTTPFailure(Exception):
    """An error that becomes a plain-text HTTP response: ``<message>\\n``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class _ClientGone(Exception):
    """The response cannot be finished: the client left, or reads too slowly."""

    def __init__(self, resp: web.StreamResponse):
        super().__init__("client gone")
        self.resp = resp


# --------------------------------------------------------------------------
# Request parsing helpers (pure functions, unit-tested on their own)

@dataclass(frozen=True, slots=True)
class LocatorInfo:
    """What keepstore needs to know of a locator in a request path."""

    hash: str
    size: int       # 0 when there is no size hint
    signed: bool    # has a +A hint
    remote: bool    # has a +R hint


def parse_locator_info(loc: str) -> LocatorInfo:
    """Parse a request-path locator the way keepstore does; ValueError if invalid.

    The hash is 32 lowercase hex digits; parts are separated by single ``+``; a
    numeric part after the first hint is invalid (the size must come first).
    """
    parts = loc.split("+")
    if any(p == "" for p in parts):
        raise ValueError("invalid locator")
    md5 = parts[0]
    if len(md5) != 32 or any(c not in "0123456789abcdef" for c in md5):
        raise ValueError("invalid locator")
    size = 0
    signed = remote = False
    for i, part in enumerate(parts[1:], start=1):
        first = part[0]
        if i == 1 and part.isdigit():
            size = int(part)
            continue
        if i > 1 and first.isdigit():
            raise ValueError("invalid locator")
        if first == "A":
            signed = True
        elif first == "R":
            remote = True
    return LocatorInfo(md5, size, signed, remote)


# What Go's strings.TrimSpace trims (unicode.IsSpace): Arvados trims every token.
_GO_SPACE = "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a" \
            "\u2028\u2029\u202f\u205f\u3000"


def request_tokens(headers: Mapping[str, str], query: Any, cookies: Mapping[str, str]) -> list[str]:
    """Every API token a request carries, in keepstore's order of precedence.

    ``Authorization: Bearer|OAuth2 <tok>``, then the Basic-auth password, then each
    ``api_token`` query value, then the base64url ``arvados_api_token`` cookie; each
    with surrounding whitespace trimmed, as Arvados' Go ``auth`` package does.
    Keepstore signs and verifies with the first one; the admin check accepts any.
    """
    tokens: list[str] = []
    auth = headers.get("Authorization", "")
    kind, sep, rest = auth.partition(" ")
    if sep and kind in ("OAuth2", "Bearer"):
        tokens.append(rest)
    if auth[:6].lower() == "basic ":
        try:
            decoded = base64.b64decode(auth[6:], validate=True).decode("utf-8", "replace")
        except (binascii.Error, ValueError):
            decoded = None
        if decoded is not None and ":" in decoded:
            tokens.append(decoded.split(":", 1)[1])
    if query is not None:
        tokens.extend(query.getall("api_token", []) if hasattr(query, "getall")
                      else query.get("api_token", []))
    cookie = cookies.get("arvados_api_token", "")
    if cookie:
        try:
            tokens.append(base64.urlsafe_b64decode(cookie.encode("ascii")).decode("utf-8", "replace"))
        except (binascii.Error, ValueError):
            pass
    return [token.strip(_GO_SPACE) for token in tokens]


def parse_storage_classes(value: str) -> list[str]:
    """``X-Keep-Storage-Classes``: comma-separated, parts trimmed, empty ones dropped."""
    return [p.strip() for p in value.split(",") if p.strip()]


# --------------------------------------------------------------------------
# Memory budget

class Busy(Exception):
    """Too many requests already wait for memory: answered 503 (clients retry)."""


class MemoryBudget:
    """A first-come-first-served budget of bytes for in-memory block buffers.

    ``acquire(n)`` waits until ``n`` bytes are free and no earlier request is still
    waiting, so a 64 MiB request is not starved by a stream of small ones. At most
    ``max_waiting`` requests wait; beyond that ``acquire`` raises :class:`Busy` at once.
    """

    def __init__(self, capacity: int, max_waiting: int = DEFAULT_MAX_QUEUED):
        if capacity < BLOCK_SIZE_MAX:
            raise ValueError("memory budget must hold at least one full block")
        self.capacity = capacity
        self.max_waiting = max_waiting
        self.in_use = 0
        self.peak = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future]] = collections.deque()

    async def acquire(self, n: int) -> Lease:
        n = min(max(n, 0), self.capacity)
        if not self._waiters and self.in_use + n <= self.capacity:
            self._take(n)
            return Lease(self, n)
        if len(self._waiters) >= self.max_waiting:
            raise Busy(f"server busy: {len(self._waiters)} requests already wait for memory")
        fut = asyncio.get_running_loop().create_future()
        entry = (n, fut)
        self._waiters.append(entry)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._give(n)       # granted just as we were cancelled
            else:
                try:
                    self._waiters.remove(entry)
                except ValueError:
                    pass
                self._wake()
            raise
        return Lease(self, n)

    def _take(self, n: int) -> None:
        self.in_use += n
        self.peak = max(self.peak, self.in_use)

    def _give(self, n: int) -> None:
        self.in_use -= n
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            n, fut = self._waiters[0]
            if fut.done():
                self._waiters.popleft()
                continue
            if self.in_use + n > self.capacity:
                break
            self._waiters.popleft()
            self._take(n)
            fut.set_result(None)


class Lease:
    """Bytes held from a MemoryBudget; released once, possibly after a thread's work."""

    __slots__ = ("_budget", "_n", "_released", "_until")

    def __init__(self, budget: MemoryBudget, n: int):
        self._budget = budget
        self._n = n
        self._released = False
        self._until: asyncio.Future | None = None

    def hold_until(self, fut: asyncio.Future) -> None:
        """Keep the bytes until ``fut`` is done (a thread still using the buffer)."""
        self._until = fut

    def release(self) -> None:
        if self._released:
            return
        if self._until is not None and not self._until.done():
            self._until.add_done_callback(lambda _f: self.release())
            self._until = None
            return
        self._released = True
        self._budget._give(self._n)

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()


# --------------------------------------------------------------------------
# Volumes

@dataclass
class Volume:
    """One mount: a directory store plus the attributes keepstore reports for it."""

    store: DirectoryStore
    uuid: str
    device_id: str
    replication: int = 1
    storage_classes: tuple[str, ...] = ("default",)
    writable: bool = True

    @classmethod
    def for_directory(cls, path: str, fsync: bool = True) -> Volume:
        store = DirectoryStore(path, fsync=fsync)
        real = os.path.realpath(store.root)
        uuid = "zzzzz-nyw5e-" + hashlib.md5(real.encode()).hexdigest()[:15]
        return cls(store=store, uuid=uuid, device_id=f"{socket.gethostname()}:{real}")

    def mount_json(self) -> dict[str, Any]:
        return {
            "uuid": self.uuid,
            "device_id": self.device_id,
            "allow_write": self.writable,
            "allow_trash": False,
            "read_only": not self.writable,
            "replication": self.replication,
            "storage_classes": {c: True for c in self.storage_classes},
        }


def mount_order(md5_hex: str, volumes: Iterable[Volume]) -> list[Volume]:
    """keepstore's mount order for a block: md5(hash + uuid[12:]) ascending."""
    def weight(v: Volume) -> str:
        part = v.uuid[12:] if len(v.uuid) == 27 else v.uuid
        return hashlib.md5((md5_hex + part).encode()).hexdigest()
    return sorted(volumes, key=weight)


class _Progress:
    """Replicas and storage classes satisfied so far by one PUT."""

    def __init__(self, classes: list[str]):
        self.todo = set(classes)
        self.used: set[str] = set()
        self.total = 0
        self.class_done: dict[str, int] = {}

    def add(self, v: Volume) -> None:
        self.used.add(v.uuid)
        self.total += v.replication
        for c in v.storage_classes:
            self.class_done[c] = self.class_done.get(c, 0) + v.replication
            self.todo.discard(c)

    def done(self) -> bool:
        return not self.todo and self.total > 0

    def want(self, v: Volume) -> bool:
        if self.done() or v.uuid in self.used:
            return False
        return not self.todo or any(c in self.todo for c in v.storage_classes)


# --------------------------------------------------------------------------
# The server

@dataclass
class ServerConfig:
    """Settings of one keepstore server (the ``keep-ingest keepstore`` flags)."""

    volumes: list[str]
    signing_key: bytes | None = None
    signing_ttl: int = DEFAULT_TTL
    system_root_token: str | None = None
    max_buffers: int = DEFAULT_MAX_BUFFERS
    min_free_space: int = BLOCK_SIZE_MAX
    fsync: bool = True
    io_threads: int = 0          # 0: 2 per buffer, at least 4
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    read_timeout: float = DEFAULT_READ_TIMEOUT   # max silence while a PUT body arrives
    min_rate: int = DEFAULT_MIN_RATE             # bytes/s a body or response must average...
    rate_window: float = DEFAULT_RATE_WINDOW     # ...over each window of this many seconds (pace.py)
    max_queued: int = DEFAULT_MAX_QUEUED         # requests waiting for memory; more get 503
    max_connections: int = DEFAULT_MAX_CONNECTIONS  # open connections (connections.py)
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT   # to complete the next request's headers
    extra: dict[str, Any] = field(default_factory=dict)


class _AccessLogger(AbstractAccessLogger):
    """Method, path (never the query string, which may hold a token), status, size, time."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time_: float) -> None:
        if self.logger.isEnabledFor(logging.INFO):
            self.logger.info("%s %s %s %s %d %.3fs", request.remote, request.method,
                             request.rel_url.raw_path, response.status,
                             response.body_length, time_)


class KeepstoreServer:
    """The keepstore HTTP service over a list of directory volumes."""

    def __init__(self, config: ServerConfig):
        if not config.volumes:
            raise StoreError("keepstore needs at least one volume")
        if config.max_buffers < 1:
            raise ValueError("max_buffers must be at least 1")
        self.config = config
        self.volumes = [Volume.for_directory(p, fsync=config.fsync) for p in config.volumes]
        uuids = [v.uuid for v in self.volumes]
        if len(set(uuids)) != len(uuids):
            raise StoreError("the same volume directory is given twice")
        self.volumes.sort(key=lambda v: v.uuid)
        self.by_uuid = {v.uuid: v for v in self.volumes}
        self.budget = MemoryBudget(config.max_buffers * BLOCK_SIZE_MAX, config.max_queued)
        self.io_threads = config.io_threads or max(4, 2 * config.max_buffers)
        self.executor = ThreadPoolExecutor(max_workers=self.io_threads, thread_name_prefix="keepstore-io")
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        self.guard: ConnectionGuard | None = None
        self._active = 0
        self._idle: asyncio.Event | None = None
        self.url: str | None = None

    # ---- lifecycle

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch, expect_handler=self._expect)
        app.on_response_prepare.append(self._add_cors)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on host:port (port 0: any free port); returns the base URL."""
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError:
            sock.close()
            raise
        # lingering_time: after an early answer (413) aiohttp reads and drops the
        # unread body for this long before closing, so the client can see the
        # answer instead of a connection reset; the default 10 s is long for that.
        limit_pipelining()
        self._runner = web.AppRunner(self.make_app(), access_log_class=_AccessLogger,
                                     access_log=log, read_bufsize=READ_BUFSIZE,
                                     lingering_time=LINGERING_TIME, max_headers=MAX_HEADERS,
                                     keepalive_timeout=self.config.idle_timeout,
                                     shutdown_timeout=self.config.shutdown_timeout)
        await self._runner.setup()
        assert self._runner.server is not None
        self.guard = ConnectionGuard(self._runner.server,
                                     fitting_limit(self.config.max_connections, self.io_threads))
        # asyncio accepts up to ``backlog`` connections at a time before any of them
        # reaches the guard: a small burst keeps the guard ahead of the open-files
        # limit, while the kernel still queues LISTEN_BACKLOG connections.
        self._listener = await asyncio.get_running_loop().create_server(self.guard, sock=sock,
                                                                        backlog=ACCEPT_BURST)
        sock.listen(LISTEN_BACKLOG)
        bound_host, bound_port = sock.getsockname()[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        self.url = f"http://{shown}:{bound_port}/"
        return self.url

    async def stop(self) -> None:
        """Stop listening, let in-flight requests finish, then release the volumes.

        aiohttp's own graceful shutdown stops reading from open connections at
        once, which would strand a PUT whose body is still arriving. So first only
        the listening sockets are closed, requests in flight (bodies included) get
        up to ``shutdown_timeout`` seconds to finish, and only then does aiohttp
        close the remaining, idle connections.
        """
        if self._runner is not None:
            if self._listener is not None:
                self._listener.close()  # accepts no more; the connections stay
                self._listener = None
            if self._active:
                log.info("waiting for %d request(s) in flight", self._active)
                assert self._idle is not None
                try:
                    await asyncio.wait_for(self._idle.wait(), self.config.shutdown_timeout)
                except TimeoutError:
                    log.warning("%d request(s) still running after %.0fs; closing anyway",
                                self._active, self.config.shutdown_timeout)
            await self._runner.cleanup()
            self._runner = None
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: self.executor.shutdown(wait=True))

    # ---- plumbing

    async def _add_cors(self, request: web.Request, response: web.StreamResponse) -> None:
        for k, v in CORS_HEADERS.items():
            response.headers.setdefault(k, v)

    async def _expect(self, request: web.Request) -> web.StreamResponse | None:
        """``Expect: 100-continue``: refuse an oversized PUT before its body is sent."""
        if request.method == "PUT" and (request.content_length or 0) > BLOCK_SIZE_MAX:
            resp = _error_response(413, "request entity too large")
            resp.force_close()
            return resp
        if request.headers.get("Expect", "").lower() == "100-continue" and request.version >= (1, 1):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0
        return None

    async def _io(self, fn: Callable[..., Any], *args: Any, lease: Lease | None = None) -> Any:
        """Run blocking work in the I/O pool; a lease is held until the thread is done.

        The arguments travel in a box the thread empties, so once ``fn`` returns
        the pool holds no reference to a block buffer: otherwise the buffer could
        outlive its lease (the pool drops its work item only when the thread next
        gets the GIL) and the next request's buffer would come on top of it.
        """
        box = [args]

        def call() -> Any:
            return fn(*box.pop())

        fut = asyncio.get_running_loop().run_in_executor(self.executor, call)
        if lease is not None:
            lease.hold_until(fut)
        return await fut

    def _tokens(self, request: web.Request) -> list[str]:
        return request_tokens(request.headers, request.rel_url.query, request.cookies)

    def _first_token(self, request: web.Request) -> str:
        tokens = self._tokens(request)
        return tokens[0] if tokens else ""

    def _require_admin(self, request: web.Request) -> None:
        """keepstore's SystemRootToken check: none configured = open."""
        root = self.config.system_root_token
        if not root:
            return
        tokens = self._tokens(request)
        if not tokens:
            raise HTTPFailure(401, "Unauthorized")
        if root not in tokens:
            raise HTTPFailure(403, "Forbidden")

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        if self._idle is None:
            self._idle = asyncio.Event()
        self._active += 1
        self._idle.clear()
        if self.guard is not None:
            self.guard.started(request.protocol)
        try:
            try:
                resp = await self._route(request)
            except _ClientGone as gone:
                return gone.resp  # aiohttp finds the connection closed and drops it
            except ConnectionError:
                log.info("%s %s from %s: the client went away", request.method,
                         request.rel_url.raw_path, request.remote)
                return _error_response(400, "client went away")
            except Busy as exc:
                resp = _error_response(503, str(exc))
            except HTTPFailure as exc:
                resp = _error_response(exc.status, exc.message)
            except StoreFull as exc:
                resp = _error_response(507, str(exc))
            except StoreError as exc:
                log.error("%s %s: %s", request.method, request.rel_url.raw_path, exc)
                resp = _error_response(500, str(exc))
            if not request.content.is_eof():
                # A body we did not read (413, refused early): no keep-alive.
                resp.force_close()
            return resp
        finally:
            if self.guard is not None:
                self.guard.ended(request.protocol)
            self._active -= 1
            if not self._active:
                self._idle.set()

    async def _route(self, request: web.Request) -> web.StreamResponse:
        method = request.method
        path = request.rel_url.raw_path
        if method == "OPTIONS":
            return web.Response(status=200)
        if method in ("GET", "HEAD"):
            m = _LOCATOR_PATH.fullmatch(path) or _LOCATOR_PATH_DOUBLE.fullmatch(path)
            if m:
                return await self._block_read(request, m.group("loc"))
            m = _INDEX_PATH.fullmatch(path)
            if m:
                self._require_admin(request)
                prefix = request.rel_url.query.get("prefix", "") or m.group("prefix") or ""
                return await self._index(request, self.volumes, prefix)
            if path == "/mounts":
                self._require_admin(request)
                return web.Response(text=json.dumps([v.mount_json() for v in self.volumes]) + "\n",
                                    content_type="application/json")
            m = _MOUNT_BLOCKS_PATH.fullmatch(path)
            if m:
                self._require_admin(request)
                vol = self.by_uuid.get(m.group("uuid"))
                if vol is None:
                    raise HTTPFailure(404, "mount not found")
                prefix = request.rel_url.query.get("prefix", "") or m.group("prefix") or ""
                return await self._index(request, [vol], prefix)
        elif method == "PUT":
            m = _LOCATOR_PATH.fullmatch(path)
            if m:
                return await self._block_write(request, m.group("loc"))
        elif method == "DELETE":
            m = _LOCATOR_PATH.fullmatch(path)
            if m:
                self._require_admin(request)
                raise HTTPFailure(405, "method not allowed: this server does not trash blocks")
        raise HTTPFailure(400, "Bad Request")

    # ---- block write

    async def _block_write(self, request: web.Request, loc: str) -> web.StreamResponse:
        declared = request.content_length
        if declared is not None and declared > BLOCK_SIZE_MAX:
            raise HTTPFailure(413, "request entity too large")
        reserve = BLOCK_SIZE_MAX if declared is None else declared
        lease = await self.budget.acquire(reserve)
        try:
            buf = await self._receive_body(request, declared)
            view = memoryview(buf)
            size = len(view)
            if declared is not None and size != declared:
                raise HTTPFailure(400, f"content length {size} did not match specified data size {declared}")
            md5 = await self._io(_md5_hex, view, lease=lease)
            if not loc.startswith(md5):
                raise HTTPFailure(400, f"content hash {md5} did not match specified locator {loc}")
            classes = parse_storage_classes(request.headers.get("X-Keep-Storage-Classes", ""))
            replicas, class_done = await self._io(self._store_block, md5, view, classes, lease=lease)
        finally:
            lease.release()
        token = self._first_token(request)
        locator = sign_locator(f"{md5}+{size}", token, self.config.signing_key, self.config.signing_ttl)
        confirmed = ", ".join(f"{c}={n}" for c, n in sorted(class_done.items()) if n > 0)
        return web.Response(status=200, text=locator + "\n", headers={
            "X-Keep-Replicas-Stored": str(replicas),
            "X-Keep-Storage-Classes-Confirmed": confirmed,
        })

    def _pace(self, request: web.Request) -> Pace:
        """The pace of one body or response (its peer noted now, while connected)."""
        return Pace(self.config.min_rate, self.config.rate_window, time.monotonic(), peer=peer_of(request))

    def _too_slow(self, request: web.Request, pace: Pace, what: str, exc: TooSlow) -> None:
        log.warning("%s %s from %s: %s %s: aborted", request.method, request.rel_url.raw_path,
                    pace.peer, what, exc)

    async def _read_chunk(self, request: web.Request, pace: Pace) -> bytes:
        """The next piece of the body; 408 when the client sends nothing for
        ``read_timeout`` seconds, or less than ``min_rate`` over a ``rate_window``.

        Without this a stalled or dribbling client would hold its share of the
        memory budget for as long as it likes.
        """
        silence_ends = time.monotonic() + self.config.read_timeout
        try:
            while True:
                now = time.monotonic()
                try:
                    async with asyncio.timeout(max(0.0, min(silence_ends, pace.deadline) - now)):
                        chunk = await request.content.readany()
                except TimeoutError:
                    now = time.monotonic()
                    if now >= silence_ends:
                        raise HTTPFailure(408, "timed out reading the request body") from None
                    pace.check(now)
                    continue
                pace.add(len(chunk), time.monotonic())
                return chunk
        except TooSlow as exc:
            self._too_slow(request, pace, "request body arrived at", exc)
            raise HTTPFailure(408, f"request body too slow: {exc}") from None
        except HTTPFailure:
            raise
        except Exception as exc:  # the client went away or framing broke
            raise HTTPFailure(400, f"reading request body: {exc or type(exc).__name__}") from None

    async def _receive_body(self, request: web.Request, declared: int | None) -> bytearray:
        """Read the whole body into one buffer; 413 past 64 MiB, 400 when cut short."""
        pace = self._pace(request)
        if declared is not None:
            buf = bytearray(declared)
            view = memoryview(buf)
            pos = 0
            try:
                while pos < declared:
                    chunk = await self._read_chunk(request, pace)
                    if not chunk:
                        break
                    view[pos:pos + len(chunk)] = chunk
                    pos += len(chunk)
            finally:
                view.release()
            if pos != declared:
                raise HTTPFailure(400, f"content length {pos} did not match specified data size {declared}")
            return buf
        buf = bytearray()
        while True:
            chunk = await self._read_chunk(request, pace)
            if not chunk:
                break
            buf += chunk
            if len(buf) > BLOCK_SIZE_MAX:
                raise HTTPFailure(413, "request entity too large")
        return buf

    async def _send(self, request: web.Request, resp: web.StreamResponse, data: memoryview,
                    pace: Pace) -> None:
        """Write ``data`` to a prepared response, at the client's ``min_rate`` or faster.

        A client that reads more slowly, or goes away, raises _ClientGone (the
        connection is then dropped): it must not hold a block buffer for as long
        as it likes, and its leaving is no error of ours.
        """
        writing: asyncio.Task | None = None
        try:
            for off in range(0, len(data), SEND_CHUNK):
                piece = data[off:off + SEND_CHUNK]
                writing = asyncio.ensure_future(resp.write(piece))
                while not writing.done():
                    await asyncio.wait([writing], timeout=max(0.0, pace.deadline - time.monotonic()))
                    if not writing.done():
                        pace.check(time.monotonic())
                writing.result()
                writing = None
                pace.add(len(piece), time.monotonic())
        except TooSlow as exc:
            self._too_slow(request, pace, "response read at", exc)
            _reset(request.transport)
            raise _ClientGone(resp) from None
        except ConnectionError:
            log.info("%s %s from %s: the client went away before the end of the response",
                     request.method, request.rel_url.raw_path, pace.peer)
            raise _ClientGone(resp) from None
        finally:
            if writing is not None:
                if not writing.done():
                    writing.cancel()
                elif not writing.cancelled():
                    writing.exception()  # retrieved: the connection is gone anyway

    def _store_block(self, md5: str, data: memoryview, classes: list[str]) -> tuple[int, dict[str, int]]:
        """Store on the volumes (in a thread): reuse an existing copy or write one."""
        order = mount_order(md5, [v for v in self.volumes if v.writable])
        progress = _Progress(classes)
        for vol in order:
            if not progress.want(vol):
                continue
            same = vol.store.same_content(md5, data)
            if same is None:
                continue
            if not same:
                # Our body hashes to md5 (checked), the stored copy differs: either
                # the copy went bad, and the write below replaces it (keepstore does
                # the same), or it is a genuine MD5 collision.
                if not vol.store.holds_good_copy(md5):
                    continue
                raise HTTPFailure(500, "hash collision")
            if vol.store.touch(md5):
                progress.add(vol)
        all_full = True
        for vol in order:
            if progress.done():
                break
            if not progress.want(vol):
                continue
            try:
                self._write_to(vol, md5, data)
            except StoreFull as exc:
                log.warning("volume %s is full: %s", vol.store.root, exc)
                continue
            except StoreError as exc:
                log.error("volume %s: %s", vol.store.root, exc)
                all_full = False
                continue
            progress.add(vol)
        if progress.total > 0:
            return progress.total, progress.class_done
        if all_full:
            raise HTTPFailure(507, "insufficient storage")
        raise HTTPFailure(503, "volume unavailable")

    def _write_to(self, vol: Volume, md5: str, data: memoryview) -> None:
        free = vol.store.free_space()
        if free < self.config.min_free_space:
            raise StoreFull(f"{free} bytes free, below the {self.config.min_free_space}-byte floor")
        writer = vol.store.open_block()
        try:
            writer.write(data)
        except BaseException:
            writer.abort()
            raise
        writer.commit(md5)

    # ---- block read

    def _check_read_permission(self, request: web.Request, loc: str, info: LocatorInfo) -> None:
        token = self._first_token(request)
        if info.remote and not info.signed:
            if not token:
                raise HTTPFailure(401, "no token provided in Authorization header")
            raise HTTPFailure(400, "remote cluster not configured")
        key = self.config.signing_key
        if not key:
            return
        if not token:
            raise HTTPFailure(401, "no token provided in Authorization header")
        try:
            verify_signature(loc, token, key, self.config.signing_ttl)
        except SignatureExpired:
            raise HTTPFailure(401, "expired signature") from None
        except SignatureError:
            raise HTTPFailure(400, "invalid signature") from None

    async def _block_read(self, request: web.Request, loc: str) -> web.StreamResponse:
        try:
            info = parse_locator_info(loc)
        except ValueError:
            raise HTTPFailure(400, "invalid locator") from None
        head = request.method == "HEAD"
        if not head and info.size == 0 and info.hash != EMPTY_BLOCK_MD5:
            raise HTTPFailure(405, "method not allowed")
        self._check_read_permission(request, loc, info)
        if head:
            size = await self._io(self._verify_any, info)
            resp = web.StreamResponse(status=200)
            resp.content_length = size
            resp.content_type = "application/octet-stream"
            await resp.prepare(request)
            await resp.write_eof()
            return resp
        vol, st_size = await self._io(self._locate, info.hash)
        lease = await self.budget.acquire(st_size)
        try:
            data = await self._io(self._read_verified, vol, info, lease=lease)
            resp = web.StreamResponse(status=200)
            resp.content_length = len(data)
            resp.content_type = "application/octet-stream"
            await resp.prepare(request)
            await self._send(request, resp, memoryview(data), self._pace(request))
            await resp.write_eof()
            return resp
        finally:
            lease.release()

    def _locate(self, md5: str) -> tuple[Volume, int]:
        """The first volume (in mount order) holding the block, and its file size."""
        error: StoreError | None = None
        for vol in mount_order(md5, self.volumes):
            try:
                st = vol.store.stat_block(md5)
            except StoreError as exc:
                error = exc
                continue
            if st is not None:
                if st.st_size > BLOCK_SIZE_MAX:
                    raise HTTPFailure(413, "request entity too large")
                return vol, st.st_size
        if error is not None:
            raise error
        raise HTTPFailure(404, "Not Found")

    def _read_verified(self, vol: Volume, info: LocatorInfo) -> bytes:
        try:
            data = vol.store.read_raw(info.hash)
        except BlockNotFound:
            raise HTTPFailure(404, "Not Found") from None
        if (info.size and len(data) != info.size) or hashlib.md5(data).hexdigest() != info.hash:
            log.error("block %s in %s does not match its hash", info.hash, vol.store.root)
            raise HTTPFailure(502, "checksum mismatch in stored data")
        return data

    def _verify_any(self, info: LocatorInfo) -> int:
        """HEAD: find the block and check its MD5 by streaming it; returns its size."""
        error: StoreError | None = None
        for vol in mount_order(info.hash, self.volumes):
            try:
                size = vol.store.verify(info.hash)
            except BlockNotFound:
                continue
            except BlockCorrupt:
                raise HTTPFailure(502, "checksum mismatch in stored data") from None
            except StoreError as exc:
                error = exc
                continue
            if info.size and size != info.size:
                raise HTTPFailure(502, "checksum mismatch in stored data")
            return size
        if error is not None:
            raise error
        raise HTTPFailure(404, "Not Found")

    # ---- admin

    async def _index(self, request: web.Request, volumes: list[Volume], prefix: str) -> web.StreamResponse:
        """One ``<md5>+<size> <mtime ns>`` line per stored block, then an empty line.

        Lines are produced per volume in the I/O pool and streamed; if listing
        fails midway the final empty line is left out, which tells the client the
        listing is incomplete.
        """
        resp = web.StreamResponse(status=200)
        resp.content_type = "text/plain"
        started = False
        pace = self._pace(request)
        for vol in volumes:
            def listing(v: Volume = vol) -> bytes:
                return "".join(f"{b.md5}+{b.size} {b.mtime_ns}\n"
                               for b in v.store.index(prefix)).encode()
            try:
                chunk = await self._io(listing)
            except StoreError as exc:
                if not started:
                    raise
                log.error("index of %s cut short: %s", vol.store.root, exc)
                return resp
            if not started:
                await resp.prepare(request)
                started = True
            if chunk:
                await self._send(request, resp, memoryview(chunk), pace)
        if not started:
            await resp.prepare(request)
        await self._send(request, resp, memoryview(b"\n"), pace)
        await resp.write_eof()
        return resp


def peer_of(request: web.BaseRequest) -> str:
    """``host:port`` of the client, for logs."""
    transport = request.transport
    name = transport.get_extra_info("peername") if transport is not None else None
    if not name:
        return request.remote or "?"
    host, port = name[0], name[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _reset(transport: asyncio.BaseTransport | None) -> None:
    """Drop a connection with a reset, discarding what the kernel still buffers for it
    (a plain close would keep feeding a slow reader from the socket buffer)."""
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()


def _md5_hex(data: memoryview) -> str:
    return hashlib.md5(data).hexdigest()


def _error_response(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=message + "\n")


# --------------------------------------------------------------------------
# Running as a process

def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` (or ``:PORT`` for all interfaces)."""
    m = re.fullmatch(r"(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:]*)):(?P<port>\d+)", value)
    if not m:
        raise ValueError(f"--listen must be HOST:PORT, not {value!r}")
    host = m.group("v6") or m.group("host") or "0.0.0.0"
    port = int(m.group("port"))
    if port > 65535:
        raise ValueError(f"port {port} out of range")
    return host, port


def run_server(config: ServerConfig, host: str, port: int,
               announce: Callable[[str], None] | None = None) -> int:
    """Serve until SIGTERM or SIGINT, then finish in-flight requests and return 0."""

    raise_fd_limit()

    async def main() -> int:
        server = KeepstoreServer(config)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            url = await server.start(host, port)
        except OSError as exc:
            server.executor.shutdown(wait=False)
            raise StoreError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        if announce is not None:
            announce(url)
        await stop.wait()
        t0 = time.monotonic()
        log.info("stopping: finishing in-flight requests")
        await server.stop()
        log.info("stopped after %.1fs", time.monotonic() - t0)
        return 0

    return asyncio.run(main())
