"""Helpers of the bitmap tests: the memfd name and counters of this
process's fds and mappings."""

from __future__ import annotations

import os

# Every memfd made by these tests carries this name, so that its mappings can
# be counted in /proc/self/maps ("/memfd:vubackend-test-bitmap (deleted)").
MEMFD_NAME = "vubackend-test-bitmap"


def count_fds() -> int:
    """Open fds of this process."""
    return len(os.listdir("/proc/self/fd"))


def count_mappings(name: str = MEMFD_NAME) -> int:
    """Mappings of memfds called ``name`` in this process."""
    with open("/proc/self/maps") as maps:
        return sum(1 for line in maps if f"/memfd:{name} " in line)
