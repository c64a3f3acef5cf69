"""Keep: locators, the block store interface and its implementations."""

from ingest.keep.store import BlockStore, BlockWriter, StoredBlock, open_store

__all__ = ["BlockStore", "BlockWriter", "StoredBlock", "open_store"]
