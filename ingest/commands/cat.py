"""``keep-ingest cat``: one file's bytes to stdout, streamed block by block."""

from __future__ import annotations

import argparse
import sys

from ingest.commands.common import add_store_arguments, settings_from
from ingest.commands.reading import add_manifest_argument
from ingest.errors import EXIT_CODES_HELP, EXIT_OK, IngestError
from ingest.words import quoted


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "cat", parents=[common], help="write one file of a manifest to stdout",
        description="Write the bytes of the file PATH of a manifest to stdout, fetching one "
                    "block at a time (with one block of read-ahead); every block's MD5 and size "
                    "are checked.",
        epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_manifest_argument(p)
    p.add_argument("path", metavar="PATH", help="the file in the collection")
    add_store_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported when the command runs: keeps start-up cheap for every command.
    from ingest.keep.factory import open_store
    from ingest.read.cat import stream_file
    from ingest.read.names import collection_path
    from ingest.read.select import select
    from ingest.read.source import load_manifest

    path = collection_path(args.path)
    settings = settings_from(args)
    loaded = load_manifest(args.manifest, settings)
    sel = select(loaded.manifest, path)
    if not sel.is_file:
        raise IngestError(f"{quoted(args.path)} is a directory in the manifest, not a file")
    store = open_store(settings.store_spec(), write=False)
    out = sys.stdout.buffer
    try:
        # A reader that goes away (`| head`) is the command line's to handle, as coreutils do.
        stream_file(store, sel.files[0].segments, out, name=sel.root)
        out.flush()
    finally:
        store.close()
    return EXIT_OK
