"""Bounds on the keepstore server's connections: how many, how long idle, how big.

Without them, as measured against this server on one host: 250 idle connections
exhausted a 200-descriptor open-files limit and locked every client out for as
long as they stayed open (an hour: aiohttp's default idle timeout), while the
accept loop logged a traceback many times a second; and one connection that
pipelined requests with 120 headers of 8 KiB behind a slow one held about 68 MB
(aiohttp parses 32 requests ahead).

* **How many**: at most ``limit`` connections are open. A new one beyond that
  closes the connection that has been idle (no request in progress) the
  longest; only when every connection is busy is the new one closed instead.
  Busy connections are bounded by the other limits (a request's body and
  response must keep a minimum rate, and few may wait for memory), so idle ones
  - or patient attackers - make room for newcomers. The limit is lowered to fit
  the process's open-files limit, which is first raised to its hard maximum.
* **How long idle**: a connection must complete its next request's headers
  within ``idle_timeout`` seconds of connecting or of its previous response
  (aiohttp's keep-alive timer), so slowly dribbled headers do not hold it.
* **How big**: at most :data:`MAX_HEADERS` header lines of aiohttp's 8190 bytes
  per request, and at most :data:`PIPELINED` requests parsed ahead of the one
  being handled (Keep clients never pipeline).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections.abc import Callable

from aiohttp import web, web_protocol

log = logging.getLogger("keep-ingest.keepstore")

MAX_HEADERS = 32
PIPELINED = 2
FD_RESERVE = 64          # descriptors kept for volumes, the I/O threads and logging
REFUSED_LOG_EVERY_S = 10.0


def limit_pipelining() -> None:
    """Parse at most PIPELINED requests ahead on a connection.

    aiohttp (3.14) takes this bound from a module constant when it creates each
    connection's handler and offers no setting; the keepstore process sets it
    before it accepts any (a test checks that it still bounds memory).
    """
    web_protocol.MAX_MSG_QUEUE_SIZE = PIPELINED


def raise_fd_limit() -> int:
    """Raise this process's soft open-files limit to the hard one; returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def fitting_limit(wanted: int, io_threads: int) -> int:
    """``wanted`` connections, or fewer when the open-files limit cannot hold them."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    room = soft - FD_RESERVE - 2 * io_threads
    if room < wanted:
        log.warning("at most %d connections (not %d): the open-files limit is %d (ulimit -n)",
                    max(room, 1), wanted, soft)
    return max(1, min(wanted, room))


def _peer(handler: web_protocol.RequestHandler) -> str:
    transport = handler.transport
    name = transport.get_extra_info("peername") if transport is not None else None
    return f"{name[0]}:{name[1]}" if name else "?"


class ConnectionGuard:
    """The protocol factory of the listening socket: at most ``limit`` open connections."""

    def __init__(self, server: web.Server, limit: int, clock: Callable[[], float] = time.monotonic):
        self.server = server
        self.limit = limit
        self._clock = clock
        self._idle_since: dict[web_protocol.RequestHandler, float] = {}
        self._busy: set[web_protocol.RequestHandler] = set()
        self._refused = 0
        self._refused_logged = 0.0

    def __call__(self) -> web_protocol.RequestHandler:
        """A handler for a connection just accepted, making room for it if need be."""
        live = [h for h in self.server.connections if h.transport is not None]
        alive = set(live)
        self._idle_since = {h: t for h, t in self._idle_since.items() if h in alive}
        self._busy &= alive
        handler = self.server()
        if len(live) >= self.limit:
            idle = [h for h in live if h not in self._busy]
            if idle:
                victim = min(idle, key=lambda h: self._idle_since.get(h, 0.0))
                log.info("connection limit %d reached: closing the connection from %s, idle %.1f s",
                         self.limit, _peer(victim), self._clock() - self._idle_since.get(victim, 0.0))
                self._idle_since.pop(victim, None)
                victim.force_close()
            else:
                # Its transport is made (and connection_made scheduled) right after this
                # returns: close it once that has run.
                loop = asyncio.get_running_loop()
                loop.call_soon(loop.call_soon, self._refuse, handler)
        self._idle_since[handler] = self._clock()
        return handler

    def _refuse(self, handler: web_protocol.RequestHandler) -> None:
        self._refused += 1
        now = self._clock()
        if now - self._refused_logged >= REFUSED_LOG_EVERY_S:
            log.warning("connection limit %d reached with every connection busy: refused %d "
                        "connection(s), the last from %s", self.limit, self._refused, _peer(handler))
            self._refused_logged, self._refused = now, 0
        handler.force_close()

    def started(self, handler: web_protocol.RequestHandler) -> None:
        """A request began on ``handler``'s connection."""
        self._busy.add(handler)

    def ended(self, handler: web_protocol.RequestHandler) -> None:
        """The request on ``handler``'s connection is done with; it is idle from now."""
        self._busy.discard(handler)
        self._idle_since[handler] = self._clock()
