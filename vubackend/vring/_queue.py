# Queue: one virtqueue's configuration and positions, and the ring engine
# (SplitRing or PackedRing) built from them.
#
# Rules of this module:
# - Configuration arrives piecemeal (SET_FEATURES, SET_VRING_NUM,
#   SET_VRING_BASE, SET_VRING_ADDR, then a kick): each setter checks what it
#   can on its own (range, alignment) and raises RingStateError; the full
#   rules (power-of-two size for split rings, every ring part inside guest
#   memory with the EVENT_IDX extra bytes) are checked when the engine is
#   built, at the first data-path call after a change, and again whenever
#   the memory snapshot changes.
# - Any configuration change drops the engine after saving its positions;
#   the next data-path call builds a new one. Stop and restart (GET_VRING_BASE,
#   then SET_VRING_*) therefore works any number of times.
# - A split ring's next used index comes from guest memory (used.idx) when
#   the engine is first built after a reset or SET_VRING_BASE, unless
#   set_next_used() said otherwise (libvhost-user does the same).
# - The in-flight table lives in a RingWalker kept across engine rebuilds of
#   the same size and kind; SET_VRING_BASE and reset() clear it (chains
#   popped before are forgotten: the frontend rewinds to the base it gives).
# - An InflightTracker (INFLIGHT_SHMFD, split rings) may be attached with
#   set_inflight(): every popped head is recorded before its chain is
#   returned, every push is linked before and completed after the used ring
#   is written. Attaching recovers the tracker (the "used_idx != used->idx"
#   fix-up), sets next_used = used.idx and next_avail = used.idx + pending
#   (the spec's last_avail_idx), and the pending heads, oldest first, are
#   returned by the next pops before any new available entry. reset()
#   detaches it. The recording itself is _queue_inflight.py's QueueInflight;
#   without a tracker the data path goes straight to the engine.
# - Packed rings (a PackedInflightTracker): each popped chain's ring
#   descriptors are recorded; attaching takes the used position and wrap
#   counter from the record (next avail = used + the pending chains'
#   slots, as DPDK) and rebuilds the pending chains from the recorded
#   descriptors on the next pops; malformed ones are dropped.
# - Regions with native_copies (the postcopy backend) force the native
#   walker: a Python walk reads guest memory with the GIL held, and a fault
#   there would stall every thread of the process.
# - Not thread-safe: VringMutex / VringRwLock serialise access.

from __future__ import annotations

import time
from array import array
from collections.abc import Iterable, Sequence
from itertools import chain as iter_chain
from typing import Final, final

from vubackend._native import RingWalker
from vubackend.bitmap import Bitmap
from vubackend.errors import RingStateError
from vubackend.memory import GuestAddress, GuestMemory
from vubackend.vring._chain import ChainBatch, DescriptorChain
from vubackend.vring._defs import (
    MAX_QUEUE_SIZE,
    PACKED_WRAP_BIT,
    QueueFeatures,
    check_packed_config,
    check_split_config,
)
from vubackend.vring._packed import PackedRing, decode_packed_base
from vubackend.vring._queue_inflight import QueueInflight
from vubackend.vring._readback import guest_used_idx
from vubackend.vring._split import SplitRing
from vubackend.vring._tracker import AnyInflightTracker, PackedInflightTracker

__all__ = ["Queue"]

# Chains one native call returns at most; pop_chains loops for more.
DEFAULT_BATCH: Final = 256


@final
class Queue:
    """A virtqueue: its configuration, its positions, and (once ready) the
    ring it serves.

    Data-path methods take the :class:`~vubackend.memory.GuestMemory`
    snapshot to work on; :class:`~vubackend.vring.VringState` passes a
    leased one on every call.
    """

    __slots__ = (
        "_addresses",
        "_avail_wrap",
        "_engine",
        "_features",
        "_inflight",
        "_log",
        "_log_addr",
        "_max_size",
        "_native",
        "_next_avail",
        "_next_used",
        "_ready",
        "_size",
        "_used_explicit",
        "_used_wrap",
        "_walker",
    )

    def __init__(self, max_size: int = MAX_QUEUE_SIZE, *, native: bool = True) -> None:
        """Create a queue in its reset state.

        Args:
            max_size: the device's largest queue size, 1..32768; also the
                size until ``set_size``.
            native: pop and push batches in the native helper (True) or in
                the Python reference code (False; slower, same behaviour).
                Memory mapped with native copies (postcopy) always uses the
                native helper.

        Raises:
            RingStateError: ``max_size`` is out of range.
        """
        if not 1 <= max_size <= MAX_QUEUE_SIZE:
            raise RingStateError(
                f"maximum queue size {max_size} is not in 1..{MAX_QUEUE_SIZE}"
            )
        self._max_size = max_size
        self._native = native
        self._walker: RingWalker | None = None
        self._engine: SplitRing | PackedRing | None = None
        self._log: Bitmap | None = None
        self._log_addr: int | None = None
        self._features = QueueFeatures()
        # The inflight tracking, while a tracker is attached.
        self._inflight: QueueInflight | None = None
        self.reset()

    # ------------------------------------------------------------ configuration

    def reset(self) -> None:
        """Back to the reset state: size = maximum, no addresses, positions 0
        (packed wrap counters 1), not ready, nothing in flight, no ring
        logging. Features are kept (they belong to the device)."""
        self._drop(save=False)
        self._size = self._max_size
        self._addresses: tuple[int, int, int] | None = None
        self._ready = False
        self._next_avail = 0
        self._avail_wrap = 1
        self._next_used = 0
        self._used_wrap = 1
        self._used_explicit = False
        self._log = None
        self._log_addr = None
        self._close_inflight()
        if self._walker is not None:
            self._walker.clear_inflight()

    def _drop(self, *, save: bool = True) -> None:
        # Save the engine's positions, then forget it (and unpin its memory).
        engine, self._engine = self._engine, None
        if engine is None:
            return
        if save:
            if isinstance(engine, SplitRing):
                self._next_avail = engine.next_avail
                self._next_used = engine.next_used
            else:
                (
                    self._next_avail,
                    self._avail_wrap,
                    self._next_used,
                    self._used_wrap,
                ) = engine.positions
            self._used_explicit = True
        engine.release()

    @property
    def max_size(self) -> int:
        """The device's largest queue size."""
        return self._max_size

    @property
    def size(self) -> int:
        """The configured queue size."""
        return self._size

    @property
    def features(self) -> QueueFeatures:
        """The ring features in force."""
        return self._features

    @property
    def ready(self) -> bool:
        """Whether the queue may be used (started)."""
        return self._ready

    @property
    def addresses(self) -> tuple[GuestAddress, GuestAddress, GuestAddress] | None:
        """(descriptor, driver/avail, device/used) guest addresses, or None."""
        if self._addresses is None:
            return None
        desc, avail, used = self._addresses
        return GuestAddress(desc), GuestAddress(avail), GuestAddress(used)

    def set_features(self, features: QueueFeatures) -> None:
        """Set the negotiated ring features (``SET_FEATURES``).

        Args:
            features: the features.
        """
        if features != self._features:
            self._drop()
            if features.packed != self._features.packed:
                self._walker = None
            self._features = features

    def set_size(self, size: int) -> None:
        """Set the queue size (``SET_VRING_NUM``).

        Args:
            size: entries; 1..the maximum, a power of two for split rings.

        Raises:
            RingStateError: the size breaks a rule; nothing changes.
        """
        if not 1 <= size <= self._max_size:
            raise RingStateError(
                f"queue size {size} is not in 1..{self._max_size} (the device maximum)"
            )
        if not self._features.packed and size & (size - 1):
            raise RingStateError(f"split queue size {size} is not a power of two")
        self._drop()
        self._size = size

    def set_addresses(self, desc: int, avail: int, used: int) -> None:
        """Set the ring addresses, as guest physical addresses
        (``SET_VRING_ADDR``, after translating the frontend's addresses).

        For a packed ring ``avail`` is the driver event suppression area and
        ``used`` the device event suppression area.

        Args:
            desc: descriptor table (ring), 16-byte aligned.
            avail: available ring (2-aligned) / driver area (4-aligned).
            used: used ring / device area, 4-byte aligned.

        Raises:
            RingStateError: an address is misaligned; nothing changes.
        """
        if self._features.packed:
            check_packed_config(1, desc, avail, used)
        else:
            check_split_config(1, desc, avail, used)
        self._drop()
        self._addresses = (desc, avail, used)

    def set_ready(self, ready: bool) -> None:
        """Start (True) or stop (False) the queue.

        Args:
            ready: the new state.
        """
        if not ready:
            self._drop()
        self._ready = ready

    def set_log(self, log: Bitmap | None, log_addr: int | None = None) -> None:
        """Log the device's ring writes (``VHOST_VRING_F_LOG``), or stop.

        Args:
            log: a bitmap over guest physical addresses (the session's
                ``DirtyLogSlot``), or None.
            log_addr: split rings: where the used ring is logged
                (``log_guest_addr``; None means the used ring's address).
                Packed rings log at the written addresses.
        """
        self._log = log
        self._log_addr = log_addr
        engine = self._engine
        if engine is not None:
            self._apply_log(engine)

    def _apply_log(self, engine: SplitRing | PackedRing) -> None:
        if isinstance(engine, SplitRing):
            used = self._addresses[2] if self._addresses else 0
            engine.set_log(
                self._log, used if self._log_addr is None else self._log_addr
            )
        else:
            engine.set_log(self._log)

    # ------------------------------------------------------------ positions

    @property
    def next_avail(self) -> int:
        """The next available position (split: u16 index; packed: slot)."""
        engine = self._engine
        if isinstance(engine, SplitRing):
            return engine.next_avail
        if isinstance(engine, PackedRing):
            return engine.positions[0]
        return self._next_avail

    @property
    def next_used(self) -> int:
        """The next used position (split: u16 index; packed: slot)."""
        engine = self._engine
        if isinstance(engine, SplitRing):
            return engine.next_used
        if isinstance(engine, PackedRing):
            return engine.positions[2]
        return self._next_used

    def set_next_avail(self, value: int) -> None:
        """Set the next available position (packed: slot, wrap counter kept).

        Args:
            value: u16 (split) or slot below the size (packed).

        Raises:
            RingStateError: out of range.
        """
        if not 0 <= value <= 0xFFFF:
            raise RingStateError(f"next available index {value} is not a u16")
        self._drop()
        self._next_avail = value

    def set_next_used(self, value: int) -> None:
        """Set the next used position, instead of reading ``used.idx`` from
        guest memory when the ring starts.

        Args:
            value: u16 (split) or slot below the size (packed).

        Raises:
            RingStateError: out of range.
        """
        if not 0 <= value <= 0xFFFF:
            raise RingStateError(f"next used index {value} is not a u16")
        self._drop()
        self._next_used = value
        self._used_explicit = True

    def base(self) -> int:
        """The ring position for ``GET_VRING_BASE``: split: the next
        available index; packed: ``avail | avail_wrap << 15 | used << 16 |
        used_wrap << 31``. Reading it does not disturb a running ring."""
        engine = self._engine
        if isinstance(engine, SplitRing):
            return engine.next_avail
        if isinstance(engine, PackedRing):
            avail, avail_wrap, used, used_wrap = engine.positions
        elif not self._features.packed:
            return self._next_avail
        else:
            avail, avail_wrap = self._next_avail, self._avail_wrap
            used, used_wrap = self._next_used, self._used_wrap
        return (
            avail
            | avail_wrap << PACKED_WRAP_BIT
            | used << 16
            | used_wrap << (16 + PACKED_WRAP_BIT)
        )

    def set_base(self, num: int) -> None:
        """Restore the ring position (``SET_VRING_BASE``) and forget chains in
        flight. Split: the next available index (the next used index is then
        read from guest memory when the ring starts). Packed: the encoding of
        :meth:`base` (a value with zero upper half sets used = avail).

        Args:
            num: the value from the message (u32).

        Raises:
            RingStateError: the value is not a u32, or packed positions are
                not below the queue size.
        """
        if not 0 <= num <= 0xFFFF_FFFF:
            raise RingStateError(f"vring base {num:#x} is not a u32")
        if self._features.packed:
            avail, avail_wrap, used, used_wrap = decode_packed_base(num)
            if avail >= self._size or used >= self._size:
                raise RingStateError(
                    f"packed vring base {num:#x}: positions {avail} and {used} "
                    f"must be below the queue size {self._size}"
                )
        else:
            if num > 0xFFFF:
                raise RingStateError(f"split vring base {num:#x} is not a u16")
            avail, avail_wrap, used, used_wrap = num, 1, 0, 1
        self._drop()
        self._next_avail, self._avail_wrap = avail, avail_wrap
        self._next_used, self._used_wrap = used, used_wrap
        self._used_explicit = self._features.packed
        if self._inflight is not None:
            self._inflight.forget_resubmissions()
        if self._walker is not None:
            self._walker.clear_inflight()

    # ------------------------------------------------------------ the engine

    @property
    def broken(self) -> str | None:
        """Why the ring is broken (hostile input), or None."""
        return None if self._engine is None else self._engine.broken

    def _ring(self, mem: GuestMemory) -> SplitRing | PackedRing:
        engine = self._engine
        if engine is not None:
            return engine
        if not self._ready:
            raise RingStateError("queue is not ready (not started)")
        if self._addresses is None:
            raise RingStateError("queue addresses are not set")
        desc, avail, used = self._addresses
        packed = self._features.packed
        # Memory that may block on a fault (postcopy) is walked only by the
        # native helper, which runs without the GIL.
        native = self._native or any(r.native_copies for r in mem.regions)
        walker = self._walker
        if walker is None or walker.packed != packed or walker.qsize != self._size:
            walker = RingWalker(self._size, packed=packed, max_chains=DEFAULT_BATCH)
            self._walker = walker
        if packed:
            engine = PackedRing(
                self._size,
                desc,
                avail,
                used,
                self._features,
                walker=walker,
                next_avail=self._next_avail,
                avail_wrap=self._avail_wrap,
                next_used=self._next_used,
                used_wrap=self._used_wrap,
                native=native,
            )
        else:
            next_used = self._next_used
            if not self._used_explicit:
                next_used = guest_used_idx(mem, used, self._size)
            engine = SplitRing(
                self._size,
                desc,
                avail,
                used,
                self._features,
                walker=walker,
                next_avail=self._next_avail,
                next_used=next_used,
                native=native,
            )
        self._apply_log(engine)
        self._engine = engine
        return engine

    def pop_chains(
        self, mem: GuestMemory, max_chains: int | None = None
    ) -> list[DescriptorChain]:
        """Pop the available chains (at most ``max_chains``; by default up to
        the queue size).

        Args:
            mem: the memory snapshot.
            max_chains: most chains to return.

        Returns:
            The chains, possibly none.

        Raises:
            DescriptorChainError: the next chain is malformed.
            RingStateError: the queue is not ready, is broken, or its rings
                are not in guest memory.
        """
        limit = self._size if max_chains is None else max_chains
        if limit <= 0:
            return []
        engine = self._engine or self._ring(mem)
        inflight = self._inflight
        if inflight is None:
            return engine.pop(mem, limit)  # the usual case
        return inflight.pop(mem, engine, limit)

    def pop_batches(
        self, mem: GuestMemory, max_chains: int | None = None
    ) -> list[ChainBatch]:
        """Pop the available chains as batches, without an object per chain
        (see :class:`ChainBatch`): for devices that need only ids and
        lengths. Same rules and errors as :meth:`pop_chains`.

        Args:
            mem: the memory snapshot.
            max_chains: most chains to pop (default: up to the queue size).

        Returns:
            The batches, possibly none.
        """
        limit = self._size if max_chains is None else max_chains
        if limit <= 0:
            return []
        engine = self._engine or self._ring(mem)
        inflight = self._inflight
        if inflight is None:
            return engine.pop_batches(mem, limit)
        return inflight.pop_batches(mem, engine, limit)

    def add_used_heads(
        self, mem: GuestMemory, heads: Sequence[int], length: int = 0
    ) -> None:
        """Return many chains with the same used length (0 for chains the
        device only read), published together.

        Args:
            mem: the memory snapshot.
            heads: the chains' ids, in completion order.
            length: the used length of every one.

        Raises:
            ValueError: an entry is invalid; nothing was written.
            RingStateError: the queue is not ready.
        """
        if not heads:
            return
        flat = [length] * (2 * len(heads))
        flat[0::2] = heads
        self._push(mem, flat)

    def pop_chain(self, mem: GuestMemory) -> DescriptorChain | None:
        """Pop one chain, or None if none is available.

        Raises:
            DescriptorChainError: the next chain is malformed.
            RingStateError: as :meth:`pop_chains`.
        """
        chains = self.pop_chains(mem, 1)
        return chains[0] if chains else None

    def add_used(self, mem: GuestMemory, head: int, length: int) -> None:
        """Return one chain to the driver.

        Args:
            mem: the memory snapshot.
            head: the chain's :attr:`~DescriptorChain.head`.
            length: bytes written into its writable buffers.

        Raises:
            ValueError: ``head`` is not in flight or ``length`` exceeds what
                the chain can hold.
            RingStateError: the queue is not ready.
        """
        self._push(mem, (head, length))

    def add_used_many(self, mem: GuestMemory, used: Iterable[tuple[int, int]]) -> None:
        """Return many chains at once, published together.

        Args:
            mem: the memory snapshot.
            used: ``(head, length)`` pairs, in completion order.

        Raises:
            ValueError: an entry is invalid; nothing was written.
            RingStateError: the queue is not ready.
        """
        flat = list(iter_chain.from_iterable(used))
        if flat:
            self._push(mem, flat)

    def plain_engine(self, mem: GuestMemory) -> SplitRing | PackedRing | None:
        """The ring engine, when this queue adds nothing to its pops and
        pushes on ``mem`` (no inflight tracker, or one the engine records in
        itself): a drain then calls it directly. None otherwise. Builds the
        engine if needed.

        Raises:
            RingStateError: the queue is not ready or not in guest memory.
        """
        engine = self._engine or self._ring(mem)
        inflight = self._inflight
        if inflight is None or inflight.recorded_by(engine, mem):
            return engine
        return None

    def complete(self, mem: GuestMemory, flat: list[int]) -> tuple[bool, bool]:
        """Return chains (``flat``: ``[head, length, ...]``, one publication)
        and say whether the driver wants an interrupt and whether more chains
        are available (one full fence for both; the engines' ``complete``).
        With an inflight tracker, call :meth:`settle` after signalling.

        Returns:
            ``(signal, more)``; ``more`` may be True when unsure (the next
            pop tells).

        Raises:
            ValueError: an entry is invalid; nothing was written.
            RingStateError: the queue is not ready, broken, or not in memory.
        """
        engine = self._engine or self._ring(mem)
        inflight = self._inflight
        if inflight is None:
            return engine.complete(mem, flat)
        return inflight.complete(mem, engine, flat)

    def complete_batch(
        self,
        mem: GuestMemory,
        batch: ChainBatch,
        count: int,
        length: int | array[int] = 0,
        first: int = 0,
    ) -> tuple[bool, bool]:
        """:meth:`complete` of ``count`` chains of ``batch`` from chain
        ``first`` on, every one with used length ``length`` or ``length[k]``
        (an ``array('I')``), without an int per chain (the engines'
        ``complete_batch``). With an inflight tracker, call
        :meth:`settle` after signalling.

        Raises:
            ValueError: a chain is not in flight; nothing was written.
            RingStateError: as :meth:`complete`.
        """
        engine = self._engine or self._ring(mem)
        inflight = self._inflight
        if inflight is None:
            return engine.complete_batch(mem, batch, count, length, first)
        return inflight.complete(mem, engine, batch._used_entries(count, length, first))

    def settle(self) -> None:
        """Finish the inflight record of the last :meth:`complete` (clear
        its heads, record ``used_idx``); a no-op without a tracker."""
        if self._inflight is not None:
            self._inflight.settle()

    def _push(self, mem: GuestMemory, flat: Sequence[int]) -> None:
        engine = self._engine or self._ring(mem)
        inflight = self._inflight
        if inflight is None:
            engine.push(mem, flat)
        else:
            inflight.push(mem, engine, flat)

    # ------------------------------------------------------------ inflight

    def set_inflight_detached(self) -> int:
        """Detach the inflight tracker (no memory needed).

        Returns:
            0.
        """
        self._close_inflight()
        return 0

    def _close_inflight(self) -> None:
        # The walker stops recording in the tracker's buffer before anyone
        # can close it.
        inflight, self._inflight = self._inflight, None
        if inflight is not None:
            inflight.close()

    @property
    def inflight_tracker(self) -> AnyInflightTracker | None:
        """The attached inflight tracker, or None."""
        return None if self._inflight is None else self._inflight.tracker

    def set_inflight(self, mem: GuestMemory, tracker: AnyInflightTracker | None) -> int:
        """Attach an inflight tracker (INFLIGHT_SHMFD) to the configured
        ring, or detach it (None).

        Attaching recovers the tracker against ``used.idx`` in guest memory,
        sets next used = used.idx and next available = used.idx + the number
        of pending heads, and queues those heads (oldest first) for the
        next pops. Chains popped before are forgotten.

        Returns:
            The number of heads to resubmit.

        Packed rings: see the module rules (a PackedInflightTracker).

        Raises:
            RingStateError: the tracker does not fit the ring kind,
                addresses not set, or the used ring not in guest memory.
        """
        if tracker is None:
            return self.set_inflight_detached()
        packed_tracker = isinstance(tracker, PackedInflightTracker)
        if self._features.packed != packed_tracker:
            kind = "packed" if self._features.packed else "split"
            raise RingStateError(f"the inflight tracker does not fit a {kind} ring")
        used = 0 if packed_tracker else self.used_idx(mem)
        inflight = QueueInflight(tracker, self._size)
        if packed_tracker:
            if self._addresses is None:
                raise RingStateError("queue addresses are not set")
            used, used_wrap, avail, avail_wrap, pending = inflight.attach_packed(
                mem, self._addresses[0]
            )
            self._drop()
            self._next_used, self._used_wrap = used, used_wrap
            self._next_avail, self._avail_wrap = avail, avail_wrap
        else:
            try:
                pending = inflight.attach_split(used)
            except BaseException:
                inflight.close()  # its region view
                raise
            self._drop()
            self._next_used = used
            self._next_avail = (used + pending) & 0xFFFF
        self._used_explicit = True
        if self._walker is not None:
            self._walker.clear_inflight()
        self._close_inflight()
        self._inflight = inflight
        return pending

    def enable_notification(self, mem: GuestMemory) -> bool:
        """Re-enable kicks and re-check for work.

        Returns:
            True if chains are available (handle them before sleeping).

        Raises:
            RingStateError: the queue is not ready or is broken.
        """
        return (self._engine or self._ring(mem)).enable_notification(mem)

    def poll_available(self, mem: GuestMemory, timeout: float) -> bool:
        """Busy-poll for up to ``timeout`` seconds until the driver makes a
        chain available (the optional busy-poll window of a device that
        would otherwise go back to sleep on the kick eventfd).

        Each check is one native acquire load, which also lets other threads
        of the process run between checks.

        Returns:
            True as soon as a chain is available; False after ``timeout``.

        Raises:
            RingStateError: the queue is not ready or is broken.
        """
        engine = self._engine or self._ring(mem)
        deadline = time.monotonic() + timeout
        while True:
            if engine.available(mem):
                return True
            if time.monotonic() >= deadline:
                return False

    def disable_notification(self, mem: GuestMemory) -> None:
        """Ask the driver not to kick.

        Raises:
            RingStateError: the queue is not ready or is broken.
        """
        (self._engine or self._ring(mem)).disable_notification(mem)

    def needs_notification(self, mem: GuestMemory) -> bool:
        """Whether the driver wants an interrupt now.

        Returns:
            True to signal the call eventfd.

        Raises:
            RingStateError: the queue is not ready.
        """
        return (self._engine or self._ring(mem)).needs_notification(mem)

    def used_idx(self, mem: GuestMemory) -> int:
        """Split rings: ``used.idx`` as it is in guest memory (packed: the
        next used slot). Reads only; does not build the engine.

        Raises:
            RingStateError: the addresses are not set or not in memory.
        """
        if self._features.packed:
            return self.next_used
        if self._addresses is None:
            raise RingStateError("queue addresses are not set")
        return guest_used_idx(mem, self._addresses[2], self._size)

    def __repr__(self) -> str:
        kind = "packed" if self._features.packed else "split"
        state = "ready" if self._ready else "stopped"
        return f"<Queue {kind} size={self._size} {state}>"
