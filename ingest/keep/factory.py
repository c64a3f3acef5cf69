"""Build a block store from its spec: the one place that knows every store type.

Kept apart from the interface (:mod:`ingest.keep.store`), which every store
implementation imports; an implementation is imported only when a spec asks for
it, so a run into a directory store never loads the HTTP client.
"""

from __future__ import annotations

from typing import Any

from ingest.keep.store import BlockStore


def open_store(spec: dict[str, Any], write: bool = True) -> BlockStore:
    """Build the store a spec describes; ``write=False`` for a reader, which never
    creates anything (a directory store that does not exist is an error, and one
    that is read-only is fine).

    * ``{"type": "directory", "path": DIR, "fsync": bool}``: a local directory store.
    * ``{"type": "keep", "services": [URL, ...], "token": str | None,
      "replication": int, ...}``: Keep services over HTTP; the other keys
      (``service_type``, ``service_uuids``, ``retries``, ``backoff_start``,
      ``backoff_max``, ``connect_timeout``, ``read_timeout``, ``pool_maxsize``,
      ``insecure``, ``ca_certs``, ``extra_headers``) are described in
      :mod:`ingest.keep.client`.
    """
    kind = spec.get("type")
    if kind == "directory":
        from ingest.keep.dirstore import DirectoryStore

        return DirectoryStore(spec["path"], fsync=spec.get("fsync", True), write=write)
    if kind == "keep":
        from ingest.keep.client import KeepClient

        return KeepClient.from_spec(spec)
    raise ValueError(f"unknown block store type {kind!r}")
