"""Pausing Python's cyclic garbage collector while building many per-file objects."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Pause the cyclic collector for a block of code.

    Building per-file records (the walk, the manifest) makes no reference cycles, but
    its allocation bursts trigger full collections that rescan everything built so far:
    for 100,000 files that is a fifth of the walk and nearly half of the assembly.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
