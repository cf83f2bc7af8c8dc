# Driver-side virtqueue writers for the frontend's drivers: place buffers in
# a split or packed ring, publish them, and collect used entries.
#
# STOP-GAP: vubackend.vring is to provide driver-side writers; until it does,
# the drivers use these. They share one small interface (DriverRing), so the
# swap touches only make_driver_ring().
#
# Memory ordering (virtio 1.x §2.7.13 and §2.8.21, the driver's side of
# vhost-user-protocol.md §5.4):
# - Split: descriptors and the avail ring entry are written with plain
#   stores, then avail.idx is stored with RELEASE ordering, so a device that
#   sees the new index sees the entries. used.idx is loaded with ACQUIRE
#   ordering before the used elements are read.
# - Packed: the descriptors of a chain after the first are written with
#   their flags, then the head's flags are stored with RELEASE ordering (the
#   head is published last). A used descriptor's flags are loaded with
#   ACQUIRE ordering before its id and len are read.
# - Both atomics go through the memory layer's pinned native view
#   (MappedRegion.atomic), which implements them with C11 atomics.
# - The frontend always kicks after publishing (spurious kicks are allowed),
#   so it never reads the device's suppression flags.
#
# Rules of this module:
# - A ring lives in one region (FrontendQueue allocates it so); buffers are
#   guest physical ranges the caller owns.
# - Each chain carries a caller token, returned by collect() with the used
#   length. A chain of n buffers takes n descriptors (no indirect tables).

from __future__ import annotations

import struct
import time
from collections.abc import Sequence
from typing import Final, Generic, Protocol, TypeVar, final

from vubackend.errors import RingStateError
from vubackend.frontend._memory import GuestRam
from vubackend.frontend._queue import FrontendQueue
from vubackend.memory import GuestAddress

__all__ = [
    "Buffer",
    "DriverRing",
    "PackedDriverRing",
    "SplitDriverRing",
    "make_driver_ring",
]

T = TypeVar("T")

Buffer = tuple[int, int]
"""A buffer as (guest physical address, length)."""

_DESC: Final = struct.Struct("<QIHH")
_USED_ELEM: Final = struct.Struct("<II")
_F_NEXT: Final = 1
_F_WRITE: Final = 2
_P_AVAIL: Final = 1 << 7
_P_USED: Final = 1 << 15


class DriverRing(Protocol[T]):
    """What a driver needs from a ring: add chains, collect used ones."""

    @property
    def num_free(self) -> int:
        """Descriptors free for new chains."""
        ...

    def add(
        self, readable: Sequence[Buffer], writable: Sequence[Buffer], token: T
    ) -> None:
        """Make one chain available: device-readable buffers, then
        device-writable ones. Raises RingStateError when the ring is full."""
        ...

    def collect(self) -> list[tuple[T, int]]:
        """The chains the device used since the last call, in order, as
        (token, bytes written)."""
        ...


def _chain(
    readable: Sequence[Buffer], writable: Sequence[Buffer]
) -> list[tuple[int, int, int]]:
    parts = [(gpa, n, 0) for gpa, n in readable] + [
        (gpa, n, _F_WRITE) for gpa, n in writable
    ]
    if not parts:
        raise ValueError("a chain needs at least one buffer")
    return parts


@final
class SplitDriverRing(Generic[T]):
    """The driver's side of a split virtqueue (virtio 1.x §2.7)."""

    def __init__(self, ram: GuestRam, queue: FrontendQueue) -> None:
        if queue.packed:
            raise RingStateError(f"queue {queue.index} is packed, not split")
        self._ram = ram
        self._q = queue
        self._size = queue.size
        self._free = list(range(queue.size))
        self._tokens: dict[int, tuple[T, list[int]]] = {}
        memory = ram.memory
        self._avail_idx = memory.read_u16(GuestAddress(queue.avail + 2))
        self._last_used = memory.read_u16(GuestAddress(queue.used + 2))

    @property
    def num_free(self) -> int:
        """Descriptors free for new chains."""
        return len(self._free)

    def add(
        self, readable: Sequence[Buffer], writable: Sequence[Buffer], token: T
    ) -> None:
        """Make one chain available (see :class:`DriverRing`)."""
        parts = _chain(readable, writable)
        if len(parts) > len(self._free):
            raise RingStateError(
                f"queue {self._q.index}: {len(parts)} descriptors needed, "
                f"{len(self._free)} free"
            )
        ids = [self._free.pop() for _ in parts]
        memory = self._ram.memory
        q = self._q
        for i, (gpa, length, flags) in enumerate(parts):
            last = i == len(parts) - 1
            next_id = 0 if last else ids[i + 1]
            desc = _DESC.pack(gpa, length, flags | (0 if last else _F_NEXT), next_id)
            memory.write(GuestAddress(q.desc + 16 * ids[i]), desc)
        slot = self._avail_idx % self._size
        memory.write_u16(GuestAddress(q.avail + 4 + 2 * slot), ids[0])
        self._tokens[ids[0]] = (token, ids)
        self._avail_idx = (self._avail_idx + 1) & 0xFFFF
        region, offset = memory.locate(GuestAddress(q.avail + 2), 2)
        # ORDERING: release store of avail.idx after the descriptors and the
        # ring entry (virtio 1.x §2.7.13.3); store_u16 is a release store.
        region.atomic.store_u16(offset, self._avail_idx)

    def collect(self) -> list[tuple[T, int]]:
        """The chains used since the last call, as (token, bytes written)."""
        memory = self._ram.memory
        q = self._q
        region, offset = memory.locate(GuestAddress(q.used + 2), 2)
        # ORDERING: acquire load of used.idx before reading the elements
        # (virtio 1.x §2.7.14); load_u16 is an acquire load.
        used_idx = region.atomic.load_u16(offset)
        out: list[tuple[T, int]] = []
        while self._last_used != used_idx:
            slot = self._last_used % self._size
            raw = memory.read(GuestAddress(q.used + 4 + 8 * slot), 8)
            head, written = _USED_ELEM.unpack(raw)
            entry = self._tokens.pop(head, None)
            if entry is None:
                raise RingStateError(
                    f"queue {q.index}: device used unknown head {head}"
                )
            token, ids = entry
            self._free.extend(ids)
            out.append((token, written))
            self._last_used = (self._last_used + 1) & 0xFFFF
        return out


@final
class PackedDriverRing(Generic[T]):
    """The driver's side of a packed virtqueue (virtio 1.x §2.8)."""

    def __init__(self, ram: GuestRam, queue: FrontendQueue) -> None:
        if not queue.packed:
            raise RingStateError(f"queue {queue.index} is split, not packed")
        self._ram = ram
        self._q = queue
        self._size = queue.size
        self._next_avail = 0
        self._avail_wrap = True
        self._next_used = 0
        self._used_wrap = True
        self._free_descs = queue.size
        self._free_ids = list(range(queue.size))
        self._tokens: dict[int, tuple[T, int]] = {}

    @property
    def num_free(self) -> int:
        """Descriptors free for new chains."""
        return self._free_descs

    def _flags(self, write: int, more: bool) -> int:
        avail = _P_AVAIL if self._avail_wrap else 0
        used = 0 if self._avail_wrap else _P_USED
        return avail | used | write | (_F_NEXT if more else 0)

    def add(
        self, readable: Sequence[Buffer], writable: Sequence[Buffer], token: T
    ) -> None:
        """Make one chain available (see :class:`DriverRing`)."""
        parts = _chain(readable, writable)
        if len(parts) > self._free_descs:
            raise RingStateError(
                f"queue {self._q.index}: {len(parts)} descriptors needed, "
                f"{self._free_descs} free"
            )
        buffer_id = self._free_ids.pop()
        memory = self._ram.memory
        q = self._q
        head_slot = self._next_avail
        head_flags = self._flags(parts[0][2], len(parts) > 1)
        for i, (gpa, length, write) in enumerate(parts):
            slot = self._next_avail
            more = i < len(parts) - 1
            flags = head_flags if i == 0 else self._flags(write, more)
            # The head's flags are written last, below.
            desc = _DESC.pack(gpa, length, buffer_id, 0 if i == 0 else flags)
            memory.write(GuestAddress(q.desc + 16 * slot), desc)
            self._next_avail += 1
            if self._next_avail == self._size:
                self._next_avail = 0
                self._avail_wrap = not self._avail_wrap
        self._free_descs -= len(parts)
        self._tokens[buffer_id] = (token, len(parts))
        region, offset = memory.locate(GuestAddress(q.desc + 16 * head_slot + 14), 2)
        # ORDERING: release store of the head's flags after every other write
        # of the chain (virtio 1.x §2.8.21.1); store_u16 is a release store.
        region.atomic.store_u16(offset, head_flags)

    def collect(self) -> list[tuple[T, int]]:
        """The chains used since the last call, as (token, bytes written)."""
        memory = self._ram.memory
        q = self._q
        out: list[tuple[T, int]] = []
        while self._tokens:
            slot = self._next_used
            region, offset = memory.locate(GuestAddress(q.desc + 16 * slot + 14), 2)
            # ORDERING: acquire load of the flags before reading id and len
            # (virtio 1.x §2.8.21.2); load_u16 is an acquire load.
            flags = region.atomic.load_u16(offset)
            avail = bool(flags & _P_AVAIL)
            used = bool(flags & _P_USED)
            if avail != used or used != self._used_wrap:
                break
            _addr, written, buffer_id, _ = _DESC.unpack(
                memory.read(GuestAddress(q.desc + 16 * slot), 16)
            )
            entry = self._tokens.pop(buffer_id, None)
            if entry is None:
                raise RingStateError(
                    f"queue {q.index}: device used unknown id {buffer_id}"
                )
            token, count = entry
            self._free_ids.append(buffer_id)
            self._free_descs += count
            out.append((token, written))
            self._next_used += count
            if self._next_used >= self._size:
                self._next_used -= self._size
                self._used_wrap = not self._used_wrap
        return out


def make_driver_ring(ram: GuestRam, queue: FrontendQueue) -> DriverRing[T]:
    """The driver-side writer for ``queue``'s layout."""
    if queue.packed:
        return PackedDriverRing[T](ram, queue)
    return SplitDriverRing[T](ram, queue)


def poll_used(
    ring: DriverRing[T], queue: FrontendQueue, *, timeout: float, until: int = 1
) -> list[tuple[T, int]]:
    """Collect used chains until at least ``until`` arrived or ``timeout``
    seconds passed, sleeping on the queue's call eventfd in between.

    Returns:
        What was collected (possibly fewer than ``until`` on timeout).
    """
    deadline = time.monotonic() + timeout
    out = ring.collect()
    while len(out) < until:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        queue.call.wait(min(left, 0.05))
        out.extend(ring.collect())
    return out
