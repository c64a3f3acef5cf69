"""Read a manifest's files back with the official SDK, from a directory block store.

The SDK's local-store mode reads ``<dir>/<md5>`` (a flat directory); our store uses
keepstore's ``<md5[:3]>/<md5>`` layout, so we give the SDK a flat directory of
symlinks to the very files the run stored.
"""

from __future__ import annotations

import os
import re
import tempfile

import arvados.arvfile
import arvados.collection
import arvados.keep

from sdk_referee import _STUB_API


def sdk_read_tree(manifest_text: str, store_root: str) -> tuple[dict[str, bytes], set[str]]:
    """(every file path -> bytes, every directory path) as the SDK reads them."""
    with tempfile.TemporaryDirectory(prefix="sdk-flat-") as flat:
        for dirpath, _, names in os.walk(store_root):
            for name in names:
                if re.fullmatch(r"[0-9a-f]{32}", name):
                    os.symlink(os.path.join(dirpath, name), os.path.join(flat, name))
        keep = arvados.keep.KeepClient(api_client=_STUB_API, local_store=flat)
        coll = arvados.collection.Collection(manifest_text, api_client=_STUB_API,
                                             keep_client=keep, replication_desired=1)
        files: dict[str, bytes] = {}
        dirs: set[str] = set()

        def visit(node, prefix: str) -> None:
            for name, item in node.items():
                path = f"{prefix}{name}"
                if isinstance(item, arvados.arvfile.ArvadosFile):
                    with node.open(name, "rb") as f:
                        files[path] = f.read()
                else:
                    dirs.add(path)
                    visit(item, path + "/")

        visit(coll, "")
        return files, dirs
