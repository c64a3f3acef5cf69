"""The HTTP Keep client: a BlockStore that writes to keepstore/keepproxy services.

Behaviour follows the official Python client where it matters for compatibility
(KEEP_PROTOCOL.md section 4):

* services are probed in rendezvous order, ``md5_hex(block_md5 + uuid[-15:])``
  descending; a static list of URLs gets the SDK's fake uuids
  ``00000-bi6l4-<index as 15 digits>``;
* ``replication`` copies go to distinct services, counted from
  ``X-Keep-Replicas-Stored`` (1 when the header is absent); against ``disk``
  services the copies are written in parallel, against proxies one at a time;
* 408, 409, 423, 500, 502, 503, 504 and network errors are temporary: the service
  is tried again in the next round, after an exponential backoff with jitter;
  any other status moves on to the next service for the rest of the call
  (400 and 422 both mean the server saw a different MD5);
* requests carry ``Authorization: Bearer``, ``X-Keep-Desired-Replicas``,
  ``Content-Length`` and ``X-Request-Id``;
* with ``storage_classes``, PUTs carry ``X-Keep-Storage-Classes`` and a block is
  stored only when ``X-Keep-Storage-Classes-Confirmed`` counts ``replication``
  copies in every class (a service that sends no such header turns the check off
  for the call, as the SDK does with an old keepstore).

The token goes into request headers only; it never appears in log records or
error messages.

Transport: one urllib3 PoolManager per client (keep-alive connections, reused
across blocks and threads); a block body is sent from the writer's buffer without
being copied.
"""

from __future__ import annotations

import hashlib
import logging
import random
import secrets
import string
import threading
from collections.abc import Collection, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import urllib3

from ingest.errors import BlockCorrupt, BlockNotFound, ConfigError, StoreError
from ingest.keep.locator import BLOCK_SIZE_MAX, EMPTY_BLOCK_LOCATOR, EMPTY_BLOCK_MD5, Locator, LocatorError, is_md5_hex
from ingest.keep.store import StoredBlock, block_to_read

log = logging.getLogger("keep-ingest.keep")

TEMPORARY_STATUSES = frozenset({408, 409, 423, 500, 502, 503, 504})
NOT_FOUND_STATUSES = frozenset({403, 404, 410})
HASH_MISMATCH_STATUSES = frozenset({400, 422})
SERVICE_TYPES = ("disk", "proxy")
_REQUEST_ID_CHARS = string.ascii_lowercase + string.digits


@dataclass(frozen=True, slots=True)
class KeepService:
    """One Keep service endpoint."""

    root: str                  # base URL ending in "/"
    uuid: str
    service_type: str = "disk"
    read_only: bool = False


def static_services(urls: Sequence[str], service_type: str = "disk",
                    uuids: Sequence[str] | None = None, types: Sequence[str] | None = None) -> list[KeepService]:
    """Services from a list of URLs; uuids default to the SDK's ``00000-bi6l4-%015d``,
    types to ``service_type`` (``types`` gives one per service)."""
    if uuids is not None and len(uuids) != len(urls):
        raise ConfigError("keep store: service_uuids must list one uuid per service")
    if types is not None and (len(types) != len(urls) or any(t not in SERVICE_TYPES for t in types)):
        raise ConfigError(f"keep store: service_types must list one of {', '.join(SERVICE_TYPES)} per service")
    out = []
    for idx, url in enumerate(urls):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ConfigError(f"keep store: service URL {url!r} must start with http:// or https://")
        root = url if url.endswith("/") else url + "/"
        uuid = uuids[idx] if uuids is not None else f"00000-bi6l4-{idx:015d}"
        out.append(KeepService(root, uuid, types[idx] if types is not None else service_type))
    return out


def service_weight(md5_hex: str, service_uuid: str) -> str:
    """The rendezvous weight of a service for a block: md5_hex(md5 + uuid[-15:])."""
    return hashlib.md5((md5_hex + service_uuid[-15:]).encode()).hexdigest()


def rendezvous_order(md5_hex: str, services: Iterable[KeepService]) -> list[KeepService]:
    """Services in the order clients probe them for this block (heaviest first)."""
    return sorted(services, key=lambda s: service_weight(md5_hex, s.uuid), reverse=True)


def new_request_id() -> str:
    """``req-`` plus 20 random lowercase letters and digits, like the SDK's."""
    return "req-" + "".join(secrets.choice(_REQUEST_ID_CHARS) for _ in range(20))


@dataclass
class _ServiceState:
    """One service's fate within one put/get call."""

    service: KeepService
    tries: int = 0
    last_error: str | None = None
    done: bool = False       # stored our copy (put)
    replicas: int = 0        # (put) replicas it confirmed
    classes: dict[str, int] | None = None  # (put) X-Keep-Storage-Classes-Confirmed; None: no header
    dead: bool = False       # permanent failure for the rest of this call
    not_found: bool = False  # (get) answered 403/404/410
    corrupt: bool = False    # (get) answered 200 with bytes that do not match the locator


@dataclass
class _Outcome:
    ok: bool
    temporary: bool = False
    replicas: int = 0
    body: bytes = b""
    error: str = ""
    status: int | None = None


@dataclass
class KeepClientOptions:
    """The tunables of :class:`KeepClient`; every field is also a spec key."""

    replication: int = 1
    service_type: str = "disk"
    retries: int = 3
    backoff_start: float = 1.0
    backoff_max: float = 30.0
    connect_timeout: float = 2.0
    read_timeout: float = 300.0
    pool_maxsize: int = 16
    insecure: bool = False
    ca_certs: str | None = None
    extra_headers: dict[str, str] = field(default_factory=dict)
    storage_classes: list[str] = field(default_factory=list)


class KeepClient:
    """A BlockStore backed by Keep services over HTTP.

    ``services`` is a list of base URLs (``http://host:port/``). ``token`` is the
    Arvados API token; keepstore signs the returned locators for it (use the same
    token when saving the manifest). See :class:`KeepClientOptions` for the rest.
    """

    SPEC_KEYS = frozenset({"type", "services", "token", "service_uuids", "service_types",
                           *KeepClientOptions.__dataclass_fields__})
    buffers_whole_blocks = True    # a PUT sends the whole block: KeepBlockWriter holds it

    def __init__(self, services: Sequence[str], token: str | None = None, replication: int = 1,
                 *, service_uuids: Sequence[str] | None = None, service_types: Sequence[str] | None = None,
                 **options: Any):
        opts = KeepClientOptions(replication=replication, **options)
        if not services:
            raise ConfigError("keep store: no services given")
        if opts.service_type not in SERVICE_TYPES:
            raise ConfigError(f"keep store: service_type must be one of {', '.join(SERVICE_TYPES)}, "
                              f"not {opts.service_type!r}")
        if not isinstance(opts.replication, int) or opts.replication < 1:
            raise ConfigError(f"keep store: replication must be a positive integer, not {opts.replication!r}")
        if opts.retries < 0:
            raise ConfigError("keep store: retries must be >= 0")
        self.services = static_services(list(services), opts.service_type, service_uuids, service_types)
        if len({s.root for s in self.services}) != len(self.services):
            raise ConfigError("keep store: the same service is listed twice")
        self.token = token or None
        self.options = opts
        self.replication = opts.replication
        self.classes = sorted(set(opts.storage_classes))
        pool_kw: dict[str, Any] = {"num_pools": max(10, 2 * len(self.services)),
                                   "maxsize": opts.pool_maxsize, "block": False,
                                   "retries": False}
        if opts.insecure:
            pool_kw["cert_reqs"] = "CERT_NONE"
            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        elif opts.ca_certs:
            pool_kw["ca_certs"] = opts.ca_certs
        self._http = urllib3.PoolManager(**pool_kw)
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()
        self._closed = False
        self._closing = threading.Event()   # wakes put/get loops that are backing off

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> KeepClient:
        """Build from a store spec: ``{"type": "keep", "services": [...], ...}``."""
        unknown = set(spec) - cls.SPEC_KEYS
        if unknown:
            raise ConfigError(f"keep store: unknown setting(s) {', '.join(sorted(unknown))}")
        services = spec.get("services")
        if isinstance(services, str):
            services = services.split()
        if not services:
            raise ConfigError("keep store: 'services' must list at least one URL")
        kw = {k: v for k, v in spec.items() if k not in ("type", "services", "token", "service_uuids",
                                                          "service_types")}
        if "extra_headers" in kw:
            kw["extra_headers"] = dict(kw["extra_headers"])
        if "storage_classes" in kw:
            kw["storage_classes"] = list(kw["storage_classes"])
        return cls(services, spec.get("token"), service_uuids=spec.get("service_uuids"),
                   service_types=spec.get("service_types"), **kw)

    # ---- BlockStore protocol

    def open_block(self) -> KeepBlockWriter:
        self._check_open()
        return KeepBlockWriter(self)

    def describe(self) -> str:
        return "keep services " + " ".join(s.root for s in self.services)

    def unreachable(self) -> dict[str, str]:
        """Services that do not answer at all (one quick HEAD each, no retries):
        ``{url: error}``. Any HTTP status, even an error, counts as an answer."""
        down = {}
        for service in self.services:
            try:
                resp = self._http.request("HEAD", service.root + EMPTY_BLOCK_LOCATOR,
                                          headers=self._headers(new_request_id()),
                                          timeout=urllib3.Timeout(connect=self.options.connect_timeout,
                                                                  read=self.options.connect_timeout),
                                          retries=False, redirect=False)
                resp.drain_conn()
            except urllib3.exceptions.HTTPError as exc:
                down[service.root] = self._network_error(exc)
        return down

    def writable_services(self) -> list[KeepService]:
        return [s for s in self.services if not s.read_only]

    def max_replicas(self, down: Collection[str] = ()) -> int | None:
        """How many copies the writable services (not in ``down``) can hold: one per
        disk service; for a proxy, the copies it confirms of the empty block when asked
        for ``replication`` (a probe that stores no data). None when a proxy's answer
        says nothing."""
        total = 0
        for service in self.writable_services():
            if service.root in down:
                continue
            if service.service_type == "disk":
                total += 1
                continue
            confirmed = self._probe_proxy(service)
            if confirmed is None:
                return None
            total += confirmed
        return total

    def _probe_proxy(self, service: KeepService) -> int | None:
        headers = {**self._headers(new_request_id()), "X-Keep-Desired-Replicas": str(self.replication),
                   "Content-Length": "0"}
        try:
            resp = self._http.request("PUT", service.root + EMPTY_BLOCK_MD5, body=b"", headers=headers,
                                      timeout=urllib3.Timeout(connect=self.options.connect_timeout,
                                                              read=self.options.connect_timeout),
                                      retries=False, redirect=False)
            resp.drain_conn()
        except urllib3.exceptions.HTTPError:
            return None
        replicas = resp.headers.get("X-Keep-Replicas-Stored", "1")
        return int(replicas) if resp.status == 200 and replicas.isdigit() else None

    def check_block(self, locator: str) -> None:
        """HEAD the block on the services in rendezvous order until ``replication``
        copies of the right size are confirmed (one behind a proxy, which does not
        say how many it has); keepstore checks the MD5 of what it holds for a HEAD."""
        self._check_open()
        loc = block_to_read(locator)
        if loc is None:
            return
        want = self.replication if all(s.service_type == "disk" for s in self.writable_services()) else 1
        found = 0
        problems: list[str] = []
        missing = 0
        timeout = urllib3.Timeout(connect=self.options.connect_timeout, read=self.options.read_timeout)
        for service in rendezvous_order(loc.md5, self.services):
            try:
                resp = self._http.request("HEAD", service.root + locator, headers=self._headers(new_request_id()),
                                          timeout=timeout, retries=False, redirect=False)
                resp.drain_conn()
            except urllib3.exceptions.HTTPError as exc:
                problems.append(f"{service.root}: {self._network_error(exc)}")
                continue
            length = resp.headers.get("Content-Length")
            if 200 <= resp.status < 300 and length == str(loc.size):
                found += 1
                if found >= want:
                    return
            elif 200 <= resp.status < 300:
                problems.append(f"{service.root}: HTTP {resp.status} with Content-Length {str(length)[:20]}")
            elif resp.status in NOT_FOUND_STATUSES:
                missing += 1
            else:
                problems.append(f"{service.root}: HTTP {resp.status}")
        where = f" ({'; '.join(problems)})" if problems else ""
        if found == 0 and not problems:
            raise BlockNotFound(self._scrub(f"block {loc.stripped()} not found on {missing} service(s)"))
        if found:
            raise BlockNotFound(self._scrub(f"block {loc.stripped()}: {found} of {want} copies found{where}"))
        raise StoreError(self._scrub(f"block {loc.stripped()}: no service confirmed it{where}"))

    def close(self) -> None:
        """Release connections. Safe to call from another thread while a put or get
        runs: that call stops at its next backoff or round with a StoreError (a
        request already on the wire finishes first, within its timeouts)."""
        self._closed = True
        self._closing.set()
        with self._executor_lock:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
        self._http.clear()

    def __enter__(self) -> KeepClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- helpers

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"{self.describe()}: client is closed")

    def _pool(self) -> ThreadPoolExecutor:
        with self._executor_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=self.options.pool_maxsize,
                                                    thread_name_prefix="keep-put")
            return self._executor

    def _headers(self, request_id: str) -> dict[str, str]:
        headers = dict(self.options.extra_headers)
        headers["X-Request-Id"] = request_id
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def _timeout(self, attempt: int) -> urllib3.Timeout:
        # The connect timeout doubles on each round, as the SDK does.
        connect = min(self.options.connect_timeout * (1 << min(attempt, 5)), 120.0)
        return urllib3.Timeout(connect=connect, read=self.options.read_timeout)

    def _backoff(self, attempt: int) -> None:
        """Sleep before round ``attempt`` (>= 1): exponential, capped, with jitter."""
        base = min(self.options.backoff_max, self.options.backoff_start * (2 ** (attempt - 1)))
        if base > 0:
            self._closing.wait(random.uniform(base / 2, base))

    def _scrub(self, text: str) -> str:
        """Never let the token into a message, even if a server echoes it."""
        if self.token and self.token in text:
            text = text.replace(self.token, "<token>")
        return text

    @staticmethod
    def _describe_body(body: bytes) -> str:
        line = body.decode("utf-8", "replace").strip().splitlines()
        return line[0][:200] if line else ""

    def _network_error(self, exc: Exception) -> str:
        reason = getattr(exc, "reason", None) or exc
        text = str(reason)
        # urllib3 messages repeat the pool object; keep the useful tail.
        if ": " in text and "HTTPConnection" in text:
            text = text.rsplit(": ", 1)[-1]
        return self._scrub(f"{type(reason).__name__}: {text}" if text else type(reason).__name__)

    # ---- put

    def put(self, data: bytes | bytearray | memoryview, md5_hex: str | None = None) -> StoredBlock:
        """Store one block with ``replication`` copies; returns the signed locator."""
        self._check_open()
        view = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
        size = view.nbytes
        if size > BLOCK_SIZE_MAX:
            raise StoreError(f"block of {size} bytes exceeds the {BLOCK_SIZE_MAX}-byte maximum")
        if md5_hex is None:
            md5_hex = hashlib.md5(view).hexdigest()
        elif not is_md5_hex(md5_hex):
            raise StoreError(f"invalid block hash {md5_hex!r}")
        if size == 0 and md5_hex == EMPTY_BLOCK_MD5:
            return StoredBlock(EMPTY_BLOCK_LOCATOR, replicas=self.replication)
        want = self.replication
        order = rendezvous_order(md5_hex, self.writable_services())
        states = [_ServiceState(s) for s in order]
        request_id = new_request_id()
        stored = 0
        locator: str | None = None
        parallel = want if all(s.service_type == "disk" for s in order) else 1
        rounds = 0
        for attempt in range(self.options.retries + 1):
            candidates = [st for st in states if not st.done and not st.dead]
            if not candidates:
                break
            if attempt:
                self._backoff(attempt)
            if self._closed:
                raise StoreError(f"{self.describe()}: client closed while storing block {md5_hex}+{size}")
            rounds = attempt + 1
            while candidates:
                got, loc = self._put_round(candidates, view, md5_hex, size, self._shortfall(states, stored),
                                           parallel, request_id, attempt)
                stored += got
                locator = loc or locator
                if self._shortfall(states, stored) <= 0:
                    break
                # Copies still missing (a storage class unconfirmed, fewer replicas than
                # hoped): the services not yet asked this round are asked now.
                candidates = [st for st in candidates if st.tries <= attempt and not st.done and not st.dead]
            if self._shortfall(states, stored) <= 0:
                assert locator is not None
                log.debug("stored %s+%d: %d replicas (request %s)", md5_hex, size, stored, request_id)
                return StoredBlock(locator, stored)
        missing = self._classes_missing(states) if stored >= want else []
        raise StoreError(self._scrub(_put_failure(md5_hex, size, want, stored, rounds, states, missing)))

    def _classes_missing(self, states: list[_ServiceState]) -> list[str]:
        """Wanted storage classes with fewer than ``replication`` confirmed copies; none
        when a service that stored a copy did not say (no tracking, as in the SDK)."""
        done = [st for st in states if st.done]
        if not self.classes or any(st.classes is None for st in done):
            return []
        return [c for c in self.classes if sum((st.classes or {}).get(c, 0) for st in done) < self.replication]

    def _shortfall(self, states: list[_ServiceState], stored: int) -> int:
        """How many more copies the block needs: replicas, or copies in a storage class."""
        return max(self.replication - stored, 1 if self._classes_missing(states) else 0)

    def _put_round(self, candidates: list[_ServiceState], view: memoryview, md5_hex: str, size: int,
                   needed: int, parallel: int, request_id: str, attempt: int) -> tuple[int, str | None]:
        """One pass over the candidates in order; returns (replicas stored, last locator)."""
        queue = list(candidates)
        stored = 0
        locator = None
        if parallel <= 1:
            for st in queue:
                if stored >= needed:
                    break
                got, loc = self._put_one(st, view, md5_hex, size, request_id, attempt)
                stored += got
                locator = loc or locator
            return stored, locator
        pool = self._pool()
        running: dict[Future, _ServiceState] = {}
        # Assume each disk PUT yields one replica until it answers.
        while True:
            while queue and stored + len(running) < needed:
                st = queue.pop(0)
                running[pool.submit(self._put_one, st, view, md5_hex, size, request_id, attempt)] = st
            if not running:
                return stored, locator
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                running.pop(fut)
                got, loc = fut.result()
                stored += got
                locator = loc or locator

    def _put_one(self, st: _ServiceState, view: memoryview, md5_hex: str, size: int,
                 request_id: str, attempt: int) -> tuple[int, str | None]:
        """PUT to one service; records the outcome in ``st``."""
        st.tries += 1
        headers = self._headers(request_id)
        headers["Content-Length"] = str(size)
        headers["X-Keep-Desired-Replicas"] = str(self.replication)
        headers["Content-Type"] = "application/octet-stream"
        if self.classes:
            headers["X-Keep-Storage-Classes"] = ", ".join(self.classes)
        url = st.service.root + md5_hex
        try:
            resp = self._http.request("PUT", url, body=view, headers=headers,
                                      timeout=self._timeout(attempt), retries=False,
                                      redirect=False, preload_content=True)
        except urllib3.exceptions.HTTPError as exc:
            st.last_error = self._network_error(exc)
            log.info("PUT %s: %s (will retry)", url, st.last_error)
            return 0, None
        status = resp.status
        body = resp.data
        if 200 <= status < 300:
            locator = body.decode("ascii", "replace").strip()
            try:
                parsed = Locator.parse(locator)
            except LocatorError:
                parsed = None
            if parsed is None or parsed.md5 != md5_hex or parsed.size != size:
                st.dead = True
                st.last_error = self._scrub(f"HTTP {status} with an unexpected body {locator[:100]!r}")
                return 0, None
            header = resp.headers.get("X-Keep-Replicas-Stored", "1")
            try:
                replicas = max(int(header), 0)
            except ValueError:
                replicas = 1
            st.done = True
            st.replicas = replicas
            st.classes = _confirmed_classes(resp.headers.get("X-Keep-Storage-Classes-Confirmed"))
            # A success that confirms no replica is not retried on this service (as
            # the SDK does), but it must show in the message if the block fails.
            st.last_error = None if replicas else self._scrub(
                f"HTTP {status} but X-Keep-Replicas-Stored: {header[:20]}")
            return replicas, locator
        message = self._describe_body(body)
        if status in HASH_MISMATCH_STATUSES:
            st.last_error = self._scrub(f"HTTP {status} hash mismatch: {message}")
        else:
            st.last_error = self._scrub(f"HTTP {status}: {message}" if message else f"HTTP {status}")
        if status in TEMPORARY_STATUSES:
            log.info("PUT %s: %s (will retry)", url, st.last_error)
        else:
            st.dead = True
            log.info("PUT %s: %s (next service)", url, st.last_error)
        return 0, None

    # ---- get

    def get(self, locator: str) -> bytes:
        """Read a whole block, checking its size and MD5; tries services in rendezvous order."""
        self._check_open()
        loc = block_to_read(locator)
        if loc is None:
            return b""
        states = [_ServiceState(s) for s in rendezvous_order(loc.md5, self.services)]
        request_id = new_request_id()
        for attempt in range(self.options.retries + 1):
            candidates = [st for st in states if not st.dead]
            if not candidates:
                break
            if attempt:
                self._backoff(attempt)
            if self._closed:
                raise StoreError(f"{self.describe()}: client closed while reading block {loc.stripped()}")
            for st in candidates:
                data = self._get_one(st, locator, loc, request_id, attempt)
                if data is not None:
                    return data
        tried = [st for st in states if st.tries]
        detail = "; ".join(f"{st.service.root}: {st.last_error}" for st in tried)
        if tried and all(st.not_found for st in tried):
            raise BlockNotFound(self._scrub(f"block {loc.stripped()} not found: {detail}"))
        if any(st.corrupt for st in tried):
            # Some service has the block but served bytes that are not it, and no
            # service served the right ones.
            raise BlockCorrupt(self._scrub(f"block {loc.stripped()} is corrupt: no service returned "
                                           f"its content ({len(tried)} tried): {detail}"))
        raise StoreError(self._scrub(f"could not read block {loc.stripped()} from "
                                     f"{len(tried)} service(s): {detail}"))

    def _get_one(self, st: _ServiceState, locator: str, loc: Locator, request_id: str,
                 attempt: int) -> bytes | None:
        st.tries += 1
        headers = self._headers(request_id)
        headers["Accept"] = "application/octet-stream"
        url = st.service.root + locator
        try:
            resp = self._http.request("GET", url, headers=headers, timeout=self._timeout(attempt),
                                      retries=False, redirect=False, preload_content=False)
        except urllib3.exceptions.HTTPError as exc:
            st.last_error = self._network_error(exc)
            return None
        reusable = False
        try:
            if 200 <= resp.status < 300:
                data = resp.read(loc.size + 1)
                if len(data) != loc.size or hashlib.md5(data).hexdigest() != loc.md5:
                    st.dead = True
                    st.corrupt = True
                    st.last_error = (f"HTTP {resp.status} but the {len(data)}-byte body "
                                     f"does not match {loc.stripped()}")
                    return None
                reusable = True
                return data
            body = resp.read(4096)
            reusable = len(body) < 4096
            message = self._describe_body(body)
            st.last_error = self._scrub(f"HTTP {resp.status}: {message}" if message else f"HTTP {resp.status}")
            if resp.status not in TEMPORARY_STATUSES:
                st.dead = True
                st.not_found = resp.status in NOT_FOUND_STATUSES
            return None
        except urllib3.exceptions.HTTPError as exc:
            st.last_error = self._network_error(exc)
            return None
        finally:
            # A fully read response gives its connection back to the pool; one
            # with unread bytes (bad length, long error body) is closed instead.
            if not reusable:
                resp.close()
            resp.release_conn()


def _put_failure(md5_hex: str, size: int, want: int, stored: int, rounds: int,
                 states: list[_ServiceState], classes_missing: list[str]) -> str:
    """Why a block could not get its copies: what each writable service did (and
    which storage classes were confirmed, when those are what is missing)."""
    outcomes = []
    for st in states:
        if st.replicas:
            confirmed = f", confirmed {st.classes or 'no class'}" if classes_missing else ""
            outcomes.append(f"{st.service.root}: stored {st.replicas}{confirmed}")
        elif st.last_error:
            outcomes.append(f"{st.service.root}: {st.last_error}")
        elif not st.tries:
            outcomes.append(f"{st.service.root}: not tried")
    if len(states) < want:
        outcomes.append(f"only {len(states)} writable service(s) for {want} copies")
    classes = f" in storage class(es) {', '.join(classes_missing)}" if classes_missing else ""
    return (f"could not store block {md5_hex}+{size} with {want} replicas{classes} (stored {stored}) after "
            f"{rounds} round(s): {'; '.join(outcomes) or 'no writable service'}")


def _confirmed_classes(header: str | None) -> dict[str, int] | None:
    """``X-Keep-Storage-Classes-Confirmed: a=1, b=2`` as a dict; None when absent or
    malformed (the SDK then stops tracking classes)."""
    if header is None:
        return None
    out: dict[str, int] = {}
    for part in header.split(","):
        name, _, count = part.strip().partition("=")
        if not name:
            continue
        try:
            out[name] = out.get(name, 0) + int(count)
        except ValueError:
            return None
    return out


class KeepBlockWriter:
    """Buffers one block in memory; commit() uploads it with the client's replication."""

    def __init__(self, client: KeepClient):
        self._client = client
        self._buf: bytearray | None = bytearray()
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        if self._buf is None:
            raise StoreError("block writer already committed or aborted")
        n = memoryview(data).nbytes
        if self.size + n > BLOCK_SIZE_MAX:
            self.abort()
            raise StoreError(f"block larger than {BLOCK_SIZE_MAX} bytes")
        self._buf += data
        self.size += n

    def commit(self, md5_hex: str) -> StoredBlock:
        if self._buf is None:
            raise StoreError("block writer already committed or aborted")
        buf, self._buf = self._buf, None
        try:
            return self._client.put(buf, md5_hex)
        finally:
            del buf

    def abort(self) -> None:
        self._buf = None
