"""Source trees for tests: awkward names, empty files and dirs, packing edges."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import NamedTuple

MiB = 1 << 20
BLOCK = 1 << 26
HALF = BLOCK // 2

AWKWARD_NAMES = [
    "plain.txt", "with space.txt", "tab\there", "new\nline", "colon:name", "back\\slash",
    "ünïcødé-名前.txt", "a b", "a!b", "a-b", "del\x7fchar", "\\056", "trailing space ",
]
EDGE_SIZES = {
    "edge-0": 0, "edge-1": 1, "edge-half": HALF, "edge-half+1": HALF + 1,
    "edge-block": BLOCK, "edge-block+1": BLOCK + 1, "edge-multi": 2 * BLOCK + 12345,
}


def fill(path: Path, size: int, seed: str) -> None:
    """Write ``size`` bytes of content that is distinct per file and per MiB, quickly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    base = hashlib.sha256(seed.encode()).digest() * (MiB // 32)
    with open(path, "wb") as f:
        for k in range(0, size, MiB):
            chunk = k.to_bytes(8, "little") + base[8:]
            f.write(chunk[:min(MiB, size - k)])


def make_mixed_tree(root: Path, big: int, big_size: int, small: int, small_size: int) -> Path:
    """``big`` distinct files of about ``big_size`` bytes at the top, ``small`` of about
    ``small_size`` in ``small/``: several large blocks and one packed one."""
    for i in range(big):
        fill(root / f"big{i}", big_size + i, f"big{i}")
    for i in range(small):
        fill(root / "small" / f"s{i}", small_size + i, f"s{i}")
    return root


def make_awkward_tree(root: Path, empty_dirs: bool = True, edges: bool = True) -> Path:
    """A tree exercising escaping, nesting, empty files/dirs and every packing edge."""
    for i, name in enumerate(AWKWARD_NAMES):
        fill(root / name, 10 + i, name)
        fill(root / "dir one" / "sub:dir" / name, 100 + i, "nested" + name)
    fill(root / "ünï dir" / "deep\tfile", 5000, "deep")
    (root / "empty.txt").touch()
    (root / "dir one" / "empty too").touch()
    fill(root / "z-small-after" / "x", 77, "after")  # shares a block with earlier small files
    if empty_dirs:
        (root / "empty dir").mkdir()
        (root / "dir one" / "inner empty").mkdir(parents=True)
    if edges:
        for name, size in EDGE_SIZES.items():
            fill(root / "edges" / name, size, name)
    return root


def read_tree(root: Path) -> dict[str, bytes]:
    """Every regular file under root: manifest-style relative path -> bytes."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            full = Path(dirpath) / name
            out[str(full.relative_to(root))] = full.read_bytes()
    return out


class Packed(NamedTuple):
    """A whole list of files packed: the blocks in index order, and each file's parts."""

    blocks: list
    parts: list


def batches(files, most: int | None = None) -> list:
    """``files`` (SourceFile) as a walk yields them: FileBatches of consecutive files of
    one directory, of at most ``most`` files each."""
    from ingest.walk import FileBatch, Fingerprints

    groups: list[tuple[str, str, list[str], list]] = []
    for f in files:
        directory, _, base = f.name.rpartition("/")
        last = groups[-1] if groups else None
        if last is None or last[:2] != (f.root, directory) or len(last[2]) == most:
            last = (f.root, directory, [], [])
            groups.append(last)
        last[2].append(base)
        last[3].append(f.fingerprint)
    return [FileBatch(root, directory, names, Fingerprints.of_rows(fps)) for root, directory, names, fps in groups]


def pack(files, block_size: int = BLOCK, most: int | None = None) -> Packed:
    """Feed ``files`` (SourceFile) to a Packer in batches (of at most ``most``), as a
    run does, and collect what it gives: the blocks, and each file's parts."""
    from ingest.plan import Packer, file_parts

    packer = Packer(block_size)
    blocks, parts = [], []
    for batch in batches(files, most):
        placed, closed = packer.add(batch)
        parts += file_parts(placed.spans, placed.spread)
        blocks += closed
    blocks += packer.finish()
    return Packed(sorted(blocks, key=lambda b: b.index), parts)


def sized_files(sizes) -> list:
    """Stand-in SourceFiles of the given sizes (for the packing policy alone)."""
    from ingest.walk import Fingerprint, SourceFile

    return [SourceFile("", f"f{i}", Fingerprint(size, 0, 0, i, 0)) for i, size in enumerate(sizes)]
