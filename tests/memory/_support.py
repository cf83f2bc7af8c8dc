"""Helpers of the memory tests: the memfd name and counters of this
process's fds and mappings."""

from __future__ import annotations

import os

from vubackend.memory import FrontendAddress, GuestAddress, RegionDescriptor

# Every memfd made by these tests carries this name, so that its mappings can
# be counted in /proc/self/maps ("/memfd:vubackend-test-memory (deleted)").
MEMFD_NAME = "vubackend-test-memory"


def count_fds() -> int:
    """Open fds of this process."""
    return len(os.listdir("/proc/self/fd"))


def count_mappings(name: str = MEMFD_NAME) -> int:
    """Mappings of memfds called ``name`` in this process."""
    with open("/proc/self/maps") as maps:
        return sum(1 for line in maps if f"/memfd:{name} " in line)


def descriptor(
    fd: int,
    gpa: int,
    size: int,
    *,
    frontend_addr: int | None = None,
    mmap_offset: int = 0,
) -> RegionDescriptor:
    """A region descriptor; the frontend address defaults to a made-up
    virtual address 0x7f00_0000_0000 above the GPA."""
    return RegionDescriptor(
        gpa=GuestAddress(gpa),
        size=size,
        frontend_addr=FrontendAddress(
            0x7F00_0000_0000 + gpa if frontend_addr is None else frontend_addr
        ),
        mmap_offset=mmap_offset,
        fd=fd,
    )
