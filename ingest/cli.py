"""The ``keep-ingest`` command line: parse, set up logging, run, map errors to exit codes."""

from __future__ import annotations

import argparse
import difflib
import importlib
import json
import logging
import os
import signal
import sys
from typing import Any, NoReturn

from ingest import __version__
from ingest.commands import COMMANDS
from ingest.errors import EXIT_CODES_HELP, EXIT_ERROR, EXIT_INTERRUPTED, EXIT_LOCKED, IngestError

log = logging.getLogger("keep-ingest")


class Parser(argparse.ArgumentParser):
    """argparse as the user typed it: no abbreviated options (``--worker`` is not
    ``--workers``), and an unknown argument is reported by the (sub)command it was
    given to, with that command's usage and the nearest option it has."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}{self._suggestion(extras)}")
        return parsed, extras

    def _suggestion(self, extras: list[str]) -> str:
        for extra in extras:
            if extra.startswith("-"):
                near = difflib.get_close_matches(extra.split("=", 1)[0], list(self._option_string_actions),
                                                  n=1, cutoff=0.75)
                if near:
                    return f" (did you mean {near[0]}?)"
        return ""


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    common = Parser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (repeat for debug)")
    common.add_argument("-q", "--quiet", action="count", default=0,
                        help="only errors")
    parser = Parser(
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


class _StderrHandler(logging.StreamHandler):
    """Writes each record to ``sys.stderr`` as it is at that moment: a live progress
    display stands in for it while it runs, to print records above itself."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self) -> Any:  # type: ignore[override]
        return sys.stderr


def setup_logging(verbosity: int) -> None:
    """Log to stderr as ``keep-ingest: level: message``; -v for info, -vv for debug."""
    level = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}.get(
        max(-1, min(verbosity, 2)), logging.DEBUG)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("keep-ingest: %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def _die_of_sigpipe() -> NoReturn:
    """Stop as coreutils do when the reader of the output went away (``| head``):
    no message, killed by SIGPIPE (the shell reports 141)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        try:
            os.dup2(devnull, stream.fileno())
        except (OSError, ValueError):
            pass
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGPIPE)
    os._exit(128 + signal.SIGPIPE)


def _failed(args: argparse.Namespace, message: str, code: int) -> int:
    """Report a failure: on stderr (a held lock is not an error: a warning, which -q
    silences), and with --json also as a JSON object on stdout."""
    if code == EXIT_LOCKED:
        log.warning("%s", message)
    else:
        log.error("%s", message)
    if getattr(args, "json", False):
        json.dump({"error": message, "exit_code": code}, sys.stdout)
        sys.stdout.write("\n")
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``keep-ingest`` console script."""
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose - args.quiet)
    try:
        try:
            code = args.func(args)
        except IngestError as exc:
            code = _failed(args, str(exc), exc.exit_code)
        except KeyboardInterrupt:
            code = _failed(args, "interrupted; run the same command again to resume", EXIT_INTERRUPTED)
        except BrokenPipeError:
            raise
        except Exception as exc:  # a bug: one clear line, the traceback only with -vv
            log.debug("internal error", exc_info=True)
            code = _failed(args, f"internal error: {type(exc).__name__}: {exc} (please report it; "
                                 "-vv shows where it happened)", EXIT_ERROR)
        sys.stdout.flush()
    except BrokenPipeError:
        _die_of_sigpipe()
    return code
