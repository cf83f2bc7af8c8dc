# DriverRing: the frontend drivers' handle on one queue's driver side. The
# ring itself is vubackend.vring's SplitDriverRing / PackedDriverRing (they
# place chains, publish them with the ordering virtio requires, decide kicks
# from the device's suppression and collect used entries); this adapter only
# adds what the drivers need on top.
#
# Rules of this module:
# - Each chain carries a caller token: the vring drivers hand back ids
#   (split: the head index, packed: the buffer id), and this keeps the
#   id -> token map. An id is reused only after collect() returned it.
# - Buffers are (guest physical address, length) ranges the caller owns;
#   readable ones go first, then writable ones; n buffers take n descriptors
#   (no indirect tables).
# - The ring attaches to the queue's memory as it is (reset=False): the
#   queue zeroed it when it was allocated, and zeroing again would wipe what
#   a running device wrote (used flags, avail_event, device area). A split
#   ring continues from the indices in memory; a packed ring starts at slot
#   0, wrap 1 (the vring driver cannot attach to a running packed ring), so
#   one DriverRing serves a packed queue for its whole life, across
#   stop/start.
# - kick() signals the kick eventfd when the ring says the device wants it
#   (NO_NOTIFY, avail_event, packed device event suppression), and always
#   after the queue was (re)started since the last kick, as QEMU kicks a
#   queue it starts.
# - wait() re-enables interrupts (NO_INTERRUPT clear, or used_event / the
#   driver area at the next used entry with EVENT_IDX) and re-checks before
#   each sleep on the call eventfd; every sleep is bounded.

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Final, Generic, TypeVar, final

from vubackend.frontend._memory import GuestRam
from vubackend.frontend._queue import FrontendQueue
from vubackend.protocol import VirtioFeatures
from vubackend.vring import PackedDriverRing, SplitDriverRing

__all__ = ["Buffer", "DriverRing", "make_driver_ring"]

T = TypeVar("T")

Buffer = tuple[int, int]
"""A buffer as (guest physical address, length)."""

# Longest sleep between two looks at the used ring (a lost call costs this).
_POLL: Final = 0.05


@final
class DriverRing(Generic[T]):
    """The driver side of a :class:`FrontendQueue`, with a token per chain.

    Args:
        ram: the guest RAM holding the queue's rings.
        queue: the queue.
        event_idx: whether EVENT_IDX was negotiated.
        in_order: whether IN_ORDER was negotiated (packed rings).
    """

    def __init__(
        self,
        ram: GuestRam,
        queue: FrontendQueue,
        *,
        event_idx: bool = False,
        in_order: bool = False,
    ) -> None:
        self._queue = queue
        where = (ram.memory, queue.size, queue.desc, queue.avail, queue.used)
        self._ring: SplitDriverRing | PackedDriverRing
        if queue.packed:
            self._ring = PackedDriverRing(
                *where, event_idx=event_idx, in_order=in_order, reset=False
            )
        else:
            self._ring = SplitDriverRing(*where, event_idx=event_idx, reset=False)
        self._tokens: dict[int, T] = {}
        self._kicked_start = queue.starts

    @property
    def ring(self) -> SplitDriverRing | PackedDriverRing:
        """The vring driver underneath."""
        return self._ring

    @property
    def num_free(self) -> int:
        """Descriptors (ring slots) free for new chains."""
        return self._ring.num_free

    @property
    def in_flight(self) -> int:
        """Chains made available and not collected yet."""
        return len(self._tokens)

    def add(
        self, readable: Sequence[Buffer], writable: Sequence[Buffer], token: T
    ) -> None:
        """Make one chain available: device-readable buffers, then
        device-writable ones (published at once; see :meth:`kick`).

        Raises:
            RingStateError: the ring is full, or no buffer was given.
        """
        buffers = [(gpa, n, False) for gpa, n in readable]
        buffers += [(gpa, n, True) for gpa, n in writable]
        ident = self._ring.add(buffers)
        self._tokens[ident] = token

    def kick(self) -> bool:
        """Kick the queue if the device asked to be told of the chains
        published since the last kick, or if the queue was started since.

        Returns:
            Whether the kick eventfd was written.
        """
        needed = self._ring.kick_needed()
        started = self._queue.starts != self._kicked_start
        if needed or started:
            self._kicked_start = self._queue.starts
            self._queue.kick.signal()
            return True
        return False

    def collect(self) -> list[tuple[T, int]]:
        """The chains the device used since the last call, in order, as
        (token, bytes written).

        Raises:
            RingStateError: the device returned an id that is not in flight.
        """
        # The ring raises for an id not in flight, so every id has a token.
        return [(self._tokens.pop(i), n) for i, n in self._ring.collect()]

    def wait(self, *, timeout: float, until: int = 1) -> list[tuple[T, int]]:
        """Collect used chains until at least ``until`` arrived or
        ``timeout`` seconds passed, sleeping on the call eventfd between
        looks (interrupts re-enabled first).

        Returns:
            What was collected (possibly fewer than ``until`` on timeout).
        """
        deadline = time.monotonic() + timeout
        out = self.collect()
        while len(out) < until:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.sleep(left)
            out.extend(self.collect())
        return out

    def sleep(self, seconds: float) -> None:
        """Re-enable interrupts and, unless a used entry is already
        waiting, sleep on the call eventfd (at most ``seconds``, and never
        long: a lost call costs one short sleep)."""
        if not self._ring.enable_interrupts():
            self._queue.call.wait(min(seconds, _POLL))


def make_driver_ring(
    ram: GuestRam, queue: FrontendQueue, *, features: int = 0
) -> DriverRing[T]:
    """The driver side of ``queue`` (split or packed as the queue is).

    Args:
        ram: the guest RAM holding the queue's rings.
        queue: the queue.
        features: the acked virtio features (EVENT_IDX and IN_ORDER count).
    """
    return DriverRing[T](
        ram,
        queue,
        event_idx=bool(features & VirtioFeatures.EVENT_IDX),
        in_order=bool(features & VirtioFeatures.IN_ORDER),
    )
