"""Helpers to create and account for file descriptors in tests."""

from __future__ import annotations

import os


def open_fds() -> set[int]:
    """The fds open in this process right now."""
    return {int(name) for name in os.listdir("/proc/self/fd")} - {_listing_fd()}


def _listing_fd() -> int:
    # os.listdir opened one fd for itself; it is closed again by now, but its
    # number shows in the listing. Find it by opening and closing one more.
    fd = os.open("/dev/null", os.O_RDONLY)
    os.close(fd)
    return fd


def make_fds(count: int) -> tuple[int, ...]:
    """``count`` fresh fds (on /dev/null), owned by the caller."""
    return tuple(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC) for _ in range(count))


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True
