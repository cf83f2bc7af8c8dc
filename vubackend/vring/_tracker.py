# InflightTracker: what a ring calls to record the descriptor heads it has
# handed to the device and not yet returned (INFLIGHT_SHMFD;
# vhost-user-protocol.md §4.9). Defined here so that vring does not import
# the daemon; the daemon's inflight buffer implements it per queue.
#
# Rules:
# * begin() is called for every popped head before its chain leaves the
#   ring; link() before the used ring is written, complete() after used.idx
#   was published (the spec's order: link the batch through last_batch_head,
#   write and publish the used ring, clear the inflight flags, record
#   used_idx).
# * recover() runs once when the tracker is attached to a started ring and
#   returns the heads to resubmit, oldest counter first.
# * Calls are made under the ring's lock (VringMutex / VringRwLock).
# * PackedInflightTracker (packed rings) records each popped chain's ring
#   descriptors (begin_chains), since used descriptors overwrite the ring;
#   recover_packed() returns the recorded used position and the chains to
#   rebuild. unlink() undoes a link() whose push failed; drop() forgets
#   chains that are malformed on resubmission.
# * A split tracker that also gives its region (NativeInflightTracker) is
#   recorded by the native ring calls themselves while the ring walks
#   natively; begin/link/complete then run only for what the Python walks
#   do, with `counter` kept current in between.

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

__all__ = [
    "AnyInflightTracker",
    "InflightTracker",
    "NativeInflightTracker",
    "PackedDesc",
    "PackedInflightTracker",
]

# A recorded packed ring descriptor: (addr, len, id, flags).
PackedDesc = tuple[int, int, int, int]


class InflightTracker(Protocol):
    """One queue's inflight record (split rings)."""

    def begin(self, heads: Sequence[int]) -> None:
        """Record ``heads`` as popped (in order; each gets the next counter)."""
        ...

    def link(self, heads: Sequence[int]) -> None:
        """Link the batch ``heads`` through ``last_batch_head`` (before the
        used ring is written)."""
        ...

    def complete(self, heads: Sequence[int], used_idx: int) -> None:
        """Clear ``heads`` and record ``used_idx`` (after used.idx was
        published)."""
        ...

    def pending(self) -> list[int]:
        """Heads still in flight, oldest counter first."""
        ...

    def recover(self, used_idx: int) -> list[int]:
        """After a reconnect: if the recorded used index differs from
        ``used_idx`` (``used->idx`` in guest memory), clear the last batch
        and record ``used_idx``; then return :meth:`pending`."""
        ...


@runtime_checkable
class NativeInflightTracker(Protocol):
    """A split tracker over the spec's layout, which the native ring calls
    can write themselves (see the module rules)."""

    counter: int
    """The counter the next recorded head gets."""

    def region(self) -> tuple[memoryview, int]:
        """The queue's region of the inflight buffer (its 16-byte header,
        then 16 bytes per descriptor state: inflight flag, 5 pad bytes,
        next, counter) and its number of descriptor states. The caller
        releases the view."""
        ...


@runtime_checkable
class PackedInflightTracker(Protocol):
    """One queue's inflight record (packed rings)."""

    def begin_chains(self, chains: Sequence[Sequence[PackedDesc]]) -> None:
        """Record popped chains (in order): each one's ring descriptors; the
        chain's id is the last one's."""
        ...

    def link(self, heads: Sequence[int]) -> None:
        """Before the used descriptors of ids ``heads`` are written."""
        ...

    def unlink(self) -> None:
        """Undo the last :meth:`link` (nothing was written)."""
        ...

    def complete(self, heads: Sequence[int], used_idx: int) -> None:
        """After the used descriptors of ``heads`` were published."""
        ...

    def drop(self, heads: Sequence[int]) -> None:
        """Forget ``heads`` (malformed on resubmission) without using them."""
        ...

    def pending(self) -> list[int]:
        """Ids still in flight, oldest counter first."""
        ...

    def recover_packed(
        self, ring_size: int, published: Callable[[int, int], bool]
    ) -> tuple[int, int, list[tuple[int, list[PackedDesc]]]]:
        """After a reconnect: settle a batch cut by the crash (``published
        (slot, wrap)`` tells whether the used descriptor there was written)
        and return (used slot, used wrap counter, pending chains oldest
        first as ``(id, descriptors)``)."""
        ...


AnyInflightTracker = InflightTracker | PackedInflightTracker
