"""The manifest assembled on disk as a run goes is the normalized text Manifest renders."""

import hashlib
import random

from hypothesis import given, settings
from hypothesis import strategies as st
from trees import batches

from ingest.assemble import ManifestAssembler
from ingest.manifest import Manifest, Segment
from ingest.plan import Packer, file_parts
from ingest.walk import Fingerprint, SourceFile

BLOCK = 64   # tiny blocks: many of them, shared by directories, and files over several


def _locator(block, signed: bool) -> str:
    md5 = hashlib.md5(b"".join(p.file.name.encode() + bytes([p.length % 256]) for p in block.pieces)).hexdigest()
    return f"{md5}+{block.size}" + ("+A" + "f" * 40 + "@65000000" if signed else "")


names = st.text(st.sampled_from("ab-. :\\é\t"), min_size=1, max_size=4).filter(lambda n: n not in (".", ".."))
# A tree in walk order: (directory, [(file name, size)]) visits; a directory may come back
# (sources that merge into it) and visits need not be in tree order (sources not sorted).
trees = st.lists(st.tuples(st.lists(names, min_size=0, max_size=3).map("/".join),
                           st.lists(st.tuples(names, st.integers(0, 3 * BLOCK)), max_size=6)),
                 min_size=1, max_size=8)


def _ancestors(path):
    parts = path.split("/")
    return {"/".join(parts[:i]) for i in range(1, len(parts))}


def _walk_order(visits):
    """The visits as a walk yields them: a directory's files sorted, each path once,
    and never a file where a directory is (or the other way round)."""
    files, dirs, out = set(), set(), []
    for directory, entries in visits:
        if directory in files or _ancestors(directory) & files:
            continue
        dirs |= _ancestors(directory) | ({directory} if directory else set())
        kept = []
        for name, size in sorted(dict(entries).items()):
            path = f"{directory}/{name}" if directory else name
            if path not in files and path not in dirs:
                files.add(path)
                kept.append((path, size))
        out.append((directory, kept))
    return out


@settings(max_examples=150, deadline=None)
@given(trees, st.booleans(), st.randoms(use_true_random=False))
def test_the_assembled_text_and_pdh_are_manifests_own(tmp_path_factory, visits, signed, rnd):
    visits = _walk_order(visits)
    packer = Packer(BLOCK)
    assembler = ManifestAssembler(str(tmp_path_factory.mktemp("spool")))
    reference = Manifest()
    closed, locators, parts_of = [], {}, {}

    def locate_some(every: bool) -> None:
        rnd.shuffle(closed)
        while closed and (every or rnd.random() < 0.5):
            block = closed.pop()
            locators[block.index] = _locator(block, signed)
            assembler.block_located(block.index, locators[block.index], block.size)

    for n, (directory, files) in enumerate(visits):
        if directory:
            assembler.add_dir(directory)
            reference.add_dir(directory)
        sources = [SourceFile("/src/", path, Fingerprint(size, n, 0, 0, 0)) for path, size in files]
        for batch in batches(sources, most=rnd.randint(1, 4)):
            placed, done = packer.add(batch)
            assembler.add_files(batch.directory, batch.names, placed)
            parts_of.update(zip((f.name for f in batch.files()), file_parts(placed.spans, placed.spread),
                                strict=True))
            closed += done
            locate_some(every=False)
    closed += packer.finish()
    locate_some(every=True)
    sizes = {}
    for path, parts in parts_of.items():
        for index, _, _ in parts:
            sizes[index] = int(locators[index].split("+")[1])
        reference.add_file(path, [Segment(locators[b], sizes[b], offset, length) for b, offset, length in parts])
    result = assembler.finish()
    try:
        text, pdh = reference.text_and_pdh()
        assert result.text() == text
        assert result.pdh == pdh
        assert result.text(strip=True) == reference.text(strip=True)
    finally:
        result.close()


def test_a_directory_waits_for_its_blocks_and_nothing_is_kept_once_written(tmp_path):
    assembler = ManifestAssembler(str(tmp_path))
    packer = Packer(BLOCK)
    assembler.add_dir("a")
    (batch,) = batches([SourceFile("/src/", "a/x", Fingerprint(10, 0, 0, 0, 0))])
    placed, closed = packer.add(batch)
    assembler.add_files("a", batch.names, placed)
    assembler.add_dir("b")                      # the walk leaves a: its block is not stored yet
    (block,) = packer.finish()
    assert assembler._users                     # a waits for that block
    assembler.block_located(block.index, "0" * 32 + "+10", 10)
    assert not assembler._users and not assembler._locator   # written: nothing left of it
    result = assembler.finish()
    try:
        assert result.text() == f"./a {'0' * 32}+10 0:10:x\n./b d41d8cd98f00b204e9800998ecf8427e+0 0:0:\\056\n"
    finally:
        result.close()
    assert not list(tmp_path.iterdir())        # close removes its files


def test_discard_removes_the_spool(tmp_path):
    assembler = ManifestAssembler(str(tmp_path))
    assembler.add_dir("a")
    assembler.discard()
    assert not list(tmp_path.iterdir())


def test_many_directories_in_random_order_are_sorted(tmp_path):
    assembler = ManifestAssembler(str(tmp_path))
    packer = Packer(BLOCK)
    dirs = [f"d{i}/e{j}" for i in range(20) for j in range(3)]
    random.Random(7).shuffle(dirs)
    for d in dirs:
        assembler.add_dir(d)
        name = f"{d}/f"
        (batch,) = batches([SourceFile("/", name, Fingerprint(1, 0, 0, 0, 0))])
        placed, closed = packer.add(batch)
        assembler.add_files(d, batch.names, placed)
        for block in closed:
            assembler.block_located(block.index, f"{block.index:032x}+{block.size}", block.size)
    for block in packer.finish():
        assembler.block_located(block.index, f"{block.index:032x}+{block.size}", block.size)
    result = assembler.finish()
    try:
        assert [line.split(" ")[0] for line in result.text().splitlines()] == \
            [f"./{d}" for d in sorted(dirs, key=lambda d: d.split("/"))]
    finally:
        result.close()
