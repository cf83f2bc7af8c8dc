# VringState: one virtqueue as the daemon and the device see it: the Queue,
# the kick/call/err eventfds, the enabled flag and the guest memory handle
# (rust-vmm vhost-user-backend vring.rs, VringState).
#
# Rules of this module:
# - Every call that touches guest memory works on a leased snapshot, so a
#   new memory table is seen at the next call and an old one is never
#   unmapped under it. Outside a hold, each call takes and drops its own
#   lease (GuestMemoryAtomic.memory()). Under an exclusive hold (get_mut(),
#   hold()/unhold()) the calls share one renewable lease (MemoryLease),
#   which costs an identity check per call and still moves to a new table
#   at the first call after the swap. That lease outlives the hold while its
#   snapshot is current (the next drain then starts for free); it is dropped
#   at the end of a hold that finds it stale, and whenever the request
#   thread re-points the ring (set_queue_info, which every memory change
#   does for configured rings), stops, resets or closes it.
# - The eventfds are owned: set_kick/set_call/set_err take ownership of the
#   fd they are given and close the one they replace; close() closes all.
#   (In the seed these take `Option<File>`, which is ownership too.)
# - Not thread-safe. VringMutex and VringRwLock wrap it with a lock; the
#   methods they call under a shared (read) lock (signal_used_queue,
#   read_kick, queue_next_avail, queue_used_idx) only read this object.
# - OSErrors of the eventfds become RingStateError (no bare OSError leaves
#   the layer).

from __future__ import annotations

import contextlib
import os
import select
from array import array
from collections.abc import Callable, Iterable, Sequence
from typing import Final, final

from vubackend.errors import RingStateError
from vubackend.memory import GuestAddress, GuestMemoryAtomic, MemoryLease
from vubackend.vring._chain import ChainBatch, DescriptorChain
from vubackend.vring._defs import QueueFeatures
from vubackend.vring._drain import drain_batches, drain_chains
from vubackend.vring._queue import Queue
from vubackend.vring._tracker import AnyInflightTracker

__all__ = ["VringState"]

_ONE: Final = (1).to_bytes(8, "little")


def _close(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


@final
class VringState:
    """One virtqueue with its eventfds, enabled flag and memory handle.

    Device code normally reaches it through :class:`VringMutex` or
    :class:`VringRwLock`, which expose the same methods under a lock.

    Attributes:
        kicks: kicks consumed by :meth:`read_kick` so far (for reports).
        calls: signals written by :meth:`signal_used_queue` so far.
    """

    __slots__ = (
        "_call",
        "_enabled",
        "_err",
        "_hold_lease",
        "_kick",
        "_kick_direct",
        "_kick_poll",
        "_lease",
        "_log_on",
        "_mem",
        "_queue",
        "calls",
        "kicks",
    )

    def __init__(
        self, mem: GuestMemoryAtomic, max_queue_size: int, *, native: bool = True
    ) -> None:
        """Create a stopped, disabled queue.

        Args:
            mem: the session's guest memory.
            max_queue_size: the device's largest queue size (1..32768).
            native: use the native batch walker (True) or the Python
                reference path (False).

        Raises:
            RingStateError: ``max_queue_size`` is out of range.
        """
        self._mem = mem
        self._queue = Queue(max_queue_size, native=native)
        self._kick: int | None = None
        # Counters for reports (see the class docstring).
        self.kicks = 0
        self.calls = 0
        # A poll object for the kick fd, made once per fd: read_kick runs on
        # every event of the data path.
        self._kick_poll: select.poll | None = None
        self._kick_direct = False
        self._call: int | None = None
        self._err: int | None = None
        self._enabled = False
        self._log_on = False
        # The lease of an exclusive hold (hold()/unhold()); made once.
        self._lease: MemoryLease | None = None
        self._hold_lease = mem.lease()

    # ------------------------------------------------------------ holds

    def hold(self) -> None:
        """Start an exclusive hold: until :meth:`unhold`, data-path calls
        share one renewable memory lease instead of taking one each.

        The caller holds the vring's exclusive lock for the whole hold
        (``VringMutex.get_mut()`` / ``VringRwLock.get_mut()`` do both).
        """
        if self._lease is None:
            self._lease = self._hold_lease

    def unhold(self) -> None:
        """End the hold started by :meth:`hold`. Its lease is kept while
        its snapshot is current (see :meth:`release_memory`)."""
        lease, self._lease = self._lease, None
        if lease is not None:
            lease.release_if_stale()

    def release_memory(self) -> None:
        """Drop the memory lease kept between holds (the ring then pins no
        snapshot). Called with the exclusive lock held, outside a hold."""
        self._hold_lease.release()

    # ------------------------------------------------------------ parts

    @property
    def queue(self) -> Queue:
        """The queue (configuration, positions, data path)."""
        return self._queue

    def get_queue(self) -> Queue:
        """The queue (seed name).

        Returns:
            The queue.
        """
        return self._queue

    @property
    def mem(self) -> GuestMemoryAtomic:
        """The guest memory handle."""
        return self._mem

    def is_enabled(self) -> bool:
        """Whether the ring is enabled (``SET_VRING_ENABLE``).

        Returns:
            The flag.
        """
        return self._enabled

    def set_enabled(self, enabled: bool) -> None:
        """Enable or disable the ring.

        Args:
            enabled: the new flag.
        """
        self._enabled = enabled

    # ------------------------------------------------------------ data path

    def pop_chains(self, max_chains: int | None = None) -> list[DescriptorChain]:
        """Pop the available descriptor chains.

        Args:
            max_chains: most chains to pop (default: up to the queue size).

        Returns:
            The chains, possibly none.

        Raises:
            DescriptorChainError: the next chain is malformed (consumed on a
                split ring; a packed ring is then broken).
            RingStateError: the queue is not ready, is broken, or its rings
                are not in guest memory.
        """
        lease = self._lease
        if lease is not None:
            return self._queue.pop_chains(lease.current(), max_chains)
        with self._mem.memory() as mem:
            return self._queue.pop_chains(mem, max_chains)

    def drain(
        self,
        serve: Callable[[DescriptorChain], int],
        *,
        busy_poll: float = 0.0,
        max_chains: int | None = None,
    ) -> int:
        """Serve every available chain, the way the best backends do it:
        pop a batch, call ``serve(chain)`` for each (it returns the used
        length: the bytes it wrote), return the batch with one publication,
        signal the driver once if it wants an interrupt (EVENT_IDX
        suppression honoured), and start again until the ring is empty. An
        empty pop re-arms the driver's kick and looks once more (§5.4 rule
        6), so nothing that arrives meanwhile waits for a kick that never
        comes.

        With ``busy_poll`` (seconds), kicks are turned off while the ring is
        served, and an empty ring is polled that long for the next chain
        before they are turned back on (and the ring checked once more).

        Under :meth:`hold` (``get_mut()``) the whole drain uses the hold's
        memory lease; otherwise it takes one for its duration.

        Args:
            serve: the device's work for one chain; returns the used length.
            busy_poll: seconds to poll an empty ring before returning (0:
                never).
            max_chains: most chains per batch (default: the queue size).

        Returns:
            The number of chains served.

        Raises:
            DescriptorChainError: a malformed chain (the ones before it were
                served); call again to go on.
            RingStateError: the queue is not ready, broken, or not in guest
                memory.
            Exception: whatever ``serve`` raised (its chain and the rest of
                its batch are then not returned).
        """
        return self._held(drain_chains, serve, busy_poll, max_chains)

    def drain_batches(
        self,
        serve: Callable[[ChainBatch], int],
        *,
        busy_poll: float = 0.0,
        max_chains: int | None = None,
        budget: int | None = None,
    ) -> int:
        """:meth:`drain` for chains the device only reads (a transmit queue,
        a sink): pop a batch, hand it to ``serve(batch)`` whole (a
        :class:`ChainBatch`: lengths and ids without an object per chain,
        ``batch.chains()`` when the data is needed), return the chains it
        took with used length 0 in one publication, signal the driver if it
        wants an interrupt, and go on until the ring is empty.

        ``serve`` returns how many of the batch's chains (from the first) it
        took. Fewer than all ends the drain: the others stay in flight and
        are the caller's (keep them, e.g. ``batch.chains()[taken:]``, and
        return them with ``add_used`` once done).

        Args:
            serve: the device's work for one batch; returns the chains taken.
            busy_poll: as :meth:`drain`.
            max_chains: most chains per batch (default: the queue size).
            budget: stop after about this many chains (a batch is never
                split), so that a busy ring cannot starve the worker's other
                queues (default: no limit).

        Returns:
            The number of chains taken.

        Raises:
            ValueError: ``serve`` returned more than the batch's chains.
            DescriptorChainError: as :meth:`drain`.
            RingStateError: as :meth:`drain`.
            Exception: whatever ``serve`` raised (its batch is then not
                returned).
        """
        return self._held(drain_batches, serve, busy_poll, max_chains, budget)

    def _held(self, loop: Callable[..., int], *args: object) -> int:
        # A drain loop (_drain.py) under the current hold, or under one for
        # its duration (whose lease is the kept one).
        lease = self._lease
        if lease is not None:
            return loop(lease, self._queue, self.signal_used_queue, *args)
        self.hold()
        try:
            return loop(self._hold_lease, self._queue, self.signal_used_queue, *args)
        finally:
            self.unhold()

    def pop_batches(self, max_chains: int | None = None) -> list[ChainBatch]:
        """Pop the available chains as batches, without an object per chain
        (:meth:`Queue.pop_batches`); complete them with
        :meth:`add_used_heads`.

        Raises:
            DescriptorChainError: as :meth:`pop_chains`.
            RingStateError: as :meth:`pop_chains`.
        """
        lease = self._lease
        if lease is not None:
            return self._queue.pop_batches(lease.current(), max_chains)
        with self._mem.memory() as mem:
            return self._queue.pop_batches(mem, max_chains)

    def add_used_heads(self, heads: Sequence[int], length: int = 0) -> None:
        """Return many chains with one used length, published together.

        Raises:
            ValueError: an entry is invalid; nothing was written.
            RingStateError: the queue is not ready.
        """
        lease = self._lease
        if lease is not None:
            self._queue.add_used_heads(lease.current(), heads, length)
            return
        with self._mem.memory() as mem:
            self._queue.add_used_heads(mem, heads, length)

    def add_used_batch(
        self,
        batch: ChainBatch,
        count: int | None = None,
        length: int | array[int] = 0,
        *,
        first: int = 0,
    ) -> bool:
        """Return ``count`` chains of ``batch`` from chain ``first`` on (all
        the rest by default), with one used length or one per chain (an
        ``array('I')``, as :meth:`ChainBatch.fill` gives), in one
        publication; then signal the driver if it wants it (one fence).

        Returns:
            Whether the driver was signalled.

        Raises:
            ValueError: a chain is not in flight, or a length exceeds its
                chain's writable bytes; nothing was written.
            RingStateError: the queue is not ready, or signalling failed.
        """
        if count is None:
            count = len(batch) - first
        lease = self._lease
        queue = self._queue
        if lease is not None:
            signal, _ = queue.complete_batch(
                lease.current(), batch, count, length, first
            )
        else:
            with self._mem.memory() as mem:
                signal, _ = queue.complete_batch(mem, batch, count, length, first)
        if signal:
            self.signal_used_queue()
        queue.settle()
        return signal

    def pop_chain(self) -> DescriptorChain | None:
        """Pop one descriptor chain.

        Returns:
            The chain, or None if none is available.

        Raises:
            DescriptorChainError: the next chain is malformed.
            RingStateError: as :meth:`pop_chains`.
        """
        lease = self._lease
        if lease is not None:
            return self._queue.pop_chain(lease.current())
        with self._mem.memory() as mem:
            return self._queue.pop_chain(mem)

    def add_used(self, desc_index: int, length: int) -> None:
        """Return a chain to the driver (used element / used descriptor),
        published at once.

        Args:
            desc_index: the chain's ``head``.
            length: bytes written into its writable buffers.

        Raises:
            ValueError: the chain is not in flight, or ``length`` exceeds its
                writable bytes.
            RingStateError: the queue is not ready.
        """
        lease = self._lease
        if lease is not None:
            self._queue.add_used(lease.current(), desc_index, length)
            return
        with self._mem.memory() as mem:
            self._queue.add_used(mem, desc_index, length)

    def add_used_many(self, used: Iterable[tuple[int, int]]) -> None:
        """Return many chains at once (one native call, one publication).

        Args:
            used: ``(head, length)`` pairs in completion order.

        Raises:
            ValueError: an entry is invalid; nothing was written.
            RingStateError: the queue is not ready.
        """
        lease = self._lease
        if lease is not None:
            self._queue.add_used_many(lease.current(), used)
            return
        with self._mem.memory() as mem:
            self._queue.add_used_many(mem, used)

    def enable_notification(self) -> bool:
        """Ask the driver to kick again, then re-check for work.

        Returns:
            True if chains are available: process them before waiting.

        Raises:
            RingStateError: the queue is not ready or is broken.
        """
        lease = self._lease
        if lease is not None:
            return self._queue.enable_notification(lease.current())
        with self._mem.memory() as mem:
            return self._queue.enable_notification(mem)

    def poll_available(self, timeout: float) -> bool:
        """Busy-poll up to ``timeout`` seconds for a newly available chain
        (see :meth:`Queue.poll_available`); True if one came.

        Raises:
            RingStateError: the queue is not ready or is broken.
        """
        lease = self._lease
        if lease is not None:
            return self._queue.poll_available(lease.current(), timeout)
        with self._mem.memory() as mem:
            return self._queue.poll_available(mem, timeout)

    def disable_notification(self) -> None:
        """Ask the driver not to kick (while we poll).

        Raises:
            RingStateError: the queue is not ready or is broken.
        """
        lease = self._lease
        if lease is not None:
            self._queue.disable_notification(lease.current())
            return
        with self._mem.memory() as mem:
            self._queue.disable_notification(mem)

    def needs_notification(self) -> bool:
        """Whether the driver wants an interrupt for what was used since the
        last call (EVENT_IDX, NO_INTERRUPT, packed event suppression).

        Returns:
            True to call :meth:`signal_used_queue`.

        Raises:
            RingStateError: the queue is not ready.
        """
        lease = self._lease
        if lease is not None:
            return self._queue.needs_notification(lease.current())
        with self._mem.memory() as mem:
            return self._queue.needs_notification(mem)

    def signal_used_queue(self) -> None:
        """Signal the call eventfd (interrupt the driver); nothing without one.

        Unconditional, like the seed; use :meth:`signal_if_needed` to honour
        the driver's suppression.

        Raises:
            RingStateError: writing the eventfd failed.
        """
        fd = self._call
        if fd is None:
            return
        self.calls += 1
        try:
            os.write(fd, _ONE)
        except BlockingIOError:
            pass  # the counter is saturated: the driver will be woken anyway
        except OSError as exc:
            raise RingStateError(f"cannot signal the call eventfd: {exc}") from exc

    def signal_if_needed(self) -> bool:
        """:meth:`needs_notification`, then :meth:`signal_used_queue` if so.

        Returns:
            Whether the driver was signalled.

        Raises:
            RingStateError: as the two methods.
        """
        lease = self._lease
        if lease is not None:
            needed = self._queue.needs_notification(lease.current())
        else:
            with self._mem.memory() as mem:
                needed = self._queue.needs_notification(mem)
        if needed:
            self.signal_used_queue()
        return needed

    # ------------------------------------------------------------ configuration

    def set_queue_info(self, desc_table: int, avail_ring: int, used_ring: int) -> None:
        """Set the ring addresses, as guest physical addresses.

        Args:
            desc_table: descriptor table (ring).
            avail_ring: available ring (packed: driver event suppression).
            used_ring: used ring (packed: device event suppression).

        Raises:
            RingStateError: an address is misaligned.
        """
        self._queue.set_addresses(desc_table, avail_ring, used_ring)
        self._apply_log()
        # Re-pointed (a memory change does this): the next hold leases the
        # table that is current then.
        self.release_memory()

    def set_queue_size(self, num: int) -> None:
        """Set the queue size (``SET_VRING_NUM``).

        Args:
            num: entries.

        Raises:
            RingStateError: the size breaks a rule.
        """
        self._queue.set_size(num)

    def set_queue_features(self, features: QueueFeatures) -> None:
        """Set the ring features (from the acked virtio features).

        Args:
            features: the features.
        """
        self._queue.set_features(features)

    def set_queue_event_idx(self, enabled: bool) -> None:
        """Turn EVENT_IDX on or off (seed name), keeping the other features.

        Args:
            enabled: whether EVENT_IDX was negotiated.
        """
        f = self._queue.features
        self._queue.set_features(
            QueueFeatures(
                event_idx=enabled,
                packed=f.packed,
                in_order=f.in_order,
                indirect=f.indirect,
            )
        )

    def set_queue_ready(self, ready: bool) -> None:
        """Start or stop the queue.

        Args:
            ready: the new state.
        """
        self._queue.set_ready(ready)
        if not ready:
            self.release_memory()

    def queue_next_avail(self) -> int:
        """The next available position.

        Returns:
            A u16 index (split) or slot (packed).
        """
        return self._queue.next_avail

    def set_queue_next_avail(self, base: int) -> None:
        """Set the next available position.

        Args:
            base: the position.

        Raises:
            RingStateError: out of range.
        """
        self._queue.set_next_avail(base)

    def set_queue_next_used(self, idx: int) -> None:
        """Set the next used position.

        Args:
            idx: the position.

        Raises:
            RingStateError: out of range.
        """
        self._queue.set_next_used(idx)

    def queue_used_idx(self) -> int:
        """``used.idx`` as it is in guest memory (split).

        Returns:
            The index.

        Raises:
            RingStateError: the used ring is not set or not in memory.
        """
        with self._mem.memory() as mem:
            return self._queue.used_idx(mem)

    def set_inflight(self, tracker: AnyInflightTracker | None) -> int:
        """Attach an inflight tracker to the configured ring (INFLIGHT_SHMFD),
        or detach it (None). See :meth:`Queue.set_inflight`: positions are
        recovered from it and its pending heads are resubmitted first.

        Args:
            tracker: the queue's tracker, or None.

        Returns:
            The number of heads the next pops resubmit.

        Raises:
            RingStateError: a packed ring, or the used ring is not set or
                not in guest memory.
        """
        if tracker is None:
            return self._queue.set_inflight_detached()
        with self._mem.memory() as mem:
            return self._queue.set_inflight(mem, tracker)

    def vring_base(self) -> int:
        """The value for ``GET_VRING_BASE`` (packed: both positions and wrap
        counters).

        Returns:
            The u32 value.
        """
        return self._queue.base()

    def set_vring_base(self, num: int) -> None:
        """Apply ``SET_VRING_BASE``.

        Args:
            num: the value from the message.

        Raises:
            RingStateError: the value is out of range.
        """
        self._queue.set_base(num)

    def set_log_used(self, enabled: bool, log_addr: GuestAddress | None = None) -> None:
        """Log the device's ring writes in the session's dirty log
        (``VHOST_VRING_F_LOG`` of ``SET_VRING_ADDR``).

        Args:
            enabled: whether to log.
            log_addr: the ``log_guest_addr`` of the message (split rings; None
                for the used ring's own address).
        """
        self._log_on = enabled
        self._queue.set_log(self._mem.log if enabled else None, log_addr)

    def _apply_log(self) -> None:
        if self._log_on:
            self._queue.set_log(self._mem.log, None)

    def reset(self) -> None:
        """Reset the queue (positions, addresses, in-flight), disable it, and
        close the eventfds."""
        self._queue.reset()
        self.release_memory()
        self._enabled = False
        self._log_on = False
        for fd in (self._kick, self._call, self._err):
            _close(fd)
        self._kick = self._call = self._err = None
        self._kick_poll = None

    # ------------------------------------------------------------ eventfds

    def get_kick(self) -> int | None:
        """The kick eventfd (borrowed), or None.

        Returns:
            The fd.
        """
        return self._kick

    def get_call(self) -> int | None:
        """The call eventfd (borrowed), or None.

        Returns:
            The fd.
        """
        return self._call

    def get_err(self) -> int | None:
        """The error eventfd (borrowed), or None.

        Returns:
            The fd.
        """
        return self._err

    def set_kick(self, fd: int | None) -> None:
        """Take ownership of a new kick eventfd (closing the old one).

        Args:
            fd: the eventfd, or None.
        """
        old, self._kick = self._kick, fd
        if old != fd:
            self._kick_poll = None
            _close(old)

    def set_call(self, fd: int | None) -> None:
        """Take ownership of a new call eventfd (closing the old one).

        Args:
            fd: the eventfd, or None.
        """
        old, self._call = self._call, fd
        if old != fd:
            _close(old)

    def set_err(self, fd: int | None) -> None:
        """Take ownership of a new error eventfd (closing the old one).

        Args:
            fd: the eventfd, or None.
        """
        old, self._err = self._err, fd
        if old != fd:
            _close(old)

    def read_kick(self) -> bool:
        """Consume the kick eventfd's counter if it is readable.

        Returns:
            Whether the ring is enabled (seed semantics: a kick on a disabled
            ring is consumed and ignored).

        Raises:
            RingStateError: reading the eventfd failed.
        """
        fd = self._kick
        if fd is not None:
            try:
                # Never block: the worker calls this after epoll, but a
                # spurious wakeup or a reader elsewhere may have emptied it.
                # A non-blocking eventfd (QEMU's and DPDK's are) is read at
                # once; any other is polled first.
                poller = self._kick_poll
                if poller is None:
                    poller = self._kick_poll = select.poll()
                    poller.register(fd, select.POLLIN)
                    self._kick_direct = not os.get_blocking(fd)
                if self._kick_direct or poller.poll(0):
                    os.read(fd, 8)
                    self.kicks += 1
            except BlockingIOError:
                pass
            except OSError as exc:
                raise RingStateError(f"cannot read the kick eventfd: {exc}") from exc
        return self._enabled

    def note_kick(self) -> bool:
        """Count a kick reported by an edge-triggered wait on the kick fd
        (which is then not read: see the daemon's worker).

        Returns:
            Whether the ring is enabled (a disabled ring's kick is ignored).
        """
        self.kicks += 1
        return self._enabled

    def signal_err(self) -> None:
        """Signal the error eventfd (a broken ring), if there is one.

        Raises:
            RingStateError: writing the eventfd failed.
        """
        fd = self._err
        if fd is None:
            return
        try:
            os.write(fd, _ONE)
        except BlockingIOError:
            pass
        except OSError as exc:
            raise RingStateError(f"cannot signal the error eventfd: {exc}") from exc

    def close(self) -> None:
        """Reset and close every fd (end of session). Idempotent."""
        self.reset()

    def __repr__(self) -> str:
        return f"<VringState {self._queue!r} enabled={self._enabled}>"
