"""One file's bytes to a binary stream, block by block.

The next block is fetched by a helper thread while the current one is written, so
at most two blocks (2 x 64 MiB) are in memory, whatever the file's size.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO

from ingest.errors import IngestError
from ingest.keep.store import BlockStore
from ingest.manifest import Segment
from ingest.words import quoted


def _runs(segments: list[Segment]) -> list[tuple[str, list[Segment]]]:
    """Consecutive segments of one block grouped, so each run fetches its block once."""
    runs: list[tuple[str, list[Segment]]] = []
    for seg in segments:
        if runs and runs[-1][0] == seg.locator:
            runs[-1][1].append(seg)
        else:
            runs.append((seg.locator, [seg]))
    return runs


def stream_file(store: BlockStore, segments: list[Segment], out: BinaryIO, name: str = "") -> int:
    """Write the file made of ``segments`` to ``out``; returns the bytes written.

    A block that is missing or corrupt raises the store's error, with ``name`` added.
    """
    runs = _runs(segments)
    written = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cat-readahead") as readahead:
        nxt: Future | None = readahead.submit(store.get, runs[0][0]) if runs else None
        try:
            for k, (_locator, segs) in enumerate(runs):
                assert nxt is not None
                try:
                    data = nxt.result()
                except IngestError as exc:
                    if not name:
                        raise
                    raise type(exc)(f"{exc} (reading {quoted(name)})", exc.exit_code) from None
                nxt = readahead.submit(store.get, runs[k + 1][0]) if k + 1 < len(runs) else None
                view = memoryview(data)
                for seg in segs:
                    out.write(view[seg.offset:seg.offset + seg.length])
                    written += seg.length
                del view, data
        finally:
            if nxt is not None:
                nxt.cancel()
    return written
