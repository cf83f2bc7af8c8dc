# MemorySpace: what the ring code needs from one guest memory snapshot,
# computed once per snapshot and reused until the snapshot changes.
#
# Rules of this module:
# - A space belongs to one GuestMemory snapshot and is only used while the
#   caller holds a lease on that snapshot (VringState takes one per call).
#   The ring code compares `space.memory is mem` to decide whether to reuse
#   it; it keeps a reference to the snapshot object for that (not a lease).
# - The native RegionTable is built lazily and pins every region's buffer:
#   while a space has a table, its regions cannot be unmapped under a C call
#   (a pinned mmap refuses to close; the memory layer then leaves the unmap
#   to the garbage collector). release() unpins. Whoever replaces a space
#   releases the old one, so a retired snapshot's memory goes away as soon as
#   every ring has moved on.
# - Ring parts (descriptor table, rings, event areas) must lie inside one
#   region and be naturally aligned in host memory (atomic accesses);
#   otherwise RingStateError names the part. Buffers may span regions.
# - Ring parts must not lie in a region mapped on demand (Xen grants with
#   NO_ADVANCE_MAP): it has no fixed mapping for atomics. Buffers may; chains
#   of a snapshot with such a region are walked in Python (native_walks).

from __future__ import annotations

from typing import final

from vubackend._native import AtomicView, RegionTable
from vubackend.bitmap import Bitmap, DirtyLogSlot, RegionBitmap
from vubackend.errors import RingStateError, UnmappedAddressError
from vubackend.memory import GuestAddress, GuestMemory, MappedRegion

__all__ = ["MemorySpace", "RingPart", "locate_part"]


@final
class RingPart:
    """One ring structure located in host memory: the region's native view
    (atomics), its memoryview (plain reads and writes) and the offset."""

    __slots__ = ("atomic", "gpa", "offset", "region", "view")

    def __init__(self, region: MappedRegion, offset: int, gpa: int) -> None:
        self.region = region
        self.atomic: AtomicView = region.atomic
        self.view: memoryview = region.view
        self.offset = offset
        self.gpa = gpa


@final
class MemorySpace:
    """Lookup tables of one guest memory snapshot for the ring code."""

    __slots__ = (
        "bitmaps",
        "log_slot",
        "memory",
        "native_walks",
        "pinned",
        "regions",
        "sizes",
        "starts",
    )

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self.regions: tuple[MappedRegion, ...] = memory.regions
        self.bitmaps: tuple[Bitmap, ...] = tuple(r.bitmap for r in self.regions)
        # The one dirty-log slot every region marks, when there is one: a
        # writer then checks `log_slot.current` before marking anything.
        # None: regions of mixed kinds; mark through each region's bitmap.
        slots = {
            id(b.slot): b.slot for b in self.bitmaps if isinstance(b, RegionBitmap)
        }
        self.log_slot: DirtyLogSlot | None = None
        if len(slots) == 1 and all(isinstance(b, RegionBitmap) for b in self.bitmaps):
            self.log_slot = next(iter(slots.values()))
        self.starts: list[int] = [r.gpa for r in self.regions]
        self.sizes: list[int] = [r.size for r in self.regions]
        # The C walker reads indirect tables through the pinned views, which
        # an on-demand region does not have: such snapshots walk in Python.
        self.native_walks = not any(r.on_demand for r in self.regions)
        # The native table once built (table()); None before.
        self.pinned: RegionTable | None = None

    def table(self) -> RegionTable:
        """The pinned native region table (built on first use)."""
        table = self.pinned
        if table is None:
            table = RegionTable([(r.gpa, r.view) for r in self.regions])
            self.pinned = table
        return table

    def io_table(self) -> RegionTable | None:
        """The table popped chains copy through (:meth:`table`), or None
        when a region is mapped on demand (no fixed mapping to pin)."""
        return self.table() if self.native_walks else None

    def release(self) -> None:
        """Unpin the native table, if one was built. Idempotent."""
        table, self.pinned = self.pinned, None
        if table is not None:
            table.release()

    def part(self, gpa: int, length: int, align: int, what: str) -> RingPart:
        """Locate a ring structure of ``length`` bytes at ``gpa``.

        Raises:
            RingStateError: it is not inside one region, or its host address
                is not ``align``-aligned.
        """
        try:
            region, offset = self.memory.locate(GuestAddress(gpa), length)
        except UnmappedAddressError as exc:
            # Atomic ring accesses need a fixed mapping: a region mapped on
            # demand has none (vm-memory maps vrings in advance too).
            found = self.memory.find_region(GuestAddress(gpa))
            why = " (it is mapped on demand)" if found and found.on_demand else ""
            raise RingStateError(
                f"{what} [{gpa:#x}, +{length:#x}) is not inside one guest memory "
                f"region{why}"
            ) from exc
        part = RingPart(region, offset, gpa)
        # Natural alignment of the host address: the native view refuses an
        # unaligned atomic, and so does the C walker (VU_STOP_RING).
        try:
            if align >= 2:
                part.atomic.load_u16(offset)
            if align >= 4:
                part.atomic.load_u32(offset)
        except ValueError as exc:
            raise RingStateError(
                f"{what} at {gpa:#x} is not {align}-byte aligned in host memory ({exc})"
            ) from exc
        return part

    def __repr__(self) -> str:
        return f"<MemorySpace {self.memory!r}>"


def locate_part(mem: GuestMemory, gpa: int, length: int, what: str) -> RingPart:
    """Locate a ring structure for the driver side (no alignment probe).

    Raises:
        RingStateError: it is not inside one region.
    """
    try:
        region, offset = mem.locate(GuestAddress(gpa), length)
    except UnmappedAddressError as exc:
        raise RingStateError(f"driver ring: {what} at {gpa:#x} is not mapped") from exc
    return RingPart(region, offset, gpa)
