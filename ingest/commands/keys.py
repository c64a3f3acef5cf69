"""``keep-ingest keys``: make a key pair for the worker link (ZeroMQ CURVE)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "keys", parents=[common], help="make a key pair for the worker link",
        description="Make a CURVE key pair for the link between 'put --listen' and remote "
                    "workers: NAME.key (public: give it to the other end) and NAME.key_secret "
                    "(mode 0600: never give it away). By convention the coordinator's pair is "
                    "named 'coordinator' and a worker host's 'worker'; a coordinator accepts the "
                    "workers whose public keys are in its worker-keys directory.")
    p.add_argument("name", metavar="NAME", help="the key pair's name, e.g. coordinator or worker")
    p.add_argument("--dir", metavar="DIR",
                   help="where to write it (default: $XDG_CONFIG_HOME/keep-ingest/link)")
    p.add_argument("--force", action="store_true", help="replace an existing key pair of that name")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ingest.config import default_key_dir
    from ingest.link import load_public_key, make_key_pair

    public, secret = make_key_pair(args.dir or default_key_dir(), args.name, force=args.force)
    print(f"public key:  {public}\nsecret key:  {secret}\nthe public key is {load_public_key(public).decode()}")
    return 0
