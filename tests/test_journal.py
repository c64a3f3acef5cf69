"""The checkpoint journal: framing, torn tails, corruption."""

import os

import pytest

from ingest.journal import FRAME_OVERHEAD, JournalCorrupt, JournalWriter, frame, read_journal, rewrite_journal


def write(path, records):
    w = JournalWriter(str(path))
    for r in records:
        w.append(r)
    w.close()


RECORDS = [{"t": "block", "n": i, "pad": "x" * i} for i in range(10)]


def test_round_trip_and_private_mode(tmp_path):
    path = tmp_path / "journal"
    write(path, RECORDS)
    records, valid, torn = read_journal(str(path))
    assert records == RECORDS and valid == path.stat().st_size and not torn
    assert path.stat().st_mode & 0o777 == 0o600


def test_missing_journal_is_empty(tmp_path):
    assert read_journal(str(tmp_path / "none")) == ([], 0, False)


@pytest.mark.parametrize("cut", [1, FRAME_OVERHEAD - 1, FRAME_OVERHEAD + 1])
def test_torn_tail_is_detected_and_cut_off(tmp_path, cut):
    path = tmp_path / "journal"
    write(path, RECORDS)
    good = path.stat().st_size
    with open(path, "ab") as f:
        f.write(frame({"t": "block", "n": 99})[:cut])
    records, valid, torn = read_journal(str(path))
    assert records == RECORDS and valid == good and torn
    JournalWriter(str(path), valid_length=valid).close()  # what a resuming run does
    assert path.stat().st_size == good


def test_damaged_last_record_counts_as_torn(tmp_path):
    path = tmp_path / "journal"
    write(path, RECORDS)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    records, _, torn = read_journal(str(path))
    assert records == RECORDS[:-1] and torn


@pytest.mark.parametrize("where", ["payload", "header"])
def test_flipped_byte_in_the_middle_is_reported(tmp_path, where):
    path = tmp_path / "journal"
    write(path, RECORDS)
    data = bytearray(path.read_bytes())
    third = len(frame(RECORDS[0])) + len(frame(RECORDS[1]))
    data[third + (FRAME_OVERHEAD + 2 if where == "payload" else 3)] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(JournalCorrupt, match=f"{path} is damaged at byte {third} .*--reset-state"):
        read_journal(str(path))


def test_rewrite_is_atomic_and_private(tmp_path):
    path = tmp_path / "journal"
    write(path, RECORDS)
    rewrite_journal(str(path), map(frame, RECORDS[:3]))
    assert read_journal(str(path))[0] == RECORDS[:3]
    assert os.listdir(tmp_path) == ["journal"] and path.stat().st_mode & 0o777 == 0o600
