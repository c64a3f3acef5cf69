"""One ``put`` run: walk, plan, dispatch to workers, assemble the manifest."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from ingest.config import Settings
from ingest.coordinator import Coordinator
from ingest.keep.store import StoredBlock, open_store
from ingest.manifest import Manifest, Segment
from ingest.plan import Plan
from ingest.reader import BlockReader
from ingest.walk import Excludes, WalkResult, walk_sources

log = logging.getLogger(__name__)


@dataclass
class PutResult:
    """What a finished run produced, for the manifest output and the summary."""

    manifest: Manifest
    files: int
    bytes: int
    blocks: int
    bytes_uploaded: int
    seconds: float
    skipped: list[tuple[str, str]] = field(default_factory=list)


def build_manifest(walk: WalkResult, plan: Plan, locators: list[str]) -> Manifest:
    """The manifest of a walked tree, given the locator of every planned block."""
    manifest = Manifest()
    for directory in walk.directories:
        manifest.add_dir(directory)
    for index, source in enumerate(walk.files):
        manifest.add_file(source.name, [
            Segment(locators[block], plan.block_size_of(block), offset, length)
            for block, offset, length in plan.placement(index).parts])
    return manifest


def run_put(settings: Settings, sources: list[str]) -> PutResult:
    """Upload the sources into the configured store and return the result."""
    started = time.monotonic()
    walk = walk_sources(sources, settings.put.follow_links, Excludes(settings.put.exclude))
    plan = Plan([f.size for f in walk.files], settings.put.block_size)
    log.info("%d files, %d bytes in %d blocks to store in %s",
             len(walk.files), walk.total_bytes, plan.block_count, settings.describe_store())
    # Open the store once here so that a bad store fails before any worker starts.
    open_store(settings.store_spec()).close()

    locators: list[str] = [""] * plan.block_count
    uploaded = 0

    def on_stored(index: int, stored: StoredBlock) -> None:
        nonlocal uploaded
        locators[index] = stored.locator
        uploaded += plan.block_size_of(index)

    reader = BlockReader(walk.files, settings.put.chunk_size)
    Coordinator(settings, plan, reader, on_stored).run(list(range(plan.block_count)))
    manifest = build_manifest(walk, plan, locators)
    return PutResult(manifest, files=len(walk.files), bytes=walk.total_bytes,
                     blocks=plan.block_count, bytes_uploaded=uploaded,
                     seconds=time.monotonic() - started, skipped=walk.skipped)
