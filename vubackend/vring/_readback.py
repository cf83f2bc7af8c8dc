# Ring state read back from guest memory when a ring starts: used.idx of a
# split ring, and whether a packed ring's used descriptor was written (to
# recover inflight records after a reconnect).
#
# Rules of this module: acquire loads through the regions' atomic views;
# addresses outside guest memory are RingStateError, never a crash.

from __future__ import annotations

from collections.abc import Callable

from vubackend.errors import RingStateError, UnmappedAddressError
from vubackend.memory import GuestAddress, GuestMemory
from vubackend.vring._defs import DESC_F_AVAIL, DESC_F_USED

__all__ = ["guest_used_idx", "packed_used_reader"]


def guest_used_idx(mem: GuestMemory, used: int, size: int) -> int:
    """``used.idx`` of the split ring whose used ring is at ``used``."""
    try:
        region, offset = mem.locate(GuestAddress(used), 4)
    except UnmappedAddressError as exc:
        raise RingStateError(f"used ring at {used:#x} is not in guest memory") from exc
    del size
    try:
        # ORDERING: acquire load of used.idx (read back when a ring starts).
        return region.atomic.load_u16(offset + 2)
    except ValueError as exc:
        raise RingStateError(f"used ring at {used:#x} is misaligned ({exc})") from exc


def packed_used_reader(
    mem: GuestMemory, desc: int, size: int
) -> Callable[[int, int], bool]:
    """``published(slot, wrap)``: whether the used descriptor at ``slot`` of
    the packed ring at ``desc`` was written with wrap counter ``wrap``."""

    def published(slot: int, wrap: int) -> bool:
        if not 0 <= slot < size:
            return False
        try:
            region, offset = mem.locate(GuestAddress(desc + 16 * slot), 16)
        except UnmappedAddressError as exc:
            raise RingStateError(
                f"descriptor ring at {desc:#x} is not in guest memory"
            ) from exc
        # ORDERING: acquire load of a descriptor's flags (read back when
        # a ring starts).
        flags = region.atomic.load_u16(offset + 14)
        bit = DESC_F_AVAIL | DESC_F_USED
        return flags & bit == (bit if wrap else 0)

    return published
