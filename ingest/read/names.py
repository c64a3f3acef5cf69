"""Paths inside a collection: as users type them, as files on disk, as shown.

Manifest names are already free of empty, ``.`` and ``..`` components (the parser
refuses them); :func:`check_safe` repeats that check, and refuses what a manifest
can carry but a file system cannot (a NUL byte), right before names become files.
"""

from __future__ import annotations

import os

from ingest.errors import IngestError, UsageError
from ingest.manifest import Manifest, ManifestError
from ingest.words import quoted

# Shown as \ooo in text output: control characters, DEL and the backslash itself,
# so that one line is one entry whatever the names hold. --json shows names as is.
_DISPLAY_ESCAPES = {c: f"\\{c:03o}" for c in [*range(0x20), 0x7F, ord("\\")]}


class UnsafePath(IngestError):
    """A manifest name that must not become a path on disk."""


def display(path: str) -> str:
    """A collection path for one line of text output."""
    return path.translate(_DISPLAY_ESCAPES)


def collection_path(arg: str) -> str:
    """A user's path inside a collection, normalized: ``"."``, ``"./"`` and ``""`` are the root.

    A leading ``./`` or ``/`` and a trailing ``/`` are dropped; ``..`` and empty
    components are refused (UsageError).
    """
    path = arg
    if path.startswith("./"):
        path = path[2:]
    path = path.strip("/") if path not in (".", "") else ""
    if path:
        try:
            Manifest().add_dir(path)  # the manifest's own rules for a path
        except ManifestError as exc:
            raise UsageError(f"invalid collection path {quoted(arg)}: {exc}") from None
    return path


def check_safe(relpath: str) -> None:
    """Refuse a relative path that could leave its destination or cannot be created."""
    parts = relpath.split("/")
    if relpath.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise UnsafePath(f"refusing unsafe name {quoted(relpath)}: absolute, empty, '.' or '..' component")
    if "\x00" in relpath:
        raise UnsafePath(f"refusing name '{display(relpath)}': it contains a NUL byte")


def local_path(root: str, relpath: str) -> str:
    """The file-system path of a checked collection path under ``root``."""
    check_safe(relpath)
    return os.path.join(root, *relpath.split("/"))
