# GuestMemory: one immutable snapshot of the guest's memory table, with GPA
# lookup and translation, the frontend-address table for ring addresses, and
# typed read/write helpers that mark the dirty bitmap.
#
# Rules of this module:
# - Immutable. Regions are sorted by guest physical address whatever order
#   they arrive in; check_layout() holds for every snapshot (no overlap in
#   either address space, at most MAX_MEM_SLOTS regions). A change of table
#   (ADD_MEM_REG, REM_MEM_REG) builds a new snapshot sharing the unchanged
#   regions (each region counts its holders, see _region.py).
# - Translation is all or nothing: a range is translated fully, possibly
#   across adjacent regions, or UnmappedAddressError is raised
#   (vhost-user-protocol.md §4.12, §7.4 items 6 and 7). All arithmetic is on
#   Python integers, so nothing wraps; a negative address is simply unmapped.
# - A zero-length range is valid anywhere and touches nothing: translate()
#   returns [] and read() returns b"" without looking the address up. Policy
#   on zero-length descriptors belongs to the ring layer.
# - Lookup is a binary search over region starts (bisect); the helpers try
#   "inside one region" first and fall back to splitting.
# - translate() slices each region's `window`: its view, or for an on-demand
#   region (Xen grants mapped per access) a transient mapping of the pages,
#   alive as long as the returned memoryview. Integer helpers use the view
#   only for `direct` regions.
# - Lifetime: a snapshot owns one reference on each of its regions. Users of
#   a shared snapshot hold a lease (_take_lease/_drop_lease, counted under a
#   lock, taken by GuestMemoryAtomic.memory()); close() retires the snapshot
#   and its references are dropped when the last lease ends, so no region is
#   unmapped under a reader. Using a snapshot after it was unmapped fails
#   with ValueError from the released views; it never touches freed memory.
#   Memoryviews returned by translate() are further protected by CPython: a
#   mapping is not unmapped while one of them is alive (SharedMapping).

from __future__ import annotations

import struct
import threading
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Final, final

from vubackend.bitmap import DirtyLogSlot
from vubackend.errors import MappingError, UnmappedAddressError
from vubackend.memory._addresses import FrontendAddress, GuestAddress
from vubackend.memory._descriptor import RegionDescriptor, check_layout
from vubackend.memory._mmap_backend import MmapBackend
from vubackend.memory._region import MappedRegion, Window

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from vubackend.memory._backend import MemoryBackend

__all__ = ["GuestMemory"]

# Virtio is little-endian (virtio 1.x §2.4); the ring layer reads indices
# with the native atomic loads instead.
_U8: Final = struct.Struct("<B")
_U16: Final = struct.Struct("<H")
_U32: Final = struct.Struct("<I")
_U64: Final = struct.Struct("<Q")


def _unmapped(gpa: int, length: int, why: str) -> UnmappedAddressError:
    return UnmappedAddressError(
        f"guest address range [{gpa:#x}, +{length:#x}) is not mapped: {why}",
        address=gpa,
        length=length,
    )


@final
class GuestMemory:
    """An immutable snapshot of guest memory: the mapped regions of one
    memory table.

    Build one from mapped regions, or with :meth:`map` from descriptors.
    Share one between threads through
    :class:`~vubackend.memory.GuestMemoryAtomic`, which also unmaps old
    snapshots safely.

    Writes through the helpers (:meth:`write`, :meth:`write_u32`, ...) mark
    each region's dirty bitmap for exactly the bytes written. Memoryviews from
    :meth:`translate` are raw: writes through them are not logged.
    """

    __slots__ = (
        "_by_faddr",
        "_closed",
        "_end",
        "_faddr_starts",
        "_fixed_sizes",
        "_lock",
        "_regions",
        "_released",
        "_starts",
        "_users",
        "_views",
        "_windows",
    )

    def __init__(self, regions: Iterable[MappedRegion] = ()) -> None:
        """Build a snapshot from mapped regions, in any order.

        Takes ownership of one reference of each region, also when it raises
        (then it closes them): the caller must not close them afterwards.

        Args:
            regions: the regions; none may be unmapped.

        Raises:
            MappingError: too many regions, two overlap (in guest physical or
                in frontend addresses), or one is already unmapped.
        """
        given = list(regions)
        try:
            for region in given:
                if not region.mapped:
                    raise MappingError(f"{region!r} is already unmapped")
            check_layout(given)
        except BaseException:
            for region in {id(r): r for r in given}.values():
                region.close()
            raise
        ordered = tuple(sorted(given, key=lambda r: r.gpa))
        self._regions = ordered
        self._starts = [r.gpa for r in ordered]
        self._views = tuple(r.view for r in ordered)
        # What translate() slices: the views, or on-demand mappings.
        self._fixed_sizes = tuple(0 if r.on_demand else r.size for r in ordered)
        self._windows: tuple[Window, ...] = tuple(r.window for r in ordered)
        self._end = ordered[-1].end if ordered else 0
        self._by_faddr = tuple(sorted(ordered, key=lambda r: r.frontend_addr))
        self._faddr_starts = [r.frontend_addr for r in self._by_faddr]
        self._lock = threading.Lock()
        self._users = 0
        self._closed = False
        self._released = False

    @classmethod
    def map(
        cls,
        descriptors: Sequence[RegionDescriptor],
        backend: MemoryBackend | None = None,
        *,
        log: DirtyLogSlot | None = None,
    ) -> GuestMemory:
        """Map a memory table (``SET_MEM_TABLE``): all regions or none.

        The descriptors' fds are borrowed; close them afterwards.

        Args:
            descriptors: the regions, in any order.
            backend: how to map them; plain ``MmapBackend()`` by default.
            log: the session's dirty-log slot, or None for no logging.

        Returns:
            The new snapshot, owned by the caller.

        Raises:
            MappingError: the table is invalid (too many regions, overlap) or
                a region cannot be mapped; nothing stays mapped.
        """
        if backend is None:
            backend = MmapBackend()
        check_layout(descriptors)
        mapped: list[MappedRegion] = []
        try:
            for descriptor in descriptors:
                mapped.append(backend.map_region(descriptor, log))
        except BaseException:
            for region in mapped:
                region.close()
            raise
        return cls(mapped)

    # ------------------------------------------------------------ table

    @property
    def regions(self) -> tuple[MappedRegion, ...]:
        """The regions, sorted by guest physical address."""
        return self._regions

    def __len__(self) -> int:
        return len(self._regions)

    @property
    def end_gpa(self) -> int:
        """One past the highest guest physical address mapped (0 if empty);
        a dirty log must cover up to here."""
        return self._end

    def find_region(self, gpa: GuestAddress) -> MappedRegion | None:
        """The region holding guest physical address ``gpa``.

        Args:
            gpa: a guest physical address.

        Returns:
            The region, or None if no region holds it.
        """
        i = bisect_right(self._starts, gpa) - 1
        if i >= 0 and gpa < self._regions[i].end:
            return self._regions[i]
        return None

    def locate(self, gpa: GuestAddress, length: int) -> tuple[MappedRegion, int]:
        """Find the one region holding all of ``[gpa, gpa + length)``.

        For ring structures, which must be contiguous in one region; use
        ``region.atomic`` at the returned offset for atomic accesses. A
        region mapped on demand has no fixed mapping and is never returned.

        Args:
            gpa: first guest physical address.
            length: number of bytes (0 asks for the region holding ``gpa``).

        Returns:
            ``(region, offset)``: the region and the offset of ``gpa`` in it.

        Raises:
            UnmappedAddressError: no single region holds the whole range, or
                it is in a region mapped on demand.
            ValueError: ``length`` is negative.
        """
        if length < 0:
            raise ValueError(f"length {length} is negative")
        i = bisect_right(self._starts, gpa) - 1
        if i >= 0:
            region = self._regions[i]
            offset = gpa - region.gpa
            # An on-demand region's fixed size is 0: it has no fixed mapping.
            fixed = self._fixed_sizes[i]
            if offset < fixed and offset + length <= fixed:
                return region, offset
            if region.on_demand and offset < region.size:
                raise _unmapped(gpa, length, "in a region mapped on demand")
        raise _unmapped(gpa, length, "not inside one memory region")

    def translate(self, gpa: GuestAddress, length: int) -> list[memoryview]:
        """Translate a guest physical range into host memory, fully.

        Args:
            gpa: first guest physical address.
            length: number of bytes.

        Returns:
            Writable memoryviews covering exactly the range, in order: one
            per region it spans (adjacent regions are split, never merged).
            Empty for ``length == 0``. Writes through them are not logged.

        Raises:
            UnmappedAddressError: some byte of the range is not mapped.
            ValueError: ``length`` is negative.
        """
        if length <= 0:
            if length < 0:
                raise ValueError(f"length {length} is negative")
            return []
        regions = self._regions
        i = bisect_right(self._starts, gpa) - 1
        if i < 0:
            raise _unmapped(gpa, length, f"no memory region at {gpa:#x}")
        region = regions[i]
        offset = gpa - region.gpa
        if offset + length <= region.size:
            return [self._windows[i][offset : offset + length]]
        if offset >= region.size:
            raise _unmapped(gpa, length, f"no memory region at {gpa:#x}")
        # Spans regions: check that they are contiguous up to the end before
        # slicing anything, so that a failure leaves no view behind (a view
        # held by the exception's traceback would delay unmapping).
        first = i
        done = region.size - offset
        count = len(regions)
        while True:
            i += 1
            here = gpa + done
            if i == count or regions[i].gpa != here:
                raise _unmapped(gpa, length, f"no memory region at {here:#x}")
            if length - done <= regions[i].size:
                break
            done += regions[i].size
        views = self._windows
        return [
            views[first][offset:],
            # New views, never the region's own: a caller may release() them.
            *(view[:] for view in views[first + 1 : i]),
            views[i][: length - done],
        ]

    def _pieces(self, gpa: int, length: int) -> list[tuple[MappedRegion, int, int]]:
        # (region, offset, count) covering [gpa, gpa + length), or raise.
        regions = self._regions
        i = bisect_right(self._starts, gpa) - 1
        out: list[tuple[MappedRegion, int, int]] = []
        done = 0
        while done < length:
            here = gpa + done
            if i < 0 or i >= len(regions) or not regions[i].contains(here):
                raise _unmapped(gpa, length, f"no memory region at {here:#x}")
            region = regions[i]
            offset = here - region.gpa
            count = min(length - done, region.size - offset)
            out.append((region, offset, count))
            done += count
            i += 1
        return out

    def faddr_to_gpa(self, faddr: FrontendAddress, length: int) -> GuestAddress:
        """Translate a frontend virtual address (a ring address from
        ``SET_VRING_ADDR``) into a guest physical address.

        Args:
            faddr: the frontend's virtual address of the first byte.
            length: size of the structure at ``faddr``; the whole of it must
                lie in one region (rings are contiguous). 0 only requires
                ``faddr`` itself to be mapped.

        Returns:
            The guest physical address of ``faddr``.

        Raises:
            UnmappedAddressError: the range is not inside one region's
                frontend addresses (``address`` is ``faddr``).
            ValueError: ``length`` is negative.
        """
        if length < 0:
            raise ValueError(f"length {length} is negative")
        i = bisect_right(self._faddr_starts, faddr) - 1
        if i >= 0:
            region = self._by_faddr[i]
            offset = faddr - region.frontend_addr
            if offset < region.size and offset + length <= region.size:
                return GuestAddress(region.gpa + offset)
        raise UnmappedAddressError(
            f"frontend address range [{faddr:#x}, +{length:#x}) is not inside one "
            f"memory region",
            address=faddr,
            length=length,
        )

    # ------------------------------------------------------------ bytes

    def read(self, gpa: GuestAddress, length: int) -> bytes:
        """Copy ``length`` bytes of guest memory, across regions if needed.

        Args:
            gpa: first guest physical address.
            length: number of bytes.

        Returns:
            The bytes.

        Raises:
            UnmappedAddressError: some byte is not mapped.
            ValueError: ``length`` is negative.
        """
        if length <= 0:
            if length < 0:
                raise ValueError(f"length {length} is negative")
            return b""
        i = bisect_right(self._starts, gpa) - 1
        if i >= 0:
            region = self._regions[i]
            offset = gpa - region.gpa
            if offset + length <= region.size:
                return region.read(offset, length)
        return b"".join(r.read(o, n) for r, o, n in self._pieces(gpa, length))

    def read_into(self, gpa: GuestAddress, out: Buffer) -> int:
        """Fill the writable buffer ``out`` from guest memory.

        Args:
            gpa: first guest physical address.
            out: a writable buffer; all of it is filled.

        Returns:
            The number of bytes copied.

        Raises:
            UnmappedAddressError: some byte is not mapped; nothing was copied.
            TypeError: ``out`` is read-only.
        """
        dst = memoryview(out).cast("B")
        length = dst.nbytes
        done = 0
        for region, offset, count in self._pieces(gpa, length):
            region.read_into(offset, dst[done : done + count])
            done += count
        return length

    def write(self, gpa: GuestAddress, data: Buffer) -> None:
        """Copy ``data`` into guest memory, across regions if needed, and mark
        the written bytes dirty (each region after its part of the data).

        The whole range is checked before anything is written.

        Args:
            gpa: first guest physical address.
            data: any buffer.

        Raises:
            UnmappedAddressError: some byte of the range is not mapped;
                nothing was written.
        """
        src = data if type(data) is bytes else memoryview(data).cast("B")
        length = len(src)
        if length == 0:
            return
        i = bisect_right(self._starts, gpa) - 1
        if i >= 0:
            region = self._regions[i]
            offset = gpa - region.gpa
            if offset + length <= region.size:
                region.write(offset, src)
                return
        view = memoryview(src)
        done = 0
        for region, offset, count in self._pieces(gpa, length):
            region.write(offset, view[done : done + count])
            done += count

    # ------------------------------------------------------------ integers

    def _read_int(self, gpa: int, fmt: struct.Struct) -> int:
        i = bisect_right(self._starts, gpa) - 1
        if i >= 0:
            region = self._regions[i]
            offset = gpa - region.gpa
            if offset + fmt.size <= region.size and region.direct:
                value: int = fmt.unpack_from(self._views[i], offset)[0]
                return value
        result: int = fmt.unpack(self.read(GuestAddress(gpa), fmt.size))[0]
        return result

    def _write_int(self, gpa: int, fmt: struct.Struct, value: int) -> None:
        try:
            i = bisect_right(self._starts, gpa) - 1
            if i >= 0:
                region = self._regions[i]
                offset = gpa - region.gpa
                if offset + fmt.size <= region.size and region.direct:
                    fmt.pack_into(self._views[i], offset, value)
                    region.bitmap.mark_dirty(offset, fmt.size)
                    return
            packed = fmt.pack(value)
        except struct.error as exc:
            raise ValueError(
                f"{value} does not fit in a u{fmt.size * 8}: {exc}"
            ) from exc
        self.write(GuestAddress(gpa), packed)

    def read_u8(self, gpa: GuestAddress) -> int:
        """Read the byte at ``gpa``.

        Args:
            gpa: guest physical address of its first byte.

        Returns:
            The value.

        Raises:
            UnmappedAddressError: some byte of it is not mapped.
        """
        return self._read_int(gpa, _U8)

    def read_u16(self, gpa: GuestAddress) -> int:
        """Read the little-endian u16 at ``gpa`` (not atomic; may span regions).

        Args:
            gpa: guest physical address of its first byte.

        Returns:
            The value.

        Raises:
            UnmappedAddressError: some byte of it is not mapped.
        """
        return self._read_int(gpa, _U16)

    def read_u32(self, gpa: GuestAddress) -> int:
        """Read the little-endian u32 at ``gpa`` (not atomic; may span regions).

        Args:
            gpa: guest physical address of its first byte.

        Returns:
            The value.

        Raises:
            UnmappedAddressError: some byte of it is not mapped.
        """
        return self._read_int(gpa, _U32)

    def read_u64(self, gpa: GuestAddress) -> int:
        """Read the little-endian u64 at ``gpa`` (not atomic; may span regions).

        Args:
            gpa: guest physical address of its first byte.

        Returns:
            The value.

        Raises:
            UnmappedAddressError: some byte of it is not mapped.
        """
        return self._read_int(gpa, _U64)

    def write_u8(self, gpa: GuestAddress, value: int) -> None:
        """Write the byte ``value`` at ``gpa`` and mark it dirty.

        Args:
            gpa: guest physical address of its first byte.
            value: the value, in ``0..0xff``.

        Raises:
            UnmappedAddressError: some byte of it is not mapped; nothing was
                written.
            ValueError: ``value`` is out of range.
        """
        self._write_int(gpa, _U8, value)

    def write_u16(self, gpa: GuestAddress, value: int) -> None:
        """Write ``value`` as a little-endian u16 at ``gpa`` and mark it dirty.

        Args:
            gpa: guest physical address of its first byte.
            value: the value, in ``0..0xffff``.

        Raises:
            UnmappedAddressError: some byte of it is not mapped; nothing was
                written.
            ValueError: ``value`` is out of range.
        """
        self._write_int(gpa, _U16, value)

    def write_u32(self, gpa: GuestAddress, value: int) -> None:
        """Write ``value`` as a little-endian u32 at ``gpa`` and mark it dirty.

        Args:
            gpa: guest physical address of its first byte.
            value: the value, in ``0..0xffffffff``.

        Raises:
            UnmappedAddressError: some byte of it is not mapped; nothing was
                written.
            ValueError: ``value`` is out of range.
        """
        self._write_int(gpa, _U32, value)

    def write_u64(self, gpa: GuestAddress, value: int) -> None:
        """Write ``value`` as a little-endian u64 at ``gpa`` and mark it dirty.

        Args:
            gpa: guest physical address of its first byte.
            value: the value, in ``0..2**64 - 1``.

        Raises:
            UnmappedAddressError: some byte of it is not mapped; nothing was
                written.
            ValueError: ``value`` is out of range.
        """
        self._write_int(gpa, _U64, value)

    # ------------------------------------------------------------ new tables

    def with_region_added(self, region: MappedRegion) -> GuestMemory:
        """A new snapshot with ``region`` added (``ADD_MEM_REG``).

        This snapshot is unchanged; the new one shares its regions. Takes
        ownership of ``region``, also on failure (then it is closed).

        Args:
            region: the mapped region to add.

        Returns:
            The new snapshot, owned by the caller.

        Raises:
            MappingError: the region overlaps one of this snapshot's (either
                address space), or the table would exceed ``MAX_MEM_SLOTS``.
        """
        for kept in self._regions:
            kept.incref()
        return GuestMemory((*self._regions, region))

    def with_region_removed(
        self, gpa: GuestAddress, frontend_addr: FrontendAddress, size: int
    ) -> GuestMemory:
        """A new snapshot without the region that starts at ``gpa`` with
        exactly this frontend address and size (``REM_MEM_REG``).

        This snapshot is unchanged; the removed region is unmapped once no
        snapshot holds it any more.

        Args:
            gpa: the region's guest physical address.
            frontend_addr: its frontend virtual address.
            size: its size in bytes.

        Returns:
            The new snapshot, owned by the caller.

        Raises:
            UnmappedAddressError: no region matches all three
                (``address`` is ``gpa``, ``length`` is ``size``).
        """
        for index, region in enumerate(self._regions):
            if (
                region.gpa == gpa
                and region.frontend_addr == frontend_addr
                and region.size == size
            ):
                kept = self._regions[:index] + self._regions[index + 1 :]
                for other in kept:
                    other.incref()
                return GuestMemory(kept)
        raise UnmappedAddressError(
            f"no memory region with GPA {gpa:#x}, frontend address "
            f"{frontend_addr:#x} and size {size:#x} to remove",
            address=gpa,
            length=size,
        )

    # ------------------------------------------------------------ lifetime

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (regions may stay mapped while
        leases are held)."""
        return self._closed

    def close(self) -> None:
        """Retire the snapshot: refuse new leases, and drop its references on
        its regions once the last lease ends (now, if none is held). A region
        is unmapped when no snapshot holds it. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._users:
                return
        self._release_regions()

    def _take_lease(self) -> bool:
        # Take a lease; False once the snapshot is retired.
        with self._lock:
            if self._closed:
                return False
            self._users += 1
            return True

    def _drop_lease(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users or not self._closed:
                return
        self._release_regions()

    def _release_regions(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        for region in self._regions:
            region.close()

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        spans = ", ".join(f"[{r.gpa:#x}, {r.end:#x})" for r in self._regions)
        return f"<GuestMemory{state} {spans}>"
