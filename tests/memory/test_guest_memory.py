"""GuestMemory: sorted snapshot, translation, helpers, dirty marks, new tables."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from vubackend.bitmap import DirtyLog, DirtyLogSlot
from vubackend.errors import MappingError, UnmappedAddressError
from vubackend.memory import (
    MAX_MEM_SLOTS,
    FrontendAddress,
    GuestAddress,
    GuestMemory,
    MmapBackend,
)

from ._support import count_fds, count_mappings, descriptor
from .conftest import MakeMemfd

G = GuestAddress
F = FrontendAddress

# The table used by most tests, from one 64 KiB memfd (file offset = GPA for
# the first two regions):
#   A: GPA [0x0000, 0x3000)  file [0x0000, 0x3000)  frontend 0x7f..0000
#   B: GPA [0x3000, 0x8000)  file [0x3000, 0x8000)  frontend 0x7f..3000
#   (gap)
#   C: GPA [0x10000, 0x12000) file [0x9100, 0xb100) frontend 0x5000_0000
# A and B are adjacent; C is at an unaligned file offset and its frontend
# address sorts first although its GPA sorts last.
CONTENT = os.urandom(0x10000)
C_FADDR = 0x5000_0000


def file_bytes(gpa: int, length: int) -> bytes:
    """What the table holds at [gpa, gpa + length), from CONTENT."""
    out = b""
    for start in range(gpa, gpa + length):
        if start < 0x8000:
            out += CONTENT[start : start + 1]
        else:
            out += CONTENT[start - 0x10000 + 0x9100 : start - 0x10000 + 0x9101]
    return out


@pytest.fixture
def memfd(make_memfd: MakeMemfd) -> int:
    return make_memfd(len(CONTENT), CONTENT)


@pytest.fixture
def log_buf() -> bytearray:
    return bytearray(8)  # covers GPA [0, 0x40000)


@pytest.fixture
def mem(memfd: int, log_buf: bytearray) -> Iterator[GuestMemory]:
    slot = DirtyLogSlot(DirtyLog(log_buf))
    memory = GuestMemory.map(
        [  # deliberately not in GPA order
            descriptor(
                memfd, 0x10000, 0x2000, frontend_addr=C_FADDR, mmap_offset=0x9100
            ),
            descriptor(memfd, 0x3000, 0x5000, mmap_offset=0x3000),
            descriptor(memfd, 0x0, 0x3000),
        ],
        log=slot,
    )
    yield memory
    memory.close()
    slot.close()


def dirty_pages(log_buf: bytearray) -> set[int]:
    return {i * 8 + b for i, v in enumerate(log_buf) for b in range(8) if v >> b & 1}


# ---------------------------------------------------------------- table


def test_regions_are_sorted_by_gpa_whatever_the_order_given(mem: GuestMemory) -> None:
    assert [r.gpa for r in mem.regions] == [0x0, 0x3000, 0x10000]
    assert len(mem) == 3
    assert mem.end_gpa == 0x12000


def test_find_region_and_locate(mem: GuestMemory) -> None:
    assert mem.find_region(G(0x2FFF)) is mem.regions[0]
    assert mem.find_region(G(0x3000)) is mem.regions[1]
    assert mem.find_region(G(0x8000)) is None
    assert mem.find_region(G(-1)) is None
    region, offset = mem.locate(G(0x10010), 0x100)
    assert (region.gpa, offset) == (0x10000, 0x10)
    with pytest.raises(UnmappedAddressError, match="not inside one memory region"):
        mem.locate(G(0x2FFE), 4)  # spans A and B: not one region
    with pytest.raises(UnmappedAddressError):
        mem.locate(G(0x8000), 0)


def test_empty_memory_maps_nothing() -> None:
    empty = GuestMemory()
    assert len(empty) == 0
    assert empty.end_gpa == 0
    with pytest.raises(UnmappedAddressError):
        empty.translate(G(0), 1)
    with pytest.raises(UnmappedAddressError):
        empty.faddr_to_gpa(F(0), 1)


# ---------------------------------------------------------------- translate


def test_translate_inside_one_region(mem: GuestMemory) -> None:
    (view,) = mem.translate(G(0x10100), 0x200)
    assert view.tobytes() == CONTENT[0x9200:0x9400]
    assert not view.readonly


def test_translate_splits_at_a_region_boundary(mem: GuestMemory) -> None:
    views = mem.translate(G(0x2F00), 0x200)
    assert [v.nbytes for v in views] == [0x100, 0x100]
    assert b"".join(v.tobytes() for v in views) == CONTENT[0x2F00:0x3100]


def test_translate_the_whole_of_two_adjacent_regions(mem: GuestMemory) -> None:
    views = mem.translate(G(0), 0x8000)
    assert [v.nbytes for v in views] == [0x3000, 0x5000]
    assert b"".join(v.tobytes() for v in views) == CONTENT[:0x8000]


@pytest.mark.parametrize(
    ("gpa", "length", "where"),
    [
        (0x7F00, 0x101, 0x8000),  # runs off B into the gap
        (0x8000, 1, 0x8000),  # in the gap
        (0xFFFF, 2, 0xFFFF),  # starts in the gap, ends in C
        (0x11FFF, 2, 0x12000),  # runs off the end
        (0x20000, 1, 0x20000),  # beyond everything
        (-1, 2, -1),  # negative: unmapped, not wrapped
        ((1 << 64) - 1, 2, (1 << 64) - 1),  # past u64: no wrap to 0
    ],
)
def test_translate_fails_unless_every_byte_is_mapped(
    mem: GuestMemory, gpa: int, length: int, where: int
) -> None:
    with pytest.raises(
        UnmappedAddressError, match=f"no memory region at {where:#x}"
    ) as info:
        mem.translate(G(gpa), length)
    assert (info.value.address, info.value.length) == (gpa, length)


def test_translate_of_zero_bytes_is_empty_anywhere(mem: GuestMemory) -> None:
    assert mem.translate(G(0x8000), 0) == []
    with pytest.raises(ValueError, match="negative"):
        mem.translate(G(0), -1)


# ---------------------------------------------------------------- frontend addresses


def test_frontend_addresses_translate_to_gpas(mem: GuestMemory) -> None:
    base = 0x7F00_0000_0000
    assert mem.faddr_to_gpa(F(base + 0x3010), 0x100) == 0x3010
    assert mem.faddr_to_gpa(F(C_FADDR + 0x1FFE), 2) == 0x11FFE
    assert mem.faddr_to_gpa(F(base + 0x2FFF), 0) == 0x2FFF


@pytest.mark.parametrize(
    "faddr_length",
    [
        (0x7F00_0000_0000 + 0x2FF0, 0x20),  # crosses A into B: rings are contiguous
        (C_FADDR + 0x1FFF, 2),  # runs off C
        (C_FADDR - 1, 1),  # just below C
        (0x7F00_0000_8000, 0),  # just past B, even for 0 bytes
    ],
)
def test_frontend_ranges_must_lie_in_one_region(
    mem: GuestMemory, faddr_length: tuple[int, int]
) -> None:
    faddr, length = faddr_length
    with pytest.raises(UnmappedAddressError, match="frontend address") as info:
        mem.faddr_to_gpa(F(faddr), length)
    assert (info.value.address, info.value.length) == (faddr, length)


# ---------------------------------------------------------------- read / write


def test_read_and_write_bytes_across_regions(mem: GuestMemory, memfd: int) -> None:
    assert mem.read(G(0x2FF0), 0x20) == CONTENT[0x2FF0:0x3010]
    mem.write(G(0x2FFE), b"WXYZ")
    assert os.pread(memfd, 4, 0x2FFE) == b"WXYZ"
    out = bytearray(6)
    assert mem.read_into(G(0x2FFD), out) == 6
    assert out == CONTENT[0x2FFD:0x2FFE] + b"WXYZ" + CONTENT[0x3002:0x3003]
    assert mem.read(G(0x8000), 0) == b""


def test_a_write_to_a_partly_unmapped_range_writes_nothing(
    mem: GuestMemory, memfd: int, log_buf: bytearray
) -> None:
    with pytest.raises(UnmappedAddressError):
        mem.write(G(0x7FFE), b"abcd")
    assert os.pread(memfd, 2, 0x7FFE) == CONTENT[0x7FFE:0x8000]
    assert dirty_pages(log_buf) == set()


@pytest.mark.parametrize("gpa", [0x100, 0x2FFD, 0x2FFF])  # inside A, and across A|B
def test_little_endian_integers(mem: GuestMemory, memfd: int, gpa: int) -> None:
    assert mem.read_u64(G(gpa)) == int.from_bytes(file_bytes(gpa, 8), "little")
    mem.write_u8(G(gpa), 0xAB)
    assert mem.read_u8(G(gpa)) == 0xAB
    mem.write_u16(G(gpa), 0x1234)
    assert os.pread(memfd, 2, gpa) == b"\x34\x12"
    assert mem.read_u16(G(gpa)) == 0x1234
    mem.write_u32(G(gpa), 0xDEADBEEF)
    assert os.pread(memfd, 4, gpa) == b"\xef\xbe\xad\xde"
    assert mem.read_u32(G(gpa)) == 0xDEADBEEF
    mem.write_u64(G(gpa), 0x0102030405060708)
    assert os.pread(memfd, 8, gpa) == bytes(range(8, 0, -1))
    assert mem.read_u64(G(gpa)) == 0x0102030405060708


def test_integers_out_of_range_are_refused(mem: GuestMemory) -> None:
    for write, value in (
        (mem.write_u8, 256),
        (mem.write_u16, 1 << 16),
        (mem.write_u32, -1),
        (mem.write_u64, 1 << 64),
    ):
        with pytest.raises(ValueError, match="does not fit"):
            write(G(0x100), value)
    with pytest.raises(ValueError, match="does not fit"):
        mem.write_u32(G(0x2FFE), 1 << 32)  # the split path too
    with pytest.raises(UnmappedAddressError):
        mem.write_u32(G(0x7FFE), 1)
    with pytest.raises(UnmappedAddressError):
        mem.read_u16(G(0x11FFF))


def test_native_copies_give_the_same_results(memfd: int) -> None:
    mem = GuestMemory.map(
        [
            descriptor(memfd, 0, 0x3000),
            descriptor(memfd, 0x3000, 0x5000, mmap_offset=0x3000),
        ],
        MmapBackend(native_copies=True),
    )
    try:
        assert mem.read(G(0x2FF0), 0x20) == CONTENT[0x2FF0:0x3010]
        mem.write_u32(G(0x2FFE), 0x11223344)
        assert mem.read_u32(G(0x2FFE)) == 0x11223344
        mem.write_u16(G(0x10), 0xBEEF)
        assert os.pread(memfd, 2, 0x10) == b"\xef\xbe"
    finally:
        mem.close()


# ---------------------------------------------------------------- dirty marks


def test_writes_mark_exactly_the_pages_they_touch(
    mem: GuestMemory, log_buf: bytearray
) -> None:
    mem.write(G(0x1FFF), b"ab")  # inside A, straddling pages 1 and 2
    assert dirty_pages(log_buf) == {1, 2}
    mem.write(G(0x2FFF), b"cd")  # straddling regions A|B: pages 2 and 3
    assert dirty_pages(log_buf) == {1, 2, 3}
    mem.write_u64(G(0x10FFC), 0)  # in C, indexed by GPA (pages 0x10, 0x11)
    assert dirty_pages(log_buf) == {1, 2, 3, 0x10, 0x11}
    mem.write_u32(G(0x5000), 7)  # exactly one page, at its start
    assert dirty_pages(log_buf) == {1, 2, 3, 5, 0x10, 0x11}
    mem.write(G(0x6000), b"")  # nothing written, nothing marked
    mem.read(G(0x7000), 0x10)  # reads mark nothing
    assert dirty_pages(log_buf) == {1, 2, 3, 5, 0x10, 0x11}


def test_a_large_write_across_regions_marks_every_page(
    mem: GuestMemory, log_buf: bytearray
) -> None:
    mem.write(G(0x800), bytes(0x7000))
    assert dirty_pages(log_buf) == set(range(0, 8))


# ---------------------------------------------------------------- new tables


def test_adding_a_region_builds_a_new_snapshot(mem: GuestMemory, memfd: int) -> None:
    region = MmapBackend().map_region(
        descriptor(memfd, 0x8000, 0x1000, mmap_offset=0xF000)
    )
    bigger = mem.with_region_added(region)
    try:
        assert [r.gpa for r in bigger.regions] == [0, 0x3000, 0x8000, 0x10000]
        assert len(mem) == 3  # the old snapshot is unchanged
        # A, B and the new region are adjacent: one range over all three.
        views = bigger.translate(G(0x2000), 0x6800)
        assert [v.nbytes for v in views] == [0x1000, 0x5000, 0x800]
        for view in views:
            view.release()  # the caller's views, not the regions' own
        assert bigger.read(G(0x3000), 4) == CONTENT[0x3000:0x3004]
        views = bigger.translate(G(0x7FFF), 2)
        assert (
            b"".join(v.tobytes() for v in views)
            == CONTENT[0x7FFF:0x8000] + CONTENT[0xF000:0xF001]
        )
    finally:
        bigger.close()
    assert not region.mapped
    assert all(r.mapped for r in mem.regions)  # still held by `mem`


def test_adding_an_overlapping_region_is_refused_and_closes_it(
    mem: GuestMemory, memfd: int
) -> None:
    maps = count_mappings()
    region = MmapBackend().map_region(descriptor(memfd, 0x7000, 0x2000))
    with pytest.raises(MappingError, match="overlap in guest physical"):
        mem.with_region_added(region)
    assert not region.mapped
    assert count_mappings() == maps
    assert all(r.mapped for r in mem.regions)
    assert mem.read(G(0), 4) == CONTENT[:4]


def test_removing_a_region_needs_gpa_frontend_address_and_size(
    mem: GuestMemory,
) -> None:
    b_faddr = F(0x7F00_0000_3000)
    for gpa, faddr, size in (
        (0x3000, b_faddr, 0x4000),
        (0x3000, F(0x1234), 0x5000),
        (0x3001, b_faddr, 0x5000),
    ):
        with pytest.raises(UnmappedAddressError, match="no memory region with GPA"):
            mem.with_region_removed(G(gpa), faddr, size)
    removed = mem.regions[1]
    smaller = mem.with_region_removed(G(0x3000), b_faddr, 0x5000)
    assert [r.gpa for r in smaller.regions] == [0, 0x10000]
    with pytest.raises(UnmappedAddressError):
        smaller.translate(G(0x2FFF), 2)
    mem.close()
    assert not removed.mapped  # only `mem` held it
    assert all(r.mapped for r in smaller.regions)
    smaller.close()


def test_a_table_over_the_slot_limit_is_refused(make_memfd: MakeMemfd) -> None:
    fd = make_memfd(0x1000)
    fds, maps = count_fds(), count_mappings()
    backend = MmapBackend()
    regions = [
        backend.map_region(descriptor(fd, i * 0x1000, 0x1000))
        for i in range(MAX_MEM_SLOTS)
    ]
    full = GuestMemory(regions)
    extra = backend.map_region(descriptor(fd, MAX_MEM_SLOTS * 0x1000, 0x1000))
    with pytest.raises(MappingError, match="too many memory regions: 510"):
        full.with_region_added(extra)
    assert not extra.mapped
    assert full.read_u8(G((MAX_MEM_SLOTS - 1) * 0x1000)) == 0
    full.close()
    assert (count_fds(), count_mappings()) == (fds, maps)


def test_a_failed_map_leaves_nothing_mapped(memfd: int) -> None:
    fds, maps = count_fds(), count_mappings()
    with pytest.raises(MappingError, match=r"GPA 0x4000: .*past the end"):
        GuestMemory.map(
            [
                descriptor(memfd, 0, 0x4000),
                descriptor(memfd, 0x4000, 0x1000, mmap_offset=0xFFFF),
            ]
        )
    with pytest.raises(MappingError, match="overlap"):
        GuestMemory.map(
            [descriptor(memfd, 0, 0x4000), descriptor(memfd, 0x3000, 0x1000)]
        )
    assert (count_fds(), count_mappings()) == (fds, maps)


def test_closing_a_snapshot_unmaps_its_regions(memfd: int) -> None:
    fds, maps = count_fds(), count_mappings()
    mem = GuestMemory.map(
        [descriptor(memfd, 0, 0x4000), descriptor(memfd, 0x4000, 0x4000)]
    )
    assert count_mappings() == maps + 2
    mem.close()
    assert mem.closed
    assert (count_fds(), count_mappings()) == (fds, maps)
    with pytest.raises(ValueError, match="released"):
        mem.read(G(0), 1)  # a clear error, not a crash


def test_a_snapshot_refuses_an_unmapped_region(memfd: int) -> None:
    region = MmapBackend().map_region(descriptor(memfd, 0, 0x1000))
    region.close()
    with pytest.raises(MappingError, match="already unmapped"):
        GuestMemory([region])


def test_the_same_region_twice_is_an_overlap_and_is_closed_once(memfd: int) -> None:
    region = MmapBackend().map_region(descriptor(memfd, 0, 0x1000))
    region.incref()  # a second holder, who must keep it
    with pytest.raises(MappingError, match="overlap"):
        GuestMemory([region, region])
    assert region.mapped
    region.close()
    assert not region.mapped
