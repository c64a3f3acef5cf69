"""Where manifests come from and go to: a file, stdin, or a block in Keep.

A manifest argument is ``-`` (stdin), the path of a file, or a locator: the
portable data hash ``md5+size`` of a manifest that ``put --save-manifest`` stored
as a block, or the (signed) locator the store returned for it. An existing file
wins over a locator of the same spelling.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from typing import Protocol

from ingest.config import Settings
from ingest.errors import IngestError, StoreError
from ingest.keep.factory import open_store
from ingest.keep.locator import BLOCK_SIZE_MAX, Locator, LocatorError
from ingest.keep.store import BlockStore
from ingest.manifest import Manifest, ManifestError, parse_manifest


class ManifestLoadError(IngestError):
    """A manifest that cannot be read or parsed; the message names it (and the line)."""


@dataclass(frozen=True, slots=True)
class LoadedManifest:
    manifest: Manifest
    source: str  # for messages: the path, "stdin" or "block <locator>"


def _is_locator(text: str) -> bool:
    try:
        Locator.parse(text)
    except LocatorError:
        return False
    return True


def _read_source(arg: str, settings: Settings | None) -> tuple[bytes, str]:
    if arg == "-":
        return sys.stdin.buffer.read(), "stdin"
    if os.path.exists(arg) or not _is_locator(arg):
        try:
            with open(arg, "rb") as f:
                return f.read(), arg
        except FileNotFoundError:
            raise ManifestLoadError(f"manifest {arg}: no such file (nor a manifest locator)") from None
        except IsADirectoryError:
            raise ManifestLoadError(f"manifest {arg}: is a directory, not a manifest file") from None
        except OSError as exc:
            raise ManifestLoadError(f"manifest {arg}: {exc.strerror or exc}") from None
    if settings is None:
        raise ManifestLoadError(f"manifest {arg}: loading a manifest from Keep needs a store")
    store = open_store(settings.store_spec(), write=False)
    try:
        data = store.get(arg)
    except StoreError as exc:
        raise ManifestLoadError(f"cannot load manifest {arg} from {store.describe()}: {exc}") from None
    finally:
        store.close()
    return data, f"block {Locator.parse(arg).stripped()}"


def load_manifest(arg: str, settings: Settings | None) -> LoadedManifest:
    """Read and parse the manifest ``arg`` names (see the module docstring)."""
    data, source = _read_source(arg, settings)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ManifestLoadError(f"malformed manifest {source}: line {line}: not valid UTF-8") from None
    try:
        manifest = parse_manifest(text)
    except ManifestError as exc:
        raise ManifestLoadError(f"malformed manifest {source}: {exc}") from None
    return LoadedManifest(manifest, source)


class _HasText(Protocol):
    def text(self, strip: bool = False) -> str: ...


def save_manifest(store: BlockStore, manifest: _HasText) -> str:
    """Store the portable (stripped, normalized) text of ``manifest`` as one block.

    Returns the locator the store gave: signed by a signing keepstore, otherwise
    ``md5+size``, which is then the manifest's portable data hash. A manifest
    over 64 MiB cannot be one block and is refused.
    """
    data = manifest.text(strip=True).encode("utf-8")
    if len(data) > BLOCK_SIZE_MAX:
        raise IngestError(f"the manifest is {len(data):,} bytes; one stored as a block in Keep "
                          f"can be at most {BLOCK_SIZE_MAX:,} bytes (64 MiB)")
    md5_hex = hashlib.md5(data, usedforsecurity=False).hexdigest()
    writer = store.open_block()
    try:
        writer.write(data)
        stored = writer.commit(md5_hex)
    except BaseException:
        writer.abort()
        raise
    return stored.locator
