"""Helpers of the vring tests: a memfd-backed guest memory with three
regions, and a harness pairing a device-side vring with a driver-side ring.

Guest memory layout (one 1 MiB memfd):

* R0: GPA [0x00000, 0x40000), file [0x00000, 0x40000): rings and buffers;
* R1: GPA [0x40000, 0x80000), file [0x40000, 0x80000): adjacent to R0, so a
  buffer across 0x40000 spans two regions;
* (gap: GPA [0x80000, 0x100000) is not mapped);
* R2: GPA [0x100000, 0x140000), file [0x80000, 0xC0000).
"""

from __future__ import annotations

import os
from typing import Final

from vubackend.memory import (
    FrontendAddress,
    GuestAddress,
    GuestMemory,
    GuestMemoryAtomic,
    MemoryGuard,
    RegionDescriptor,
)
from vubackend.vring import (
    PackedDriverRing,
    QueueFeatures,
    SplitDriverRing,
    VringState,
    packed_layout,
    split_layout,
)

MEMFD_SIZE: Final = 0x100000
R0: Final = (0x0, 0x40000)
R1: Final = (0x40000, 0x40000)
R2: Final = (0x100000, 0x40000)
GAP: Final = 0x80000
RING_BASE: Final = 0x1000
DATA: Final = 0x20000  # buffers from here on (R0)
SPAN: Final = 0x40000 - 0x20  # a buffer here crosses into R1

# (gpa, size, file offset)
REGIONS: Final = [
    (0x0, 0x40000, 0x0),
    (0x40000, 0x40000, 0x40000),
    (0x100000, 0x40000, 0x80000),
]


def gpa_to_file(gpa: int) -> int:
    """The memfd offset of a mapped guest address."""
    for start, size, off in REGIONS:
        if start <= gpa < start + size:
            return off + gpa - start
    raise ValueError(f"{gpa:#x} is not mapped")


def make_memory(fd: int) -> GuestMemoryAtomic:
    """A GuestMemoryAtomic over the three regions of ``fd``."""
    atomic = GuestMemoryAtomic()
    atomic.set_mem_table(
        [
            RegionDescriptor(
                gpa=GuestAddress(gpa),
                size=size,
                frontend_addr=FrontendAddress(0x7F00_0000_0000 + gpa),
                mmap_offset=off,
                fd=fd,
            )
            for gpa, size, off in REGIONS
        ]
    )
    return atomic


def new_memfd() -> int:
    """A zeroed memfd of MEMFD_SIZE bytes (the caller closes it)."""
    fd = os.memfd_create("vubackend-test-vring", os.MFD_CLOEXEC)
    os.ftruncate(fd, MEMFD_SIZE)
    return fd


class Harness:
    """A device-side VringState and a driver ring on the same queue."""

    def __init__(
        self,
        atomic: GuestMemoryAtomic,
        *,
        packed: bool,
        native: bool,
        size: int = 16,
        event_idx: bool = False,
        indirect: bool = True,
        in_order: bool = False,
        base: int = RING_BASE,
        vring_base: int | None = None,
    ) -> None:
        self.atomic = atomic
        self.packed = packed
        self.size = size
        self.state = VringState(atomic, 32768, native=native)
        self.state.set_queue_features(
            QueueFeatures(
                event_idx=event_idx, packed=packed, in_order=in_order, indirect=indirect
            )
        )
        self.state.set_queue_size(size)
        self._guard: MemoryGuard = atomic.memory()
        self.mem: GuestMemory = self._guard.memory
        self.driver: SplitDriverRing | PackedDriverRing
        if packed:
            self.desc, self.avail, self.used, self.end = packed_layout(base, size)
            self.driver = PackedDriverRing(
                self.mem,
                size,
                self.desc,
                self.avail,
                self.used,
                event_idx=event_idx,
                in_order=in_order,
            )
        else:
            self.desc, self.avail, self.used, self.end = split_layout(base, size)
            self.driver = SplitDriverRing(
                self.mem,
                size,
                self.desc,
                self.avail,
                self.used,
                event_idx=event_idx,
                start=vring_base or 0,
            )
        if vring_base is not None:
            self.state.set_vring_base(vring_base)
        self.state.set_queue_info(self.desc, self.avail, self.used)
        self.state.set_queue_ready(True)

    def close(self) -> None:
        self.state.close()
        self._guard.release()

    def read(self, gpa: int, length: int) -> bytes:
        return self.mem.read(GuestAddress(gpa), length)

    def write(self, gpa: int, data: bytes) -> None:
        self.mem.write(GuestAddress(gpa), data)
