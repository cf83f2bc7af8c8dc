"""DescriptorChain: reading and writing across buffers and regions, the
dirty bitmap, raw views, stale chains after a memory table change."""

from __future__ import annotations

import contextlib
import gc
import os

import pytest

from vubackend.bitmap import DirtyLog
from vubackend.memory import (
    FrontendAddress,
    GuestAddress,
    GuestMemoryAtomic,
    RegionDescriptor,
)
from vubackend.vring import DescriptorChain, SplitDriverRing, VringState, split_layout

from ._support import DATA, REGIONS, RING_BASE, SPAN, Harness
from .conftest import MakeHarness


def descriptor_for(fd: int, gpa: int, size: int, off: int) -> RegionDescriptor:
    return RegionDescriptor(
        gpa=GuestAddress(gpa),
        size=size,
        frontend_addr=FrontendAddress(0x7F00_0000_0000 + gpa),
        mmap_offset=off,
        fd=fd,
    )


def one_chain(h: Harness, buffers: list[tuple[int, int, bool]]) -> DescriptorChain:
    d = h.driver
    assert isinstance(d, SplitDriverRing)
    d.add(buffers)
    [chain] = h.state.pop_chains()
    return chain


def pages(log_buf: bytearray) -> set[int]:
    return {i * 8 + b for i, v in enumerate(log_buf) for b in range(8) if v >> b & 1}


def test_read_in_pieces_across_buffers(harness: MakeHarness, native: bool) -> None:
    h = harness(packed=False, native=native)
    payload = os.urandom(0x70)
    h.write(DATA, payload[:0x10])
    h.write(SPAN, payload[0x10:0x50])
    h.write(DATA + 0x100, payload[0x50:])
    c = one_chain(
        h, [(DATA, 0x10, False), (SPAN, 0x40, False), (DATA + 0x100, 0x20, False)]
    )
    got = b"".join(c.read(n) for n in (3, 0, 0x20, 0x11, 0x100))
    assert got == payload
    assert c.bytes_read == 0x70
    assert c.read(5) == b""
    assert c.read_all() == b""


def test_readinto(harness: MakeHarness, native: bool) -> None:
    h = harness(packed=False, native=native)
    h.write(DATA, b"abcdef")
    c = one_chain(h, [(DATA, 6, False)])
    buf = bytearray(4)
    assert c.readinto(buf) == 4
    assert buf == b"abcd"
    assert c.readinto(buf) == 2
    assert buf[:2] == b"ef"


def test_write_in_pieces_and_truncation(harness: MakeHarness, native: bool) -> None:
    h = harness(packed=False, native=native)
    c = one_chain(h, [(DATA, 4, False), (DATA + 0x10, 3, True), (SPAN, 0x30, True)])
    assert c.write(b"") == 0
    assert c.write(b"ab") == 2
    assert c.write(memoryview(b"cdef")) == 4
    rest = os.urandom(0x40)
    assert c.write(rest) == 0x30 - 3
    assert c.write(b"x") == 0
    assert c.bytes_written == c.writable_len == 0x33
    assert h.read(DATA + 0x10, 3) == b"abc"
    assert h.read(SPAN, 0x30) == b"def" + rest[: 0x30 - 3]
    assert h.read(SPAN + 0x30, 4) == bytes(4)  # nothing past the buffer
    assert h.read(DATA, 4) == bytes(4)  # the readable buffer is untouched


def test_writable_buffers_and_mark_written(
    harness: MakeHarness, native: bool, atomic: GuestMemoryAtomic
) -> None:
    log_buf = bytearray(0x140000 // 0x1000 // 8)
    atomic.set_log(DirtyLog(log_buf))
    h = harness(packed=False, native=native)
    c = one_chain(h, [(0x100000 + 0x2FF0, 0x20, True)])  # two pages of R2
    views = c.writable_buffers()
    assert [len(v) for v in views] == [0x20]
    views[0][:] = b"q" * 0x20
    assert pages(log_buf) == set()  # raw views are not logged
    c.mark_written(0x8)
    assert pages(log_buf) == {0x102}
    c.mark_written(0x20)
    assert pages(log_buf) == {0x102, 0x103}
    assert c.bytes_written == 0x20
    with pytest.raises(ValueError, match="not in 0"):
        c.mark_written(0x21)
    assert c.readable_buffers() == []


def test_write_marks_exactly_the_pages_written(
    harness: MakeHarness, native: bool, atomic: GuestMemoryAtomic
) -> None:
    log_buf = bytearray(0x140000 // 0x1000 // 8)
    atomic.set_log(DirtyLog(log_buf))
    h = harness(packed=False, native=native)
    c = one_chain(h, [(0x3FFF0, 0x20, True), (0x100000 + 0x5000, 0x3000, True)])
    c.write(b"w" * 0x30)
    # 0x3fff0..0x40010 spans pages 0x3f and 0x40; then 0x10 bytes of 0x105.
    assert pages(log_buf) == {0x3F, 0x40, 0x105}


def test_segments_report_guest_addresses(harness: MakeHarness, native: bool) -> None:
    h = harness(packed=False, native=native)
    c = one_chain(h, [(0x100010, 8, False), (SPAN, 0x40, True)])
    assert [(s.gpa, s.length, s.writable) for s in c.segments()] == [
        (0x100010, 8, False),
        (SPAN, 0x20, True),
        (0x40000, 0x20, True),
    ]
    assert "readable=8" in repr(c)


def count_mappings() -> int:
    with open("/proc/self/maps") as maps:
        return sum(1 for line in maps if "/memfd:vubackend-test-vring " in line)


def test_rings_follow_a_new_memory_table(
    native: bool, atomic: GuestMemoryAtomic, memfd: int
) -> None:
    size = 8
    desc, avail, used, _ = split_layout(RING_BASE, size)
    state = VringState(atomic, 64, native=native)
    state.set_queue_size(size)
    state.set_queue_info(desc, avail, used)
    state.set_queue_ready(True)
    with atomic.memory() as mem:
        driver = SplitDriverRing(mem, size, desc, avail, used)
        head = driver.add([(DATA, 8, True)])
        [stale] = state.pop_chains()
        state.add_used(head, 0)
        assert driver.collect() == [(head, 0)]
    del driver
    gc.collect()
    baseline = count_mappings()
    # SET_MEM_TABLE with the same layout: a new snapshot, new mappings.
    atomic.set_mem_table(
        [descriptor_for(memfd, gpa, size_, off) for gpa, size_, off in REGIONS]
    )
    with atomic.memory() as mem:
        driver = SplitDriverRing(mem, size, desc, avail, used, reset=False)
        head = driver.add([(DATA + 0x10, 8, True)])
        [chain] = state.pop_chains()  # the ring moves to the new snapshot
        assert chain.head == head
        chain.write(b"new")
        state.add_used(head, 3)
        assert driver.collect() == [(head, 3)]
    del driver
    # A chain from the old table never reaches freed memory: the old
    # mapping stays while the chain holds views of it, or the write fails.
    with contextlib.suppress(ValueError):
        stale.write(b"old")
    del stale, chain
    gc.collect()
    # The old mappings are gone once the ring moved on and the chain died.
    assert count_mappings() <= baseline
    state.close()
