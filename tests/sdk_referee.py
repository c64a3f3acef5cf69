"""The official Arvados Python SDK as a test referee, run with no API server or Keep.

``Collection`` needs a Keep client to build its block manager, even to print a
manifest. A ``KeepClient`` with a local store only reads ``api_token`` and
``insecure`` from its API client, so a stand-in object is enough; passing
``replication_desired`` keeps the collection from asking the API for its
default replication. Import this module only after ``pytest.importorskip("arvados")``.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import types
from collections.abc import Iterable, Iterator, Sequence

import arvados.collection
import arvados.keep
from arvados._internal.streams import Range

_STUB_API = types.SimpleNamespace(api_token="unused", insecure=False, _rootDesc={})
_store: tempfile.TemporaryDirectory | None = None
_keep: arvados.keep.KeepClient | None = None


def sdk_keep_client() -> arvados.keep.KeepClient:
    """A shared KeepClient that stores blocks in a private temporary directory."""
    global _store, _keep
    if _keep is None:
        _store = tempfile.TemporaryDirectory(prefix="sdk-referee-")
        _keep = arvados.keep.KeepClient(api_client=_STUB_API, local_store=_store.name)
    return _keep


def sdk_collection(manifest_text: str = "") -> arvados.collection.Collection:
    """An SDK Collection parsed from ``manifest_text`` (empty if "")."""
    return arvados.collection.Collection(
        manifest_text or None,
        api_client=_STUB_API,
        keep_client=sdk_keep_client(),
        replication_desired=1,
    )


def sdk_collection_in(local_store: str) -> arvados.collection.Collection:
    """An empty SDK Collection whose blocks the SDK writes into ``local_store`` (flat ``<md5>`` files)."""
    keep = arvados.keep.KeepClient(api_client=_STUB_API, local_store=local_store)
    return arvados.collection.Collection(None, api_client=_STUB_API, keep_client=keep, replication_desired=1)


def sdk_forms(manifest_text: str) -> tuple[str, str, str]:
    """The SDK's (normalized text, portable text, portable data hash) for a manifest."""
    coll = sdk_collection(manifest_text)
    return coll.manifest_text(normalize=True), coll.portable_manifest_text(), coll.portable_data_hash()


def sdk_build(
    files: Iterable[tuple[str, Sequence[tuple[str, int, int, int]]]],
    dirs: Iterable[str] = (),
) -> arvados.collection.Collection:
    """An SDK Collection built through its API, without any manifest text.

    ``files`` holds (path, [(locator, block_size, offset, length), ...]) with
    '/'-separated relative paths; ``dirs`` lists directories to create.
    """
    coll = sdk_collection()
    for path in dirs:
        coll.find_or_create(path, arvados.collection.COLLECTION)
    for path, segments in files:
        afile = coll.find_or_create(path, arvados.collection.FILE)
        for locator, block_size, offset, length in segments:
            afile.add_segment([Range(locator, 0, block_size)], offset, length)
    return coll


def sdk_tree(coll: arvados.collection.RichCollectionBase) -> tuple[dict[str, list[tuple[str, int, int]]], list[str]]:
    """The SDK's view of a tree: {path: [(locator, offset, length), ...]} and sorted dir paths."""
    files: dict[str, list[tuple[str, int, int]]] = {}
    dirs: list[str] = []
    stack = [("", coll)]
    while stack:
        prefix, node = stack.pop()
        for name, item in node.items():
            path = prefix + name
            if isinstance(item, arvados.collection.RichCollectionBase):
                dirs.append(path)
                stack.append((path + "/", item))
            else:
                files[path] = [(r.locator, r.segment_offset, r.range_size) for r in item.segments()]
    return files, sorted(dirs)


@contextlib.contextmanager
def sdk_keep_for_store(store_root: str) -> Iterator[arvados.keep.KeepClient]:
    """An SDK KeepClient reading the blocks of one of our directory stores.

    The SDK's local-store mode reads a flat ``<dir>/<md5>``; our store is keepstore's
    ``<md5[:3]>/<md5>``, so the SDK gets a flat directory of symlinks to the very
    files the run stored.
    """
    with tempfile.TemporaryDirectory(prefix="sdk-flat-") as flat:
        for dirpath, _, names in os.walk(store_root):
            for name in names:
                if re.fullmatch(r"[0-9a-f]{32}", name):
                    os.symlink(os.path.join(dirpath, name), os.path.join(flat, name))
        yield arvados.keep.KeepClient(api_client=_STUB_API, local_store=flat)


def sdk_keep_for_services(urls: Sequence[str], token: str) -> arvados.keep.KeepClient:
    """An SDK KeepClient talking to Keep services over HTTP, as ARVADOS_KEEP_SERVICES would."""
    return arvados.keep.KeepClient(proxy=" ".join(urls), api_token=token, num_retries=0)


def sdk_read_tree(manifest_text: str, keep: arvados.keep.KeepClient) -> tuple[dict[str, bytes], set[str]]:
    """Read every file of a manifest with the SDK: ({path: bytes}, {directory paths})."""
    coll = arvados.collection.Collection(manifest_text, api_client=_STUB_API,
                                         keep_client=keep, replication_desired=1)
    paths, dirs = sdk_tree(coll)
    contents = {}
    for path in paths:
        with coll.open(path, "rb") as f:
            contents[path] = f.read()
    return contents, set(dirs)
