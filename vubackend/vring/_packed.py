# PackedRing: the device side of a packed virtqueue (virtio 1.x §2.8,
# VIRTIO_F_RING_PACKED).
#
# Rules of this module:
# - One PackedRing serves one configured queue; the Queue rebuilds it on
#   reconfiguration, carrying positions, wrap counters and the in-flight
#   table over.
# - Positions are ring slots (0..size-1) plus a wrap counter each, both
#   starting at (0, 1). GET/SET_VRING_BASE carries them as
#   avail | avail_wrap << 15 | used << 16 | used_wrap << 31 (vhost-user §5.2).
# - Buffer ids must be below the queue size (Linux and DPDK drivers never use
#   others); the in-flight table is indexed by id and remembers each chain's
#   writable length and ring slots, which the used side needs: used
#   descriptors advance by the slots of the chain they complete.
# - The guest is hostile. Chains are walked with every guard (_walk.py, or C).
#   A malformed chain raises DescriptorChainError and breaks the ring
#   (RingStateError until reset): unlike a split ring, where the next chain
#   starts at the next avail entry, the next packed chain starts after the
#   bad one's last slot, which a malformed chain does not reliably tell.
# - Two paths, one behaviour (native=True: batches in C; native=False: the
#   Python reference); same chains, same faults, same bytes in the ring.
#
# Memory ordering (the essay; rules are docs/reference/vhost-user-protocol.md
# §5.4, spec sections are virtio 1.x):
#
# A packed ring has no index that publishes a batch: each descriptor's
# flags word is the publication. The driver writes addr/len/id of every
# descriptor of a chain, then the flags of all but the head, then (release)
# the head's flags, so that the chain becomes visible at once (§2.8.13,
# "Supplying Buffers to The Device", and its memory barrier step).
#
# 1. Finding available buffers (rule 2). We load the head's flags with
#    acquire and compare AVAIL/USED with our wrap counter; only then do we
#    read addr/len/id of the head and the rest of the chain. The flags we
#    act on are the ones from that acquire load; the other fields come from
#    one read each (rule 3), never re-read.
# 2. Returning used buffers (§2.8.14, "Receiving Used Buffers From The
#    Device"; rule 4). One used descriptor per chain (per run with
#    IN_ORDER), at the used position, which then advances by the chain's
#    slots. We write id and len of every used descriptor of the batch, then a
#    release fence, then the flags (AVAIL = USED = our wrap counter, WRITE
#    if len > 0) of all but the first, and the first's flags last with a
#    release store. The driver, which polls the first used slot, sees the
#    whole batch at once, with the data written before it.
# 3. Interrupts (§2.8.10, "Event Suppression Structure Format"; rule 5).
#    After publishing, a seq_cst fence, then read the driver's event
#    suppression structure: DISABLE never, ENABLE always, DESC (EVENT_IDX)
#    when the used position passed off_wrap (need_event on slot indices,
#    corrected for the wrap as DPDK's vhost_vring_call_packed does).
# 4. Kicks (rule 6). We write our own event suppression flags (ENABLE or
#    DISABLE; we never ask for DESC mode, which the spec leaves optional for
#    the device), and after enabling, a seq_cst fence and a re-check of the
#    next slot's flags before the caller sleeps.
# 5. Dirty logging (rule 7): every ring write (used descriptors, our event
#    suppression structure) is marked at its guest address afterwards.

from __future__ import annotations

import struct
from array import array
from collections.abc import Sequence
from typing import Final, final

from vubackend._native import (
    RING_IN_ORDER,
    RING_INDIRECT,
    RING_PEEK,
    RingFault,
    RingStop,
    RingWalker,
    fence_release,
    fence_seq_cst,
)
from vubackend.bitmap import Bitmap
from vubackend.errors import DescriptorChainError, RingStateError
from vubackend.memory import GuestMemory
from vubackend.vring._chain import ChainBatch, DescriptorChain
from vubackend.vring._defs import (
    DESC_F_AVAIL,
    DESC_F_USED,
    DESC_F_WRITE,
    DESC_SIZE,
    EVENT_SUPPRESSION_SIZE,
    PACKED_WRAP_BIT,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    QueueFeatures,
    check_packed_config,
    need_event,
)
from vubackend.vring._space import MemorySpace, RingPart
from vubackend.vring._tracker import PackedDesc
from vubackend.vring._walk import (
    DESC,
    WalkError,
    check_used_entries,
    fault_message,
    walk_packed,
)

__all__ = ["PackedRing", "decode_packed_base"]

_LEN_ID: Final = struct.Struct("<IH")
_FREE: Final = (1 << 64) - 1
_POS_MASK: Final = (1 << PACKED_WRAP_BIT) - 1


def decode_packed_base(num: int) -> tuple[int, int, int, int]:
    """Split a packed ``SET_VRING_BASE`` value into (avail, avail_wrap, used,
    used_wrap).

    A value with nothing in the upper 16 bits (DPDK virtio-user sends only
    ``last_avail_idx | wrap << 15``) sets the used position equal to the
    available one, as DPDK does.
    """
    avail = num & _POS_MASK
    avail_wrap = num >> PACKED_WRAP_BIT & 1
    upper = num >> 16 & 0xFFFF
    if upper == 0:
        return avail, avail_wrap, avail, avail_wrap
    return avail, avail_wrap, upper & _POS_MASK, upper >> PACKED_WRAP_BIT & 1


@final
class PackedRing:
    """The device side of one configured packed virtqueue."""

    __slots__ = (
        "_avail_wrap",
        "_broken",
        "_desc",
        "_device",
        "_devpart",
        "_dpart",
        "_driver",
        "_drvpart",
        "_event_idx",
        "_in_order",
        "_indirect",
        "_log",
        "_native",
        "_next_avail",
        "_next_used",
        "_notify",
        "_signalled",
        "_signalled_valid",
        "_since_signal",
        "_size",
        "_space",
        "_used_wrap",
        "_walker",
    )

    def __init__(
        self,
        size: int,
        desc: int,
        driver: int,
        device: int,
        features: QueueFeatures,
        *,
        walker: RingWalker,
        next_avail: int = 0,
        avail_wrap: int = 1,
        next_used: int = 0,
        used_wrap: int = 1,
        native: bool = True,
    ) -> None:
        check_packed_config(size, desc, driver, device)
        if not walker.packed or walker.qsize != size:
            raise ValueError("walker does not match the ring")
        if not (0 <= next_avail < size and 0 <= next_used < size):
            raise RingStateError(
                f"packed ring positions avail={next_avail} used={next_used} are not "
                f"below the queue size {size}"
            )
        self._size = size
        self._desc = desc
        self._driver = driver
        self._device = device
        self._event_idx = features.event_idx
        self._indirect = features.indirect
        self._in_order = features.in_order
        self._walker = walker
        self._next_avail = next_avail
        self._avail_wrap = avail_wrap & 1
        self._next_used = next_used
        self._used_wrap = used_wrap & 1
        self._signalled = (next_used, self._used_wrap)
        self._signalled_valid = False
        self._since_signal = 0
        self._notify = True
        self._broken: str | None = None
        self._native = native
        self._log: Bitmap | None = None
        self._space: MemorySpace | None = None

    # ------------------------------------------------------------ state

    @property
    def positions(self) -> tuple[int, int, int, int]:
        """(next_avail, avail_wrap, next_used, used_wrap)."""
        return self._next_avail, self._avail_wrap, self._next_used, self._used_wrap

    @property
    def broken(self) -> str | None:
        """Why the ring is broken, or None."""
        return self._broken

    def set_log(self, log: Bitmap | None) -> None:
        """Log ring writes in ``log`` (a bitmap over guest physical
        addresses), or stop (None)."""
        self._log = log

    def release(self) -> None:
        """Drop the memory binding (unpins the native region table)."""
        space, self._space = self._space, None
        if space is not None:
            space.release()

    def _bind(self, mem: GuestMemory) -> MemorySpace:
        space = self._space
        if space is not None and space.memory is mem:
            return space
        self.release()
        space = MemorySpace(mem)
        self._dpart: RingPart = space.part(
            self._desc, DESC_SIZE * self._size, 4, "descriptor ring"
        )
        self._drvpart: RingPart = space.part(
            self._driver, EVENT_SUPPRESSION_SIZE, 4, "driver event suppression area"
        )
        self._devpart: RingPart = space.part(
            self._device, EVENT_SUPPRESSION_SIZE, 4, "device event suppression area"
        )
        if self._native:
            self._walker.bind(space.table(), self._desc, self._driver)
        self._space = space
        return space

    def _mark(self, gpa: int, length: int) -> None:
        if self._log is not None:
            self._log.mark_dirty(gpa, length)

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise RingStateError(f"queue is broken: {self._broken}")

    def _use(self, mem: GuestMemory) -> MemorySpace:
        # _check_usable and _bind in one call: this runs on every data-path
        # call, and the usual answer is "not broken, same snapshot".
        if self._broken is not None:
            raise RingStateError(f"queue is broken: {self._broken}")
        space = self._space
        if space is not None and space.memory is mem:
            return space
        return self._bind(mem)

    # ------------------------------------------------------------ popping

    def pop(self, mem: GuestMemory, max_chains: int) -> list[DescriptorChain]:
        """Pop up to ``max_chains`` available chains (see :meth:`pop_batches`,
        which this flattens)."""
        return ChainBatch.flatten(self.pop_batches(mem, max_chains, peek=True))

    def pop_batches(
        self, mem: GuestMemory, max_chains: int, *, peek: bool = False
    ) -> list[ChainBatch]:
        """Pop up to ``max_chains`` available chains.

        Returns:
            The chains in batches, possibly none. If a malformed chain
            follows good ones, the good ones are returned and the next call
            raises.

        Raises:
            DescriptorChainError: the next chain is malformed; the ring is
                now broken.
            RingStateError: the ring is broken or not inside guest memory.
        """
        space = self._use(mem)
        if self._native and space.native_walks:
            batches, fault = self._pop_native(space, max_chains, peek)
        else:
            batches, fault = self._pop_python(space, max_chains)
        if fault is not None and not batches:
            code, detail, slot = fault
            self._broken = f"malformed chain at slot {slot}"
            raise DescriptorChainError(
                f"descriptor chain at slot {slot}: {fault_message(code, detail)}; "
                f"the packed ring cannot continue past it"
            )
        return batches

    def _pop_native(
        self, space: MemorySpace, max_chains: int, peek: bool
    ) -> tuple[list[ChainBatch], tuple[RingFault, int, int] | None]:
        # peek: copy the request headers out (for chains, not id batches).
        flags = (RING_INDIRECT if self._indirect else 0) | (RING_PEEK if peek else 0)
        batches: list[ChainBatch] = []
        count = 0
        walker = self._walker
        while True:
            # The C walk does rules 2 and 3 itself (native.c, "Ring walks").
            stop, n, self._next_avail, self._avail_wrap, taken = walker.pop_take(
                self._next_avail, self._avail_wrap, flags, max_chains - count
            )
            if taken is not None:
                words, segs, peek_bytes, ptr = taken
                batches.append(
                    ChainBatch(words, segs, space, space.pinned, peek_bytes, ptr)
                )
                count += n
            if stop is RingStop.EMPTY:
                return batches, None
            if stop is RingStop.RING:
                raise RingStateError(
                    f"packed descriptor ring at {walker.last_pop(stop).detail:#x} is "
                    f"not inside one guest memory region, or not aligned in host "
                    f"memory"
                )
            if stop is RingStop.FAULT:
                r = walker.last_pop(stop)
                return batches, (r.fault, r.detail, r.where)
            if stop is RingStop.FULL or (stop is RingStop.LIMIT and count < max_chains):
                continue
            return batches, None

    def _pop_python(
        self, space: MemorySpace, max_chains: int
    ) -> tuple[list[ChainBatch], tuple[RingFault, int, int] | None]:
        size = self._size
        dpart = self._dpart
        atomic, view, base = dpart.atomic, dpart.view, dpart.offset
        inflight = self._walker.inflight
        slot, wrap = self._next_avail, self._avail_wrap
        words: list[int] = []
        segs: list[int] = []
        fault: tuple[RingFault, int, int] | None = None
        while len(words) < 8 * max_chains:
            # The head's other fields and the rest of the chain are read
            # after this load.
            # ORDERING: acquire load of the head's flags (§5.4 rule 2; §2.8.13).
            hflags = atomic.load_u16(base + DESC_SIZE * slot + 14)
            if (
                bool(hflags & DESC_F_AVAIL) != wrap
                or bool(hflags & DESC_F_USED) == wrap
            ):
                break
            try:
                walk, ident, slots = walk_packed(
                    space, view, base, size, slot, hflags, self._indirect
                )
                if ident >= size:
                    raise WalkError(RingFault.ID_RANGE, ident)
                if inflight[ident] != _FREE:
                    raise WalkError(RingFault.IN_FLIGHT, ident)
            except WalkError as exc:
                fault = (exc.fault, exc.detail, slot)
                break
            inflight[ident] = walk.wlen | slots << 32
            walk.record(ident, slots, words, segs)
            slot += slots
            if slot >= size:
                slot -= size
                wrap ^= 1
        self._next_avail, self._avail_wrap = slot, wrap
        batches = [ChainBatch(words, segs, space, space.io_table())] if words else []
        return batches, fault

    def read_slots(self, start: int, count: int) -> list[PackedDesc]:
        """The ring descriptors (addr, len, id, flags) of ``count`` slots from
        ``start`` (a chain just popped, to record for inflight tracking).
        Plain reads: the pop's acquire load ordered them."""
        dpart = self._dpart
        out: list[PackedDesc] = []
        slot = start
        for _ in range(count):
            addr, length, ident, flags = DESC.unpack_from(
                dpart.view, dpart.offset + DESC_SIZE * slot
            )
            out.append((addr, length, ident, flags))
            slot = 0 if slot + 1 == self._size else slot + 1
        return out

    def resubmit(
        self, mem: GuestMemory, chains: Sequence[tuple[int, Sequence[PackedDesc]]]
    ) -> tuple[list[DescriptorChain], list[int]]:
        """Build chains from recorded descriptors (inflight resubmission),
        with the guards of a pop, and mark them in flight. Positions do not
        move (they already count them).

        Returns:
            The chains, and the ids whose records are malformed (not
            returned; the caller forgets them).
        """
        space = self._use(mem)
        inflight = self._walker.inflight
        words: list[int] = []
        segs: list[int] = []
        bad: list[int] = []
        for ident, descs in chains:
            table = bytearray(DESC_SIZE * len(descs))
            for k, (addr, length, rid, flags) in enumerate(descs):
                DESC.pack_into(table, DESC_SIZE * k, addr, length, rid, flags)
            try:
                if not descs or not 0 <= ident < self._size:
                    raise WalkError(RingFault.ID_RANGE, ident)
                walk, got, slots = walk_packed(
                    space,
                    memoryview(table),
                    0,
                    len(descs),
                    0,
                    descs[0][3],
                    self._indirect,
                )
                if got != ident or slots != len(descs):
                    raise WalkError(RingFault.ID_RANGE, got)
                if inflight[ident] != _FREE:
                    raise WalkError(RingFault.IN_FLIGHT, ident)
            except WalkError:
                bad.append(ident)
                continue
            inflight[ident] = walk.wlen | slots << 32
            walk.record(ident, slots, words, segs)
        batch = ChainBatch(words, segs, space, space.io_table())
        return batch.chains(), bad

    # ------------------------------------------------------------ used side

    def push(self, mem: GuestMemory, entries: Sequence[int]) -> None:
        """Write used descriptors for ``(id, len)`` pairs (flattened). All
        entries are checked first; a bad one writes nothing. With IN_ORDER,
        entries of length 0 are folded into the next one.

        Raises:
            ValueError: an id is not in flight, out of range, or its length
                exceeds the chain's writable bytes.
            RingStateError: the ring is not inside guest memory.
        """
        space = self._space
        if space is None or space.memory is not mem:
            self._bind(mem)
        old, old_wrap = self._next_used, self._used_wrap
        if self._native:
            walker = self._walker
            flags = RING_IN_ORDER if self._in_order else 0
            if len(entries) == 2:
                stop, new, new_wrap = walker.push_one(
                    old, old_wrap, flags, entries[0], entries[1]
                )
            else:
                stop, new, new_wrap = walker.push_bound(old, old_wrap, flags, entries)
            if stop is not RingStop.EMPTY:
                if stop is RingStop.RING:
                    raise RingStateError(
                        f"packed descriptor ring at {self._desc:#x} is not inside "
                        f"one guest memory region, or not aligned in host memory"
                    )
                r = walker.last_push(stop)
                raise ValueError(
                    f"used entry {r.where}: {fault_message(r.fault, r.detail)}"
                )
        else:
            new, new_wrap = self._push_python(entries)
        self._pushed(old, old_wrap, new, new_wrap)

    def _pushed(self, old: int, old_wrap: int, new: int, new_wrap: int) -> None:
        self._next_used, self._used_wrap = new, new_wrap
        # Slots the used position moved: at most one lap, since every slot
        # completed was popped first.
        advanced = (new - old) % self._size
        if advanced == 0 and new_wrap != old_wrap:
            advanced = self._size
        self._since_signal += advanced
        if self._log is not None and advanced:
            self._log_slots(old, advanced)

    def _log_slots(self, start: int, count: int) -> None:
        size = self._size
        if count >= size:
            self._mark(self._desc, DESC_SIZE * size)
        elif start + count <= size:
            self._mark(self._desc + DESC_SIZE * start, DESC_SIZE * count)
        else:
            first = size - start
            self._mark(self._desc + DESC_SIZE * start, DESC_SIZE * first)
            self._mark(self._desc, DESC_SIZE * (count - first))

    def _push_python(self, entries: Sequence[int]) -> tuple[int, int]:
        inflight = self._walker.inflight
        size = self._size
        check_used_entries(entries, inflight, size)
        count = len(entries) // 2
        pos, wrap = self._next_used, self._used_wrap
        if count == 0:
            return pos, wrap
        # One used descriptor per run: (slot, wrap, id, len).
        descs: list[tuple[int, int, int, int]] = []
        k = 0
        while k < count:
            last = k
            if self._in_order:
                while last + 1 < count and entries[2 * last + 1] == 0:
                    last += 1
            descs.append((pos, wrap, entries[2 * last], entries[2 * last + 1]))
            for j in range(k, last + 1):
                pos += inflight[entries[2 * j]] >> 32 & 0xFFFF
                if pos >= size:
                    pos -= size
                    wrap ^= 1
            k = last + 1
        dpart = self._dpart
        view, base, atomic = dpart.view, dpart.offset, dpart.atomic
        for slot, _, ident, length in descs:
            # Plain stores: published by the flags stores below.
            _LEN_ID.pack_into(view, base + DESC_SIZE * slot + 8, length, ident)
        for j in range(count):
            inflight[entries[2 * j]] = _FREE
        # ORDERING: release fence: ids and lens before any flags (§5.4 rule 4).
        fence_release()
        for slot, w, _, length in descs[1:]:
            # ORDERING: release store of a used descriptor's flags (§5.4 rule 4).
            atomic.store_u16(base + DESC_SIZE * slot + 14, _used_flags(w, length))
        slot, w, _, length = descs[0]
        # The first used descriptor last: the driver polls it (§2.8.14).
        # ORDERING: release store of the first used flags (§5.4 rule 4).
        atomic.store_u16(base + DESC_SIZE * slot + 14, _used_flags(w, length))
        return pos, wrap

    # ------------------------------------------------------------ notifications

    def _set_device_flags(self, flags: int) -> None:
        part = self._devpart
        # ORDERING: release store of our event suppression flags (§5.4 rule 6).
        part.atomic.store_u16(part.offset + 2, flags)
        self._mark(self._device + 2, 2)

    def enable_notification(self, mem: GuestMemory) -> bool:
        """Ask the driver to kick (event suppression ENABLE), then re-check
        for work (§5.4 rule 6).

        Returns:
            True if a chain is available: process it before waiting.
        """
        self._use(mem)
        self._notify = True
        self._set_device_flags(RING_EVENT_FLAGS_ENABLE)
        # ORDERING: §5.4 rule 6: full fence between re-enabling and re-checking.
        fence_seq_cst()
        return self._available()

    def available(self, mem: GuestMemory) -> bool:
        """Whether the driver has made a chain available at the next slot
        (one acquire load of its flags; no fence, no re-arm)."""
        self._use(mem)
        return self._available()

    def _available(self) -> bool:
        dpart = self._dpart
        # ORDERING: acquire load of the next head's flags (§5.4 rule 2).
        flags = dpart.atomic.load_u16(dpart.offset + DESC_SIZE * self._next_avail + 14)
        wrap = self._avail_wrap
        return bool(flags & DESC_F_AVAIL) == wrap and bool(flags & DESC_F_USED) != wrap

    def disable_notification(self, mem: GuestMemory) -> None:
        """Tell the driver not to kick (event suppression DISABLE)."""
        self._use(mem)
        self._notify = False
        self._set_device_flags(RING_EVENT_FLAGS_DISABLE)

    def needs_notification(self, mem: GuestMemory) -> bool:
        """Whether the driver wants an interrupt for the used descriptors
        written since the last call (virtio §2.8.10; DPDK
        ``vhost_vring_call_packed``).

        Returns:
            True to signal the call eventfd.
        """
        self._bind(mem)
        part = self._drvpart
        # Between publishing used descriptors and reading the driver's event
        # suppression structure.
        # ORDERING: §5.4 rule 5: full fence, then acquire load of the flags.
        word = part.atomic.fence_load_u16(part.offset + 2) << 16
        # ORDERING: acquire load of off_wrap (after the fence above).
        word |= part.atomic.load_u16(part.offset)
        return self._decide(word)

    def _decide(self, word: int) -> bool:
        # The notification decision from the driver event suppression area,
        # read after the fence: off_wrap | flags << 16. Updates the state.
        flags = word >> 16 & 3
        new = (self._next_used, self._used_wrap)
        old = self._signalled
        valid = self._signalled_valid and self._since_signal < self._size
        self._signalled = new
        self._signalled_valid = True
        self._since_signal = 0
        if flags == RING_EVENT_FLAGS_DISABLE:
            return False
        if flags != RING_EVENT_FLAGS_DESC or not self._event_idx:
            return True  # ENABLE; reserved values notify (spurious is harmless)
        if not valid:
            return True
        if new == old:
            return False
        off_wrap = word & 0xFFFF
        off = off_wrap & _POS_MASK
        new_pos, old_pos = new[0], old[0]
        if new_pos <= old_pos:
            old_pos -= self._size
        if off_wrap >> PACKED_WRAP_BIT != self._used_wrap:
            off -= self._size
        return need_event(off & 0xFFFF, new_pos, old_pos & 0xFFFF)

    def complete(self, mem: GuestMemory, entries: Sequence[int]) -> tuple[bool, bool]:
        """:meth:`push`, then whether the driver wants an interrupt (as
        :meth:`needs_notification`) and whether a chain is available at the
        next slot, after one full fence (§5.4 rules 5 and 6).

        Returns:
            ``(signal, more)``.

        Raises:
            ValueError: as :meth:`push`; nothing was written.
            RingStateError: the ring is not inside guest memory.
        """
        if not self._native:
            self.push(mem, entries)
            part = self._drvpart
            # ORDERING: §5.4 rules 5 and 6: full fence, then the driver's flags.
            word = part.atomic.fence_load_u16(part.offset + 2) << 16
            # ORDERING: acquire load of off_wrap (after the fence above).
            word |= part.atomic.load_u16(part.offset)
            return self._decide(word), self._available()
        space = self._space
        if space is None or space.memory is not mem:
            self._bind(mem)
        old, old_wrap = self._next_used, self._used_wrap
        stop, new, new_wrap, word, more = self._walker.complete(
            old, old_wrap, RING_IN_ORDER if self._in_order else 0, entries
        )
        return self._completed(stop, old, old_wrap, new, new_wrap, word, more)

    def complete_batch(
        self,
        mem: GuestMemory,
        batch: ChainBatch,
        count: int,
        length: int | array[int] = 0,
        first: int = 0,
    ) -> tuple[bool, bool]:
        """:meth:`complete` of ``count`` chains of ``batch`` from chain
        ``first`` on, each with used length ``length`` (0: read only) or
        ``length[k]`` (an ``array('I')``), without an int object per chain.

        Raises:
            ValueError: as :meth:`push`; nothing was written.
            RingStateError: as :meth:`complete`.
        """
        if not self._native:
            return self.complete(mem, batch._used_entries(count, length, first))
        space = self._space
        if space is None or space.memory is not mem:
            self._bind(mem)
        old, old_wrap = self._next_used, self._used_wrap
        stop, new, new_wrap, word, more = self._walker.complete_records(
            old,
            old_wrap,
            RING_IN_ORDER if self._in_order else 0,
            batch._records(),
            count,
            length,
            first,
        )
        return self._completed(stop, old, old_wrap, new, new_wrap, word, more)

    def _completed(
        self,
        stop: RingStop,
        old: int,
        old_wrap: int,
        new: int,
        new_wrap: int,
        word: int,
        more: bool,
    ) -> tuple[bool, bool]:
        # After a native completion: the fault if any, else the state and
        # the notification decision.
        walker = self._walker
        if stop is not RingStop.EMPTY:
            if stop is RingStop.RING:
                raise RingStateError(
                    f"packed ring part at {walker.last_push(stop).detail:#x} is not "
                    f"inside one guest memory region, or not aligned in host memory"
                )
            r = walker.last_push(stop)
            raise ValueError(
                f"used entry {r.where}: {fault_message(r.fault, r.detail)}"
            )
        self._pushed(old, old_wrap, new, new_wrap)
        return self._decide(word), more

    def __repr__(self) -> str:
        return (
            f"<PackedRing size={self._size} avail={self._next_avail}/"
            f"{self._avail_wrap} used={self._next_used}/{self._used_wrap}>"
        )


def _used_flags(wrap: int, length: int) -> int:
    # AVAIL = USED = the device's wrap counter; WRITE when len is meaningful.
    flags = DESC_F_AVAIL | DESC_F_USED if wrap else 0
    return flags | DESC_F_WRITE if length else flags
