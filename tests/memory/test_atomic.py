"""GuestMemoryAtomic: leases, swaps under readers, deferred unmapping."""

from __future__ import annotations

import threading
import time

import pytest

from vubackend.bitmap import DirtyLog
from vubackend.errors import MappingError, UnmappedAddressError
from vubackend.memory import (
    MAX_MEM_SLOTS,
    FrontendAddress,
    GuestAddress,
    GuestMemory,
    GuestMemoryAtomic,
    MmapBackend,
)

from ._support import count_fds, count_mappings, descriptor
from .conftest import MakeMemfd

G = GuestAddress
PAGE = 0x1000


def filled(value: int, size: int = 4 * PAGE) -> bytes:
    return value.to_bytes(4, "little") * (size // 4)


def test_readers_lease_the_current_snapshot(make_memfd: MakeMemfd) -> None:
    atomic = GuestMemoryAtomic()
    with atomic.memory() as mem:
        assert len(mem) == 0  # starts empty
    atomic.set_mem_table([descriptor(make_memfd(4 * PAGE, filled(1)), 0, 4 * PAGE)])
    guard = atomic.memory()
    assert guard.memory.read_u32(G(0x100)) == 1
    guard.release()
    guard.release()  # idempotent
    with pytest.raises(ValueError, match="released"):
        _ = guard.memory
    atomic.close()


def test_an_old_table_stays_mapped_until_its_last_reader_is_done(
    make_memfd: MakeMemfd,
) -> None:
    one, two = make_memfd(4 * PAGE, filled(1)), make_memfd(4 * PAGE, filled(2))
    fds, maps = count_fds(), count_mappings()
    atomic = GuestMemoryAtomic()
    atomic.set_mem_table([descriptor(one, 0, 4 * PAGE)])
    old = atomic.memory()
    atomic.set_mem_table([descriptor(two, 0, 4 * PAGE)])
    assert count_mappings() == maps + 2  # the old one is still leased
    assert old.memory.read_u32(G(0)) == 1  # and still reads the old table
    with atomic.memory() as new:
        assert new.read_u32(G(0)) == 2
    old.release()
    assert count_mappings() == maps + 1
    atomic.close()
    assert (count_fds(), count_mappings()) == (fds, maps)


def test_add_and_remove_regions(make_memfd: MakeMemfd) -> None:
    fd = make_memfd(8 * PAGE, filled(7, 8 * PAGE))
    atomic = GuestMemoryAtomic()
    atomic.set_mem_table([descriptor(fd, 0, 4 * PAGE)])
    atomic.add_region(descriptor(fd, 4 * PAGE, 4 * PAGE, mmap_offset=4 * PAGE))
    with atomic.memory() as mem:
        assert [r.gpa for r in mem.regions] == [0, 4 * PAGE]
        assert mem.read_u64(G(4 * PAGE - 4)) == 0x0000000700000007
    atomic.remove_region(G(0), FrontendAddress(0x7F00_0000_0000), 4 * PAGE)
    with atomic.memory() as mem:
        assert [r.gpa for r in mem.regions] == [4 * PAGE]
    with pytest.raises(UnmappedAddressError):
        atomic.remove_region(G(0), FrontendAddress(0x7F00_0000_0000), 4 * PAGE)
    atomic.close()


def test_add_region_refuses_overlap_and_a_full_table_before_mapping(
    make_memfd: MakeMemfd,
) -> None:
    fd = make_memfd(PAGE)
    atomic = GuestMemoryAtomic()
    atomic.set_mem_table([descriptor(fd, i * PAGE, PAGE) for i in range(MAX_MEM_SLOTS)])
    fds, maps = count_fds(), count_mappings()
    with pytest.raises(MappingError, match="too many memory regions: already 509"):
        atomic.add_region(descriptor(fd, MAX_MEM_SLOTS * PAGE, PAGE))
    atomic.remove_region(G(0), FrontendAddress(0x7F00_0000_0000), PAGE)
    maps -= 1
    with pytest.raises(MappingError, match="overlap in guest physical"):
        atomic.add_region(descriptor(fd, PAGE, PAGE, frontend_addr=0x1000))
    with pytest.raises(MappingError, match="overlap in frontend"):
        atomic.add_region(descriptor(fd, 0, PAGE, frontend_addr=0x7F00_0000_1000))
    assert (count_fds(), count_mappings()) == (fds - 1, maps)
    atomic.add_region(descriptor(fd, 0, PAGE))  # the free slot
    atomic.close()


def test_a_failed_set_mem_table_keeps_the_current_table(make_memfd: MakeMemfd) -> None:
    fd = make_memfd(4 * PAGE, filled(3))
    atomic = GuestMemoryAtomic()
    atomic.set_mem_table([descriptor(fd, 0, 4 * PAGE)])
    maps = count_mappings()
    with pytest.raises(MappingError, match="past the end"):
        atomic.set_mem_table([descriptor(fd, 0, 5 * PAGE)])
    assert count_mappings() == maps
    with atomic.memory() as mem:
        assert mem.read_u32(G(0)) == 3
    atomic.close()


def test_the_log_follows_every_region_and_can_be_replaced(
    make_memfd: MakeMemfd,
) -> None:
    fd = make_memfd(8 * PAGE)
    atomic = GuestMemoryAtomic()
    atomic.set_mem_table([descriptor(fd, 0x10000, 4 * PAGE)])
    atomic.add_region(descriptor(fd, 0, 4 * PAGE, mmap_offset=4 * PAGE))
    first, second = bytearray(4), bytearray(4)  # cover GPA [0, 0x20000)
    atomic.set_log(DirtyLog(first))
    with atomic.memory() as mem:
        mem.write_u32(G(0x10FFE), 1)  # pages 0x10, 0x11 (byte 2)
        mem.write_u8(G(0x3000), 1)  # page 3 (byte 0), in the added region
    assert first == bytearray([0x08, 0, 0x03, 0])
    atomic.set_log(DirtyLog(second))
    with atomic.memory() as mem:
        mem.write_u8(G(0x1000), 1)
    assert first == bytearray([0x08, 0, 0x03, 0])
    assert second == bytearray([0x02, 0, 0, 0])
    atomic.set_log(None)
    with atomic.memory() as mem:
        mem.write_u8(G(0x2000), 1)
    assert second == bytearray([0x02, 0, 0, 0])
    atomic.close()


def test_a_log_too_small_for_the_table_is_refused(make_memfd: MakeMemfd) -> None:
    atomic = GuestMemoryAtomic()
    atomic.set_mem_table([descriptor(make_memfd(4 * PAGE), 0x10000, 4 * PAGE)])
    small = DirtyLog(bytearray(2))  # covers [0, 0x10000): not the region
    with pytest.raises(MappingError, match=r"up to 0x10000, .* up to 0x14000"):
        atomic.set_log(small)
    assert small.closed
    assert atomic.log.current is None
    atomic.set_log(DirtyLog(bytearray(2)), require_coverage=False)  # if you insist
    atomic.close()


@pytest.mark.usefixtures("fast_thread_switching")
def test_memory_swaps_while_readers_read(make_memfd: MakeMemfd) -> None:
    """Three readers read continuously while the handler swaps in (at least)
    300 tables. A table is two regions of one memfd filled with that memfd's
    number, so a reader that ever sees two numbers in one snapshot saw a torn
    view. Then every mapping and fd made for the tables is gone."""
    # Every byte of memfd k is k, so any u32, even across regions, reads
    # k * 0x01010101 from a consistent table.
    memfds = [make_memfd(8 * PAGE, bytes([k]) * 8 * PAGE) for k in range(8)]
    fds, maps = count_fds(), count_mappings()
    atomic = GuestMemoryAtomic()
    stop = threading.Event()
    errors: list[BaseException] = []
    seen: list[set[int]] = [set() for _ in range(3)]

    def read(me: int) -> None:
        try:
            while not stop.is_set():
                with atomic.memory() as mem:
                    if len(mem) == 0:
                        continue
                    values = {mem.read_u32(G(r.gpa + 0x100)) for r in mem.regions}
                    values.add(mem.read_u32(G(0x3FFE)))  # across both regions
                    if me == 0:
                        time.sleep(0)  # hold the lease across a swap
                    values.add(mem.read_u32(G(0x6000)))
                    assert len(values) == 1, f"torn view: {values}"
                    seen[me] |= values
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    readers = [threading.Thread(target=read, args=(i,)) for i in range(3)]
    for thread in readers:
        thread.start()
    # At least 300 swaps, and until every reader has seen several tables (a
    # thread may start late); the deadline only guards against a hang.
    deadline = time.monotonic() + 20
    swap = 0
    while swap < 300 or (
        min(len(values) for values in seen) < 3 and time.monotonic() < deadline
    ):
        fd = memfds[swap % len(memfds)]
        swap += 1
        atomic.set_mem_table(
            [
                descriptor(fd, 0x4000, 0x4000, mmap_offset=0x4000),
                descriptor(fd, 0x0, 0x4000),
            ]
        )
    stop.set()
    for thread in readers:
        thread.join()
    atomic.close()

    assert errors == []
    assert min(len(values) for values in seen) >= 3  # readers saw swaps
    assert (count_fds(), count_mappings()) == (fds, maps)


@pytest.mark.usefixtures("fast_thread_switching")
def test_region_changes_while_readers_read(make_memfd: MakeMemfd) -> None:
    """Readers use every region of their snapshot while the handler adds and
    removes regions (ADD_MEM_REG / REM_MEM_REG) at least 200 times: a region of a
    leased snapshot is never unmapped under them."""
    fd = make_memfd(4 * PAGE, filled(9))
    fds, maps = count_fds(), count_mappings()
    atomic = GuestMemoryAtomic(backend=MmapBackend())
    atomic.set_mem_table([descriptor(fd, 0, 2 * PAGE)])
    stop = threading.Event()
    errors: list[BaseException] = []
    reads = [0, 0]

    def read(me: int) -> None:
        try:
            while not stop.is_set():
                with atomic.memory() as mem:
                    for region in mem.regions:
                        assert mem.read_u32(G(region.end - 4)) == 9
                        reads[me] += 1
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    readers = [threading.Thread(target=read, args=(i,)) for i in range(2)]
    for thread in readers:
        thread.start()
    extra = descriptor(fd, 0x100000, 2 * PAGE, mmap_offset=2 * PAGE)
    deadline = time.monotonic() + 20
    changes = 0
    while changes < 200 or (min(reads) < 100 and time.monotonic() < deadline):
        changes += 1
        atomic.add_region(extra)
        atomic.remove_region(extra.gpa, extra.frontend_addr, extra.size)
    stop.set()
    for thread in readers:
        thread.join()
    atomic.close()

    assert errors == []
    assert min(reads) >= 100
    assert (count_fds(), count_mappings()) == (fds, maps)


def test_a_snapshot_given_at_construction_is_taken_over(make_memfd: MakeMemfd) -> None:
    maps = count_mappings()
    mem = GuestMemory.map([descriptor(make_memfd(PAGE), 0, PAGE)])
    atomic = GuestMemoryAtomic(mem)
    with atomic.memory() as current:
        assert current is mem
    atomic.close()
    assert count_mappings() == maps


def test_a_lease_follows_the_current_table(make_memfd: MakeMemfd) -> None:
    """A renewable lease: free while the table stays, renewed when it
    changes (the new one leased before the old one is let go), and its
    snapshot kept mapped only while it is current or not yet renewed."""
    one, two = make_memfd(4 * PAGE, filled(1)), make_memfd(4 * PAGE, filled(2))
    maps = count_mappings()
    atomic = GuestMemoryAtomic()
    atomic.set_mem_table([descriptor(one, 0, 4 * PAGE)])
    lease = atomic.lease()
    first = lease.current()
    assert lease.current() is first
    assert first.read_u32(G(0)) == 1
    atomic.set_mem_table([descriptor(two, 0, 4 * PAGE)])
    assert count_mappings() == maps + 2, "the leased table stays mapped"
    lease.release_if_stale()
    assert count_mappings() == maps + 1, "a stale lease is let go"
    second = lease.current()
    assert second is not first
    assert second.read_u32(G(0)) == 2
    lease.release_if_stale()
    assert lease.current() is second, "a current lease is kept"
    atomic.set_mem_table([descriptor(one, 0, 4 * PAGE)])
    assert lease.current().read_u32(G(0)) == 1, "renewed at the next call"
    assert count_mappings() == maps + 1
    lease.release()
    lease.release()
    atomic.close()
    assert count_mappings() == maps
