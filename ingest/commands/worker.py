"""``keep-ingest worker``: a worker process serving a coordinator, possibly on another host."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "worker", parents=[common], help="serve a coordinator started with put --listen",
        description="Connect to a coordinator (keep-ingest put --listen ENDPOINT), receive "
                    "blocks, store them and reply, until the coordinator is done. The link is "
                    "authenticated and encrypted (ZeroMQ CURVE): the worker proves its key pair, "
                    "and accepts only the coordinator whose public key it is given (both made "
                    "by 'keep-ingest keys').")
    p.add_argument("--connect", required=True, metavar="ENDPOINT",
                   help="the coordinator's endpoint, e.g. tcp://HOST:5555")
    p.add_argument("--coordinator-key", metavar="FILE",
                   help="the coordinator's public key file "
                        "(default: $XDG_CONFIG_HOME/keep-ingest/link/coordinator.key)")
    p.add_argument("--key", metavar="FILE",
                   help="this worker's secret key file "
                        "(default: $XDG_CONFIG_HOME/keep-ingest/link/worker.key_secret)")
    p.add_argument("--insecure-plaintext", action="store_true",
                   help="INSECURE: no authentication and no encryption, for a coordinator started "
                        "with --insecure-plaintext-workers; never across a network you do not own")
    p.add_argument("--wait", type=float, default=30.0, metavar="SECONDS",
                   help="give up if no coordinator answers within SECONDS (default 30)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported when the command runs: keeps start-up cheap for every command.
    import os

    from ingest.config import default_key_dir
    from ingest.link import WorkerCredentials, load_key_pair, load_public_key
    from workers import run_worker

    credentials = None
    if not args.insecure_plaintext:
        own = load_key_pair(args.key or os.path.join(default_key_dir(), "worker.key_secret"))
        server = load_public_key(args.coordinator_key or os.path.join(default_key_dir(), "coordinator.key"))
        credentials = WorkerCredentials(own, server)
    return run_worker(args.connect, credentials, wait_s=args.wait)
