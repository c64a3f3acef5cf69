"""The resume index: block records, loading without decoding rows, fingerprints, compaction."""

from __future__ import annotations

import hashlib
import os
import tracemalloc

import msgpack
import pytest
from msgpack import packb

from ingest.journal import JournalCorrupt, JournalWriter, frame, iter_records, read_journal, rewrite_journal
from ingest.state import RunIdentity, RunState, block_key, block_record
from tests.journal_rows import record_rows

TOP = 2**64 - 1  # digests are full u64s


@pytest.fixture
def state(tmp_path):
    s = RunState(str(tmp_path / "state"), RunIdentity(("/src",), 1 << 20, "directory /store"))
    os.makedirs(s.dir)
    return s


def rows_of(names, version=0, size=1024):
    """Piece rows (name, size, mtime, ctime, inode, offset, length) of small files."""
    return [[n, size, 1_700_000_000_000_000_000 + version, 1_700_000_000_500_000_000 + version, 1000 + i, 0, size]
            for i, n in enumerate(names)]


def locator(tag, size=1024):
    return f"{hashlib.md5(tag.encode()).hexdigest()}+{size}"


def old_record(rows, loc, digests):
    """A block record as version 1 wrote it: the rows and digests as plain lists."""
    return {"t": "block", "loc": loc, "exp": None, "pieces": rows, "digests": digests}


def write(state, records):
    w = JournalWriter(state.journal_path)
    for r in records:
        w.append(r)
    w.close()


def test_block_records_round_trip_packed(state):
    rows = rows_of(["a", "b/c", "dé"])
    digests = [0, 1, TOP]
    record = block_record(packb(rows), locator("x", 3072) + "+A" + "0" * 40 + "@65000000", digests)
    assert record["key"] == block_key(packb(rows)) and isinstance(record["rows"], bytes)
    assert len(record["digests"]) == 8 * len(rows) and record["exp"] == 0x65000000
    write(state, [{"t": "run"}, record, {"t": "done", "pdh": "p"}])
    (decoded,) = [r for r in iter_records(state.journal_path) if r["t"] == "block"]
    assert record_rows(decoded) == rows
    index, valid = state.load()
    assert valid == os.path.getsize(state.journal_path) and index.records == 3
    stored = index.blocks[block_key(packb(rows))]
    assert (stored.locator, stored.expiry, stored.digests) == (record["loc"], 0x65000000, digests)
    assert index.last_done == {"t": "done", "pdh": "p"}


def test_a_block_stored_by_this_run_is_indexed_with_its_digests_but_is_not_earlier(state):
    index, valid = state.load()
    rows = rows_of(["new"])
    record = block_record(packb(rows), locator("n"), [TOP])
    journal = state.open_writer(valid)
    try:
        index.add(record, journal.append(record))   # as put does
    finally:
        journal.close()
    assert index.blocks[block_key(packb(rows))].digests == [TOP]
    # what earlier runs recorded of a file, for saying why it is uploaded: not this run's
    assert index.previous_fingerprints({"new"}) == {}


def test_loading_does_not_decode_the_rows(state):
    """200,000 rows in 20 records: loading holds about one frame, not the decoded rows."""
    per, count = 10_000, 20
    records = [block_record(packb(rows_of([f"dir{b:03d}/file{i:05d}" for i in range(per)])), locator(str(b), per * 1024),
                            list(range(per))) for b in range(count)]
    write(state, records)
    size = os.path.getsize(state.journal_path)
    tracemalloc.start()
    try:
        msgpack.unpackb(records[0]["rows"])
        one_record_decoded = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        index, _ = state.load()
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert len(index.blocks) == count
    print(f"journal {size} bytes, rows decoded ~{one_record_decoded * count} bytes, peak of load {peak} bytes")
    assert peak < one_record_decoded * count / 5   # rows decoded cost 6-7 times the file
    assert peak < size / 4                          # and the file is never read whole


def test_a_version_1_journal_still_loads_and_gives_fingerprints(state):
    rows = rows_of(["a", "b"])
    write(state, [{"t": "run", "v": 1}, old_record(rows, locator("o", 2048), [5, TOP])])
    index, _ = state.load()
    assert index.blocks[block_key(packb(rows))].digests == [5, TOP]
    assert index.previous_fingerprints({"a", "z"}) == {"a": tuple(rows[0][1:5])}


def test_previous_fingerprints_are_the_latest_of_the_names_asked(state):
    first, second = rows_of(["a", "b", "c"], version=1), rows_of(["b"], version=2)
    write(state, [old_record(first, locator("1", 3072), [1, 2, 3]), {"t": "done"},
                  block_record(packb(second), locator("2"), [4]), {"t": "run"}])
    index, _ = state.load()
    assert index.previous_fingerprints({"a", "b", "missing"}) == {"a": tuple(first[0][1:5]),
                                                                  "b": tuple(second[0][1:5])}
    assert index.previous_fingerprints(set()) == {}


def test_no_block_known_means_no_pass_over_the_journal(state):
    write(state, [{"t": "run"}, {"t": "done"}])
    index, _ = state.load()
    with open(state.journal_path, "r+b") as f:   # a pass would now fail
        f.write(b"XX")
    assert index.previous_fingerprints({"a"}) == {}


def test_compaction_keeps_only_live_blocks_and_the_last_run_records(state):
    live_old, live, dead = rows_of(["old"]), rows_of(["live"]), rows_of(["dead"])
    kept_old = frame(old_record(live_old, locator("o"), [1]))
    stale = block_record(packb(live), locator("stale"), [2])     # stored again since: only the last is kept
    fresh = block_record(packb(live), locator("fresh"), [3])
    save = {"t": "save", "rid": 1, "target": None, "pdh": "p"}
    records = [{"t": "run", "n": 1}, stale, *[block_record(packb(dead), locator(f"d{i}"), [i]) for i in range(20)],
               {"t": "done", "n": 1}, save, {"t": "run", "n": 2}, fresh, {"t": "failed", "n": 2}, {"t": "done", "n": 2}]
    with open(state.journal_path, "wb") as f:
        f.write(kept_old)
    write(state, records)
    index, _ = state.load()
    state.compact({block_key(packb(live_old)), block_key(packb(live))}, index)
    data = open(state.journal_path, "rb").read()
    assert data.startswith(kept_old) and frame(fresh) in data   # frames copied byte for byte
    kinds = [(r["t"], r.get("loc") or r.get("n")) for r in read_journal(state.journal_path)[0]]
    assert kinds == [("block", locator("o")), ("save", None), ("run", 2), ("block", locator("fresh")),
                     ("failed", 2), ("done", 2)]
    again, valid = state.load()
    assert set(again.blocks) == {block_key(packb(live_old)), block_key(packb(live))} and valid == len(data)
    assert again.blocks[block_key(packb(live))].digests == [3] and again.blocks[block_key(packb(live_old))].digests == [1]
    assert os.listdir(state.dir) == ["journal"] and os.stat(state.journal_path).st_mode & 0o777 == 0o600


def test_a_small_journal_is_left_as_it_is(state):
    write(state, [{"t": "run"}, block_record(packb(rows_of(["dead"])), locator("d"), [1]), {"t": "done"}])
    before = open(state.journal_path, "rb").read()
    state.compact(set(), state.load()[0])
    assert open(state.journal_path, "rb").read() == before


def test_load_stops_at_a_torn_tail_and_reports_damage(state):
    rows = rows_of(["a"])
    write(state, [{"t": "run"}, block_record(packb(rows), locator("a"), [1])])
    good = os.path.getsize(state.journal_path)
    with open(state.journal_path, "ab") as f:
        f.write(frame(block_record(packb(rows_of(["b"])), locator("b"), [2]))[:-3])
    index, valid = state.load()
    assert valid == good and list(index.blocks) == [block_key(packb(rows))]
    data = bytearray(open(state.journal_path, "rb").read())
    data[20] ^= 0x40   # inside the first record, with more after it
    open(state.journal_path, "wb").write(bytes(data))
    with pytest.raises(JournalCorrupt, match="damaged at byte 0 .*--reset-state"):
        state.load()


def test_digests_of_a_journal_changed_under_the_run_are_refused(state):
    rows = rows_of(["a"])
    write(state, [{"t": "run"}, block_record(packb(rows), locator("a"), [1])])
    stored = state.load()[0].blocks[block_key(packb(rows))]
    rewrite_journal(state.journal_path, [frame({"t": "run", "pad": "x" * 100})])
    with pytest.raises(JournalCorrupt, match="changed under this run"):
        _ = stored.digests


def test_a_blocks_rows_are_packed_as_the_journal_has_always_keyed_them(tmp_path):
    """packed_rows streams its rows into the packer; the bytes (and so every journaled
    block's key) are those of the whole list of rows packed at once."""
    from trees import pack

    from ingest.state import packed_rows
    from ingest.walk import walk_sources

    for i in range(40):
        (tmp_path / "d" / f"s{i // 20}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "d" / f"s{i // 20}" / f"f{i}").write_bytes(b"x" * (i * 37 % 500))
    (tmp_path / "d" / "big").write_bytes(b"y" * 3000)        # a file over several blocks
    files = walk_sources([str(tmp_path / "d")]).files
    plan = pack(files, 1024)
    assert len(plan.blocks) > 3
    for block in plan.blocks:
        rows = [(p.file.name, *p.file.fingerprint[:4], p.file_offset, p.length) for p in block.pieces]
        assert packed_rows(block) == packb(rows)


@pytest.mark.parametrize("change, moved", [
    ("nothing", []),
    ("touched", [(1, 6), (3, 8)]),                 # mtime, ctime or inode moved: reusable if the bytes match
    ("resized", None), ("renamed", None), ("reranged", None), ("one more", None), ("cut short", None)])
def test_moved_pieces_are_those_whose_fingerprint_alone_moved(change, moved):
    from ingest.state import moved_pieces

    then = [(f"f{i}", 5 + i, 10, 20, 30 + i, 0, 5 + i) for i in range(5)]
    now = list(then)
    if change == "touched":
        now[1] = (*now[1][:2], 11, 21, now[1][4], *now[1][5:])
        now[3] = (*now[3][:4], 99, *now[3][5:])
    elif change == "resized":
        now[2] = (now[2][0], 6, *now[2][2:])
    elif change == "renamed":
        now[2] = ("g", *now[2][1:])
    elif change == "reranged":
        now[2] = (*now[2][:5], 1, 4)
    elif change == "one more":
        now.append(now[-1])
    packed_then = packb(then)
    packed_now = packb(now) if change != "cut short" else packb(now)[:-3]
    assert moved_pieces(packed_now, packed_then) == moved


@pytest.mark.parametrize("then", [packb(7), b"", b"\xc1", packb([("f", 1)])])
def test_moved_pieces_of_journaled_rows_that_are_no_rows_is_none(then):
    from ingest.state import moved_pieces

    assert moved_pieces(packb([("f", 1, 2, 3, 4, 0, 1)]), then) is None
