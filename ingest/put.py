"""One ``put`` run: walk, plan, reuse what is checkpointed, dispatch the rest, assemble.

Every run of the same sources, packing and destination shares a checkpoint journal
(see ingest.state). A block whose pieces (file names, fingerprints and ranges) are
in the journal is reused without reading or uploading a byte; every other block is
read, stored and journaled. A file that changes while being read sends the run back
to the walk (up to ``change_retries`` times): blocks stored meanwhile stay reusable
when their files did not change.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from ingest import md5lanes
from ingest.config import Settings
from ingest.coordinator import Coordinator
from ingest.errors import EXIT_INTERRUPTED, BlockCorrupt, BlockNotFound, ConfigError, IngestError, StoreError
from ingest.gcpause import collector_paused
from ingest.journal import JournalWriter
from ingest.keep.factory import open_store
from ingest.keep.store import StoredBlock
from ingest.manifest import Manifest, Segment
from ingest.plan import Plan
from ingest.progress import Display, NoDisplay, Tracker
from ingest.reader import BlockReader, FileChanged, piece_sources
from ingest.state import ResumeIndex, RunIdentity, RunState, StoredRecord, block_key, block_record, piece_rows
from ingest.walk import Excludes, WalkResult, check_sources, walk_sources
from ingest.words import plural

log = logging.getLogger(__name__)


@dataclass
class PutResult:
    """What a run produced (or, for a dry run, would do), for output and summary."""

    manifest: Manifest
    text: str                    # the manifest's normalized text
    pdh: str                     # its portable data hash
    files: int
    bytes: int
    blocks: int
    blocks_uploaded: int
    bytes_uploaded: int
    bytes_reused: int
    bytes_read: int
    seconds: float
    changed: dict[str, list[str]] = field(default_factory=dict)  # path -> reasons it is uploaded
    skipped: list[tuple[str, str]] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)     # left out (--skip-unreadable)
    state_dir: str = ""


class RunHooks(Protocol):
    """What a caller adds to a run (ingest.save saves the collection through them)."""

    def planned(self, walk: WalkResult, plan: Plan) -> None:
        """The tree is planned and nothing is uploaded yet; raise to stop the run."""

    def finished(self, result: PutResult, journal: JournalWriter, index: ResumeIndex) -> None:
        """Every block is stored and journaled; the run still holds its lock."""


def build_manifest(walk: WalkResult, plan: Plan, locators: list[str]) -> Manifest:
    """The manifest of a walked tree, given the locator of every planned block."""
    manifest = Manifest()
    with collector_paused():
        for directory in walk.directories:
            manifest.add_dir(directory)
        for index, source in enumerate(walk.files):
            manifest.add_file(source.name, [
                Segment(locators[block], plan.block_size_of(block), offset, length)
                for block, offset, length in plan.placement(index).parts])
    return manifest


def _file_reasons(walk: WalkResult, plan: Plan, todo: list[int], index: ResumeIndex,
                  block_reason: dict[int, str]) -> dict[str, list[str]]:
    """Why each file of the blocks to upload is uploaded."""
    reasons: dict[str, list[str]] = {}
    names = {walk.files[p.file_index].name for b in todo for p in plan.block(b).pieces}
    previous = index.previous_fingerprints(names)
    for b in todo:
        for piece in plan.block(b).pieces:
            f = walk.files[piece.file_index]
            if f.name in reasons:
                continue
            before = previous.get(f.name)
            if before is None:
                reasons[f.name] = ["new"]
                continue
            fp = f.fingerprint
            now = (fp.size, fp.mtime_ns, fp.ctime_ns, fp.inode)
            diff = [name for name, old, new in zip(("size", "mtime", "ctime", "inode"), before, now, strict=True)
                    if old != new]
            # Unchanged, yet its block is to be stored: a large file keeps its blocks,
            # so that one was not stored yet (an interrupted run); a small file's
            # block was packed anew around it.
            unstored = "not stored yet" if plan.is_large(f.size) else "repacked"
            reasons[f.name] = diff or [block_reason.get(b, unstored)]
    return reasons


class _Run:
    """One attempt at the tree: plan it, decide what to reuse, upload the rest."""

    def __init__(self, settings: Settings, sources: list[str], index: ResumeIndex,
                 verify_content: bool, leave_out: dict[str, str], tracker: Tracker):
        self.settings = settings
        self.tracker = tracker
        tracker.walk_started(left_out=len(leave_out))
        self.walk = walk_sources(sources, settings.put.follow_links, Excludes(settings.put.exclude),
                                 leave_out, on_progress=tracker.walk_progress)
        self.unreadable = {**leave_out, **self.walk.unreadable}
        self.plan = Plan([f.size for f in self.walk.files], settings.put.block_size)
        tracker.planned(len(self.walk.files), self.walk.total_bytes, self._files_ending())
        # The file list and plan live until the end of the run: move them out of the
        # collector's sight (fewer full passes).
        gc.freeze()
        self.reader = BlockReader(settings.put.chunk_size)
        self.index = index
        self.locators = [""] * self.plan.block_count
        self.keys = [block_key(piece_rows(self.plan.block(b), self.walk.files))
                     for b in range(self.plan.block_count)]
        self.todo: list[int] = []
        self.block_reason: dict[int, str] = {}
        self.bytes_reused = self.bytes_uploaded = 0
        self.bytes_read_by_workers = 0
        self._decide(verify_content)
        self.changed = _file_reasons(self.walk, self.plan, self.todo, index, self.block_reason)
        todo = set(self.todo)
        for b in range(self.plan.block_count):
            if b not in todo:
                self.tracker.block_done(b, self.plan.block_size_of(b), reused=True)

    def _files_ending(self) -> list[int]:
        """Per block, how many files have their last byte in it."""
        ending = [0] * self.plan.block_count
        for i in range(len(self.walk.files)):
            parts = self.plan.placement(i).parts
            if parts:
                ending[parts[-1][0]] += 1
        return ending

    def _reusable(self, b: int, record: StoredRecord | None, verify_content: bool) -> bool:
        if record is None:
            return False
        margin = self.settings.put.signature_margin
        if record.expiry is not None and record.expiry < time.time() + margin:
            self.block_reason[b] = "signature expiring"
            return False
        if verify_content:
            block = self.plan.block(b)
            if self.reader.digests(block.size, piece_sources(block, self.walk.files)) != record.digests:
                self.block_reason[b] = "content"
                return False
        return True

    def _decide(self, verify_content: bool) -> None:
        reusable: dict[int, str] = {}
        for b, key in enumerate(self.keys):
            self.tracker.tick()
            record = self.index.blocks.get(key)
            if self._reusable(b, record, verify_content):
                reusable[b] = record.locator
            else:
                self.todo.append(b)
        if verify_content:
            for b, why in _not_in_store(self.settings, reusable).items():
                del reusable[b]
                self.block_reason[b] = why
                self.todo.append(b)
            self.todo.sort()
        for b, locator in reusable.items():
            self.locators[b] = locator
            self.bytes_reused += self.plan.block_size_of(b)

    def upload(self, coordinator: Coordinator, journal: JournalWriter) -> dict[str, str]:
        """Store the blocks to upload through the coordinator's workers; return the
        files that could not be read."""
        def on_stored(b: int, stored: StoredBlock, digests: list[int]) -> None:
            record = block_record(piece_rows(self.plan.block(b), self.walk.files), stored.locator, digests)
            journal.append(record)
            self.index.add(record)
            self.locators[b] = stored.locator
            self.bytes_uploaded += self.plan.block_size_of(b)
            self.tracker.block_done(b, self.plan.block_size_of(b), reused=False)

        self.tracker.uploading()
        coordinator.run(self.plan, self.walk.files, self.reader, self.todo, on_stored, self.tracker)
        self.bytes_read_by_workers = coordinator.bytes_read_by_workers
        return coordinator.unreadable

    def result(self, started: float, state_dir: str, with_manifest: bool = True) -> PutResult:
        manifest = build_manifest(self.walk, self.plan, self.locators) if with_manifest else Manifest()
        return PutResult(
            manifest, *manifest.text_and_pdh(),
            files=len(self.walk.files), bytes=self.walk.total_bytes, blocks=self.plan.block_count,
            blocks_uploaded=len(self.todo), bytes_uploaded=self.bytes_uploaded,
            bytes_reused=self.bytes_reused, bytes_read=self.reader.bytes_read + self.bytes_read_by_workers,
            seconds=time.monotonic() - started, changed=self.changed, skipped=self.walk.skipped,
            unreadable=self.unreadable, state_dir=state_dir)


STORE_CHECKS = 8          # reused blocks checked in the store at once (--verify-content)
SHOWN_STORE_PROBLEMS = 10


def _not_in_store(settings: Settings, blocks: dict[int, str]) -> dict[int, str]:
    """--verify-content: the blocks (index -> locator) that are no longer in the store
    or no longer sound there, each with the reason it is stored again."""
    reasons = {BlockNotFound: "missing from the store", BlockCorrupt: "damaged in the store"}
    store = open_store(settings.store_spec(), write=False)
    try:
        def check(locator: str) -> StoreError | None:
            try:
                store.check_block(locator)
            except StoreError as exc:
                return exc
            return None

        with ThreadPoolExecutor(STORE_CHECKS, thread_name_prefix="store-check") as pool:
            unique = list(dict.fromkeys(blocks.values()))
            problems = {loc: exc for loc, exc in zip(unique, pool.map(check, unique), strict=True) if exc}
    finally:
        store.close()
    for exc in list(problems.values())[:SHOWN_STORE_PROBLEMS]:
        log.warning("%s; storing it again", exc)
    if len(problems) > SHOWN_STORE_PROBLEMS:
        log.warning("... and %d more blocks to store again", len(problems) - SHOWN_STORE_PROBLEMS)
    return {b: reasons.get(type(problems[loc]), "unconfirmed by the store")
            for b, loc in blocks.items() if loc in problems}


def check_store(settings: Settings) -> None:
    """Fail before any work starts when the store cannot be used: a directory store
    that cannot be created or written, Keep services none of which answer, or fewer
    writable services (that answer) than the copies asked for."""
    store = open_store(settings.store_spec())
    try:
        down = store.unreachable()
        can_hold = None if len(down) == len(settings.store.services) else store.max_replicas(down)
        writable = len(store.writable_services()) if settings.store.type == "keep" else 1
    finally:
        store.close()
    want = settings.store.replication if settings.store.type == "keep" else 1
    services = settings.origin("store.services")
    listed = "; ".join(f"{url}: {error}" for url, error in down.items())
    if down and len(down) == len(settings.store.services):
        raise StoreError(f"no Keep service answers ({services}): {listed}")
    if can_hold is not None and can_hold < want:
        if down:
            raise StoreError(f"only {writable - len(down)} of {writable} writable Keep services answer, and they "
                             f"can hold {can_hold} of the {want} copies asked for (replication, "
                             f"{settings.origin('store.replication')}): {listed}")
        raise ConfigError(
            f"replication {want} ({settings.origin('store.replication')}) needs {want} copies, but the "
            f"writable Keep services given ({services}) can hold {can_hold}: lower it with --replication "
            f"{max(can_hold, 1)} (or store.replication in the profile), or add services (--keep URL, repeatable)")
    if down:
        log.warning("some Keep services do not answer (%s), the others will take their blocks: %s",
                    services, listed)


def _run_record(identity: RunIdentity) -> dict[str, Any]:
    return {"t": "run", "v": 1, "sources": list(identity.sources), "block_size": identity.block_size,
            "store": identity.store, "started": time.time()}


def dry_run(settings: Settings, sources: list[str]) -> PutResult:
    """What a run would upload and why, reading no file data and taking no lock."""
    started = time.monotonic()
    state = RunState(settings.state_dir, RunIdentity.of(settings, sources))
    index = state.load()[0] if settings.put.resume else ResumeIndex()
    run = _Run(settings, sources, index, verify_content=False, leave_out={}, tracker=Tracker(NoDisplay()))
    return run.result(started, state.dir, with_manifest=False)


def run_put(settings: Settings, sources: list[str], verify_content: bool = False,
            reset: bool = False, display: Display | None = None, hooks: RunHooks | None = None) -> PutResult:
    """Upload the sources, resuming from the run's journal; return the result.

    ``display`` shows progress (see ingest.progress); it is closed before returning.
    ``hooks`` are called once the tree is planned and once everything is stored.
    """
    display = display or NoDisplay()
    started = time.monotonic()
    _log_md5_engine()
    check_sources(sources, settings.put.follow_links)
    identity = RunIdentity.of(settings, sources)
    state = RunState(settings.state_dir, identity)
    state.acquire()
    try:
        if reset or not settings.put.resume:
            state.reset()
        index, valid = state.load()
        check_store(settings)
        tracker = Tracker(display, settings.put.progress_interval, started)
        journal = state.open_writer(valid)
        try:
            journal.append(_run_record(identity))
            run = _attempt(settings, sources, index, verify_content, journal, tracker, hooks)
            tracker.close()
            result = run.result(started, state.dir)
            journal.append({"t": "done", "pdh": result.pdh,
                            "files": result.files, "bytes": result.bytes, "finished": time.time()})
            if hooks:
                hooks.finished(result, journal, index)
        except KeyboardInterrupt:
            raise IngestError(f"interrupted; every block stored so far is checkpointed in {state.dir}; "
                              "run the same command again to resume", EXIT_INTERRUPTED) from None
        except IngestError as exc:
            # `status` tells a failed run from an interrupted one by this record.
            with contextlib.suppress(OSError, IngestError):
                journal.append({"t": "failed", "error": str(exc), "exit": exc.exit_code, "at": time.time()})
            raise
        finally:
            journal.close()
            display.close_quietly()
        state.compact(set(run.keys), index)
        return result
    finally:
        state.release()


def _log_md5_engine() -> None:
    """Say (in -v) how blocks are hashed; ConfigError for a bad ``$KEEP_INGEST_MD5``,
    before any work starts (the local workers inherit it)."""
    engine = md5lanes.engine()
    if md5lanes.NOT_BUILT and engine.name == "hashlib":
        log.info("warning: MD5 by hashlib, one block at a time: %s; reinstall with a C compiler "
                 "to hash several blocks at once", md5lanes.NOT_BUILT)
    else:
        log.info("MD5: %s, %s", engine.describe(), engine.origin)


def _attempt(settings: Settings, sources: list[str], index: ResumeIndex, verify_content: bool,
             journal: JournalWriter, tracker: Tracker, hooks: RunHooks | None) -> _Run:
    """Walk and upload; walk again when files change under the reader, or to leave out
    unreadable files (--skip-unreadable). Without that option an unreadable file fails
    the run once everything else is stored and checkpointed."""
    tries = settings.put.change_retries + 1
    changes = 0
    leave_out: dict[str, str] = {}
    while True:
        try:
            # Workers start first: they are forked small, and start up during the walk.
            with Coordinator(settings) as coordinator:
                run = _Run(settings, sources, index, verify_content, leave_out, tracker)
                if hooks:
                    hooks.planned(run.walk, run.plan)
                log.info("%d files, %d bytes in %d blocks: %d to upload to %s, %d reused",
                         len(run.walk.files), run.walk.total_bytes, run.plan.block_count, len(run.todo),
                         settings.describe_store(), run.plan.block_count - len(run.todo))
                unreadable = {**run.walk.unreadable, **run.upload(coordinator, journal)}
        except FileChanged as exc:
            changes += 1
            if changes == tries:
                raise IngestError(f"{exc}; still changing after {tries} attempts, giving up "
                                  "(blocks stored so far are checkpointed)") from None
            log.warning("%s; walking the tree again (attempt %d of %d)", exc, changes + 1, tries)
            continue
        if not unreadable:
            return run
        if not settings.put.skip_unreadable:
            listed = "\n  ".join(f"{path}: {why}" for path, why in sorted(unreadable.items()))
            raise IngestError(f"{plural(len(unreadable), 'path')} could not be read; everything else is "
                              f"stored and checkpointed. Fix them and run again, or use "
                              f"--skip-unreadable to finish without them:\n  {listed}")
        new = {p: why for p, why in unreadable.items() if p not in leave_out}
        if not new:
            return run
        leave_out.update(new)
        log.warning("leaving out %s and packing the tree again", plural(len(new), "unreadable path"))
