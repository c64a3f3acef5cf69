"""``keep-ingest worker``: a worker process serving a coordinator, possibly on another host."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "worker", parents=[common], help="serve a coordinator started with put --listen",
        description="Connect to a coordinator (keep-ingest put --listen ENDPOINT), receive "
                    "blocks, store them and reply, until the coordinator is done.")
    p.add_argument("--connect", required=True, metavar="ENDPOINT",
                   help="the coordinator's endpoint, e.g. tcp://HOST:5555")
    p.add_argument("--wait", type=float, default=30.0, metavar="SECONDS",
                   help="give up if no coordinator answers within SECONDS (default 30)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported when the command runs: keeps start-up cheap for every command.
    from workers import run_worker

    return run_worker(args.connect, wait_s=args.wait)
