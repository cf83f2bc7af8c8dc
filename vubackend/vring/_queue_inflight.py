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
# - A split tracker that gives its region (NativeInflightTracker) is
#   recorded by the ring's walker itself whenever the ring walks natively
#   (the walker is bound to the region on first use, unbound by close());
#   the Python calls above then run only for pops walked in Python, with
#   the counter handed back and forth.
# - Not thread-safe: the queue's callers serialise (VringMutex/VringRwLock).

from __future__ import annotations

from collections.abc import Sequence
from typing import cast, final

from vubackend._native import RingWalker, inflight_tracking
from vubackend.errors import DescriptorChainError, RingStateError
from vubackend.memory import GuestMemory
from vubackend.vring._chain import ChainBatch, DescriptorChain
from vubackend.vring._packed import PackedRing
from vubackend.vring._readback import packed_used_reader
from vubackend.vring._split import SplitRing
from vubackend.vring._tracker import (
    AnyInflightTracker,
    InflightTracker,
    NativeInflightTracker,
    PackedDesc,
    PackedInflightTracker,
)

__all__ = ["QueueInflight"]


@final
class QueueInflight:
    """The inflight tracking of one queue (see the module rules)."""

    __slots__ = (
        "_region",
        "_resubmit",
        "_resubmit_packed",
        "_size",
        "_unsettled",
        "_walker",
        "tracker",
    )

    def __init__(self, tracker: AnyInflightTracker, size: int) -> None:
        self.tracker = tracker
        self._size = size
        self._resubmit: list[int] = []
        self._resubmit_packed: list[tuple[int, list[PackedDesc]]] = []
        # A completion whose record is still to finish (settle()).
        self._unsettled: tuple[list[int], int] | None = None
        # The region the native calls record in, and the walker bound to it.
        self._region: tuple[memoryview, int] | None = None
        if isinstance(tracker, NativeInflightTracker):
            self._region = tracker.region()
        self._walker: RingWalker | None = None

    def close(self) -> None:
        """Stop the native recording and release the region (before the
        tracker's buffer is closed). Idempotent."""
        self._unbind()
        region, self._region = self._region, None
        if region is not None:
            region[0].release()

    def _unbind(self) -> None:
        walker, self._walker = self._walker, None
        if walker is not None:
            cast(
                "NativeInflightTracker", self.tracker
            ).counter = inflight_tracking.counter(walker)
            inflight_tracking.untrack(walker)

    def _native(self, engine: SplitRing) -> bool:
        # Whether the engine's native calls record themselves (binding its
        # walker to the region on first use).
        walker = engine._walker
        if walker is not self._walker:
            self._unbind()
            if self._region is None or not engine._native:
                return False
            view, count = self._region
            tracker = cast("NativeInflightTracker", self.tracker)
            inflight_tracking.track(walker, view, count, tracker.counter)
            self._walker = walker
        return engine._native

    def _begin(self, engine: SplitRing, heads: Sequence[int]) -> None:
        # Heads popped by a Python walk: recorded here, counting on from
        # where the walker is.
        walker = self._walker
        tracker = cast("InflightTracker", self.tracker)
        if walker is None:
            tracker.begin(heads)
            return
        native = cast("NativeInflightTracker", tracker)
        native.counter = inflight_tracking.counter(walker)
        tracker.begin(heads)
        inflight_tracking.set_counter(walker, native.counter)

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
        if isinstance(engine, PackedRing):
            start = engine.positions[0]
        else:
            start = 0
            self._native(engine)  # bound before the walk
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
            elif not self._walked_natively(engine):
                self._begin(engine, [c.head for c in popped])
        return chains + popped if chains else popped

    def recorded_by(self, engine: SplitRing | PackedRing, mem: GuestMemory) -> bool:
        """Whether the engine's own pops and completions on ``mem`` record
        everything (a native split ring bound to the region, nothing to
        resubmit or settle): a drain may then call the engine directly."""
        if not isinstance(engine, SplitRing) or self._resubmit:
            return False
        if self._unsettled is not None or not self._native(engine):
            return False
        space = engine._space
        if space is not None and space.memory is mem:
            return space.native_walks
        return not any(region.on_demand for region in mem.regions)

    def _walked_natively(self, engine: SplitRing) -> bool:
        # The last pop went through the walker bound to the region.
        space = engine._space
        return (
            self._walker is engine._walker
            and engine._native
            and space is not None
            and space.native_walks
        )

    def pop_batches(
        self, mem: GuestMemory, engine: SplitRing | PackedRing, limit: int
    ) -> list[ChainBatch]:
        """:meth:`pop` as batches."""
        if self._resubmit or self._resubmit_packed or isinstance(engine, PackedRing):
            # Rare paths (resubmission, packed records): through pop().
            return [ChainBatch.of(c) for c in self.pop(mem, engine, limit)]
        if self._unsettled is not None:
            self.settle()
        self._native(engine)  # bound before the walk
        batches = engine.pop_batches(mem, limit)
        if batches and not self._walked_natively(engine):
            self._begin(engine, [head for batch in batches for head in batch.heads])
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
        if isinstance(engine, SplitRing) and self._native(engine):
            engine.push(mem, flat)  # recorded by the walker
            return
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
        if self._native(engine):
            return engine.complete(mem, flat)  # recorded by the walker
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
