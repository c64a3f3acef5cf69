"""``keep-ingest keepstore``: serve directory volumes over the Keep HTTP protocol."""

from __future__ import annotations

import argparse
import logging
import sys

from ingest.errors import EXIT_OK, ConfigError, UsageError
from ingest.keep.locator import BLOCK_SIZE_MAX
from ingest.keep.signing import DEFAULT_TTL
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

log = logging.getLogger("keep-ingest.keepstore")

DESCRIPTION = """\
Run a keepstore-compatible HTTP server over one or more directory volumes (the
keepstore Directory layout, ROOT/<md5[:3]>/<md5>). Clients such as the Arvados
SDK's KeepClient (ARVADOS_KEEP_SERVICES=http://HOST:PORT/) and keep-ingest's own
"keep" store can write and read blocks through it.

With --listen HOST:0 a free port is chosen; the actual address is printed on stderr
as "keepstore listening on http://HOST:PORT/". SIGTERM or SIGINT stops accepting
connections, lets requests in flight finish, and exits 0."""


def _read_secret(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            value = f.read().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} file {path}: {exc.strerror or exc}") from None
    if not value:
        raise ConfigError(f"{what} file {path} is empty")
    return value


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser("keepstore", parents=[common], help="serve volumes over the Keep protocol",
                              description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", default="127.0.0.1:25107", metavar="HOST:PORT",
                   help="address to listen on; port 0 picks a free port (default %(default)s)")
    p.add_argument("--volume", action="append", required=True, metavar="DIR", dest="volumes",
                   help="a block directory to serve; repeat for several volumes")
    p.add_argument("--blob-signing-key-file", metavar="FILE",
                   help="file with the blob signing key: PUT responses are signed and "
                        "GET/HEAD require a valid signature")
    p.add_argument("--blob-signing-ttl", type=int, default=DEFAULT_TTL, metavar="SECONDS",
                   help="lifetime of signatures; part of the HMAC, so it must equal the "
                        "cluster's Collections.BlobSigningTTL (default %(default)s)")
    p.add_argument("--system-root-token-file", metavar="FILE",
                   help="file with the token the admin routes (/index, /mounts) require; "
                        "without it they are open, as in keepstore")
    p.add_argument("--max-buffers", type=int, default=DEFAULT_MAX_BUFFERS, metavar="N",
                   help="memory for block bodies, in 64 MiB buffers; further requests wait "
                        "(default %(default)s)")
    p.add_argument("--min-free-space", type=int, default=BLOCK_SIZE_MAX, metavar="BYTES",
                   help="a volume with less free space counts as full (default %(default)s)")
    p.add_argument("--no-fsync", dest="fsync", action="store_false",
                   help="do not fsync blocks before acknowledging them (faster, not durable)")
    p.add_argument("--read-timeout", type=float, default=DEFAULT_READ_TIMEOUT, metavar="SECONDS",
                   help="answer 408 when a PUT body stalls this long (default %(default)s)")
    p.add_argument("--min-rate", type=int, default=DEFAULT_MIN_RATE, metavar="BYTES_PER_S",
                   help="a PUT body that arrives, or a GET response that is read, slower than "
                        "this on average over a --rate-window is aborted (PUT: 408), freeing its "
                        "buffer; 0 for no minimum (default %(default)s)")
    p.add_argument("--rate-window", type=float, default=DEFAULT_RATE_WINDOW, metavar="SECONDS",
                   help="the window --min-rate is averaged over (default %(default)s)")
    p.add_argument("--max-queued", type=int, default=DEFAULT_MAX_QUEUED, metavar="N",
                   help="requests that may wait for a buffer; more are answered 503 at once "
                        "(default %(default)s)")
    p.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS, metavar="N",
                   help="open connections; a new one beyond closes the one idle longest "
                        "(lowered to fit the open-files limit; default %(default)s)")
    p.add_argument("--idle-timeout", type=float, default=DEFAULT_IDLE_TIMEOUT, metavar="SECONDS",
                   help="a connection must complete its next request's headers this soon after "
                        "connecting or its previous response, or it is closed (default %(default)s)")
    p.add_argument("--shutdown-timeout", type=float, default=DEFAULT_SHUTDOWN_TIMEOUT,
                   metavar="SECONDS",
                   help="on SIGTERM, how long to wait for requests in flight (default %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # The HTTP server stack loads only for this command, not for every keep-ingest start.
    from ingest.keepstore.server import ServerConfig, parse_listen, run_server

    try:
        host, port = parse_listen(args.listen)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.max_buffers < 1:
        raise UsageError("--max-buffers must be at least 1")
    if args.read_timeout <= 0 or args.shutdown_timeout < 0:
        raise UsageError("--read-timeout must be positive and --shutdown-timeout not negative")
    if args.min_rate < 0 or args.rate_window <= 0:
        raise UsageError("--min-rate must not be negative and --rate-window must be positive")
    if args.max_queued < 0 or args.max_connections < 1 or args.idle_timeout <= 0:
        raise UsageError("--max-queued must not be negative, --max-connections must be at least 1 "
                         "and --idle-timeout positive")
    if args.blob_signing_ttl < 1:
        raise UsageError("--blob-signing-ttl must be positive")
    key = None
    if args.blob_signing_key_file:
        key = _read_secret(args.blob_signing_key_file, "blob signing key").encode()
    root_token = None
    if args.system_root_token_file:
        root_token = _read_secret(args.system_root_token_file, "system root token")
    else:
        log.warning("no --system-root-token-file: the admin routes (/index, /mounts) are open")
    if key is None:
        log.warning("no --blob-signing-key-file: locators are not signed and reads are not checked")
    config = ServerConfig(volumes=args.volumes, signing_key=key, signing_ttl=args.blob_signing_ttl,
                          system_root_token=root_token, max_buffers=args.max_buffers,
                          min_free_space=args.min_free_space, fsync=args.fsync,
                          shutdown_timeout=args.shutdown_timeout, read_timeout=args.read_timeout,
                          min_rate=args.min_rate, rate_window=args.rate_window,
                          max_queued=args.max_queued, max_connections=args.max_connections,
                          idle_timeout=args.idle_timeout)

    def announce(url: str) -> None:
        print(f"keepstore listening on {url}", file=sys.stderr, flush=True)

    run_server(config, host, port, announce)
    return EXIT_OK
