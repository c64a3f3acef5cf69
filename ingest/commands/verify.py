"""``keep-ingest verify``: compare the files of a manifest with a source tree."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import TYPE_CHECKING

from ingest.commands.common import add_store_arguments, add_walk_arguments, settings_from
from ingest.commands.reading import add_manifest_argument, add_workers_argument, worker_count
from ingest.errors import EXIT_CODES_HELP, EXIT_ERROR, EXIT_OK
from ingest.words import plural

if TYPE_CHECKING:
    from ingest.read.verify import Difference, VerifyReport

DESCRIPTION = """\
Compare every file of a manifest with the sources, as 'put SRC...' would have
stored them (the same forms: 'dir' is ./dir/..., 'dir/' the directory's contents,
a file ./NAME; the same symlink and --exclude rules), byte for byte: worker
processes fetch each block once (its MD5 checked) and compare it with the source
files, without holding whole files in memory. When the manifest looks made from
the other form of the directory given, a hint says what to type.

The report (stdout) has one line per difference, in tree order:
  missing: PATH     in the manifest, not in SRC (a directory ends with '/')
  extra: PATH       in SRC, not in the manifest
  differs: PATH: first difference at byte N (manifest M bytes, source S bytes)
Exit status: 0 when the tree is identical, 1 when there are differences (or when
verification failed, e.g. a block is missing or corrupt; the message says so)."""


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser("verify", parents=[common], help="compare a manifest with a source tree",
                              description=DESCRIPTION, epilog=EXIT_CODES_HELP,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_manifest_argument(p)
    p.add_argument("sources", nargs="+", metavar="SRC", help="files or directories, as given to put")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: identical, files, compared, missing, extra, differs")
    add_walk_arguments(p)  # SRC is walked as put walks it
    add_workers_argument(p)
    add_store_arguments(p)
    p.set_defaults(func=run)


def line(diff: Difference) -> str:
    from ingest.read.names import display  # imported lazily, as in run()

    if diff.kind != "differs":
        return f"{diff.kind}: {display(diff.path)}"
    if diff.detail:
        return f"differs: {display(diff.path)}: {diff.detail}"
    return (f"differs: {display(diff.path)}: first difference at byte {diff.offset} "
            f"(manifest {diff.manifest_size} bytes, source {diff.source_size} bytes)")


def as_json(report: VerifyReport) -> dict:
    return {
        "identical": report.ok,
        "files": report.files,
        "compared": report.compared,
        "missing": [d.path for d in report.differences if d.kind == "missing"],
        "extra": [d.path for d in report.differences if d.kind == "extra"],
        "differs": [{"path": d.path, "offset": d.offset, "manifest_size": d.manifest_size,
                     "source_size": d.source_size, "detail": d.detail or None}
                    for d in report.differences if d.kind == "differs"],
        "blocks_fetched": report.blocks_fetched,
        "seconds": round(report.seconds, 3),
    }


def summary(report: VerifyReport) -> str:
    if report.ok:
        return (f"keep-ingest: verify: identical: {plural(report.files, 'file')} "
                f"({plural(report.bytes_compared, 'byte')} compared) in {report.seconds:.2f} s")
    return (f"keep-ingest: verify: {plural(len(report.differences), 'difference')}: "
            f"{report.count('missing')} missing, {report.count('extra')} extra, "
            f"{report.count('differs')} differing; {report.identical} of {plural(report.files, 'file')} identical")


def hint(report: VerifyReport, manifest: str) -> str:
    """What to type when the manifest looks made from the other form of the source."""
    if not report.other_form:
        return ""
    given = "its contents at the root" if report.other_form.endswith("/") else "the directory itself"
    return (f"the manifest looks made by 'put {report.other_form}' ({given}); to compare with that, "
            f"type: keep-ingest verify {shlex.quote(manifest)} {shlex.quote(report.other_form)}")


def run(args: argparse.Namespace) -> int:
    # Imported when the command runs: keeps start-up cheap for every command.
    from ingest.read.source import load_manifest
    from ingest.read.verify import run_verify
    from ingest.walk import Excludes

    settings = settings_from(args, {
        "put.exclude": (args.exclude, "--exclude"),
        "put.follow_links": (args.follow_links, "--follow-links/--no-follow-links"),
    })
    loaded = load_manifest(args.manifest, settings)
    report = run_verify(loaded.manifest, args.sources, settings.store_spec(), worker_count(args),
                        follow_links=settings.put.follow_links, excludes=Excludes(settings.put.exclude))
    if args.json:
        json.dump({**as_json(report), "hint": hint(report, args.manifest) or None}, sys.stdout,
                  ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        for diff in report.differences:
            print(line(diff))
    sys.stdout.flush()
    if not args.quiet:
        print(summary(report), file=sys.stderr)
        if report.other_form:
            print(f"keep-ingest: hint: {hint(report, args.manifest)}", file=sys.stderr)
    return EXIT_OK if report.ok else EXIT_ERROR
