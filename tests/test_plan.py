"""The packing policy at its edges (DESIGN.md, 'Packing policy')."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from trees import pack, sized_files

from ingest.plan import Packer

M = 1 << 26  # 64 MiB
HALF = M // 2


def layout(sizes, block_size=M, most=None):
    files = sized_files(sizes)
    plan = pack(files, block_size, most)
    number = {f.name: i for i, f in enumerate(files)}
    return [[(number[p.file.name], p.file_offset, p.length) for p in b.pieces] for b in plan.blocks], plan


def test_empty_files_take_no_block():
    blocks, plan = layout([0, 0])
    assert blocks == [] and plan.blocks == []
    assert plan.parts[0] == ()


def test_one_byte_file():
    blocks, plan = layout([1])
    assert blocks == [[(0, 0, 1)]]
    assert plan.parts[0] == ((0, 0, 1),)


def test_half_block_is_small_and_shares_a_block():
    blocks, _ = layout([HALF, 7])
    assert blocks == [[(0, 0, HALF), (1, 0, 7)]]


def test_more_than_half_a_block_is_large_and_alone():
    blocks, plan = layout([5, HALF + 1, 7])
    # the small files around it share one block; the large file has its own
    assert blocks == [[(0, 0, 5), (2, 0, 7)], [(1, 0, HALF + 1)]]
    assert plan.parts[2] == ((0, 5, 7),)


def test_exactly_one_block():
    blocks, _ = layout([M])
    assert blocks == [[(0, 0, M)]]


def test_one_byte_over_a_block_gets_its_tail_block():
    blocks, plan = layout([M + 1])
    assert blocks == [[(0, 0, M)], [(0, M, 1)]]
    assert plan.parts[0] == ((0, 0, M), (1, 0, 1))


def test_file_of_several_blocks_is_cut_every_block_from_offset_zero():
    size = 3 * M + 12345
    blocks, plan = layout([size])
    assert blocks == [[(0, 0, M)], [(0, M, M)], [(0, 2 * M, M)], [(0, 3 * M, 12345)]]
    assert sum(length for _, _, length in plan.parts[0]) == size


def test_many_tiny_files_fill_blocks_in_order_and_never_split():
    sizes = [1000] * 200_000  # 200 MB of 1000-byte files
    blocks, plan = layout(sizes)
    per_block = M // 1000
    assert [len(b) for b in blocks[:-1]] == [per_block] * (len(blocks) - 1)
    assert sum(len(b) for b in blocks) == len(sizes)
    flat = [piece[0] for b in blocks for piece in b]
    assert flat == list(range(len(sizes)))  # walk order preserved
    assert all(b.size <= M for b in plan.blocks)


def test_block_closes_when_next_small_file_does_not_fit():
    blocks, _ = layout([HALF, HALF - 1, 2, 1])
    # HALF + (HALF-1) = M-1; 2 does not fit: new block, and 1 follows it there
    assert blocks == [[(0, 0, HALF), (1, 0, HALF - 1)], [(2, 0, 2), (3, 0, 1)]]


def test_small_files_from_different_directories_share_a_block():
    # the plan only sees walk order; directory boundaries do not close blocks
    blocks, _ = layout([6, 0, 6])
    assert blocks == [[(0, 0, 6), (2, 0, 6)]]


def test_plan_depends_only_on_sizes_and_block_size():
    sizes = [3, HALF + 9, 0, 17, M * 2 + 1, 40]
    assert layout(sizes)[0] == layout(list(sizes))[0]
    assert layout(sizes, 1024)[0] != layout(sizes)[0]


@pytest.mark.parametrize("bad", [0, M + 1])
def test_block_size_bounds(bad):
    with pytest.raises(ValueError):
        Packer(bad)


def _reference(sizes, block_size):
    """The packing policy file by file, written plainly: blocks as (file, offset,
    length) lists in index order, and each file's parts."""
    blocks, parts, open_block = [], [], None
    for i, size in enumerate(sizes):
        if size > block_size // 2:
            mine = []
            for start in range(0, size, block_size):
                length = min(block_size, size - start)
                blocks.append([(i, start, length)])
                mine.append((len(blocks) - 1, 0, length))
            parts.append(tuple(mine))
        elif size:
            if open_block is not None and sum(p[2] for p in blocks[open_block]) + size > block_size:
                open_block = None
            if open_block is None:
                blocks.append([])
                open_block = len(blocks) - 1
            offset = sum(p[2] for p in blocks[open_block])
            blocks[open_block].append((i, 0, size))
            parts.append(((open_block, offset, size),))
        else:
            parts.append(())
    return blocks, parts


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.just(0), st.integers(1, 50), st.integers(51, 350)), max_size=60),
       st.integers(1, 8))
def test_batches_pack_as_the_policy_does_file_by_file(sizes, most):
    """Whatever the batches (a run of small files is placed with one search), the
    blocks, their pieces and every file's parts are the plain policy's."""
    blocks, plan = layout(sizes, 100, most)
    assert (blocks, plan.parts) == _reference(sizes, 100)
    assert all(b.count == len(b.pieces) and b.size == sum(p.length for p in b.pieces) for b in plan.blocks)
    assert sum(b.ends for b in plan.blocks) == sum(1 for s in sizes if s)
    assert all(b.pieces_at(range(1, b.count, 2)) == b.pieces[1::2] for b in plan.blocks)
