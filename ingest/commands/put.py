"""``keep-ingest put``: upload source trees and print their manifest."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import secrets
import signal
import stat
import sys
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING

from ingest.commands.common import add_store_arguments, add_walk_arguments, settings_from
from ingest.commands.saving import (
    add_collection_arguments,
    collection_overrides,
    describe_saved,
    open_saver,
    saved_json,
)
from ingest.errors import EXIT_CODES_HELP, EXIT_OK, EXIT_PARTIAL, IngestError
from ingest.errors import EXIT_USAGE as EXIT_PENDING
from ingest.progress import MODES, human_bytes, make_display
from ingest.words import plural

if TYPE_CHECKING:
    from ingest.assemble import ManifestText
    from ingest.config import Settings
    from ingest.put import PutResult
    from ingest.save import SavedCollection


def _workers(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', not {text!r}") from None


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "put", parents=[common], help="upload files and directories, print the manifest",
        description="Upload files and directories into Keep and print their normalized "
                    "Arvados manifest. 'dir' puts the tree under ./dir, 'dir/' puts its "
                    "contents at the root, a file becomes ./NAME.",
        epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", metavar="PATH", help="files or directories to upload")
    add_store_arguments(p)
    p.add_argument("--workers", "--threads", type=_workers, metavar="N",
                   help="local worker processes ('auto': one per CPU; 0: remote workers only)")
    link = p.add_argument_group("remote workers (see 'keep-ingest keys')")
    link.add_argument("--listen", metavar="ENDPOINT",
                      help="accept remote workers on this ZeroMQ endpoint, e.g. tcp://0.0.0.0:5555; the "
                           "link is authenticated and encrypted (CURVE)")
    link.add_argument("--link-key", metavar="FILE",
                      help="the coordinator's secret key file "
                           "(default: $XDG_CONFIG_HOME/keep-ingest/link/coordinator.key_secret)")
    link.add_argument("--worker-keys", action="append", metavar="PATH",
                      help="a worker's public key file, or a directory of them, to accept (repeatable; "
                           "default: $XDG_CONFIG_HOME/keep-ingest/link/workers/)")
    link.add_argument("--insecure-plaintext-workers", dest="insecure_plaintext", action="store_true", default=None,
                      help="INSECURE: accept any worker on --listen, unauthenticated and unencrypted: "
                           "whoever connects receives the store's credentials and the files' bytes")
    p.add_argument("--chunk-size", type=int, metavar="BYTES", help="bytes per message to a worker")
    p.add_argument("--block-size", type=int, metavar="BYTES",
                   help="maximum block size (default and maximum 67108864; smaller changes the manifest)")
    add_walk_arguments(p)
    resume = p.add_argument_group("checkpoints and resume")
    resume.add_argument("--state-dir", metavar="DIR",
                        help="where run journals and locks live (default: $XDG_STATE_HOME/keep-ingest)")
    resume.add_argument("--no-resume", "--reset-state", "--no-cache", dest="reset_state", action="store_true",
                        help="discard this run's checkpoints and start afresh (also the way out "
                             "of a damaged journal)")
    resume.add_argument("--resume", dest="reset_state", action="store_false",
                        help="reuse what earlier runs stored (the default)")
    resume.add_argument("--dry-run", action="store_true",
                        help="read no data, upload nothing: list what would be uploaded and why; "
                             "exit 2 if anything would be, 0 if not")
    resume.add_argument("--skip-unreadable", action="store_true", default=None,
                        help="finish without files and directories that cannot be read, list "
                             "them and exit 3 (default: fail, after storing everything else)")
    resume.add_argument("--verify-content", action="store_true",
                        help="re-read files that look unchanged and compare their xxh3 digests, "
                             "to catch edits that keep size and mtime")
    prog = p.add_argument_group("progress")
    prog.add_argument("--progress", choices=MODES, metavar="MODE",
                      help="auto (default: a live display when stderr is a terminal), tty, json "
                           "(JSON lines at a fixed interval), batch (arv-put's lines), none")
    prog.add_argument("--batch-progress", dest="progress", action="store_const", const="batch",
                      help="arv-put's machine-readable progress lines")
    prog.add_argument("--no-progress", dest="progress", action="store_const", const="none",
                      help="no progress display")
    prog.add_argument("--progress-file", metavar="FILE",
                      help="append json/batch progress lines to FILE instead of stderr")
    out = p.add_argument_group("output")
    out.add_argument("--manifest-out", metavar="FILE", help="also write the manifest to FILE (atomically)")
    out.add_argument("--save-manifest", action="store_true",
                     help="also store the manifest's portable text as a block in the store, so "
                          "that ls/cat/get/verify can load it by its portable data hash")
    out.add_argument("--portable-data-hash", action="store_true",
                     help="print only the portable data hash")
    out.add_argument("--json", action="store_true",
                     help="print one JSON object: pdh, files, bytes, blocks, bytes_uploaded, seconds")
    add_collection_arguments(p)
    p.set_defaults(func=run)


def _temporary_beside(path: str) -> tuple[int, str]:
    """A new file next to ``path`` (same directory, so a rename replaces it atomically),
    open for writing, with the mode any new file gets (0666 less the umask): a
    manifest is not a secret (a signed locator is of use only with the token it was
    signed for), so it gets what a shell redirection would give it."""
    directory = os.path.dirname(os.path.abspath(path))
    for _ in range(100):
        tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", directory)


def prepare_manifest_out(path: str) -> None:
    """Before any work starts: make sure the manifest can be written to ``path``, found
    by trying (a file is created beside it and removed). Missing directories are
    created, as for the store and the state directory."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        if os.path.isdir(path):
            raise IsADirectoryError(errno.EISDIR, "it is a directory")
        try:
            os.makedirs(directory, exist_ok=True)
        except FileExistsError:  # a file where a directory should be
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)) from None
        fd, tmp = _temporary_beside(path)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        where = "" if isinstance(exc, IsADirectoryError) else f" in {directory}"
        raise IngestError(f"--manifest-out {path}: cannot write the manifest{where}: "
                          f"{exc.strerror or exc}") from None


def _write_atomically(path: str, manifest: ManifestText) -> None:
    """Write the manifest's file whole or not at all; a file it replaces keeps its mode."""
    tmp = ""
    try:
        fd, tmp = _temporary_beside(path)
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            with contextlib.suppress(FileNotFoundError):
                os.fchmod(f.fileno(), stat.S_IMODE(os.stat(path).st_mode))
            manifest.copy_to(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if tmp:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise IngestError(f"cannot write manifest to {path}: {exc.strerror or exc}") from None


SHOWN_CHANGES = 20


def _summary(result: PutResult, pdh: str) -> str:
    """The end of a run, on stderr in short lines (each under 80 columns)."""
    rate = result.bytes_uploaded / result.seconds if result.seconds > 0 else 0.0
    lines = [f"keep-ingest: {plural(result.files, 'file')}, {human_bytes(result.bytes)} in "
             f"{plural(result.blocks, 'block')}",
             f"  uploaded {human_bytes(result.bytes_uploaded)} ({plural(result.blocks_uploaded, 'block')}) "
             f"in {result.seconds:.2f} s ({human_bytes(rate)}/s)",
             f"  reused {human_bytes(result.bytes_reused)} "
             f"({plural(result.blocks - result.blocks_uploaded, 'block')})",
             f"  portable data hash {pdh}"]
    if result.files_rehashed:
        lines.insert(3, f"  {plural(result.files_rehashed, 'file')} touched but not changed: read, not uploaded")
    if result.bytes_reused and result.changed:
        items = list(result.changed.items())
        lines += [f"  uploaded {path} ({', '.join(reasons)})" for path, reasons in items[:SHOWN_CHANGES]]
        if result.changed_total > SHOWN_CHANGES:
            lines.append(f"  ... and {plural(result.changed_total - SHOWN_CHANGES, 'more file')} (see --json)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    # Imported when the command runs: keeps start-up cheap for every command.
    import workers  # noqa: F401  (local workers are forked from this process: they inherit it)
    from ingest.put import dry_run, run_put

    settings = settings_from(args, {
        "put.workers": (args.workers, "--workers"),
        "put.listen": (args.listen, "--listen"),
        "put.link_key": (args.link_key, "--link-key"),
        "put.worker_keys": (args.worker_keys, "--worker-keys"),
        "put.insecure_plaintext": (args.insecure_plaintext, "--insecure-plaintext-workers"),
        "put.chunk_size": (args.chunk_size, "--chunk-size"),
        "put.block_size": (args.block_size, "--block-size"),
        "put.exclude": (args.exclude, "--exclude"),
        "put.follow_links": (args.follow_links, "--follow-links/--no-follow-links"),
        "state.dir": (args.state_dir, "--state-dir"),
        "put.skip_unreadable": (args.skip_unreadable, "--skip-unreadable"),
        "put.progress": (args.progress, "--progress"),
        "put.progress_file": (args.progress_file, "--progress-file"),
        **collection_overrides(args),
    })
    saver = open_saver(args, settings)   # with a cluster: found now, before any worker starts
    if args.dry_run:
        return _report_dry_run(args, dry_run(settings, args.sources))
    if args.manifest_out:
        prepare_manifest_out(args.manifest_out)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with _progress_stream(settings) as stream:
            display = make_display(settings.put.progress, quiet=args.quiet > 0, stream=stream)
            result = run_put(settings, args.sources, verify_content=args.verify_content,
                             reset=args.reset_state, display=display, hooks=saver)
    finally:
        if saver:
            saver.client.close()
    try:
        return _report(args, settings, result, saver.saved if saver else None)
    finally:
        result.close()


def _report(args: argparse.Namespace, settings: Settings, result: PutResult,
            collection: SavedCollection | None) -> int:
    """Write the manifest where asked, say what the run did; the exit code."""
    from ingest.keep.factory import open_store
    from ingest.read.source import save_manifest

    pdh = collection.pdh if collection else result.pdh
    if args.manifest_out:
        _write_atomically(args.manifest_out, result.manifest)
    saved = None
    if args.save_manifest:
        store = open_store(settings.store_spec())
        try:
            saved = save_manifest(store, result.manifest)
        finally:
            store.close()
    if args.json:
        json.dump({"pdh": pdh, **_counters(result), "seconds": round(result.seconds, 3),
                   "store": settings.describe_store(), "state": result.state_dir,
                   "manifest_out": args.manifest_out, "manifest_locator": saved, "changed": _changed(result),
                   "changed_total": result.changed_total,
                   "collection": saved_json(collection),
                   "unreadable": [{"path": p, "reason": r} for p, r in sorted(result.unreadable.items())],
                   "skipped": [{"path": p, "reason": r} for p, r in result.skipped]},
                  sys.stdout)
        sys.stdout.write("\n")
    elif args.portable_data_hash:
        print(pdh)
    elif collection:
        print(collection.uuid)
    elif not args.manifest_out:
        result.manifest.copy_to(sys.stdout)
    if not args.quiet:
        print(_summary(result, pdh), file=sys.stderr)
        if saved:
            print(f"keep-ingest: manifest stored in Keep as {saved}", file=sys.stderr)
        if collection:
            print(describe_saved(collection), file=sys.stderr)
    if result.unreadable:
        listed = "\n  ".join(f"{p}: {r}" for p, r in sorted(result.unreadable.items()))
        print(f"keep-ingest: partial: left out {plural(len(result.unreadable), 'unreadable path')}:\n  {listed}",
              file=sys.stderr)
        return EXIT_PARTIAL
    return EXIT_OK


@contextlib.contextmanager
def _progress_stream(settings: Settings) -> Iterator[IO[str]]:
    """stderr, or the progress file opened for appending (its directory created when
    missing), before any work starts."""
    if not settings.put.progress_file:
        yield sys.stderr
        return
    path = os.path.expanduser(settings.put.progress_file)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)  # as for --manifest-out
        f = open(path, "a", encoding="utf-8")
    except OSError as exc:
        raise IngestError(f"cannot open progress file {path}: {exc.strerror}") from None
    with f:
        yield f


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM stops a run as Ctrl-C does: checkpoint, clean up, exit 130."""
    raise KeyboardInterrupt


def _counters(result: PutResult) -> dict[str, int]:
    return {"files": result.files, "bytes": result.bytes, "blocks": result.blocks,
            "blocks_uploaded": result.blocks_uploaded, "bytes_uploaded": result.bytes_uploaded,
            "bytes_reused": result.bytes_reused, "bytes_read": result.bytes_read,
            "files_rehashed": result.files_rehashed}


def _changed(result: PutResult) -> list[dict[str, object]]:
    return [{"path": path, "reasons": reasons} for path, reasons in result.changed.items()]


def _report_dry_run(args: argparse.Namespace, result: PutResult) -> int:
    """List what would be uploaded; exit 2 if anything would be (arv-put's convention)."""
    if args.json:
        json.dump({**_counters(result), "would_upload": _changed(result),
                   "would_upload_total": result.changed_total}, sys.stdout)
        sys.stdout.write("\n")
    else:
        for path, reasons in result.changed.items():
            print(f"{path}\t{', '.join(reasons)}")
        if result.changed_total > len(result.changed):
            print(f"keep-ingest: dry run: the first {len(result.changed):,} files are listed", file=sys.stderr)
    if not args.quiet:
        print(f"keep-ingest: dry run: {plural(result.changed_total, 'file')} in "
              f"{plural(result.blocks_uploaded, 'block')} "
              f"({human_bytes(result.bytes - result.bytes_reused)}) would be uploaded\n"
              f"  {human_bytes(result.bytes_reused)} already stored", file=sys.stderr)
    return EXIT_PENDING if result.blocks_uploaded else EXIT_OK
