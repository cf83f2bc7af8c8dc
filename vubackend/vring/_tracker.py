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

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

__all__ = ["InflightTracker"]


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
