"""Arguments shared by the read-side subcommands (ls, cat, get, verify)."""

from __future__ import annotations

import argparse
import os

MANIFEST_HELP = ("the manifest: a file, '-' for stdin, or the portable data hash (or locator) "
                 "of a manifest stored in Keep by put --save-manifest")


def add_manifest_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifest", metavar="MANIFEST", help=MANIFEST_HELP)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def add_workers_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=_positive, metavar="N",
                        help="worker processes, each handling one block at a time "
                             "(default: one per CPU)")


def worker_count(args: argparse.Namespace) -> int:
    return args.workers or os.cpu_count() or 1
