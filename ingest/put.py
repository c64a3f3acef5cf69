"""One ``put`` run: walk, plan, reuse what is checkpointed, upload the rest, assemble.

The walk, the plan and the upload go on together: the coordinator asks for more of
the tree while few blocks wait for a worker, the packer places each batch of a
directory's files as the walk finds it, and each block, once closed, is either reused (its pieces, by name,
fingerprint and range, are in the journal) or handed to a worker. The manifest is
assembled on disk as blocks get their locators (ingest.assemble). Nothing is held per
file beyond the few blocks in flight, so memory does not grow with the tree.

Every run of the same sources, packing and destination shares a checkpoint journal
(see ingest.state). A block stored is journaled at once. A file that changes while
being read sends the run back to the walk (up to ``change_retries`` times): blocks
stored meanwhile stay reusable when their files did not change.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ingest import md5lanes
from ingest.assemble import ManifestAssembler, ManifestText
from ingest.config import Settings
from ingest.coordinator import FEED_ITEMS, BlockToStore, Coordinator
from ingest.errors import EXIT_INTERRUPTED, BlockCorrupt, BlockNotFound, ConfigError, IngestError, StoreError
from ingest.journal import JournalWriter
from ingest.keep.factory import open_store
from ingest.keep.store import BlockStore, StoredBlock
from ingest.plan import BlockPlan, Packer
from ingest.progress import Display, NoDisplay, Tracker
from ingest.reader import BlockReader, FileChanged, Unreadable, piece_sources, small_file_loops_in_c
from ingest.state import (
    JOURNAL_VERSION,
    Layout,
    ResumeIndex,
    RunIdentity,
    RunState,
    StoredRecord,
    block_key,
    block_layout,
    block_record,
    moved_pieces,
    packed_rows,
)
from ingest.walk import Excludes, Fingerprint, TreeDir, TreeWalk, check_sources
from ingest.walker import WalkProcess
from ingest.words import plural

log = logging.getLogger(__name__)

CHANGES_LISTED = 10_000   # files listed with the reasons they are uploaded; the rest are counted


@dataclass
class PutResult:
    """What a run produced (or, for a dry run, would do), for output and summary."""

    manifest: ManifestText | None   # the normalized text, on disk (none for a dry run)
    pdh: str                        # its portable data hash
    files: int
    bytes: int
    blocks: int
    blocks_uploaded: int
    bytes_uploaded: int
    bytes_reused: int
    bytes_read: int
    seconds: float
    files_rehashed: int = 0    # fingerprint moved, bytes as stored (read, not uploaded)
    changed: dict[str, list[str]] = field(default_factory=dict)  # path -> reasons it is uploaded (the first ones)
    changed_total: int = 0                                       # files uploaded, listed or not
    skipped: list[tuple[str, str]] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)     # left out (--skip-unreadable)
    state_dir: str = ""

    def close(self) -> None:
        """Remove the manifest's files."""
        if self.manifest is not None:
            self.manifest.close()


class RunHooks(Protocol):
    """What a caller adds to a run (ingest.save saves the collection through them)."""

    def stand_in(self, block: BlockPlan) -> str:
        """A locator for a block not stored yet, as long as the real one will be."""

    def planned(self, manifest: ManifestText, files: int, blocks: int) -> None:
        """The tree's manifest with stand-in locators, before anything is uploaded;
        raise to stop the run."""

    def finished(self, result: PutResult, journal: JournalWriter, index: ResumeIndex) -> None:
        """Every block is stored and journaled; the run still holds its lock."""


class _Changes:
    """The files of the blocks to upload, for saying why each is uploaded: the first
    CHANGES_LISTED of them kept, the rest counted."""

    def __init__(self) -> None:
        self.listed: list[tuple[str, Fingerprint, str]] = []   # (name, fingerprint, why if the file did not change)
        self.total = 0
        self._last = ""

    def add(self, block: BlockPlan, why: str, large: bool) -> None:
        for batch, start, stop, _, _ in block.runs:
            prefix, names = batch.prefix, batch.names
            if prefix + names[start] == self._last:     # a large file's next block
                continue
            self._last = prefix + names[stop - 1]
            self.total += stop - start
            # Unchanged, yet its block is to be stored: a large file keeps its blocks,
            # so that one was not stored yet (an interrupted run); a small file's
            # block was packed anew around it.
            why_listed = why or ("not stored yet" if large else "repacked")
            for i in range(start, min(stop, start + CHANGES_LISTED - len(self.listed))):
                self.listed.append((prefix + names[i], batch.fingerprint(i), why_listed))

    def reasons(self, previous: Callable[[set[str]], dict[str, tuple[int, int, int, int]]]) -> dict[str, list[str]]:
        """Path -> why it is uploaded, given what earlier runs recorded of some files."""
        before = previous({name for name, _, _ in self.listed}) if self.listed else {}
        reasons: dict[str, list[str]] = {}
        for name, fp, why in self.listed:
            old = before.get(name)
            if old is None:
                reasons[name] = ["new"]
                continue
            now = (fp.size, fp.mtime_ns, fp.ctime_ns, fp.inode)
            diff = [part for part, a, b in zip(("size", "mtime", "ctime", "inode"), old, now, strict=True) if a != b]
            reasons[name] = diff or [why]
        return reasons


def _walk(settings: Settings, sources: list[str], leave_out: dict[str, str], tracker: Tracker,
          resuming: bool) -> TreeWalk | WalkProcess:
    """The walk of a run. When blocks are journaled (a re-run, a resumed run), most are
    reused and the workers idle: the walk gets the second core, in a process of its
    own (a re-run of 1,000,000 unchanged files: 9.7 s -> 4.9 s). A first run needs both
    cores for the workers, and walks in the coordinator, which costs less CPU."""
    follow, exclude = settings.put.follow_links, settings.put.exclude
    if resuming:
        return WalkProcess(sources, follow, exclude, leave_out, on_progress=tracker.walk_progress)
    return TreeWalk(sources, follow, Excludes(exclude), leave_out, on_progress=tracker.walk_progress)


class _Run:
    """One attempt at the tree: walk and plan it, decide block by block what to reuse,
    hand the rest to the coordinator, assemble the manifest."""

    def __init__(self, settings: Settings, sources: list[str], index: ResumeIndex, leave_out: dict[str, str],
                 tracker: Tracker, spool_dir: str | None, verify: _ContentCheck | None = None,
                 stand_in: Callable[[BlockPlan], str] | None = None):
        self.settings = settings
        self.tracker = tracker
        tracker.walk_started(left_out=len(leave_out))
        self.leave_out = leave_out
        self.walk = _walk(settings, sources, leave_out, tracker, resuming=bool(index.blocks))
        self._items = iter(self.walk)
        self.packer = Packer(settings.put.block_size)
        self.assembler = ManifestAssembler(spool_dir) if spool_dir else None
        self.reader = BlockReader(settings.put.chunk_size)
        self.index = index
        self.verify = verify
        self.stand_in = stand_in
        self.live_keys: set[bytes] = set()
        self._layouts: dict[int, Layout] = {}     # block index -> its layout, until stored
        self.journal: JournalWriter | None = None           # while it uploads
        self.changes = _Changes()
        self.files = self.bytes = 0
        self.files_rehashed = 0     # files whose fingerprint moved, their bytes found as stored
        self.blocks_uploaded = self.bytes_uploaded = self.bytes_reused = self.bytes_read_by_workers = 0
        self._walking = True

    def feed(self, limit: int) -> list[BlockToStore] | None:
        """Walk about ``limit`` more files (a batch at a time); the blocks among them to
        upload, or None once the walk is over (and every block decided)."""
        if not self._walking:
            return None
        todo: list[BlockToStore] = []
        assembler, packer = self.assembler, self.packer
        for item in self._items:
            if isinstance(item, TreeDir):
                if assembler is not None:
                    assembler.add_dir(item.name)
                limit -= 1
            else:
                placed, closed = packer.add(item)
                if assembler is not None:
                    assembler.add_files(item.directory, item.names, placed)
                for block in closed:
                    self._decide(block, todo)
                limit -= len(item.names)
            if limit <= 0:
                return todo
        for block in packer.finish():
            self._decide(block, todo)
        self._walking = False
        self.files, self.bytes = self.walk.files_found, self.walk.bytes_found
        self.tracker.walked(self.files, self.bytes, packer.block_count, packer.empty_files)
        return todo

    def walk_all(self) -> int:
        """Walk to the end without uploading (a dry run, a stand-in manifest); the
        number of blocks to upload."""
        count = 0
        while (blocks := self.feed(FEED_ITEMS)) is not None:
            count += len(blocks)
        return count

    def _decide(self, block: BlockPlan, todo: list[BlockToStore]) -> None:
        """Reuse a closed block (its locator goes to the manifest) or add it to ``todo``."""
        self.tracker.tick()
        if self.stand_in is not None:
            self._located(block, self.stand_in(block))
            return
        rows = packed_rows(block)
        key = block_key(rows)
        self.live_keys.add(key)
        record = self.index.blocks.get(key)
        layout = block_layout(block)
        if record is None and self.journal is not None:
            record = self._same_bytes(block, rows, layout)
        why = self._unusable(block, record)
        if why is None:
            self._located(block, record.locator)
            self.bytes_reused += block.size
            self.tracker.block_done(block.size, block.ends, reused=True)
            return
        todo.append(BlockToStore.of(block, rows))
        self._layouts[block.index] = layout
        self.blocks_uploaded += 1
        self.changes.add(block, why, self.packer.is_large(block.first_size()))

    def _same_bytes(self, block: BlockPlan, rows: bytes, layout: Layout) -> StoredRecord | None:
        """A stored block of the same files in the same places, if those of its files
        whose fingerprints moved (touched, copied over, restored) still hold the bytes
        it stored (their xxh3 digests, read now): journaled again under the new
        fingerprints, to be reused. None when there is none, when --verify-content
        checks every block anyway, or when what moved is over a quarter of the block
        (reading that costs about what storing the block does). A small file is one
        piece; a large file's block is one piece too, so it never qualifies."""
        earlier = self.index.layouts.get(layout)
        if earlier is None or self.verify is not None or self._expiring(earlier):
            return None
        then_rows, stored = earlier.rows_and_digests()
        moved_lengths = moved_pieces(rows, then_rows)
        if not moved_lengths or len(stored) != block.count:
            return None
        moved = [i for i, _ in moved_lengths]
        moved_bytes = sum(length for _, length in moved_lengths)
        if 4 * moved_bytes > block.size:
            return None
        pieces = block.pieces_at(moved)
        try:
            now = self.reader.digests(moved_bytes, piece_sources(pieces))
        except (Unreadable, FileChanged):
            return None          # the upload will say so, or walk again
        if now != [stored[i] for i in moved]:
            return None
        record = block_record(rows, earlier.locator, stored, layout)
        self.index.add(record, self.journal.append(record))
        self.files_rehashed += len(pieces)
        return self.index.blocks[record["key"]]

    def _expiring(self, record: StoredRecord) -> bool:
        margin = self.settings.put.signature_margin
        return record.expiry is not None and record.expiry < time.time() + margin

    def _unusable(self, block: BlockPlan, record: StoredRecord | None) -> str | None:
        """Why a journaled block cannot be reused ("" when it is not journaled), or None."""
        if record is None:
            return ""
        if self._expiring(record):
            return "signature expiring"
        if self.verify is not None:
            return self.verify.problem(block, record, self.reader)
        return None

    def _located(self, block: BlockPlan | BlockToStore, locator: str) -> None:
        if self.assembler is not None:
            self.assembler.block_located(block.index, locator, block.size)

    def stored(self, journal: JournalWriter) -> Callable[[BlockToStore, StoredBlock, list[int]], None]:
        """What to do as the store confirms a block: journal it, locate it."""
        def on_stored(block: BlockToStore, stored: StoredBlock, digests: list[int]) -> None:
            record = block_record(block.rows, stored.locator, digests, self._layouts.pop(block.index))
            self.index.add(record, journal.append(record))
            self._located(block, stored.locator)
            self.bytes_uploaded += block.size
            self.tracker.block_done(block.size, block.ends, reused=False)
        return on_stored

    def upload(self, coordinator: Coordinator, journal: JournalWriter) -> dict[str, str]:
        """Walk the tree and store its blocks through the coordinator's workers;
        return the files that could not be read."""
        self.journal = journal
        coordinator.run(self.feed, self.reader, self.stored(journal), self.tracker)
        self.bytes_read_by_workers = coordinator.bytes_read_by_workers
        return coordinator.unreadable

    def unreadable(self) -> dict[str, str]:
        return {**self.leave_out, **self.walk.unreadable}

    def discard(self) -> None:
        self._items.close()       # stops the walk process, if it still runs
        if self.assembler is not None:
            self.assembler.discard()

    def result(self, started: float, state_dir: str,
               previous: Callable[[set[str]], dict[str, tuple[int, int, int, int]]]) -> PutResult:
        manifest = self.assembler.finish() if self.assembler is not None else None
        return PutResult(
            manifest, manifest.pdh if manifest else "",
            files=self.files, bytes=self.bytes, blocks=self.packer.block_count,
            blocks_uploaded=self.blocks_uploaded, bytes_uploaded=self.bytes_uploaded,
            bytes_reused=self.bytes_reused, bytes_read=self.reader.bytes_read + self.bytes_read_by_workers,
            seconds=time.monotonic() - started, files_rehashed=self.files_rehashed,
            changed=self.changes.reasons(previous),
            changed_total=self.changes.total, skipped=self.walk.skipped, unreadable=self.unreadable(),
            state_dir=state_dir)


class _ContentCheck:
    """--verify-content: a journaled block is reused only if its files still hold the
    bytes recorded (their xxh3 digests) and the store still holds it, sound."""

    REASONS = {BlockNotFound: "missing from the store", BlockCorrupt: "damaged in the store"}

    def __init__(self, settings: Settings):
        self.store: BlockStore = open_store(settings.store_spec(), write=False)
        self.problems = 0

    def problem(self, block: BlockPlan, record: StoredRecord, reader: BlockReader) -> str | None:
        if reader.digests(block.size, piece_sources(block.pieces)) != record.digests:
            return "content"
        try:
            self.store.check_block(record.locator)
        except StoreError as exc:
            self.problems += 1
            if self.problems <= SHOWN_STORE_PROBLEMS:
                log.warning("%s; storing it again", exc)
            return self.REASONS.get(type(exc), "unconfirmed by the store")
        return None

    def close(self) -> None:
        if self.problems > SHOWN_STORE_PROBLEMS:
            log.warning("... and %d more blocks to store again", self.problems - SHOWN_STORE_PROBLEMS)
        self.store.close()


SHOWN_STORE_PROBLEMS = 10


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
    return {"t": "run", "v": JOURNAL_VERSION, "sources": list(identity.sources), "block_size": identity.block_size,
            "store": identity.store, "started": time.time()}


def dry_run(settings: Settings, sources: list[str]) -> PutResult:
    """What a run would upload and why, reading no file data and taking no lock."""
    started = time.monotonic()
    state = RunState(settings.state_dir, RunIdentity.of(settings, sources))
    index = state.load()[0] if settings.put.resume else ResumeIndex()
    run = _Run(settings, sources, index, leave_out={}, tracker=Tracker(NoDisplay()), spool_dir=None)
    run.walk_all()
    return run.result(started, state.dir, index.previous_fingerprints)


def run_put(settings: Settings, sources: list[str], verify_content: bool = False,
            reset: bool = False, display: Display | None = None, hooks: RunHooks | None = None) -> PutResult:
    """Upload the sources, resuming from the run's journal; return the result (whose
    manifest files the caller removes with ``close``).

    ``display`` shows progress (see ingest.progress); it is closed before returning.
    ``hooks`` hear of the tree's manifest before anything is uploaded, and of the
    result once everything is stored.
    """
    display = display or NoDisplay()
    started = time.monotonic()
    _log_engines()
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
        verify = _ContentCheck(settings) if verify_content else None
        run = None
        try:
            journal.append(_run_record(identity))
            run = _attempt(settings, sources, index, verify, journal, tracker, hooks, state.dir)
            tracker.close()
            result = run.result(started, state.dir, index.previous_fingerprints)
            journal.append({"t": "done", "pdh": result.pdh,
                            "files": result.files, "bytes": result.bytes, "finished": time.time()})
            if hooks:
                hooks.finished(result, journal, index)
        except KeyboardInterrupt:
            _discard(run)
            raise IngestError(f"interrupted; every block stored so far is checkpointed in {state.dir}; "
                              "run the same command again to resume", EXIT_INTERRUPTED) from None
        except IngestError as exc:
            _discard(run)
            # `status` tells a failed run from an interrupted one by this record.
            with contextlib.suppress(OSError, IngestError):
                journal.append({"t": "failed", "error": str(exc), "exit": exc.exit_code, "at": time.time()})
            raise
        finally:
            journal.close()
            if verify is not None:
                verify.close()
            display.close_quietly()
        state.compact(run.live_keys, index)
        return result
    finally:
        state.release()


def _discard(run: _Run | None) -> None:
    if run is not None:
        run.discard()


def _log_engines() -> None:
    """Say (in -v) how blocks are hashed, and whether the per-file loops run in C;
    ConfigError for a bad ``$KEEP_INGEST_MD5``, before any work starts (the local
    workers inherit it)."""
    engine = md5lanes.engine()
    if md5lanes.NOT_BUILT and engine.name == "hashlib":
        log.info("warning: MD5 by hashlib, one block at a time: %s; reinstall with a C compiler "
                 "to hash several blocks at once", md5lanes.NOT_BUILT)
    else:
        log.info("MD5: %s, %s", engine.describe(), engine.origin)
    if not small_file_loops_in_c():
        log.info("warning: the walk and the reader loop over small files in Python (about 1.25x the CPU "
                 "time): the ingest._smallfiles extension is not built; reinstall with a C compiler")


def _attempt(settings: Settings, sources: list[str], index: ResumeIndex, verify: _ContentCheck | None,
             journal: JournalWriter, tracker: Tracker, hooks: RunHooks | None, spool_dir: str) -> _Run:
    """Walk and upload; walk again when files change under the reader, or to leave out
    unreadable files (--skip-unreadable). Without that option an unreadable file fails
    the run once everything else is stored and checkpointed."""
    tries = settings.put.change_retries + 1
    changes = 0
    leave_out: dict[str, str] = {}
    while True:
        if hooks:
            _check_planned(settings, sources, leave_out, hooks, spool_dir)
        run = None
        try:
            # Workers start first: they are forked small, and start up during the walk.
            with Coordinator(settings) as coordinator:
                run = _Run(settings, sources, index, leave_out, tracker, spool_dir, verify)
                unreadable = {**run.upload(coordinator, journal), **run.walk.unreadable}
            log.info("%d files, %d bytes in %d blocks: %d uploaded to %s, %d reused",
                     run.files, run.bytes, run.packer.block_count, run.blocks_uploaded,
                     settings.describe_store(), run.packer.block_count - run.blocks_uploaded)
        except FileChanged as exc:
            _discard(run)
            changes += 1
            if changes == tries:
                raise IngestError(f"{exc}; still changing after {tries} attempts, giving up "
                                  "(blocks stored so far are checkpointed)") from None
            log.warning("%s; walking the tree again (attempt %d of %d)", exc, changes + 1, tries)
            continue
        except BaseException:
            _discard(run)
            raise
        if not unreadable:
            return run
        if not settings.put.skip_unreadable:
            run.discard()
            listed = "\n  ".join(f"{path}: {why}" for path, why in sorted(unreadable.items()))
            raise IngestError(f"{plural(len(unreadable), 'path')} could not be read; everything else is "
                              f"stored and checkpointed. Fix them and run again, or use "
                              f"--skip-unreadable to finish without them:\n  {listed}")
        new = {p: why for p, why in unreadable.items() if p not in leave_out}
        if not new:
            return run
        run.discard()
        leave_out.update(new)
        log.warning("leaving out %s and packing the tree again", plural(len(new), "unreadable path"))


def _check_planned(settings: Settings, sources: list[str], leave_out: dict[str, str], hooks: RunHooks,
                   spool_dir: str) -> None:
    """Walk the tree once without uploading, for the hooks to see its manifest with
    stand-in locators (a save refuses one over the cluster's request limit)."""
    run = _Run(settings, sources, ResumeIndex(), leave_out, Tracker(NoDisplay()), spool_dir,
               stand_in=hooks.stand_in)
    try:
        run.walk_all()
        manifest = run.assembler.finish()
    except BaseException:
        run.discard()
        raise
    try:
        hooks.planned(manifest, run.files, run.packer.block_count)
    finally:
        manifest.close()
