# GuestRam: the frontend's guest memory, made of memfd (or hugetlbfs) regions
# that the frontend owns and sends to the backend, mapped here through
# vubackend.memory so that rings, drivers and tests address it by GPA.
#
# Rules of this module:
# - GuestRam owns every region fd and its own mapping; the fds are lent to
#   the protocol (SET_MEM_TABLE, ADD_MEM_REG): the backend gets duplicates.
#   close() unmaps and closes everything, once.
# - Frontend virtual addresses (userspace_addr) are synthetic: FADDR_BASE +
#   gpa. A backend must translate ring addresses through the table, as it
#   must for QEMU and DPDK (whose VAs are arbitrary too); a backend that
#   confuses the two address spaces fails at once.
# - Guest physical addresses of consecutive regions are contiguous unless a
#   gap is asked for, so buffers may span regions (backends must split them).
# - alloc()/free() is a first-fit allocator over GPA ranges; an allocation
#   never spans two regions (rings must be contiguous in one region).
# - Hugetlb regions are memfd_create(MFD_HUGETLB); their sizes must be whole
#   huge pages (2 MiB by default).

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, final

from vubackend.errors import DaemonClosedError, MappingError
from vubackend.memory import (
    FrontendAddress,
    GuestAddress,
    GuestMemory,
    MmapBackend,
    RegionDescriptor,
)

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["FADDR_BASE", "HUGE_PAGE_SIZE", "GuestRam", "RamRegion"]

# Where the synthetic frontend virtual addresses start (userspace_addr =
# FADDR_BASE + gpa); any value works, this one looks like a user-space VA.
FADDR_BASE: Final = 0x7F00_0000_0000
# The default x86-64 huge page size (MFD_HUGETLB without a size flag).
HUGE_PAGE_SIZE: Final = 2 << 20
_PAGE: Final = 4096
_MEMFD_NAME: Final = "vubackend-frontend-ram"


@final
@dataclass(frozen=True, slots=True)
class RamRegion:
    """One region of guest RAM, as the frontend describes it to the backend.

    Attributes:
        gpa: guest physical address of the first byte.
        size: bytes.
        faddr: the frontend virtual address sent as ``userspace_addr``.
        fd: the memfd (owned by the :class:`GuestRam`; borrow it).
        mmap_offset: offset of the region in ``fd`` (always 0 here).
    """

    gpa: GuestAddress
    size: int
    faddr: FrontendAddress
    fd: int
    mmap_offset: int = 0

    @property
    def end(self) -> int:
        """One past the last guest physical address."""
        return self.gpa + self.size


def _make_fd(size: int, hugetlb: bool) -> int:
    flags = os.MFD_CLOEXEC | (os.MFD_HUGETLB if hugetlb else 0)
    try:
        fd = os.memfd_create(_MEMFD_NAME, flags)
    except OSError as exc:
        raise MappingError(f"memfd_create failed: {exc.strerror}") from exc
    try:
        os.ftruncate(fd, size)
    except OSError as exc:
        os.close(fd)
        raise MappingError(f"cannot size a {size:#x}-byte memfd: {exc}") from exc
    return fd


@final
class GuestRam:
    """Guest RAM for a Python frontend: regions of shared memory the
    backend maps, plus an allocator and GPA-addressed access.

    Args:
        sizes: the size of each region in bytes (multiples of 4 KiB, or of
            :data:`HUGE_PAGE_SIZE` with ``hugetlb``).
        base_gpa: guest physical address of the first region.
        gap: bytes of unmapped guest physical space between regions.
        hugetlb: back the regions with huge pages (``MFD_HUGETLB``).

    Raises:
        MappingError: a size is invalid, or memory could not be created.
    """

    def __init__(
        self,
        sizes: Sequence[int] = (16 << 20,),
        *,
        base_gpa: int = 0,
        gap: int = 0,
        hugetlb: bool = False,
    ) -> None:
        if not sizes:
            raise MappingError("guest RAM needs at least one region")
        self._hugetlb = hugetlb
        self._lock = threading.Lock()
        self._regions: list[RamRegion] = []
        self._free: list[tuple[int, int]] = []  # (gpa, size), sorted by gpa
        self._memory: GuestMemory | None = None
        self._next_gpa = base_gpa
        self._gap = gap
        try:
            descriptors = [self._new_region(size) for size in sizes]
            self._memory = GuestMemory.map(descriptors, MmapBackend())
        except BaseException:
            self._close_fds()
            raise

    def _granule(self) -> int:
        return HUGE_PAGE_SIZE if self._hugetlb else _PAGE

    def _new_region(self, size: int) -> RegionDescriptor:
        granule = self._granule()
        if size <= 0 or size % granule:
            raise MappingError(
                f"region size {size:#x} must be a positive multiple of {granule:#x}"
            )
        gpa = self._next_gpa
        fd = _make_fd(size, self._hugetlb)
        region = RamRegion(
            GuestAddress(gpa), size, FrontendAddress(FADDR_BASE + gpa), fd
        )
        self._regions.append(region)
        self._next_gpa = gpa + size + self._gap
        self._free.append((gpa, size))
        self._free.sort()
        return RegionDescriptor(
            gpa=region.gpa, size=size, frontend_addr=region.faddr, mmap_offset=0, fd=fd
        )

    # ------------------------------------------------------------ table

    @property
    def memory(self) -> GuestMemory:
        """The current :class:`~vubackend.memory.GuestMemory` snapshot of
        all regions (replaced when regions are added or removed).

        Raises:
            DaemonClosedError: the RAM was closed.
        """
        if self._memory is None:
            raise DaemonClosedError("the guest RAM is closed")
        return self._memory

    @property
    def regions(self) -> tuple[RamRegion, ...]:
        """The regions, in the order they were created."""
        return tuple(self._regions)

    @property
    def hugetlb(self) -> bool:
        """Whether the regions are backed by huge pages."""
        return self._hugetlb

    @property
    def end_gpa(self) -> int:
        """One past the highest guest physical address (dirty logs must
        cover up to here)."""
        return max(r.end for r in self._regions)

    def faddr(self, gpa: int) -> FrontendAddress:
        """The frontend virtual address of guest physical address ``gpa``
        (what SET_VRING_ADDR carries).

        Raises:
            MappingError: ``gpa`` is in no region.
        """
        for region in self._regions:
            if region.gpa <= gpa < region.end:
                return FrontendAddress(region.faddr + (gpa - region.gpa))
        raise MappingError(f"guest address {gpa:#x} is in no region")

    def add_region(self, size: int) -> RamRegion:
        """Create one more region after the others (memory hotplug; send it
        with ``Frontend.add_mem_region``).

        Returns:
            The new region.

        Raises:
            MappingError: bad size or out of memory.
        """
        with self._lock:
            memory = self.memory
            descriptor = self._new_region(size)
            try:
                mapped = MmapBackend().map_region(descriptor)
                self._memory = memory.with_region_added(mapped)
            except BaseException:
                region = self._regions.pop()
                self._free = [f for f in self._free if f[0] != region.gpa]
                os.close(region.fd)
                raise
            memory.close()
            return self._regions[-1]

    def remove_region(self, region: RamRegion) -> None:
        """Forget ``region`` (after ``Frontend.remove_mem_region``): unmap it
        and close its fd. Allocations inside it become invalid.

        Raises:
            MappingError: it is not one of this RAM's regions.
        """
        with self._lock:
            if region not in self._regions:
                raise MappingError(f"region at GPA {region.gpa:#x} is not ours")
            memory = self.memory
            self._memory = memory.with_region_removed(
                region.gpa, region.faddr, region.size
            )
            memory.close()
            self._regions.remove(region)
            self._free = [
                (g, s) for g, s in self._free if not region.gpa <= g < region.end
            ]
            os.close(region.fd)

    # ------------------------------------------------------------ allocator

    def alloc(self, size: int, align: int = 16) -> GuestAddress:
        """Reserve ``size`` bytes inside one region, aligned to ``align``.

        Returns:
            The guest physical address of the block.

        Raises:
            MappingError: no free block is large enough.
        """
        if size <= 0 or align <= 0 or align & (align - 1):
            raise ValueError(f"bad allocation: size {size}, alignment {align}")
        with self._lock:
            for i, (start, length) in enumerate(self._free):
                gpa = -(-start // align) * align
                if gpa + size <= start + length:
                    pieces = [
                        (start, gpa - start),
                        (gpa + size, start + length - gpa - size),
                    ]
                    self._free[i : i + 1] = [(g, s) for g, s in pieces if s > 0]
                    return GuestAddress(gpa)
        raise MappingError(f"guest RAM is full: no free block of {size:#x} bytes")

    def free(self, gpa: int, size: int) -> None:
        """Give back a block from :meth:`alloc` (same ``size``)."""
        with self._lock:
            self._free.append((gpa, size))
            self._free.sort()
            merged: list[tuple[int, int]] = []
            region_ends = {r.end for r in self._regions}
            for start, length in self._free:
                if (
                    merged
                    and merged[-1][0] + merged[-1][1] == start
                    and (start not in region_ends)
                ):
                    merged[-1] = (merged[-1][0], merged[-1][1] + length)
                else:
                    merged.append((start, length))
            self._free = merged

    # ------------------------------------------------------------ access

    def read(self, gpa: int, length: int) -> bytes:
        """Copy ``length`` bytes at guest physical address ``gpa``."""
        return self.memory.read(GuestAddress(gpa), length)

    def write(self, gpa: int, data: Buffer) -> None:
        """Copy ``data`` to guest physical address ``gpa``."""
        self.memory.write(GuestAddress(gpa), data)

    # ------------------------------------------------------------ lifetime

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._memory is None and not self._regions

    def _close_fds(self) -> None:
        for region in self._regions:
            with contextlib.suppress(OSError):
                os.close(region.fd)
        self._regions.clear()

    def close(self) -> None:
        """Unmap the memory and close every region fd. Idempotent."""
        with self._lock:
            memory, self._memory = self._memory, None
            if memory is not None:
                memory.close()
            self._close_fds()

    def __enter__(self) -> GuestRam:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        spans = ", ".join(f"[{r.gpa:#x}, {r.end:#x})" for r in self._regions)
        return f"<GuestRam {spans}{' hugetlb' if self._hugetlb else ''}>"
