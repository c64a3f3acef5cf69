"""The worker process: receive a block's chunks, hash them, store the block, reply."""

from workers.worker import run_worker

__all__ = ["run_worker"]
