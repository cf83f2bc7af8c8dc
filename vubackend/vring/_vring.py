# VringT, VringMutex, VringRwLock: one VringState shared between the
# request thread and a worker thread, behind a lock (rust-vmm vring.rs).
#
# Rules of this module:
# - The locking strategy is a type, not an `if` (docs/style.md §3 item 4):
#   VringMutex serialises every call with one mutex; VringRwLock takes the
#   shared side for calls that only read the state (get_ref,
#   signal_used_queue, read_kick, queue_next_avail, queue_used_idx; as in the
#   seed) and the exclusive side for everything else. Both satisfy VringT.
# - Every method holds the lock for exactly one VringState call, so each is
#   atomic with respect to the others; a caller that needs several steps
#   under one hold uses get_mut() / get_ref().
# - Locks are not reentrant: do not call the vring's methods while holding
#   one of its guards.

from __future__ import annotations

import threading
from array import array
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Protocol, final

from vubackend.memory import GuestAddress, GuestMemoryAtomic
from vubackend.vring._chain import ChainBatch, DescriptorChain
from vubackend.vring._defs import QueueFeatures
from vubackend.vring._drain import drain_batches, drain_chains
from vubackend.vring._rwlock import RwLock
from vubackend.vring._state import VringState
from vubackend.vring._tracker import AnyInflightTracker

__all__ = ["VringGuard", "VringMutex", "VringRwLock", "VringT"]


class _Lock(Protocol):
    # threading.Lock, RwLock.read, RwLock.write.
    def __enter__(self) -> object: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
        /,
    ) -> object: ...


@final
class VringGuard:
    """``with vring.get_mut() as state:``: the VringState, held under the
    vring's lock for the ``with`` block.

    An exclusive guard (``get_mut``) also holds one renewable memory lease
    for the block (:meth:`VringState.hold`), so a drain of many calls pays
    for one lease, not one per call.
    """

    __slots__ = ("_exclusive", "_lock", "_state")

    def __init__(self, state: VringState, lock: _Lock, *, exclusive: bool) -> None:
        self._state = state
        self._lock = lock
        self._exclusive = exclusive

    def __enter__(self) -> VringState:
        self._lock.__enter__()
        if self._exclusive:
            self._state.hold()
        return self._state

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._exclusive:
                self._state.unhold()
        finally:
            self._lock.__exit__(exc_type, exc, tb)


class VringT(Protocol):
    """What device code and the daemon may do with a vring, whatever its
    locking strategy (the seed's ``VringT``)."""

    def get_ref(self) -> VringGuard:
        """The state under the shared side of the lock."""
        ...

    def get_mut(self) -> VringGuard:
        """The state under the exclusive side of the lock."""
        ...

    def pop_chains(self, max_chains: int | None = None) -> list[DescriptorChain]:
        """Pop the available descriptor chains."""
        ...

    def poll_available(self, timeout: float) -> bool:
        """Busy-poll up to ``timeout`` seconds for a new available chain."""
        ...

    def drain(
        self,
        serve: Callable[[DescriptorChain], int],
        *,
        busy_poll: float = 0.0,
        max_chains: int | None = None,
    ) -> int:
        """Serve every available chain with ``serve`` until the ring is empty."""
        ...

    def drain_batches(
        self,
        serve: Callable[[ChainBatch], int],
        *,
        busy_poll: float = 0.0,
        max_chains: int | None = None,
        budget: int | None = None,
    ) -> int:
        """Serve every available chain a batch at a time with ``serve``
        (chains the device only reads)."""
        ...

    def pop_batches(self, max_chains: int | None = None) -> list[ChainBatch]:
        """Pop the available chains as batches (no object per chain)."""
        ...

    def add_used_heads(self, heads: Sequence[int], length: int = 0) -> None:
        """Return many chains with one used length, published together."""
        ...

    def add_used_batch(
        self,
        batch: ChainBatch,
        count: int | None = None,
        length: int | array[int] = 0,
        *,
        first: int = 0,
    ) -> bool:
        """Return chains of a batch (one used length, or one per chain) and
        signal the driver if it wants an interrupt."""
        ...

    def pop_chain(self) -> DescriptorChain | None:
        """Pop one descriptor chain, or None."""
        ...

    def add_used(self, desc_index: int, length: int) -> None:
        """Return one chain to the driver."""
        ...

    def add_used_many(self, used: Iterable[tuple[int, int]]) -> None:
        """Return many chains at once."""
        ...

    def signal_used_queue(self) -> None:
        """Signal the call eventfd."""
        ...

    def signal_if_needed(self) -> bool:
        """Signal the call eventfd if the driver wants an interrupt."""
        ...

    def enable_notification(self) -> bool:
        """Re-enable kicks; True if chains are available."""
        ...

    def disable_notification(self) -> None:
        """Ask the driver not to kick."""
        ...

    def needs_notification(self) -> bool:
        """Whether the driver wants an interrupt."""
        ...

    def is_enabled(self) -> bool:
        """Whether the ring is enabled."""
        ...

    def set_enabled(self, enabled: bool) -> None:
        """Enable or disable the ring."""
        ...

    def set_queue_info(self, desc_table: int, avail_ring: int, used_ring: int) -> None:
        """Set the ring addresses (guest physical)."""
        ...

    def set_queue_size(self, num: int) -> None:
        """Set the queue size."""
        ...

    def set_queue_features(self, features: QueueFeatures) -> None:
        """Set the ring features."""
        ...

    def set_queue_event_idx(self, enabled: bool) -> None:
        """Turn EVENT_IDX on or off."""
        ...

    def set_queue_ready(self, ready: bool) -> None:
        """Start or stop the queue."""
        ...

    def queue_next_avail(self) -> int:
        """The next available position."""
        ...

    def set_queue_next_avail(self, base: int) -> None:
        """Set the next available position."""
        ...

    def set_queue_next_used(self, idx: int) -> None:
        """Set the next used position."""
        ...

    def queue_used_idx(self) -> int:
        """``used.idx`` in guest memory."""
        ...

    def set_inflight(self, tracker: AnyInflightTracker | None) -> int:
        """Attach (or detach) an inflight tracker; the number to resubmit."""
        ...

    def vring_base(self) -> int:
        """The ``GET_VRING_BASE`` value."""
        ...

    def set_vring_base(self, num: int) -> None:
        """Apply ``SET_VRING_BASE``."""
        ...

    def set_log_used(self, enabled: bool, log_addr: GuestAddress | None = None) -> None:
        """Log ring writes in the dirty log, or stop."""
        ...

    def set_kick(self, fd: int | None) -> None:
        """Take ownership of a new kick eventfd."""
        ...

    def read_kick(self) -> bool:
        """Consume a kick; returns the enabled flag."""
        ...

    def note_kick(self) -> bool:
        """Count a kick seen by an edge-triggered wait; the enabled flag."""
        ...

    def set_call(self, fd: int | None) -> None:
        """Take ownership of a new call eventfd."""
        ...

    def set_err(self, fd: int | None) -> None:
        """Take ownership of a new error eventfd."""
        ...

    def get_kick(self) -> int | None:
        """The kick eventfd (borrowed), or None."""
        ...

    def reset(self) -> None:
        """Reset the queue and close its eventfds."""
        ...

    def close(self) -> None:
        """End of session: reset and close everything."""
        ...


class _LockedVring:
    # The shared implementation: `_shared` and `_exclusive` are the two sides
    # (the same mutex for VringMutex).
    __slots__ = ("_exclusive", "_mut_guard", "_ref_guard", "_shared", "_state")

    def __init__(self, state: VringState, shared: _Lock, exclusive: _Lock) -> None:
        self._state = state
        self._shared = shared
        self._exclusive = exclusive
        # Guards keep no state of their own: one of each serves every hold
        # (get_mut runs once per drain of the data path).
        self._ref_guard = VringGuard(state, shared, exclusive=False)
        self._mut_guard = VringGuard(state, exclusive, exclusive=True)

    def get_ref(self) -> VringGuard:
        """The state, held under the shared side of the lock.

        Returns:
            A guard: ``with vring.get_ref() as state: ...``.
        """
        return self._ref_guard

    def get_mut(self) -> VringGuard:
        """The state, held under the exclusive side of the lock.

        Returns:
            A guard: ``with vring.get_mut() as state: ...``.
        """
        return self._mut_guard

    def pop_chains(self, max_chains: int | None = None) -> list[DescriptorChain]:
        """Pop the available descriptor chains (:meth:`VringState.pop_chains`).

        Args:
            max_chains: most chains to pop (default: up to the queue size).

        Returns:
            The chains.

        Raises:
            DescriptorChainError: the next chain is malformed.
            RingStateError: the queue is not ready, broken, or not in memory.
        """
        with self._exclusive:
            return self._state.pop_chains(max_chains)

    def poll_available(self, timeout: float) -> bool:
        """Busy-poll for a new chain (:meth:`VringState.poll_available`);
        the request thread is held off for at most ``timeout``."""
        with self._exclusive:
            return self._state.poll_available(timeout)

    def drain(
        self,
        serve: Callable[[DescriptorChain], int],
        *,
        busy_poll: float = 0.0,
        max_chains: int | None = None,
    ) -> int:
        """Serve every available chain (:meth:`VringState.drain`), holding
        the exclusive lock and one memory lease for the whole drain.

        Returns:
            The number of chains served.
        """
        with self._exclusive:
            return self._state._held(drain_chains, serve, busy_poll, max_chains)

    def drain_batches(
        self,
        serve: Callable[[ChainBatch], int],
        *,
        busy_poll: float = 0.0,
        max_chains: int | None = None,
        budget: int | None = None,
    ) -> int:
        """Serve every available chain a batch at a time
        (:meth:`VringState.drain_batches`), holding the exclusive lock and
        one memory lease for the whole drain.

        Returns:
            The number of chains taken.
        """
        with self._exclusive:
            return self._state._held(
                drain_batches, serve, busy_poll, max_chains, budget
            )

    def pop_batches(self, max_chains: int | None = None) -> list[ChainBatch]:
        """Pop the available chains as batches (:meth:`VringState.pop_batches`)."""
        with self._exclusive:
            return self._state.pop_batches(max_chains)

    def add_used_heads(self, heads: Sequence[int], length: int = 0) -> None:
        """Return many chains with one used length
        (:meth:`VringState.add_used_heads`)."""
        with self._exclusive:
            self._state.add_used_heads(heads, length)

    def add_used_batch(
        self,
        batch: ChainBatch,
        count: int | None = None,
        length: int | array[int] = 0,
        *,
        first: int = 0,
    ) -> bool:
        """Return chains of a batch and signal the driver if it wants an
        interrupt (:meth:`VringState.add_used_batch`).

        Returns:
            Whether the driver was signalled.
        """
        with self._exclusive:
            return self._state.add_used_batch(batch, count, length, first=first)

    def pop_chain(self) -> DescriptorChain | None:
        """Pop one descriptor chain (:meth:`VringState.pop_chain`).

        Returns:
            The chain, or None.

        Raises:
            DescriptorChainError: the next chain is malformed.
            RingStateError: as :meth:`pop_chains`.
        """
        with self._exclusive:
            return self._state.pop_chain()

    def add_used(self, desc_index: int, length: int) -> None:
        """Return one chain to the driver (:meth:`VringState.add_used`).

        Args:
            desc_index: the chain's head.
            length: bytes written.

        Raises:
            ValueError: the chain is not in flight or the length is too big.
            RingStateError: the queue is not ready.
        """
        with self._exclusive:
            self._state.add_used(desc_index, length)

    def add_used_many(self, used: Iterable[tuple[int, int]]) -> None:
        """Return many chains at once (:meth:`VringState.add_used_many`).

        Args:
            used: ``(head, length)`` pairs.

        Raises:
            ValueError: an entry is invalid; nothing was written.
            RingStateError: the queue is not ready.
        """
        entries = list(used)
        with self._exclusive:
            self._state.add_used_many(entries)

    def signal_used_queue(self) -> None:
        """Signal the call eventfd (:meth:`VringState.signal_used_queue`).

        Raises:
            RingStateError: writing the eventfd failed.
        """
        with self._shared:
            self._state.signal_used_queue()

    def signal_if_needed(self) -> bool:
        """Signal the call eventfd if the driver wants an interrupt.

        Returns:
            Whether it was signalled.

        Raises:
            RingStateError: as :meth:`VringState.signal_if_needed`.
        """
        with self._exclusive:
            return self._state.signal_if_needed()

    def enable_notification(self) -> bool:
        """Re-enable kicks and re-check (:meth:`VringState.enable_notification`).

        Returns:
            True if chains are available.

        Raises:
            RingStateError: the queue is not ready or broken.
        """
        with self._exclusive:
            return self._state.enable_notification()

    def disable_notification(self) -> None:
        """Ask the driver not to kick (:meth:`VringState.disable_notification`).

        Raises:
            RingStateError: the queue is not ready or broken.
        """
        with self._exclusive:
            self._state.disable_notification()

    def needs_notification(self) -> bool:
        """Whether the driver wants an interrupt
        (:meth:`VringState.needs_notification`).

        Returns:
            True to signal.

        Raises:
            RingStateError: the queue is not ready.
        """
        with self._exclusive:
            return self._state.needs_notification()

    def is_enabled(self) -> bool:
        """Whether the ring is enabled.

        Returns:
            The flag.
        """
        with self._shared:
            return self._state.is_enabled()

    def set_enabled(self, enabled: bool) -> None:
        """Enable or disable the ring.

        Args:
            enabled: the new flag.
        """
        with self._exclusive:
            self._state.set_enabled(enabled)

    def set_queue_info(self, desc_table: int, avail_ring: int, used_ring: int) -> None:
        """Set the ring addresses (:meth:`VringState.set_queue_info`).

        Args:
            desc_table: descriptor table (ring).
            avail_ring: available ring / driver area.
            used_ring: used ring / device area.

        Raises:
            RingStateError: an address is misaligned.
        """
        with self._exclusive:
            self._state.set_queue_info(desc_table, avail_ring, used_ring)

    def set_queue_size(self, num: int) -> None:
        """Set the queue size.

        Args:
            num: entries.

        Raises:
            RingStateError: the size breaks a rule.
        """
        with self._exclusive:
            self._state.set_queue_size(num)

    def set_queue_features(self, features: QueueFeatures) -> None:
        """Set the ring features.

        Args:
            features: the features.
        """
        with self._exclusive:
            self._state.set_queue_features(features)

    def set_queue_event_idx(self, enabled: bool) -> None:
        """Turn EVENT_IDX on or off.

        Args:
            enabled: the flag.
        """
        with self._exclusive:
            self._state.set_queue_event_idx(enabled)

    def set_queue_ready(self, ready: bool) -> None:
        """Start or stop the queue.

        Args:
            ready: the new state.
        """
        with self._exclusive:
            self._state.set_queue_ready(ready)

    def queue_next_avail(self) -> int:
        """The next available position.

        Returns:
            The position.
        """
        with self._shared:
            return self._state.queue_next_avail()

    def set_queue_next_avail(self, base: int) -> None:
        """Set the next available position.

        Args:
            base: the position.

        Raises:
            RingStateError: out of range.
        """
        with self._exclusive:
            self._state.set_queue_next_avail(base)

    def set_queue_next_used(self, idx: int) -> None:
        """Set the next used position.

        Args:
            idx: the position.

        Raises:
            RingStateError: out of range.
        """
        with self._exclusive:
            self._state.set_queue_next_used(idx)

    def set_inflight(self, tracker: AnyInflightTracker | None) -> int:
        """Attach an inflight tracker (or detach: None); see
        :meth:`VringState.set_inflight`.

        Returns:
            The number of heads the next pops resubmit.

        Raises:
            RingStateError: as :meth:`VringState.set_inflight`.
        """
        with self._exclusive:
            return self._state.set_inflight(tracker)

    def queue_used_idx(self) -> int:
        """``used.idx`` in guest memory.

        Returns:
            The index.

        Raises:
            RingStateError: the used ring is not set or not in memory.
        """
        with self._shared:
            return self._state.queue_used_idx()

    def vring_base(self) -> int:
        """The ``GET_VRING_BASE`` value.

        Returns:
            The u32 value.
        """
        with self._exclusive:
            return self._state.vring_base()

    def set_vring_base(self, num: int) -> None:
        """Apply ``SET_VRING_BASE``.

        Args:
            num: the value.

        Raises:
            RingStateError: out of range.
        """
        with self._exclusive:
            self._state.set_vring_base(num)

    def set_log_used(self, enabled: bool, log_addr: GuestAddress | None = None) -> None:
        """Log ring writes in the dirty log, or stop.

        Args:
            enabled: whether to log.
            log_addr: split rings: the ``log_guest_addr``.
        """
        with self._exclusive:
            self._state.set_log_used(enabled, log_addr)

    def set_kick(self, fd: int | None) -> None:
        """Take ownership of a new kick eventfd.

        Args:
            fd: the eventfd, or None.
        """
        with self._exclusive:
            self._state.set_kick(fd)

    def read_kick(self) -> bool:
        """Consume a kick.

        Returns:
            The enabled flag.

        Raises:
            RingStateError: reading failed.
        """
        with self._shared:
            return self._state.read_kick()

    def note_kick(self) -> bool:
        """Count a kick that an edge-triggered epoll reported (the worker's
        way: the eventfd is not read); see :meth:`VringState.note_kick`.

        Without the lock: it reads one flag and bumps a counter that only
        the ring's worker writes, each a single step for the interpreter
        (VringState.note_kick, inline: this runs once per kick).

        Returns:
            The enabled flag.
        """
        state = self._state
        state.kicks += 1
        return state._enabled

    def set_call(self, fd: int | None) -> None:
        """Take ownership of a new call eventfd.

        Args:
            fd: the eventfd, or None.
        """
        with self._exclusive:
            self._state.set_call(fd)

    def set_err(self, fd: int | None) -> None:
        """Take ownership of a new error eventfd.

        Args:
            fd: the eventfd, or None.
        """
        with self._exclusive:
            self._state.set_err(fd)

    def get_kick(self) -> int | None:
        """The kick eventfd (borrowed), or None.

        Returns:
            The fd.
        """
        with self._shared:
            return self._state.get_kick()

    def reset(self) -> None:
        """Reset the queue and close its eventfds."""
        with self._exclusive:
            self._state.reset()

    def close(self) -> None:
        """End of session: reset and close everything."""
        with self._exclusive:
            self._state.close()


@final
class VringMutex(_LockedVring):
    """A VringState behind one mutex: every call is exclusive."""

    __slots__ = ()

    def __init__(
        self, mem: GuestMemoryAtomic, max_queue_size: int, *, native: bool = True
    ) -> None:
        """Create the vring.

        Args:
            mem: the session's guest memory.
            max_queue_size: the device's largest queue size.
            native: use the native batch path.

        Raises:
            RingStateError: ``max_queue_size`` is out of range.
        """
        lock = threading.Lock()
        super().__init__(VringState(mem, max_queue_size, native=native), lock, lock)

    def __repr__(self) -> str:
        return f"<VringMutex {self._state!r}>"


@final
class VringRwLock(_LockedVring):
    """A VringState behind a readers-writer lock: read-only calls share it."""

    __slots__ = ()

    def __init__(
        self, mem: GuestMemoryAtomic, max_queue_size: int, *, native: bool = True
    ) -> None:
        """Create the vring.

        Args:
            mem: the session's guest memory.
            max_queue_size: the device's largest queue size.
            native: use the native batch path.

        Raises:
            RingStateError: ``max_queue_size`` is out of range.
        """
        rw = RwLock()
        super().__init__(
            VringState(mem, max_queue_size, native=native), rw.read, rw.write
        )

    def __repr__(self) -> str:
        return f"<VringRwLock {self._state!r}>"
