"""``keep-ingest get``: download a collection tree, or part of one, into a directory."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from ingest.commands.common import add_store_arguments, settings_from
from ingest.commands.reading import add_manifest_argument, add_workers_argument, worker_count
from ingest.errors import EXIT_CODES_HELP, EXIT_OK

if TYPE_CHECKING:
    from ingest.read.get import GetResult

DESCRIPTION = """\
Download the files and directories of a manifest (all, or those under PATH) into
the directory DEST, created if needed. A directory PATH puts its contents into
DEST; a file PATH is written as DEST/NAME.

Worker processes fetch whole blocks in parallel (every block's MD5 and size are
checked) and write their ranges into temporary files next to the final ones; a
file is renamed into place once complete, with its mtime set to the time the run
started. Empty files and empty directories are created.

Nothing is written outside DEST: names with '..', empty components or absolute
paths are refused, and every write goes through directory descriptors opened
from DEST down without following symlinks, so a directory or file swapped for a
symlink during the run stops it (exit 1, naming the path). An existing file is left alone if an earlier get wrote it with
the same content and it is unchanged since; any other existing file is a conflict,
and the run stops before fetching anything unless --force is given. Directories
are never replaced.

An interrupted or failed get can be run again: files already complete are not
fetched again (their record is kept in $XDG_STATE_HOME/keep-ingest/get/)."""


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser("get", parents=[common], help="download a tree or a subtree into a directory",
                              description=DESCRIPTION, epilog=EXIT_CODES_HELP,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_manifest_argument(p)
    p.add_argument("dest", metavar="DEST", help="destination directory")
    p.add_argument("path", nargs="?", default="", metavar="PATH",
                   help="a file or directory in the collection (default: everything)")
    p.add_argument("--force", action="store_true",
                   help="overwrite existing files (and replace files or symlinks where the "
                        "manifest has directories) that are not known to match the manifest")
    add_workers_argument(p)
    add_store_arguments(p)
    p.set_defaults(func=run)


def summary(result: GetResult) -> str:
    return (f"keep-ingest: get: {result.files} files ({result.bytes:,} bytes) and {result.dirs} "
            f"directories in {result.dest}: {result.written} written, {result.already} already "
            f"complete; fetched {result.blocks_fetched} blocks ({result.bytes_fetched:,} bytes) "
            f"in {result.seconds:.2f} s")


def run(args: argparse.Namespace) -> int:
    # Imported when the command runs: keeps start-up cheap for every command.
    from ingest.read.get import run_get
    from ingest.read.names import collection_path
    from ingest.read.source import load_manifest

    path = collection_path(args.path)
    settings = settings_from(args)
    loaded = load_manifest(args.manifest, settings)
    result = run_get(loaded.manifest, args.dest, path, settings.store_spec(), worker_count(args),
                     force=args.force)
    if not args.quiet:
        print(summary(result), file=sys.stderr)
    return EXIT_OK
