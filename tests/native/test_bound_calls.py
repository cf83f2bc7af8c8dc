"""The data path's native calls: a RingWalker bound to a table (pop_bound,
pop_take, push_one, push_bound, complete, complete_records: same results as
the unbound calls, arguments checked by the C side), the request header a
pop copies out (peek), sums over a pop's records, and the chain copies
(chain_copy, chain_write, chain_file_io) with what they refuse."""

from __future__ import annotations

import os
import struct
from array import array
from pathlib import Path

import pytest

from vubackend._native import (
    PEEK_BYTES,
    RING_AVAIL_EVENT,
    RING_EVENT_IDX,
    RING_PEEK,
    AtomicView,
    RegionTable,
    RingStop,
    RingWalker,
    TableReleasedError,
    chain_copy,
    chain_file_io,
    chain_write,
    chains_fill,
    chains_forward,
    inflight_tracking,
    log_chains,
    pin_records,
    pin_segments,
    records_sum,
)

DESC = struct.Struct("<QIHH")
MEM = 0x40000
DESC_GPA, AVAIL_GPA, USED_GPA = 0x1000, 0x2000, 0x3000
QSIZE = 8


def publish(buf: bytearray, heads: list[int], start: int = 0) -> None:
    for i, head in enumerate(heads):
        struct.pack_into("<H", buf, AVAIL_GPA + 4 + 2 * ((start + i) % QSIZE), head)
    struct.pack_into("<H", buf, AVAIL_GPA + 2, (start + len(heads)) & 0xFFFF)


def request(buf: bytearray, head: int, data: int, header: bytes) -> None:
    """A two-descriptor chain at ``head``: a readable header, a writable
    byte."""
    buf[data : data + len(header)] = header
    DESC.pack_into(buf, DESC_GPA + 16 * head, data, len(header), 1, head + 1)
    DESC.pack_into(buf, DESC_GPA + 16 * (head + 1), data + 0x100, 1, 2, 0)


@pytest.fixture
def ring() -> tuple[bytearray, RegionTable, RingWalker]:
    buf = bytearray(MEM)
    table = RegionTable([(0, buf)])
    walker = RingWalker(QSIZE, packed=False)
    walker.bind(table, DESC_GPA, AVAIL_GPA, USED_GPA)
    return buf, table, walker


def test_bound_pop_gives_what_the_unbound_pop_gives(
    ring: tuple[bytearray, RegionTable, RingWalker],
) -> None:
    buf, table, walker = ring
    request(buf, 0, 0x8000, b"H" * 20)
    request(buf, 2, 0x9000, b"J" * 3)
    publish(buf, [0, 2])
    stop, count, next_avail, _, taken = walker.pop_take(0, 0, RING_PEEK, 8)
    assert (stop, count, next_avail) == (RingStop.EMPTY, 2, 2)
    assert taken is not None
    words, segs, peek, _ptr = taken
    assert peek is not None
    other = RingWalker(QSIZE, packed=False)
    unbound = other.split_pop(
        table, DESC_GPA, AVAIL_GPA, USED_GPA, 0, flags=0, max_chains=8
    )
    assert list(unbound.chains) == list(words)
    assert list(unbound.segments) == list(segs)
    # The header of each chain, PEEK_BYTES each (a short one padded).
    assert peek[:PEEK_BYTES] == b"H" * PEEK_BYTES
    assert peek[PEEK_BYTES : PEEK_BYTES + 3] == b"JJJ"
    assert walker.pop_bound(2, 0, 0, 8)[:2] == (RingStop.EMPTY, 0)
    request(buf, 4, 0xA000, b"K" * 16)
    publish(buf, [4], start=2)
    again = walker.pop_take(2, 0, 0, 8)[4]
    assert again is not None
    assert again[2] is None, "no header without RING_PEEK"


def test_bound_push_and_complete(
    ring: tuple[bytearray, RegionTable, RingWalker],
) -> None:
    buf, _table, walker = ring
    for head in (0, 2, 4):
        request(buf, head, 0x8000 + 0x200 * head, b"h" * 16)
    publish(buf, [0, 2, 4])
    assert walker.pop_bound(0, 0, RING_AVAIL_EVENT, 8)[:2] == (RingStop.EMPTY, 3)
    assert walker.push_one(0, 0, 0, 0, 1) == (RingStop.EMPTY, 1, 0)
    assert struct.unpack_from("<H", buf, USED_GPA + 2)[0] == 1
    # The driver's words: avail.flags 1 (NO_INTERRUPT), used_event 7.
    struct.pack_into("<HH", buf, AVAIL_GPA, 1, 3)
    struct.pack_into("<H", buf, AVAIL_GPA + 4 + 2 * QSIZE, 7)
    stop, next_used, _, word, more = walker.complete(1, 0, RING_EVENT_IDX, [2, 1, 4, 1])
    assert (stop, next_used, more) == (RingStop.EMPTY, 3, False)
    assert word == 1 | 7 << 16
    assert struct.unpack_from("<IIII", buf, USED_GPA + 4 + 8) == (2, 1, 4, 1)
    # A chain published since the pop shows as "more".
    request(buf, 6, 0x9000, b"n" * 16)
    publish(buf, [6], start=3)
    assert walker.pop_bound(3, 0, 0, 1)[1] == 1
    request(buf, 0, 0x9800, b"m" * 16)
    publish(buf, [0], start=4)
    assert walker.complete(3, 0, 0, [6, 1])[4] is True
    # What is not in flight is refused, nothing written.
    assert walker.push_one(4, 0, 0, 6, 1)[0] is RingStop.FAULT
    assert walker.last_push(RingStop.FAULT).where == 0
    assert walker.complete(4, 0, 0, [0, 1, 0, 1])[0] is RingStop.FAULT


def test_complete_records_returns_a_pop_without_entries(
    ring: tuple[bytearray, RegionTable, RingWalker],
) -> None:
    """complete_records writes what complete writes for the same chains
    with one used length, from the pop's records, and refuses what is not
    in flight or not in the records."""
    buf, _table, walker = ring
    for head in (0, 2, 4):
        request(buf, head, 0x8000 + 0x200 * head, b"r" * (10 + head))
    publish(buf, [4, 0, 2])
    stop, count, _, _, taken = walker.pop_take(0, 0, 0, 8)
    assert (stop, count) == (RingStop.EMPTY, 3)
    assert taken is not None
    words = taken[0]
    records = pin_records(words)
    # The readable bytes of the three chains, then less a 12-byte header.
    assert records_sum(records, 3, 5) == 14 + 10 + 12
    assert records_sum(records, 3, 5, skip=12) == 2 + 0 + 0
    assert records_sum(records, 1, 6) == 1  # the writable byte
    struct.pack_into("<H", buf, AVAIL_GPA + 4 + 2 * QSIZE, 1)  # used_event
    stop, next_used, _, word, more = walker.complete_records(
        0, 0, RING_EVENT_IDX, records, 2, 0
    )
    assert (stop, next_used, more) == (RingStop.EMPTY, 2, False)
    assert word >> 16 == 1
    assert struct.unpack_from("<HH", buf, USED_GPA) == (0, 2)
    assert struct.unpack_from("<IIII", buf, USED_GPA + 4) == (4, 0, 0, 0)
    # The first two are no longer in flight: refused, nothing written.
    assert walker.complete_records(2, 0, 0, records, 3, 0)[0] is RingStop.FAULT
    assert struct.unpack_from("<H", buf, USED_GPA + 2)[0] == 2
    with pytest.raises(ValueError, match="record words"):
        walker.complete_records(2, 0, 0, records, 4, 0)
    with pytest.raises(ValueError, match="u32"):
        walker.complete_records(2, 0, 0, records, 1, 1 << 32)
    with pytest.raises(IndexError):
        records_sum(records, 4, 5)
    with pytest.raises(IndexError):
        records_sum(records, 1, 8)
    with pytest.raises(TypeError):
        pin_records(array("Q", [0] * 8))
    # More than one pop's worth (the scratch space) is refused by C.
    small = RingWalker(QSIZE, packed=False, max_chains=1)
    small.bind(_table, DESC_GPA, AVAIL_GPA, USED_GPA)
    with pytest.raises(ValueError, match="out of range"):
        small.complete_records(2, 0, 0, records, 2, 0)


def test_bound_calls_check_their_arguments(
    ring: tuple[bytearray, RegionTable, RingWalker],
) -> None:
    _buf, table, walker = ring
    with pytest.raises(ValueError, match="out of range"):
        walker.pop_bound(0x10000, 0, 0, 8)
    with pytest.raises(ValueError, match="out of range"):
        walker.pop_bound(0, 0, 0x80, 8)
    with pytest.raises(ValueError, match="out of range"):
        walker.pop_bound(0, 0, 0, 0)
    with pytest.raises(ValueError, match="out of range"):
        walker.push_one(0x10000, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="u32"):
        walker.push_one(0, 0, 0, -1, 0)
    with pytest.raises(ValueError, match="u32"):
        walker.complete(0, 0, 0, [0, 1 << 32])
    packed = RingWalker(QSIZE, packed=True)
    with pytest.raises(ValueError, match="not bound"):
        packed.pop_bound(0, 1, 0, 8)
    packed.bind(table, DESC_GPA, 0x5000)
    with pytest.raises(ValueError, match="out of range"):
        packed.pop_bound(QSIZE, 1, 0, 8)
    with pytest.raises(ValueError, match="out of range"):
        packed.pop_bound(0, 2, 0, 8)
    table.release()
    with pytest.raises(ValueError, match="live"):
        walker.pop_bound(0, 0, 0, 8)
    walker.unbind()
    with pytest.raises(ValueError, match="live"):
        walker.push_bound(0, 0, 0, [0, 0])


# ---------------------------------------------------------------- chain data


def segments(*pieces: tuple[int, int, int, bool]) -> array[int]:
    """(region, offset, length, writable) per segment, in the walk's words."""
    words = array("Q")
    for region, offset, length, writable in pieces:
        words += array("Q", [offset, length | region << 32 | writable << 63])
    return words


@pytest.fixture
def two_regions() -> tuple[bytearray, bytearray, RegionTable]:
    a, b = bytearray(0x1000), bytearray(0x1000)
    return a, b, RegionTable([(0, a), (0x10000, b)])


def test_chain_copies_cross_segments_and_regions(
    two_regions: tuple[bytearray, bytearray, RegionTable],
) -> None:
    a, b, table = two_regions
    segs = segments((0, 0x10, 4, True), (1, 0x20, 6, True), (0, 0x40, 8, True))
    ptr = pin_segments(segs)
    assert chain_write(table, ptr, 3, 0, 3, 2, b"0123456789ABCDEFXYZ") == 16
    assert a[0x12:0x14] == b"01"
    assert b[0x20:0x26] == b"234567"
    assert a[0x40:0x48] == b"89ABCDEF"
    out = bytearray(10)
    assert chain_copy(table, ptr, 3, 1, 2, 3, out, False) == 10
    assert bytes(out) == b"56789ABCDE"
    assert chain_copy(table, ptr, 3, 0, 3, 100, out, False) == 0, "past the end"
    assert chain_write(table, ptr, 3, 0, 1, 0, memoryview(b"wxyz")) == 4


def test_chain_copies_refuse_what_they_cannot_do(
    two_regions: tuple[bytearray, bytearray, RegionTable],
) -> None:
    _a, _b, table = two_regions
    segs = segments((0, 0x10, 4, True), (1, 0xFF0, 0x20, True), (5, 0, 4, True))
    ptr = pin_segments(segs)
    with pytest.raises(IndexError, match="outside the batch"):
        chain_write(table, ptr, 3, 2, 2, 0, b"x")
    with pytest.raises(OSError, match="outside its memory region"):
        chain_write(table, ptr, 3, 1, 1, 0, b"x")
    with pytest.raises(OSError, match="outside its memory region"):
        chain_write(table, ptr, 3, 2, 1, 0, b"x")  # no region 5
    with pytest.raises(BufferError):
        chain_copy(table, ptr, 3, 0, 1, 0, b"read-only", False)
    with pytest.raises(OverflowError):
        chain_copy(table, ptr, 3, 0, 1, -1, bytearray(4), False)
    with pytest.raises(TypeError, match="array"):
        pin_segments(array("I", [1, 2]))
    table.release()
    with pytest.raises(TableReleasedError):
        chain_write(table, ptr, 3, 0, 1, 0, b"x")


def test_chain_file_io_both_ways(
    two_regions: tuple[bytearray, bytearray, RegionTable], tmp_path: Path
) -> None:
    a, b, table = two_regions
    content = os.urandom(0x100)
    path = tmp_path / "f"
    path.write_bytes(content)
    segs = segments((0, 0, 0x30, True), (1, 0x100, 0x50, True))
    ptr = pin_segments(segs)
    fd = os.open(path, os.O_RDWR)
    try:
        assert chain_file_io(fd, table, ptr, 2, 0, 2, 0x10, 0x60, 0x20, True) == 0x60
        assert a[0x10:0x30] + b[0x100:0x140] == content[0x20:0x80]
        assert chain_file_io(fd, table, ptr, 2, 0, 2, 0, 0x80, 0xF0, True) == 0x10
        a[0:0x30] = b"A" * 0x30
        assert chain_file_io(fd, table, ptr, 2, 0, 1, 0, 0x30, 0x200, False) == 0x30
        with pytest.raises(OSError, match="Invalid argument"):
            chain_file_io(fd, table, ptr, 2, 0, 1, 0, 0x30, -1, True)
    finally:
        os.close(fd)
    assert path.read_bytes()[0x200:0x230] == b"A" * 0x30
    with pytest.raises(OSError, match="Bad file descriptor"):
        chain_file_io(fd, table, ptr, 2, 0, 1, 0, 0x10, 0, True)


def record(first: int, nsegs: int, nread: int, rlen: int, wlen: int) -> list[int]:
    """A chain record (native.c layout) over segments [first, first+nsegs)."""
    return [0, 1, first, nsegs, nread, rlen, wlen, nsegs]


def test_chains_fill_and_forward_check_what_they_are_given(
    two_regions: tuple[bytearray, bytearray, RegionTable],
) -> None:
    a, b, table = two_regions
    # Chain 0: 8 bytes in a, then 8 in b; chain 1: 4 bytes in a (too small
    # for a 5-byte frame); chain 2: a readable 6-byte source in b.
    segs = segments(
        (0, 0x100, 8, True),
        (1, 0x200, 8, True),
        (0, 0x300, 4, True),
        (1, 0x400, 6, False),
    )
    ptr = pin_segments(segs)
    words = array(
        "I", record(0, 2, 0, 0, 16) + record(2, 1, 0, 0, 4) + record(3, 1, 1, 6, 0)
    )
    records = pin_records(words)
    used = array("I", [0, 0])
    lengths = array("I", [10, 5])
    done = chains_fill(
        table, ptr, 4, records, 0, 2, b"PP", b"0123456789abcde", lengths, used
    )
    assert done == 1, "the second frame does not fit its chain"
    assert list(used) == [12, 0]
    assert bytes(a[0x100:0x108] + b[0x200:0x204]) == b"PP0123456789"
    with pytest.raises(IndexError, match="overrun"):
        chains_fill(table, ptr, 4, records, 0, 1, b"", b"short", array("I", [6]), used)
    with pytest.raises(IndexError, match="outside"):
        chains_fill(table, ptr, 4, records, 2, 2, b"", b"x", array("I", [1, 1]), used)
    b[0x400:0x406] = b"SOURCE"
    used = array("I", [0])
    assert (
        chains_forward(
            table, (ptr, 4, records, 2), (ptr, 4, records, 0), 1, 2, b"H", used
        )
        == 1
    )
    assert list(used) == [5]
    assert bytes(a[0x100:0x105]) == b"HURCE"
    # A record that claims more room than its segments have is refused.
    lying = pin_records(array("I", record(2, 1, 0, 0, 64)))
    with pytest.raises(OSError, match="outside its memory region"):
        chains_fill(table, ptr, 4, lying, 0, 1, b"", b"x" * 10, array("I", [10]), used)
    table.release()
    with pytest.raises(TableReleasedError):
        chains_fill(table, ptr, 4, records, 0, 1, b"", b"x", array("I", [1]), used)


def test_log_chains_marks_what_each_chain_got() -> None:
    """One call marks the pages of the bytes each chain got, across segments
    and regions; pages past the log are counted, not marked; a bad
    argument marks nothing."""
    low, high = bytearray(0x3000), bytearray(0x2000)
    table = RegionTable([(0, low), (0x10000, high)])
    # Chain 0: a readable header, then 0x20 bytes across pages 0 and 1 and
    # 0x100 in the high region (page 0x11, past a 16-page log); chain 1:
    # page 2.
    segs = segments(
        (0, 0x0, 0x10, False),
        (0, 0xFF0, 0x20, True),
        (1, 0x1000, 0x100, True),
        (0, 0x2800, 0x100, True),
    )
    ptr = pin_segments(segs)
    records = pin_records(
        array("I", record(0, 3, 1, 0x10, 0x120) + record(3, 1, 0, 0, 0x100))
    )
    log_buf = bytearray(2)
    log = AtomicView(log_buf)
    assert log_chains(log, table, ptr, 4, records, 0, 2, array("I", [0x30, 1])) == 1
    assert log_buf == bytearray([0b111, 0])
    # Only the first bytes count: 0x10 of chain 0 stays on page 0.
    log_buf[:] = bytes(2)
    assert log_chains(log, table, ptr, 4, records, 0, 1, array("I", [0x10])) == 0
    assert log_buf == bytearray([0b1, 0])
    log_buf[:] = bytes(2)
    assert log_chains(log, table, ptr, 4, records, 1, 1, array("I", [0])) == 0
    assert log_buf == bytes(2), "nothing written, nothing marked"
    with pytest.raises(OSError, match="outside its memory region"):
        log_chains(log, table, ptr, 4, records, 0, 2, array("I", [0x10, 0x101]))
    assert log_buf == bytes(2), "a bad chain: not even the good one is marked"
    with pytest.raises(IndexError):
        log_chains(log, table, ptr, 4, records, 1, 2, array("I", [1, 1]))
    with pytest.raises(IndexError):
        log_chains(log, table, ptr, 4, records, 0, 2, array("I", [1]))
    table.release()
    with pytest.raises(TableReleasedError):
        log_chains(log, table, ptr, 4, records, 0, 1, array("I", [1]))
    log.release()
    with pytest.raises(ValueError, match="released"):
        log_chains(log, table, ptr, 4, records, 0, 1, array("I", [1]))


def test_inflight_tracking_binds_only_what_it_can_write() -> None:
    walker = RingWalker(QSIZE, packed=False)
    region = bytearray(16 + 16 * QSIZE)
    with pytest.raises(ValueError, match="cannot hold"):
        inflight_tracking.track(walker, region, QSIZE + 1, 1)
    with pytest.raises(ValueError, match="split"):
        inflight_tracking.track(RingWalker(QSIZE, packed=True), region, QSIZE, 1)
    with pytest.raises(TypeError):
        inflight_tracking.track(walker, bytes(len(region)), QSIZE, 1)
    inflight_tracking.track(walker, region, QSIZE, 7)
    assert inflight_tracking.counter(walker) == 7
    inflight_tracking.set_counter(walker, 9)
    assert inflight_tracking.counter(walker) == 9
    inflight_tracking.untrack(walker)
    inflight_tracking.untrack(walker)  # idempotent
    region.append(0)  # unpinned: the buffer can be resized again
