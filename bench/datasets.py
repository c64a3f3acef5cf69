"""Reproducible benchmark datasets, generated from a seed and cached on disk.

Each dataset is a directory ``<bench dir>/datasets/<name>-s<scale>-v<version>/`` holding
``data/`` (the tree every tool uploads) and, beside it, ``files.nul`` (every file's
path, NUL-separated, for ``md5sum``) and ``dataset.json`` (the totals; written last, so
its presence means the dataset is complete). File contents come from a seeded PRNG,
so the same name and scale always give byte-identical trees, and every file is
distinct: no block is de-duplicated by accident.

``scale`` multiplies file counts and the sizes of the big files, so a quick run can
use the same shapes at a tenth of the cost.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

KiB = 1 << 10
MiB = 1 << 20
VERSION = 1          # bump when a generator changes, so old caches are not reused
_WRITE_CHUNK = 4 * MiB

# One generated file: path relative to data/, and its size.
FileSpec = tuple[str, int]


@dataclass(frozen=True)
class Dataset:
    """A generated dataset on disk."""

    name: str
    root: str            # the dataset directory
    files: int
    bytes: int
    description: str

    @property
    def data(self) -> str:
        """The tree to upload (pass it with a trailing slash: contents at the root)."""
        return os.path.join(self.root, "data")

    @property
    def file_list(self) -> str:
        """Every file's absolute path, NUL-separated, sorted."""
        return os.path.join(self.root, "files.nul")

    def paths(self) -> list[str]:
        with open(self.file_list, "rb") as f:
            return [p.decode() for p in f.read().split(b"\0") if p]


def _large(scale: float, rng: random.Random) -> Iterator[FileSpec]:
    size = max(1, int(512 * MiB * scale))
    for i in range(4):
        yield f"large-{i}.bin", size


def _small(scale: float, rng: random.Random) -> Iterator[FileSpec]:
    dirs = max(1, round(1000 * scale))
    for d in range(dirs):
        for f in range(20):
            yield f"d{d:04d}/f{f:02d}.dat", rng.randint(1 * KiB, 16 * KiB)


def _tiny(count: int) -> Callable[[float, random.Random], Iterator[FileSpec]]:
    def gen(scale: float, rng: random.Random) -> Iterator[FileSpec]:
        files = max(1, round(count * scale))
        for i in range(files):
            yield f"t{i // 1000:03d}/f{i % 1000:03d}.txt", 1 * KiB
    return gen


def _mixed(scale: float, rng: random.Random) -> Iterator[FileSpec]:
    """Big files (own blocks), 32-64 MiB files (arv-put's per-file barrier), small, empty."""
    for i in range(2):
        yield f"big/b{i}.bin", max(1, int(192 * MiB * scale))
    for i in range(3):
        yield f"medium/m{i}.bin", max(1, int(40 * MiB * scale))
    for i in range(2):
        yield f"medium/s{i}.bin", max(1, int(8 * MiB * scale))
    dirs = max(1, round(100 * scale))
    for d in range(dirs):
        for f in range(30):
            yield f"small/s{d:03d}/f{f:02d}.dat", rng.randint(1, 64 * KiB)
        yield f"small/s{d:03d}/empty", 0


# name -> (seed, generator, description at scale 1)
GENERATORS: dict[str, tuple[int, Callable[[float, random.Random], Iterator[FileSpec]], str]] = {
    "large": (1, _large, "4 files of 512 MiB of random bytes"),
    "small": (2, _small, "20,000 files of 1-16 KiB in 1,000 directories"),
    "tiny": (3, _tiny(100_000), "100,000 files of 1 KiB in 100 directories"),
    "tiny10k": (4, _tiny(10_000), "10,000 files of 1 KiB in 10 directories"),
    "mixed": (5, _mixed, "2 x 192 MiB, 3 x 40 MiB, 2 x 8 MiB, 3,000 files of 1 B-64 KiB "
                         "in 100 directories, 100 empty files"),
}


def _write_random(path: str, size: int, rng: random.Random) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, _WRITE_CHUNK)
            f.write(rng.randbytes(n))
            left -= n


def _scale_tag(scale: float) -> str:
    return f"{scale:g}".replace(".", "p")


def ensure(name: str, bench_dir: str, scale: float = 1.0, log: Callable[[str], None] = print) -> Dataset:
    """The dataset ``name`` at ``scale``, generated now unless already cached."""
    seed, generator, description = GENERATORS[name]
    root = os.path.join(bench_dir, "datasets", f"{name}-s{_scale_tag(scale)}-v{VERSION}")
    meta_path = os.path.join(root, "dataset.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            return Dataset(**json.load(f))
    log(f"generating dataset {name} (scale {scale:g}) in {root} ...")
    shutil.rmtree(root, ignore_errors=True)
    data = os.path.join(root, "data")
    os.makedirs(data)
    rng = random.Random(seed)
    paths: list[str] = []
    total = 0
    made_dirs: set[str] = set()
    for rel, size in generator(scale, rng):
        path = os.path.join(data, rel)
        parent = os.path.dirname(path)
        if parent not in made_dirs:
            os.makedirs(parent, exist_ok=True)
            made_dirs.add(parent)
        _write_random(path, size, rng)
        paths.append(path)
        total += size
    with open(os.path.join(root, "files.nul"), "wb") as f:
        f.write(b"".join(p.encode() + b"\0" for p in sorted(paths)))
    if scale != 1:
        description += f" (scaled by {scale:g})"
    dataset = Dataset(name, root, len(paths), total, description)
    with open(meta_path + ".tmp", "w") as f:
        json.dump(asdict(dataset), f)
    os.replace(meta_path + ".tmp", meta_path)
    return dataset


def warm(dataset: Dataset) -> None:
    """Read every byte once so that every tool starts from the same warm page cache."""
    buf = bytearray(_WRITE_CHUNK)
    flags = os.O_RDONLY | getattr(os, "O_NOATIME", 0)
    for path in dataset.paths():
        fd = os.open(path, flags)
        try:
            while os.readv(fd, [buf]):
                pass
        finally:
            os.close(fd)
