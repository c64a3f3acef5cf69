"""The ``keep-ingest`` command line: parse, set up logging, run, map errors to exit codes."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ingest import __version__
from ingest.commands import COMMANDS
from ingest.errors import EXIT_CODES_HELP, EXIT_ERROR, EXIT_INTERRUPTED, IngestError

log = logging.getLogger("keep-ingest")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (repeat for debug)")
    common.add_argument("-q", "--quiet", action="count", default=0,
                        help="only errors")
    parser = argparse.ArgumentParser(
        prog="keep-ingest",
        description="Upload directory trees into Arvados Keep and print their manifest.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"keep-ingest {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"ingest.commands.{name}").register(subparsers, common)
    return parser


def setup_logging(verbosity: int) -> None:
    """Log to stderr as ``keep-ingest: level: message``; -v for info, -vv for debug."""
    level = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}.get(
        max(-1, min(verbosity, 2)), logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("keep-ingest: %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``keep-ingest`` console script."""
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose - args.quiet)
    try:
        return args.func(args)
    except IngestError as exc:
        log.error("%s", exc)
        return exc.exit_code
    except KeyboardInterrupt:
        log.error("interrupted; run the same command again to resume")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_ERROR
