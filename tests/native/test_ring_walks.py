"""The ring-walk part of the native facade: RegionTable and RingWalker.

The walkers themselves are tested against the Python reference in
tests/vring (test_hostile.py runs both on generated hostile rings); here:
what the facade refuses before C sees it, and the C paths that the ring
layer rarely reaches (a full segment array, undoing claims)."""

from __future__ import annotations

import struct

import pytest

from vubackend._native import (
    CHAIN_WORDS,
    MAX_CHAIN_SEGMENTS,
    RING_IN_ORDER,
    RING_INDIRECT,
    RegionTable,
    RingFault,
    RingStop,
    RingWalker,
)

DESC = struct.Struct("<QIHH")
MEM = 0x40000
DESC_GPA, AVAIL_GPA, USED_GPA = 0x1000, 0x2000, 0x3000
TABLE_GPA = 0x10000


def split_ring(buf: bytearray, heads: list[int]) -> None:
    for i, head in enumerate(heads):
        struct.pack_into("<H", buf, AVAIL_GPA + 4 + 2 * i, head)
    struct.pack_into("<H", buf, AVAIL_GPA + 2, len(heads))


# ---------------------------------------------------------------- RegionTable


def test_region_table_checks_its_regions() -> None:
    with pytest.raises(TypeError):
        RegionTable([(0, b"read-only")])
    with pytest.raises(ValueError, match="empty"):
        RegionTable([(0, bytearray(0))])
    with pytest.raises(ValueError, match="overlaps"):
        RegionTable([(0, bytearray(16)), (8, bytearray(16))])
    with pytest.raises(ValueError, match="out of order"):
        RegionTable([(32, bytearray(16)), (0, bytearray(16))])
    with pytest.raises(ValueError, match="2\\*\\*64"):
        RegionTable([((1 << 64) - 8, bytearray(16))])
    table = RegionTable([(0, bytearray(16)), (16, bytearray(16))])
    assert len(table) == 2
    table.release()
    table.release()
    assert table.released
    assert "released" in repr(table)


def test_region_table_pins_its_buffers() -> None:
    buf = bytearray(64)
    table = RegionTable([(0, buf)])
    with pytest.raises(BufferError):
        buf.extend(b"x")
    table.release()
    buf.extend(b"x")


def test_released_table_is_refused() -> None:
    buf = bytearray(MEM)
    table = RegionTable([(0, buf)])
    walker = RingWalker(8, packed=False)
    table.release()
    with pytest.raises(ValueError, match="released"):
        walker.split_pop(table, DESC_GPA, AVAIL_GPA, USED_GPA, 0, flags=0, max_chains=8)
    with pytest.raises(ValueError, match="released"):
        walker.split_push(table, USED_GPA, 0, [0, 0])


# ---------------------------------------------------------------- RingWalker arguments


def test_walker_sizes() -> None:
    with pytest.raises(ValueError):
        RingWalker(0, packed=True)
    with pytest.raises(ValueError):
        RingWalker(32769, packed=True)
    with pytest.raises(ValueError, match="power of two"):
        RingWalker(12, packed=False)
    with pytest.raises(ValueError):
        RingWalker(8, packed=False, max_chains=0)
    assert RingWalker(12, packed=True).qsize == 12
    assert "packed" in repr(RingWalker(3, packed=True))


def test_walker_refuses_bad_arguments() -> None:
    table = RegionTable([(0, bytearray(MEM))])
    split = RingWalker(8, packed=False)
    packed = RingWalker(8, packed=True)
    with pytest.raises(ValueError, match="packed walker"):
        packed.split_pop(table, 0, 0, 0, 0, flags=0, max_chains=1)
    with pytest.raises(ValueError, match="split walker"):
        split.packed_pop(table, 0, 0, 1, flags=0, max_chains=1)
    with pytest.raises(ValueError, match="u16"):
        split.split_pop(table, 0, 0, 0, 0x10000, flags=0, max_chains=1)
    with pytest.raises(ValueError, match="u64"):
        split.split_pop(table, 1 << 64, 0, 0, 0, flags=0, max_chains=1)
    with pytest.raises(ValueError, match="flags"):
        split.split_pop(table, 0, 0, 0, 0, flags=8, max_chains=1)
    with pytest.raises(ValueError, match="below 1"):
        split.split_pop(table, 0, 0, 0, 0, flags=0, max_chains=0)
    with pytest.raises(ValueError, match="below 8"):
        packed.packed_pop(table, 0, 8, 1, flags=0, max_chains=1)
    with pytest.raises(ValueError, match="0 or 1"):
        packed.packed_pop(table, 0, 0, 2, flags=0, max_chains=1)
    with pytest.raises(ValueError, match="pairs"):
        split.split_push(table, 0, 0, [1])
    with pytest.raises(ValueError, match="u32"):
        split.split_push(table, 0, 0, [1, -1])
    with pytest.raises(ValueError, match="u32"):
        split.split_push(table, 0, 0, [1, 2, 3, 1 << 32])
    with pytest.raises(ValueError, match="flags"):
        packed.packed_push(table, 0, 0, 1, [], flags=RING_INDIRECT)


# ---------------------------------------------------------------- C paths


def test_ring_outside_the_table_stops_with_ring() -> None:
    table = RegionTable([(0, bytearray(MEM))])
    walker = RingWalker(8, packed=False)
    r = walker.split_pop(
        table, MEM - 0x40, AVAIL_GPA, USED_GPA, 0, flags=0, max_chains=8
    )
    assert r.stop is RingStop.RING
    assert r.detail == MEM - 0x40
    r2 = walker.split_push(table, MEM - 8, 0, [])
    assert r2.stop is RingStop.RING


def test_full_segment_array_resumes_on_the_next_call() -> None:
    buf = bytearray(MEM)
    table = RegionTable([(0, buf)])
    walker = RingWalker(8, packed=False, max_chains=2)  # room: 8 + 4096 segments
    # Chain 0: an indirect table of 4000 one-byte buffers (4000 segments);
    # chain 1: 200 more. Together they do not fit: the call stops before
    # chain 1 (FULL), and the next call returns it.
    for i in range(4000):
        DESC.pack_into(
            buf, TABLE_GPA + 16 * i, 0x30000 + i, 1, 1 if i < 3999 else 0, i + 1
        )
    for i in range(200):
        DESC.pack_into(
            buf,
            TABLE_GPA + 0x10000 + 16 * i,
            0x30000 + i,
            1,
            1 if i < 199 else 0,
            i + 1,
        )
    DESC.pack_into(buf, DESC_GPA, TABLE_GPA, 16 * 4000, 4, 0)
    DESC.pack_into(buf, DESC_GPA + 16, TABLE_GPA + 0x10000, 16 * 200, 4, 0)
    split_ring(buf, [0, 1])
    r = walker.split_pop(
        table, DESC_GPA, AVAIL_GPA, USED_GPA, 0, flags=RING_INDIRECT, max_chains=2
    )
    assert r.stop is RingStop.FULL
    assert len(r.chains) == CHAIN_WORDS
    assert r.chains[3] == 4000  # segments of chain 0
    assert r.next_avail == 1
    r = walker.split_pop(
        table, DESC_GPA, AVAIL_GPA, USED_GPA, 1, flags=RING_INDIRECT, max_chains=2
    )
    assert r.stop is RingStop.EMPTY
    assert r.chains[0] == 1
    assert r.chains[3] == 200
    assert len(r.segments) == 400
    assert MAX_CHAIN_SEGMENTS == 4096


def test_avail_jump_is_broken() -> None:
    buf = bytearray(MEM)
    table = RegionTable([(0, buf)])
    walker = RingWalker(8, packed=False)
    struct.pack_into("<H", buf, AVAIL_GPA + 2, 9)
    r = walker.split_pop(table, DESC_GPA, AVAIL_GPA, USED_GPA, 0, flags=0, max_chains=8)
    assert r.stop is RingStop.BROKEN
    assert r.detail == 9
    assert r.next_avail == 0


def test_push_claims_are_undone_on_a_fault() -> None:
    buf = bytearray(MEM)
    table = RegionTable([(0, buf)])
    walker = RingWalker(8, packed=False)
    for i in range(3):
        DESC.pack_into(buf, DESC_GPA + 16 * i, 0x30000 + 0x10 * i, 8, 2, 0)
    split_ring(buf, [0, 1, 2])
    r = walker.split_pop(table, DESC_GPA, AVAIL_GPA, USED_GPA, 0, flags=0, max_chains=8)
    assert len(r.chains) == 3 * CHAIN_WORDS
    assert [walker.inflight[i] for i in range(4)] == [8, 8, 8, RingWalker.FREE]
    bad = walker.split_push(table, USED_GPA, 0, [0, 8, 1, 8, 2, 9])
    assert (bad.stop, bad.fault, bad.where, bad.detail) == (
        RingStop.FAULT,
        RingFault.USED_LEN,
        2,
        2,
    )
    assert [walker.inflight[i] for i in range(3)] == [8, 8, 8]  # unclaimed
    assert struct.unpack_from("<H", buf, USED_GPA + 2)[0] == 0  # nothing written
    dup = walker.split_push(table, USED_GPA, 0, [1, 0, 1, 0])
    assert (dup.fault, dup.where) == (RingFault.NOT_IN_FLIGHT, 1)
    ok = walker.split_push(table, USED_GPA, 0, [2, 8, 0, 1, 1, 0])
    assert (ok.stop, ok.written, ok.next_used) == (RingStop.EMPTY, 3, 3)
    assert struct.unpack_from("<HH", buf, USED_GPA) == (0, 3)
    assert struct.unpack_from("<6I", buf, USED_GPA + 4) == (2, 8, 0, 1, 1, 0)
    walker.clear_inflight()
    assert walker.inflight[0] == RingWalker.FREE


def test_packed_push_in_order_runs() -> None:
    buf = bytearray(MEM)
    table = RegionTable([(0, buf)])
    walker = RingWalker(4, packed=True)
    avail = 1 << 7
    for slot in range(4):
        struct.pack_into(
            "<QIHH", buf, DESC_GPA + 16 * slot, 0x30000, 4, slot, avail | 2
        )
    r = walker.packed_pop(table, DESC_GPA, 0, 1, flags=0, max_chains=8)
    assert (r.stop, r.next_avail, r.avail_wrap) == (RingStop.EMPTY, 0, 0)
    assert len(r.chains) == 4 * CHAIN_WORDS
    p = walker.packed_push(
        table, DESC_GPA, 0, 1, [0, 0, 1, 0, 2, 4, 3, 0], flags=RING_IN_ORDER
    )
    # Runs (0, 1, 2) and (3): two used descriptors, at slots 0 and 3.
    assert (p.stop, p.written, p.next_used, p.used_wrap) == (RingStop.EMPTY, 2, 0, 0)
    used = 1 << 7 | 1 << 15
    assert struct.unpack_from("<IHH", buf, DESC_GPA + 8) == (4, 2, used | 2)
    assert struct.unpack_from("<IHH", buf, DESC_GPA + 48 + 8) == (0, 3, used)
