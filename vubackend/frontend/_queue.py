# FrontendQueue: one virtqueue as the frontend sets it up: where its rings
# lie in guest RAM, its kick/call/err eventfds, and its start/stop state.
#
# Rules of this module:
# - Ring memory is allocated from GuestRam and zeroed before first use (a
#   packed ring must start zeroed, a split ring's used idx at 0); it stays
#   allocated while the queue lives, so a stop/restart keeps the indices.
# - Layouts come from vubackend.vring (split_layout with the event fields,
#   packed_layout), in one block of one region, 16-byte aligned, so the
#   vring driver rings can attach to it. SET_VRING_ADDR names the avail
#   ring / driver area "avail" and the used ring / device area "used".
# - The queue owns its eventfds; close() closes them and frees the rings.
# - `base` is what SET_VRING_BASE sends on the next start: 0 for a new split
#   ring, 1 << 15 (avail wrap counter 1) for a new packed ring, and whatever
#   GET_VRING_BASE returned after a stop.

from __future__ import annotations

import enum
from typing import Final, final

from vubackend.frontend._eventfd import EventFd
from vubackend.frontend._memory import GuestRam
from vubackend.memory import GuestAddress
from vubackend.protocol import MAX_QUEUE_SIZE
from vubackend.vring import packed_layout, split_layout

__all__ = ["FrontendQueue", "QueueState"]

# A new packed ring: avail wrap counter 1, used wrap counter 1 (virtio-user
# sends 0 | 1 << 15 and DPDK derives the used side from it).
PACKED_INITIAL_BASE: Final = (1 << 15) | (1 << 31)


class QueueState(enum.Enum):
    """Where a queue is in its life."""

    CONFIGURED = "configured"  # rings allocated, not sent yet
    RUNNING = "running"  # NUM/BASE/ADDR/KICK/CALL sent (and enabled)
    STOPPED = "stopped"  # disabled and GET_VRING_BASE done


@final
class FrontendQueue:
    """A virtqueue owned by a frontend: ring addresses, eventfds and state.

    Made by ``Frontend.setup_queue``.

    Attributes:
        index: the queue index.
        size: descriptors in the ring.
        packed: packed (True) or split (False) layout.
        desc: guest physical address of the descriptor table / ring.
        avail: GPA of the avail ring (split) or driver event area (packed).
        used: GPA of the used ring (split) or device event area (packed).
        kick: the eventfd the frontend kicks.
        call: the eventfd the backend signals.
        err: the error eventfd, or None.
        base: SET_VRING_BASE value for the next start.
        state: see :class:`QueueState`.
        starts: how many times the queue was started.
    """

    def __init__(
        self, ram: GuestRam, index: int, size: int, *, packed: bool, err: bool
    ) -> None:
        if not 0 <= index <= 0xFF:
            raise ValueError(f"queue index {index} does not fit in 8 bits")
        if not 0 < size <= MAX_QUEUE_SIZE or (not packed and size & (size - 1)):
            raise ValueError(
                f"queue size {size} must be 1..{MAX_QUEUE_SIZE} (a power of 2 "
                "for split rings)"
            )
        self._ram = ram
        self.index = index
        self.size = size
        self.packed = packed
        self._blocks: list[tuple[int, int]] = []
        self.kick = EventFd()
        self.call = EventFd()
        self.err: EventFd | None = EventFd() if err else None
        layout = packed_layout if packed else split_layout
        try:
            base = self._alloc(layout(0, size)[3], 16)
        except BaseException:
            self.close()
            raise
        desc, avail, used, _end = layout(base, size)
        self.desc = GuestAddress(desc)
        self.avail = GuestAddress(avail)
        self.used = GuestAddress(used)
        self.base = PACKED_INITIAL_BASE if packed else 0
        self.state = QueueState.CONFIGURED
        self.starts = 0

    def _alloc(self, size: int, align: int) -> GuestAddress:
        gpa = self._ram.alloc(size, align)
        self._blocks.append((gpa, size))
        self._ram.write(gpa, bytes(size))
        return gpa

    @property
    def used_len(self) -> int:
        """Bytes of the used ring / device area (what logging covers)."""
        return 4 if self.packed else 6 + 8 * self.size

    def close(self) -> None:
        """Close the eventfds and free the ring memory. Idempotent."""
        self.kick.close()
        self.call.close()
        if self.err is not None:
            self.err.close()
        blocks, self._blocks = self._blocks, []
        if not self._ram.closed:
            for gpa, size in blocks:
                self._ram.free(gpa, size)

    def __repr__(self) -> str:
        kind = "packed" if self.packed else "split"
        return (
            f"<FrontendQueue {self.index} {kind} size={self.size} {self.state.value}>"
        )
