# QueueInflight: a queue's inflight I/O tracking (INFLIGHT_SHMFD): what its
# pops and completions record in the tracker, the heads it resubmits after
# a reconnect, and the recovery of positions when a tracker is attached.
#
# Rules of this module (the Queue's module rules say when it is used):
# - Made only when a tracker is attached (Queue keeps None otherwise, and
#   its data path then never comes here).
# - Split rings: every popped head is recorded (begin) before its chain
#   leaves; a completion links its batch, publishes, then clears the heads
#   and records used_idx, in that order (§4.9). complete() leaves the clear
#   to settle(), which the drain runs once it has signalled the driver, and
#   which runs anyway before the next pop or push (a head used now may come
#   back in it).
# - Packed rings: each popped chain's ring descriptors are recorded; a
#   failed push unlinks its batch.
# - Pending heads (recovery) are resubmitted first, oldest counter first;
#   malformed ones are forgotten.
# - Not thread-safe: the queue's callers serialise (VringMutex/VringRwLock).

from __future__ import annotations

from collections.abc import Sequence
from typing import cast, final

from vubackend.errors import DescriptorChainError, RingStateError
from vubackend.memory import GuestMemory
from vubackend.vring._chain import ChainBatch, DescriptorChain
from vubackend.vring._packed import PackedRing
from vubackend.vring._readback import packed_used_reader
from vubackend.vring._split import SplitRing
from vubackend.vring._tracker import (
    AnyInflightTracker,
    InflightTracker,
    PackedDesc,
    PackedInflightTracker,
)

__all__ = ["QueueInflight"]


@final
class QueueInflight:
    """The inflight tracking of one queue (see the module rules)."""

    __slots__ = ("_resubmit", "_resubmit_packed", "_size", "_unsettled", "tracker")

    def __init__(self, tracker: AnyInflightTracker, size: int) -> None:
        self.tracker = tracker
        self._size = size
        self._resubmit: list[int] = []
        self._resubmit_packed: list[tuple[int, list[PackedDesc]]] = []
        # A completion whose record is still to finish (settle()).
        self._unsettled: tuple[list[int], int] | None = None

    # ------------------------------------------------------------ attaching

    def attach_split(self, used_idx: int) -> int:
        """Recover a split tracker against ``used_idx`` (``used->idx``);
        queue its pending heads for resubmission.

        Returns:
            The number of pending heads.
        """
        tracker = cast("InflightTracker", self.tracker)
        self._resubmit = list(tracker.recover(used_idx))
        return len(self._resubmit)

    def attach_packed(
        self, mem: GuestMemory, desc: int
    ) -> tuple[int, int, int, int, int]:
        """Recover a packed tracker from the descriptor ring at ``desc``.

        Returns:
            ``(used, used_wrap, avail, avail_wrap, pending)``: the positions
            to restart from and the number of chains to resubmit.

        Raises:
            RingStateError: the recorded used position is out of range.
        """
        tracker = cast("PackedInflightTracker", self.tracker)
        size = self._size
        published = packed_used_reader(mem, desc, size)
        used, used_wrap, pending = tracker.recover_packed(size, published)
        if not 0 <= used < size:
            raise RingStateError(
                f"recorded used position {used} is not below the queue size {size}"
            )
        avail, avail_wrap = used + sum(len(d) for _, d in pending), used_wrap & 1
        while avail >= size:
            avail -= size
            avail_wrap ^= 1
        self._resubmit_packed = list(pending)
        return used, used_wrap & 1, avail, avail_wrap, len(pending)

    def forget_resubmissions(self) -> None:
        """Drop the heads still to resubmit (a new ring base)."""
        self._resubmit = []
        self._resubmit_packed = []

    # ------------------------------------------------------------ pops

    def pop(
        self, mem: GuestMemory, engine: SplitRing | PackedRing, limit: int
    ) -> list[DescriptorChain]:
        """Pop up to ``limit`` chains: resubmissions first, then new chains,
        each recorded before it is returned."""
        if self._unsettled is not None:
            self.settle()
        chains: list[DescriptorChain] = []
        if self._resubmit or self._resubmit_packed:
            chains = self._pop_resubmitted(mem, engine, limit)
            if len(chains) >= limit:
                return chains
        start = engine.positions[0] if isinstance(engine, PackedRing) else 0
        try:
            popped = engine.pop(mem, limit - len(chains))
        except DescriptorChainError:
            if chains:
                return chains  # the next call raises again
            raise
        if popped:
            if isinstance(engine, PackedRing):
                records = []
                for chain in popped:
                    records.append(engine.read_slots(start, chain.ring_slots))
                    start = (start + chain.ring_slots) % self._size
                cast("PackedInflightTracker", self.tracker).begin_chains(records)
            elif len(popped) == 1:
                cast("InflightTracker", self.tracker).begin((popped[0].head,))
            else:
                cast("InflightTracker", self.tracker).begin([c.head for c in popped])
        return chains + popped if chains else popped

    def pop_batches(
        self, mem: GuestMemory, engine: SplitRing | PackedRing, limit: int
    ) -> list[ChainBatch]:
        """:meth:`pop` as batches."""
        if self._resubmit or self._resubmit_packed or isinstance(engine, PackedRing):
            # Rare paths (resubmission, packed records): through pop().
            return [ChainBatch.of(c) for c in self.pop(mem, engine, limit)]
        if self._unsettled is not None:
            self.settle()
        batches = engine.pop_batches(mem, limit)
        if batches:
            heads = [head for batch in batches for head in batch.heads]
            cast("InflightTracker", self.tracker).begin(heads)
        return batches

    def _pop_resubmitted(
        self, mem: GuestMemory, engine: SplitRing | PackedRing, limit: int
    ) -> list[DescriptorChain]:
        # The heads stay recorded (same counters): they are in flight.
        if isinstance(engine, PackedRing):
            records = self._resubmit_packed[:limit]
            self._resubmit_packed = self._resubmit_packed[limit:]
            chains, bad = engine.resubmit(mem, records)
            if bad:
                cast("PackedInflightTracker", self.tracker).drop(bad)
        else:
            heads, self._resubmit = self._resubmit[:limit], self._resubmit[limit:]
            chains, bad = engine.resubmit(mem, heads)
            if bad:
                # Malformed now: forgotten, as a malformed new chain is consumed.
                self.tracker.complete(bad, engine.next_used)
        if bad and not chains:
            raise DescriptorChainError(
                f"resubmitted descriptor chain(s) at head(s) {bad} are malformed"
            )
        return chains

    # ------------------------------------------------------------ completions

    def push(
        self, mem: GuestMemory, engine: SplitRing | PackedRing, flat: Sequence[int]
    ) -> None:
        """Return chains (``flat``: ``(id, len)`` pairs), recorded in the
        spec's order: link the batch, write and publish, clear, record
        used_idx. A push that fails writes nothing; its link is then never
        looked at (used_idx still matches used->idx)."""
        if self._unsettled is not None:
            self.settle()
        tracker = self.tracker
        heads = list(flat[0::2])
        recordable = all(0 <= head < self._size for head in heads)
        if recordable:
            tracker.link(heads)
        if isinstance(engine, PackedRing):
            try:
                engine.push(mem, flat)
            except Exception:
                if recordable:
                    cast("PackedInflightTracker", tracker).unlink()
                raise
            if recordable:
                tracker.complete(heads, engine.positions[2])
            return
        engine.push(mem, flat)
        if recordable:
            tracker.complete(heads, engine.next_used)

    def complete(
        self, mem: GuestMemory, engine: SplitRing | PackedRing, flat: list[int]
    ) -> tuple[bool, bool]:
        """Return chains and say whether to signal and whether more are
        available (the engines' ``complete``); split rings leave the clear
        to :meth:`settle`. Packed rings: :meth:`push`, the decision, and
        ``more`` True (the next pop tells)."""
        if not isinstance(engine, SplitRing):
            self.push(mem, engine, flat)
            return engine.needs_notification(mem), True
        if self._unsettled is not None:
            self.settle()
        heads = flat[0::2]
        cast("InflightTracker", self.tracker).link(heads)
        result = engine.complete(mem, flat)
        self._unsettled = (heads, engine.next_used)
        return result

    def settle(self) -> None:
        """Finish the record of the last :meth:`complete`: clear its heads
        and record used_idx (after used.idx was published). A no-op without
        one."""
        unsettled, self._unsettled = self._unsettled, None
        if unsettled is not None:
            heads, used_idx = unsettled
            cast("InflightTracker", self.tracker).complete(heads, used_idx)
