# RegionDescriptor: what the frontend said about one region to map, in the
# memory layer's own terms (the wire payloads live in vubackend.protocol,
# above this layer; the daemon converts them). check_layout(): the rules a
# whole memory table must keep.
#
# Rules of this module:
# - A descriptor that exists is syntactically valid: every field is checked
#   in __post_init__ with Python integers (no wrap-around), so an overflow is
#   refused before anything is mapped (vhost-user-protocol.md §7.4 item 5).
# - Whether its fd really holds the range is checked when mapping (fstat);
#   whether it fits with the other regions is check_layout(), run both on the
#   descriptors of a table (before mapping) and on the mapped regions of every
#   GuestMemory snapshot.
# - The fd in a descriptor is borrowed: a descriptor never closes it.

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Protocol, final

from vubackend.bitmap import U64_LIMIT
from vubackend.errors import MappingError
from vubackend.memory._addresses import MAX_MEM_SLOTS, FrontendAddress, GuestAddress

__all__ = ["RegionDescriptor", "check_layout"]

# Xen mapping flags that vm-memory's MmapXenFlags accepts (foreign, grant,
# no-advance-map); any other bit is refused here, whatever the backend.
_XEN_KNOWN_FLAGS = 0x1 | 0x2 | 0x8


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class RegionDescriptor:
    """One guest memory region as the frontend describes it
    (``SET_MEM_TABLE``, ``ADD_MEM_REG``), ready to be mapped by a
    :class:`~vubackend.memory.MemoryBackend`.

    Attributes:
        gpa: guest physical address of the first byte.
        size: length in bytes, > 0.
        frontend_addr: the frontend's virtual address of the first byte
            (``userspace_addr``); ring addresses are translated through it.
        mmap_offset: offset of the first byte in the fd; any alignment.
        fd: the file descriptor holding the memory. Borrowed: the descriptor
            never closes it, and mapping does not either.
        xen_flags: Xen mapping flags (``XEN_MMAP``; 0 for a plain mapping).
        xen_data: Xen mapping data (the domain id).

    Raises:
        MappingError: on construction, when a field is out of range: a
            negative fd, a size of 0, a value that is not a u64 (a u32 for the
            Xen fields), unknown Xen flag bits, or a range that overflows u64
            (``gpa + size``, ``frontend_addr + size``, ``mmap_offset + size``).
    """

    gpa: GuestAddress
    size: int
    frontend_addr: FrontendAddress
    mmap_offset: int
    fd: int
    xen_flags: int = 0
    xen_data: int = 0

    def __post_init__(self) -> None:
        where = f"memory region at GPA {self.gpa:#x}"
        if self.fd < 0:
            raise MappingError(f"{where}: invalid fd {self.fd}")
        if not 0 < self.size < U64_LIMIT:
            raise MappingError(f"{where}: size {self.size:#x} must be > 0 and a u64")
        for name, value in (
            ("guest address", self.gpa),
            ("frontend address", self.frontend_addr),
            ("mmap offset", self.mmap_offset),
        ):
            if not 0 <= value < U64_LIMIT:
                raise MappingError(f"{where}: {name} {value:#x} is not a u64")
            if value + self.size > U64_LIMIT:
                raise MappingError(
                    f"{where}: {name} {value:#x} + size {self.size:#x} overflows a u64"
                )
        for name, value in (("xen flags", self.xen_flags), ("xen data", self.xen_data)):
            if not 0 <= value <= 0xFFFF_FFFF:
                raise MappingError(f"{where}: {name} {value:#x} is not a u32")
        if self.xen_flags & ~_XEN_KNOWN_FLAGS:
            raise MappingError(
                f"{where}: unknown xen mapping flags {self.xen_flags:#x}"
            )

    @property
    def end(self) -> int:
        """One past the region's last guest physical address."""
        return self.gpa + self.size


class _Extent(Protocol):
    # What check_layout needs: descriptors and mapped regions both have it.
    @property
    def gpa(self) -> GuestAddress: ...
    @property
    def size(self) -> int: ...
    @property
    def frontend_addr(self) -> FrontendAddress: ...


def _check_disjoint(items: Sequence[tuple[int, int]], space: str) -> None:
    # items: (start, size), sorted by start.
    for (a_start, a_size), (b_start, b_size) in pairwise(items):
        if a_start + a_size > b_start:
            raise MappingError(
                f"memory regions overlap in {space} addresses: "
                f"[{a_start:#x}, {a_start + a_size:#x}) and "
                f"[{b_start:#x}, {b_start + b_size:#x})"
            )


def check_layout(regions: Sequence[_Extent]) -> None:
    """Check that regions may form one memory table, in any order.

    Args:
        regions: descriptors or mapped regions.

    Raises:
        MappingError: more than :data:`MAX_MEM_SLOTS` regions, or two regions
            overlap in guest physical addresses, or in frontend virtual
            addresses (ring addresses would be ambiguous).
    """
    if len(regions) > MAX_MEM_SLOTS:
        raise MappingError(
            f"too many memory regions: {len(regions)} (at most {MAX_MEM_SLOTS})"
        )
    _check_disjoint(sorted((r.gpa, r.size) for r in regions), "guest physical")
    _check_disjoint(sorted((r.frontend_addr, r.size) for r in regions), "frontend")
