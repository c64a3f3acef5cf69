"""``keep-ingest ls``: the files and directories of a manifest, with sizes."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from ingest.commands.common import add_store_arguments, settings_from
from ingest.commands.reading import add_manifest_argument
from ingest.errors import EXIT_CODES_HELP, EXIT_OK

if TYPE_CHECKING:
    from ingest.read.select import Selection

DESCRIPTION = """\
List the files and directories of a manifest (all of them, or those under PATH),
in tree order, with their full paths in the collection. Directories end with '/'.
With -l, each line is 'TYPE SIZE PATH': TYPE is 'd' for a directory or '-' for a
file, SIZE is in bytes (for a directory, the total of the files below it). In text
output, control characters and '\\' in names are shown as \\ooo octal escapes;
--json gives the names as they are."""


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser("ls", parents=[common], help="list the files and directories of a manifest",
                              description=DESCRIPTION, epilog=EXIT_CODES_HELP,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_manifest_argument(p)
    p.add_argument("path", nargs="?", default="", metavar="PATH",
                   help="a file or directory in the collection (default: everything)")
    p.add_argument("-l", "--long", action="store_true", help="show the type and size of each entry")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list of {path, type ('file' or 'directory'), size}")
    add_store_arguments(p)
    p.set_defaults(func=run)


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else ""


def entries(sel: Selection) -> list[tuple[str, bool, int]]:
    """(path, is directory, size) in tree order: each directory, then its files, then subdirectories."""
    if sel.is_file:
        return [(f.path, False, f.size) for f in sel.files]
    totals: dict[str, int] = {}
    for f in sel.files:
        d = f.path
        while d != sel.root:
            d = _parent(d)
            totals[d] = totals.get(d, 0) + f.size
    out: list[tuple[str, bool, int]] = []
    files = sel.files
    i = 0
    for d in [sel.root] + [path for path, _ in sel.dirs]:
        if d != sel.root:
            out.append((d, True, totals.get(d, 0)))
        while i < len(files) and _parent(files[i].path) == d:
            out.append((files[i].path, False, files[i].size))
            i += 1
    return out


def run(args: argparse.Namespace) -> int:
    # Imported when the command runs: keeps start-up cheap for every command.
    from ingest.read.names import collection_path, display
    from ingest.read.select import select
    from ingest.read.source import load_manifest

    path = collection_path(args.path)
    settings = settings_from(args)
    loaded = load_manifest(args.manifest, settings)
    listing = entries(select(loaded.manifest, path))
    out = sys.stdout
    if args.json:
        json.dump([{"path": p, "type": "directory" if is_dir else "file", "size": size}
                   for p, is_dir, size in listing], out, ensure_ascii=False)
        out.write("\n")
    else:
        for p, is_dir, size in listing:
            name = display(p) + ("/" if is_dir else "")
            out.write(f"{'d' if is_dir else '-'} {size:>14} {name}\n" if args.long else name + "\n")
    return EXIT_OK
