"""Reproducible benchmark datasets, generated from a seed and cached on disk.

Each dataset is a directory ``<bench dir>/datasets/<name>-s<scale>-v<version>/`` holding
``data/`` (the tree every tool uploads) and, beside it, ``files.nul`` (every file's
path, NUL-separated, for ``md5sum``) and ``dataset.json`` (the totals; written last, so
its presence means the dataset is complete). File contents come from a seeded PRNG,
so the same name and scale always give byte-identical trees, and every file is
distinct: no block is de-duplicated by accident.

``scale`` multiplies file counts and the sizes of the big files, so a quick run can
use the same shapes at a tenth of the cost.

The millions-of-files datasets (``tiny1m``, ``tiny2m``, ``tiny4m``) have tiny's shape
but are written by a cheaper generator (:class:`Stamped`): one seeded random buffer
per dataset, with each file's number in its first bytes (so every file is still
distinct), written with ``os.open``/``os.write`` by one process per core, a share of
the directories each. Creating a file costs some 40 us of kernel time here, so
that is most of their cost.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
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


@dataclass(frozen=True)
class Stamped:
    """``count`` files of ``size`` bytes, ``per_dir`` to a directory, in tiny's shape
    (``t<dir>/f<file>.txt``; the directory number has at least 3 digits): the
    dataset's seeded random bytes with the file's number written over the first 16."""

    count: int
    size: int = KiB
    per_dir: int = 1000

    def files(self, scale: float) -> int:
        return max(1, round(self.count * scale))

    def dirs(self, scale: float) -> int:
        return -(-self.files(scale) // self.per_dir)

    def relpath(self, i: int, scale: float) -> str:
        width = max(3, len(str(self.dirs(scale) - 1)))
        return f"t{i // self.per_dir:0{width}d}/f{i % self.per_dir:03d}.txt"

    def content(self, i: int, base: bytes) -> bytes:
        return b"%015d\n" % i + base[16:]


Generator = Callable[[float, random.Random], Iterator[FileSpec]] | Stamped

# name -> (seed, generator, description at scale 1)
GENERATORS: dict[str, tuple[int, Generator, str]] = {
    "large": (1, _large, "4 files of 512 MiB of random bytes"),
    "small": (2, _small, "20,000 files of 1-16 KiB in 1,000 directories"),
    "tiny": (3, _tiny(100_000), "100,000 files of 1 KiB in 100 directories"),
    "tiny10k": (4, _tiny(10_000), "10,000 files of 1 KiB in 10 directories"),
    "mixed": (5, _mixed, "2 x 192 MiB, 3 x 40 MiB, 2 x 8 MiB, 3,000 files of 1 B-64 KiB "
                         "in 100 directories, 100 empty files"),
    # Millions of files (issue 15): only when asked for (not in the default list).
    "tiny1m": (6, Stamped(1_000_000), "1,000,000 files of 1 KiB in 1,000 directories"),
    "tiny2m": (7, Stamped(2_000_000), "2,000,000 files of 1 KiB in 2,000 directories"),
    "tiny4m": (8, Stamped(4_000_000), "4,000,000 files of 1 KiB in 4,000 directories"),
}


def _write_random(path: str, size: int, rng: random.Random) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, _WRITE_CHUNK)
            f.write(rng.randbytes(n))
            left -= n


def _write_specs(data: str, specs: Iterator[FileSpec], rng: random.Random) -> tuple[list[str], int]:
    """Write every file of ``specs`` under ``data`` with seeded random bytes; (paths, bytes)."""
    paths: list[str] = []
    total = 0
    made_dirs: set[str] = set()
    for rel, size in specs:
        path = os.path.join(data, rel)
        parent = os.path.dirname(path)
        if parent not in made_dirs:
            os.makedirs(parent, exist_ok=True)
            made_dirs.add(parent)
        _write_random(path, size, rng)
        paths.append(path)
        total += size
    return paths, total


def _write_stamped_dirs(data: str, spec: Stamped, scale: float, base: bytes, dirs: range) -> None:
    """Write the files of directories ``dirs`` (one process's share)."""
    files = spec.files(scale)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for d in dirs:
        first = d * spec.per_dir
        os.mkdir(os.path.dirname(os.path.join(data, spec.relpath(first, scale))))
        for i in range(first, min(first + spec.per_dir, files)):
            fd = os.open(os.path.join(data, spec.relpath(i, scale)), flags, 0o644)
            try:
                os.write(fd, spec.content(i, base))
            finally:
                os.close(fd)


def _write_stamped(data: str, spec: Stamped, scale: float, rng: random.Random) -> tuple[list[str], int]:
    """Write a :class:`Stamped` dataset under ``data``, one process per core; (paths, bytes)."""
    base = rng.randbytes(spec.size)
    dirs = spec.dirs(scale)
    procs = min(os.cpu_count() or 1, dirs)
    shares = [range(dirs * k // procs, dirs * (k + 1) // procs) for k in range(procs)]
    with ProcessPoolExecutor(procs) as pool:
        for done in [pool.submit(_write_stamped_dirs, data, spec, scale, base, share) for share in shares]:
            done.result()
    files = spec.files(scale)
    return [os.path.join(data, spec.relpath(i, scale)) for i in range(files)], files * spec.size


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
    started = time.monotonic()
    shutil.rmtree(root, ignore_errors=True)
    data = os.path.join(root, "data")
    os.makedirs(data)
    rng = random.Random(seed)
    if isinstance(generator, Stamped):
        paths, total = _write_stamped(data, generator, scale, rng)
    else:
        paths, total = _write_specs(data, generator(scale, rng), rng)
    with open(os.path.join(root, "files.nul"), "wb") as f:
        f.write(b"".join(p.encode() + b"\0" for p in sorted(paths)))
    if scale != 1:
        description += f" (scaled by {scale:g})"
    dataset = Dataset(name, root, len(paths), total, description)
    with open(meta_path + ".tmp", "w") as f:
        json.dump(asdict(dataset), f)
    os.replace(meta_path + ".tmp", meta_path)
    log(f"generated {name}: {dataset.files:,} files in {time.monotonic() - started:.0f} s")
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
