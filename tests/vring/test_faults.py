"""Every guard of the chain walk, one hand-built hostile chain each: each ends
in a clear DescriptorChainError (or RingStateError for the ring), on both
paths and both ring types; a split ring goes on with the next chain."""

from __future__ import annotations

import struct

import pytest

from vubackend.errors import DescriptorChainError, RingStateError
from vubackend.memory import GuestAddress
from vubackend.vring import PackedDriverRing, SplitDriverRing

from ._support import DATA, GAP, Harness
from .conftest import MakeHarness

NEXT, WRITE, INDIRECT = 1, 2, 4
AVAIL = 1 << 7
TABLE = DATA + 0x8000
DESC = struct.Struct("<QIHH")


def table(h: Harness, entries: list[tuple[int, int, int, int]], at: int = TABLE) -> int:
    h.mem.write(GuestAddress(at), b"".join(DESC.pack(*e) for e in entries))
    return at


# (name, descriptors at 0.., indirect table entries or None, message)
SPLIT_CASES: list[
    tuple[
        str,
        list[tuple[int, int, int, int]],
        list[tuple[int, int, int, int]] | None,
        str,
    ]
] = [
    ("next out of range", [(DATA, 4, NEXT, 99)], None, "next index 99 is outside"),
    ("self loop", [(DATA, 4, NEXT, 0)], None, "longer than 8 descriptors"),
    ("two-cycle", [(DATA, 4, NEXT, 1), (DATA, 4, NEXT, 0)], None, "longer than 8"),
    (
        "indirect with next",
        [(TABLE, 16, INDIRECT | NEXT, 1)],
        [(DATA, 4, 0, 0)],
        "both INDIRECT and NEXT",
    ),
    (
        "nested indirect",
        [(TABLE, 32, INDIRECT, 0)],
        [(DATA, 4, NEXT, 1), (TABLE, 16, INDIRECT, 0)],
        "inside an indirect table",
    ),
    ("indirect len 0", [(TABLE, 0, INDIRECT, 0)], None, "indirect table length 0"),
    ("indirect len 24", [(TABLE, 24, INDIRECT, 0)], None, "indirect table length 24"),
    (
        "indirect too long",
        [(TABLE, 16 * 32769, INDIRECT, 0)],
        None,
        "at most 32768 entries",
    ),
    ("indirect unmapped", [(GAP, 32, INDIRECT, 0)], None, "indirect table at 0x80000"),
    (
        "indirect loop",
        [(TABLE, 32, INDIRECT, 0)],
        [(DATA, 4, NEXT, 1), (DATA, 4, NEXT, 0)],
        "longer than 2 descriptors",
    ),
    (
        "indirect next out of range",
        [(TABLE, 32, INDIRECT, 0)],
        [(DATA, 4, NEXT, 2), (DATA, 4, 0, 0)],
        "next index 2",
    ),
    ("buffer in the gap", [(GAP + 0x10, 4, 0, 0)], None, "buffer at 0x80010"),
    ("buffer into the gap", [(0x80000 - 2, 4, 0, 0)], None, "buffer at 0x7fffe"),
    ("buffer past 2**64", [((1 << 64) - 2, 4, 0, 0)], None, "is not in guest memory"),
    (
        "total overflow",
        [(DATA, 0x10, NEXT, 1), (DATA, 0xFFFF_FFFF, 0, 0)],
        None,
        "does not fit in 32 bits",
    ),
    (
        "readable after writable",
        [(DATA, 4, WRITE | NEXT, 1), (DATA, 4, 0, 0)],
        None,
        "readable descriptor after",
    ),
]


@pytest.mark.parametrize(
    ("name", "descs", "entries", "message"),
    SPLIT_CASES,
    ids=[c[0] for c in SPLIT_CASES],
)
def test_split_chain_faults(
    harness: MakeHarness,
    native: bool,
    name: str,
    descs: list[tuple[int, int, int, int]],
    entries: list[tuple[int, int, int, int]] | None,
    message: str,
) -> None:
    h = harness(packed=False, native=native, size=8)
    d = h.driver
    assert isinstance(d, SplitDriverRing)
    if entries is not None:
        table(h, entries)
    for i, desc in enumerate(descs):
        d.write_descriptor(i, *desc)
    d.write_descriptor(7, DATA + 0x100, 4, WRITE, 0)
    d.push_head(0)
    d.push_head(7)  # a good chain after the bad one
    d.publish()
    with pytest.raises(DescriptorChainError, match=message):
        h.state.pop_chains()
    # The bad chain was consumed; the ring goes on.
    [good] = h.state.pop_chains()
    assert good.head == 7
    assert h.state.queue_next_avail() == 2


def test_split_head_out_of_range(harness: MakeHarness, native: bool) -> None:
    h = harness(packed=False, native=native, size=8)
    d = h.driver
    assert isinstance(d, SplitDriverRing)
    d.push_head(8)
    d.push_head(0xFFFF)
    d.publish()
    for head in (8, 0xFFFF):
        with pytest.raises(DescriptorChainError, match=f"head index {head}"):
            h.state.pop_chains()
    assert h.state.pop_chains() == []


def test_split_head_offered_twice(harness: MakeHarness, native: bool) -> None:
    h = harness(packed=False, native=native, size=8)
    d = h.driver
    assert isinstance(d, SplitDriverRing)
    d.write_descriptor(3, DATA, 4, WRITE, 0)
    d.push_head(3)
    d.push_head(3)
    d.publish()
    [c] = h.state.pop_chains()
    with pytest.raises(DescriptorChainError, match="already in flight"):
        h.state.pop_chains()
    h.state.add_used(c.head, 4)


def test_indirect_needs_the_feature(harness: MakeHarness, native: bool) -> None:
    h = harness(packed=False, native=native, size=8, indirect=False)
    d = h.driver
    assert isinstance(d, SplitDriverRing)
    table(h, [(DATA, 4, 0, 0)])
    d.write_descriptor(0, TABLE, 16, INDIRECT, 0)
    d.push_head(0)
    d.publish()
    with pytest.raises(DescriptorChainError, match="INDIRECT_DESC was not negotiated"):
        h.state.pop_chains()


def test_indirect_table_across_regions(harness: MakeHarness, native: bool) -> None:
    # A table that straddles R0/R1 is read correctly (libvhost-user once got
    # this wrong, vhost-user-protocol.md §7.2).
    h = harness(packed=False, native=native, size=8)
    d = h.driver
    assert isinstance(d, SplitDriverRing)
    at = 0x40000 - 24
    table(
        h,
        [(DATA, 4, NEXT, 1), (DATA + 0x10, 5, NEXT, 2), (DATA + 0x20, 6, WRITE, 0)],
        at,
    )
    d.write_descriptor(0, at, 48, INDIRECT, 0)
    d.push_head(0)
    d.publish()
    [c] = h.state.pop_chains()
    assert (c.readable_len, c.writable_len) == (9, 6)


def test_too_many_segments(harness: MakeHarness, native: bool) -> None:
    h = harness(packed=False, native=native, size=8)
    d = h.driver
    assert isinstance(d, SplitDriverRing)
    n = 4097
    table(h, [(DATA + 2 * i, 1, NEXT, i + 1) for i in range(n - 1)] + [(DATA, 1, 0, 0)])
    d.write_descriptor(0, TABLE, 16 * n, INDIRECT, 0)
    d.push_head(0)
    d.publish()
    with pytest.raises(DescriptorChainError, match="more than 4096 buffer pieces"):
        h.state.pop_chains()


def test_avail_index_jump_breaks_the_ring(harness: MakeHarness, native: bool) -> None:
    h = harness(packed=False, native=native, size=8)
    d = h.driver
    assert isinstance(d, SplitDriverRing)
    d.set_avail_idx(9)
    with pytest.raises(
        RingStateError, match=r"avail\.idx 9 is more than the queue size 8"
    ):
        h.state.pop_chains()
    with pytest.raises(RingStateError, match="broken"):
        h.state.pop_chains()
    with pytest.raises(RingStateError, match="broken"):
        h.state.enable_notification()
    # A new base restarts it.
    d.set_avail_idx(0)
    h.state.set_vring_base(0)
    assert h.state.pop_chains() == []


# ---------------------------------------------------------------- packed


PACKED_CASES: list[
    tuple[
        str,
        list[tuple[int, int, int, int]],
        list[tuple[int, int, int, int]] | None,
        str,
    ]
] = [
    (
        "chain longer than the ring",
        [(DATA, 4, 0, NEXT)] * 4,
        None,
        "longer than 4 descriptors",
    ),
    (
        "indirect with next",
        [(TABLE, 16, 0, INDIRECT | NEXT)],
        [(DATA, 4, 0, 0)],
        "both INDIRECT and NEXT",
    ),
    (
        "nested indirect",
        [(TABLE, 32, 0, INDIRECT)],
        [(DATA, 4, 0, 0), (TABLE, 16, 0, INDIRECT)],
        "inside an indirect table",
    ),
    ("indirect len", [(TABLE, 40, 0, INDIRECT)], None, "indirect table length 40"),
    ("indirect unmapped", [(GAP, 16, 0, INDIRECT)], None, "indirect table at 0x80000"),
    ("buffer unmapped", [(GAP, 16, 0, 0)], None, "buffer at 0x80000"),
    ("id out of range", [(DATA, 16, 4, 0)], None, "buffer id 4"),
    (
        "readable after writable",
        [(DATA, 4, 0, WRITE | NEXT), (DATA, 4, 0, 0)],
        None,
        "readable descriptor after",
    ),
    (
        "total overflow",
        [(DATA, 0x10, 0, NEXT), (DATA, 0xFFFF_FFFF, 0, 0)],
        None,
        "32 bits",
    ),
]


@pytest.mark.parametrize(
    ("name", "descs", "entries", "message"),
    PACKED_CASES,
    ids=[c[0] for c in PACKED_CASES],
)
def test_packed_chain_faults(
    harness: MakeHarness,
    native: bool,
    name: str,
    descs: list[tuple[int, int, int, int]],
    entries: list[tuple[int, int, int, int]] | None,
    message: str,
) -> None:
    h = harness(packed=True, native=native, size=4)
    d = h.driver
    assert isinstance(d, PackedDriverRing)
    if entries is not None:
        table(h, entries)
    for slot, (addr, length, ident, flags) in enumerate(descs):
        d.write_descriptor(slot, addr, length, ident, flags | AVAIL)
    with pytest.raises(DescriptorChainError, match=message):
        h.state.pop_chains()
    with pytest.raises(RingStateError, match="broken"):
        h.state.pop_chains()


def test_packed_id_offered_twice(harness: MakeHarness, native: bool) -> None:
    h = harness(packed=True, native=native, size=4)
    d = h.driver
    assert isinstance(d, PackedDriverRing)
    d.write_descriptor(0, DATA, 4, 2, AVAIL | WRITE)
    d.write_descriptor(1, DATA, 4, 2, AVAIL | WRITE)
    [c] = h.state.pop_chains()
    assert c.head == 2
    with pytest.raises(DescriptorChainError, match="id 2 is already in flight"):
        h.state.pop_chains()
