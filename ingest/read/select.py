"""The part of a manifest under one collection path, with paths relative to it."""

from __future__ import annotations

from dataclasses import dataclass, field

from ingest.errors import IngestError
from ingest.manifest import Manifest, Segment, unescape_name
from ingest.words import quoted


class NotInManifest(IngestError):
    """The path names nothing in the manifest."""


@dataclass(slots=True)
class SelectedFile:
    path: str                # path in the collection
    rel: str                 # path relative to the selection (a file alone: its name)
    segments: list[Segment]

    @property
    def size(self) -> int:
        return sum(seg.length for seg in self.segments)


@dataclass(slots=True)
class Selection:
    """Files and directories under ``root``, in tree order (directories exclude ``root``)."""

    root: str
    is_file: bool
    files: list[SelectedFile] = field(default_factory=list)
    dirs: list[tuple[str, str]] = field(default_factory=list)  # (collection path, relative path)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def select(manifest: Manifest, path: str) -> Selection:
    """What ``path`` ("" for the root, as normalized by names.collection_path) names.

    The path is taken as ``ls`` prints it: ``\\ooo`` escapes (control characters,
    and the backslash itself as ``\\134``) are decoded, so whatever ``ls`` printed
    names what ``ls`` meant; failing that, as typed (``back\\slash`` is found either
    way, as a backslash followed by no octal digits is no escape).
    """
    for spelling in dict.fromkeys([unescape_name(path), path]):
        segments = manifest.find(spelling) if spelling else None
        if segments is not None:
            name = spelling.rsplit("/", 1)[-1]
            return Selection(spelling, True, [SelectedFile(spelling, name, segments)])
        if manifest.is_dir(spelling):
            return _directory(manifest, spelling)
    raise NotInManifest(f"{quoted(path)}: no such file or directory in the manifest")


def _directory(manifest: Manifest, path: str) -> Selection:
    prefix = path + "/" if path else ""
    sel = Selection(path, False)
    for fpath, segs in manifest.files():
        if fpath.startswith(prefix):
            sel.files.append(SelectedFile(fpath, fpath[len(prefix):], segs))
    for dpath in manifest.directories():
        if dpath.startswith(prefix):
            sel.dirs.append((dpath, dpath[len(prefix):]))
    return sel
