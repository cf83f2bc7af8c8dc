# SplitRing: the device side of a split virtqueue (virtio 1.x §2.7).
#
# Rules of this module:
# - One SplitRing serves one configured queue (size, three addresses,
#   features). Reconfiguring builds a new one (the Queue does that), carrying
#   the positions and the in-flight table over.
# - The guest is hostile. Every chain is walked with every guard (_walk.py,
#   or the C twin in native.c); an avail.idx that runs more than the queue
#   size ahead of us marks the ring broken (RingStateError until it is
#   reset); a malformed chain is consumed and reported as
#   DescriptorChainError, and the ring goes on.
# - Two paths, one behaviour: `native=True` pops and pushes whole batches in
#   one C call each; `native=False` runs the Python reference walk. Both use
#   the same in-flight table (RingWalker.inflight) and give the same chains
#   and the same faults; the tests hold them to that.
# - VIRTIO_F_IN_ORDER changes nothing here: one used element per chain is
#   valid with or without it (the spec's "one element for a batch" shortcut
#   is taken on packed rings only, where it saves descriptor writes).
# - All accesses the driver can observe, or that observe the driver, are
#   atomic and ordered (below). Plain reads are used only where an acquire
#   has already ordered them; plain writes only where a release will
#   publish them.
#
# Memory ordering (the essay; rules are docs/reference/vhost-user-protocol.md
# §5.4, spec sections are virtio 1.x):
#
# The driver and the device share three structures and no lock. Each side
# publishes with a release and consumes with an acquire, and the two
# "store, then load the other side's field" handshakes need full fences.
#
# 1. Consuming available buffers (§2.7.13, "Supplying Buffers to The
#    Device"; rule 1). The driver writes descriptors and avail.ring[], then
#    a write barrier, then avail.idx. We load avail.idx with acquire
#    (AtomicView.load_u16 or vu_ld16_acquire) and only then read ring
#    entries and descriptors. Without the acquire, the CPU or the compiler
#    may satisfy a descriptor read before the idx read and see a stale
#    descriptor that the idx says is ready.
# 2. Each descriptor is read once (rule 3; CVE-2020-14375): one 16-byte
#    snapshot into locals, checked and then used. The guest may rewrite it
#    the moment after; we never look again.
# 3. Returning used buffers (§2.7.14, "Receiving Used Buffers From The
#    Device"; rule 4). Data into the writable buffers, then used.ring[]
#    elements, then a release store of used.idx. The driver's acquire of
#    used.idx then sees both the element and the data. Elements are plain
#    stores; the release store orders them.
# 4. Deciding whether to interrupt (§2.7.10, "Used Buffer Notification
#    Suppression"; rule 5). After publishing used.idx we read avail.flags or
#    used_event. That is a store followed by a load of a different location,
#    which x86-64 (TSO) may reorder: a seq_cst fence (mfence) goes between.
#    Otherwise: we read an old used_event, the driver reads our old used.idx,
#    and both decide that no interrupt is needed while a buffer waits.
# 5. Re-enabling kicks (§2.7.10 and §2.7.13.3; rule 6). We clear NO_NOTIFY
#    or write avail_event, then seq_cst fence, then re-read avail.idx; if it
#    moved, there is work and the caller must not sleep. Same store-load
#    shape as 4, mirrored. A pop that finds the ring empty while kicks are
#    enabled with EVENT_IDX does the same re-arm / fence / re-check before it
#    returns, so that "pop until empty, then wait for a kick" never misses
#    one.
# 6. Dirty logging (rule 7): used-ring writes are marked in the log after
#    they are made (the log's own atomic OR is seq_cst).
#
# The event index arithmetic (need_event) is in _defs.py; the notification
# state follows libvhost-user: signalled_used is the used idx at the last
# notification decision, invalidated when more than 2^15 entries pass or the
# ring is (re)started, in which case we notify unconditionally.

from __future__ import annotations

import struct
from array import array
from collections.abc import Sequence
from typing import Final, final

from vubackend._native import (
    RING_AVAIL_EVENT,
    RING_EVENT_IDX,
    RING_INDIRECT,
    RING_PEEK,
    RingFault,
    RingStop,
    RingWalker,
    fence_seq_cst,
)
from vubackend.bitmap import Bitmap
from vubackend.errors import DescriptorChainError, RingStateError
from vubackend.memory import GuestMemory
from vubackend.vring._chain import ChainBatch, DescriptorChain
from vubackend.vring._defs import (
    AVAIL_ELEM,
    AVAIL_F_NO_INTERRUPT,
    RING_HEADER,
    USED_ELEM,
    USED_F_NO_NOTIFY,
    QueueFeatures,
    check_split_config,
    split_ring_sizes,
)
from vubackend.vring._space import MemorySpace, RingPart
from vubackend.vring._walk import (
    WalkError,
    check_used_entries,
    fault_message,
    walk_split,
)

__all__ = ["SplitRing"]

_U16: Final = struct.Struct("<H")
_ELEM: Final = struct.Struct("<II")
_FREE: Final = (1 << 64) - 1


@final
class SplitRing:
    """The device side of one configured split virtqueue."""

    __slots__ = (
        "_apart",
        "_avail",
        "_batch_cap",
        "_broken",
        "_complete_flags",
        "_desc",
        "_dpart",
        "_event_idx",
        "_fast",
        "_indirect",
        "_log",
        "_log_addr",
        "_native",
        "_next_avail",
        "_next_used",
        "_notify",
        "_pop_flags",
        "_pop_flags_event",
        "_signalled",
        "_signalled_valid",
        "_size",
        "_space",
        "_upart",
        "_used",
        "_used_event",
        "_walker",
    )

    def __init__(
        self,
        size: int,
        desc: int,
        avail: int,
        used: int,
        features: QueueFeatures,
        *,
        walker: RingWalker,
        next_avail: int = 0,
        next_used: int = 0,
        native: bool = True,
    ) -> None:
        check_split_config(size, desc, avail, used)
        if walker.packed or walker.qsize != size:
            raise ValueError("walker does not match the ring")
        self._size = size
        self._desc = desc
        self._avail = avail
        self._used = used
        self._event_idx = features.event_idx
        self._indirect = features.indirect
        self._walker = walker
        self._next_avail = next_avail & 0xFFFF
        self._next_used = next_used & 0xFFFF
        self._signalled = self._next_used
        self._signalled_valid = False
        self._notify = True
        self._broken: str | None = None
        self._native = native
        # Offset of used_event in the available ring.
        self._used_event = RING_HEADER + AVAIL_ELEM * size
        self._pop_flags = RING_INDIRECT if features.indirect else 0
        self._pop_flags_event = self._pop_flags | RING_AVAIL_EVENT
        self._complete_flags = RING_EVENT_IDX if features.event_idx else 0
        self._batch_cap = walker.max_chains
        self._log: Bitmap | None = None
        self._log_addr: int | None = None
        self._space: MemorySpace | None = None
        self._fast: MemorySpace | None = None

    # ------------------------------------------------------------ state

    @property
    def next_avail(self) -> int:
        """Index of the next available entry to pop (u16)."""
        return self._next_avail

    @property
    def next_used(self) -> int:
        """Index of the next used element to write (u16)."""
        return self._next_used

    @property
    def broken(self) -> str | None:
        """Why the ring is broken, or None."""
        return self._broken

    def set_log(self, log: Bitmap | None, log_addr: int | None) -> None:
        """Log used-ring writes at ``log_addr`` + offset in ``log`` (a bitmap
        over guest physical addresses), or stop logging them (None)."""
        self._log = log
        self._log_addr = log_addr if log is not None else None

    def release(self) -> None:
        """Drop the memory binding (unpins the native region table)."""
        space, self._space = self._space, None
        self._fast = None
        if space is not None:
            space.release()

    def _bind(self, mem: GuestMemory) -> MemorySpace:
        # Reuse the binding while the snapshot is the same object; otherwise
        # locate the three parts again (§4.4: never use a stale mapping).
        space = self._space
        if space is not None and space.memory is mem:
            return space
        self.release()
        space = MemorySpace(mem)
        dlen, alen, ulen = split_ring_sizes(self._size, self._event_idx)
        self._dpart: RingPart = space.part(self._desc, dlen, 1, "descriptor table")
        self._apart: RingPart = space.part(self._avail, alen, 2, "available ring")
        self._upart: RingPart = space.part(self._used, ulen, 4, "used ring")
        if self._native:
            self._walker.bind(space.table(), self._desc, self._avail, self._used)
        self._space = space
        # pop's fast path: native walks on this snapshot, ring not broken.
        self._fast = (
            space if self._native and space.native_walks and not self._broken else None
        )
        return space

    def _log_used(self, offset: int, length: int) -> None:
        if self._log is not None and self._log_addr is not None:
            self._log.mark_dirty(self._log_addr + offset, length)

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

    def _break(self, idx: int) -> RingStateError:
        self._fast = None
        self._broken = (
            f"avail.idx {idx} is more than the queue size {self._size} ahead of "
            f"the next entry {self._next_avail}"
        )
        return RingStateError(f"queue is broken: {self._broken}")

    # ------------------------------------------------------------ popping

    def pop(self, mem: GuestMemory, max_chains: int) -> list[DescriptorChain]:
        """Pop up to ``max_chains`` available chains (see :meth:`pop_batches`,
        which this flattens)."""
        space = self._fast
        if space is not None and space.memory is mem and max_chains <= self._batch_cap:
            # The usual case in one native call, without the batch list: the
            # ring is bound to this snapshot and one walk can return all that
            # was asked for. Any other outcome than "empty" or "limit" goes
            # on through the general path, from this first result.
            event = self._event_idx and self._notify
            walker = self._walker
            stop, count, next_avail, _, taken = walker.pop_take(
                self._next_avail,
                0,
                (self._pop_flags_event if event else self._pop_flags) | RING_PEEK,
                max_chains,
            )
            self._next_avail = next_avail
            if taken is not None:
                words, segs, peek, ptr = taken
                batch = ChainBatch(words, segs, space, space.pinned, peek, ptr)
            if stop is RingStop.EMPTY or stop is RingStop.LIMIT:
                if self._log is not None and event:
                    self._log_used(RING_HEADER + USED_ELEM * self._size, 2)
                if taken is None:
                    return []
                if count == 1:
                    return [DescriptorChain(batch, 0)]
                return batch.chains()
            # Anything else goes on through the general path, from here.
            first = [batch] if taken is not None else []
            batches, fault, broken_at = self._pop_native(
                space, max_chains, event, (stop, count, first)
            )
            return ChainBatch.flatten(self._popped(batches, fault, broken_at, event))
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
            DescriptorChainError: the next chain is malformed; it has been
                consumed (the ring goes on with the one after).
            RingStateError: the ring is broken or not inside guest memory.
        """
        space = self._use(mem)
        event = self._event_idx and self._notify
        if self._native and space.native_walks:
            batches, fault, broken_at = self._pop_native(
                space, max_chains, event, peek=peek
            )
        else:
            batches, fault, broken_at = self._pop_python(space, max_chains, event)
        return self._popped(batches, fault, broken_at, event)

    def _popped(
        self,
        batches: list[ChainBatch],
        fault: tuple[RingFault, int, int] | None,
        broken_at: int | None,
        event: bool,
    ) -> list[ChainBatch]:
        # The end of a pop, whichever walk did it: log avail_event, then a
        # broken ring or a malformed chain (raised when nothing came before).
        if event and self._log is not None:
            self._log_used(RING_HEADER + USED_ELEM * self._size, 2)
        if broken_at is None and fault is None:
            return batches
        if broken_at is not None:
            err = self._break(broken_at)
            if not batches:
                raise err
            return batches
        if fault is not None and not batches:
            code, detail, head = fault
            self._next_avail = (self._next_avail + 1) & 0xFFFF
            if event:
                self._rearm()
            raise DescriptorChainError(
                f"descriptor chain at head {head} (available entry "
                f"{(self._next_avail - 1) & 0xFFFF}): {fault_message(code, detail)}"
            )
        return batches

    def _rearm(self) -> None:
        # avail_event after consuming a bad chain, so that the next buffer
        # is kicked (the caller pops again before it sleeps, rule 6).
        upart = self._upart
        off = upart.offset + RING_HEADER + USED_ELEM * self._size
        # ORDERING: release store of avail_event; the fence follows (§5.4 rule 6).
        upart.atomic.store_u16(off, self._next_avail)
        # ORDERING: §5.4 rule 6: full fence after re-arming avail_event.
        fence_seq_cst()

    def _pop_native(
        self,
        space: MemorySpace,
        max_chains: int,
        event: bool,
        first: tuple[RingStop, int, list[ChainBatch]] | None = None,
        *,
        peek: bool = True,
    ) -> tuple[list[ChainBatch], tuple[RingFault, int, int] | None, int | None]:
        # first: a walk pop() already made (its stop, count and batch); its
        # next_avail is already in place. peek: copy the request headers out
        # (for chains; a batch of ids and lengths does not need them).
        flags = self._pop_flags | (RING_AVAIL_EVENT if event else 0)
        if peek:
            flags |= RING_PEEK
        batches: list[ChainBatch] = []
        count = 0
        walker = self._walker
        while True:
            # The C walk does rules 1, 3 and 6 itself (native.c, "Ring walks").
            if first is not None:
                stop, n, batches = first
                first = None
            else:
                stop, n, self._next_avail, _, taken = walker.pop_take(
                    self._next_avail, 0, flags, max_chains - count
                )
                if taken is not None:
                    words, segs, peek_bytes, ptr = taken
                    batches.append(
                        ChainBatch(words, segs, space, space.pinned, peek_bytes, ptr)
                    )
            count += n
            if stop is RingStop.EMPTY:
                return batches, None, None
            if stop is RingStop.RING:
                raise RingStateError(
                    f"a split ring part at {walker.last_pop(stop).detail:#x} is not "
                    f"inside one guest memory region, or not aligned in host memory"
                )
            if stop is RingStop.BROKEN:
                return batches, None, walker.last_pop(stop).detail
            if stop is RingStop.FAULT:
                r = walker.last_pop(stop)
                return batches, (r.fault, r.detail, r.where), None
            if stop is RingStop.FULL or (stop is RingStop.LIMIT and count < max_chains):
                continue
            return batches, None, None

    def _pop_python(
        self, space: MemorySpace, max_chains: int, event: bool
    ) -> tuple[list[ChainBatch], tuple[RingFault, int, int] | None, int | None]:
        size = self._size
        apart, upart, dpart = self._apart, self._upart, self._dpart
        a_atomic, a_off = apart.atomic, apart.offset
        event_off = upart.offset + RING_HEADER + USED_ELEM * size
        inflight = self._walker.inflight
        unpack_head = _U16.unpack_from
        nxt = self._next_avail
        words: list[int] = []
        segs: list[int] = []
        fault: tuple[RingFault, int, int] | None = None
        broken_at: int | None = None
        # Reads of avail.ring[] and the descriptors below happen after this.
        # ORDERING: acquire load of avail.idx (§5.4 rule 1; virtio §2.7.13).
        idx = a_atomic.load_u16(a_off + 2)
        while True:
            if (idx - nxt) & 0xFFFF > size:
                broken_at = idx
                break
            if nxt == idx:
                if event:
                    # ORDERING: release store re-arming avail_event (§5.4 rule 6).
                    upart.atomic.store_u16(event_off, nxt)
                    # ORDERING: §5.4 rule 6: full fence, then re-check avail.idx.
                    fence_seq_cst()
                    # ORDERING: acquire load of avail.idx (§5.4 rule 1).
                    idx = a_atomic.load_u16(a_off + 2)
                    if idx != nxt:
                        continue
                break
            if len(words) >= 8 * max_chains:
                break
            # Plain read: ordered by the acquire of avail.idx above.
            head = unpack_head(
                apart.view, a_off + RING_HEADER + AVAIL_ELEM * (nxt % size)
            )[0]
            try:
                walk = walk_split(
                    space,
                    dpart.view,
                    dpart.offset,
                    size,
                    head,
                    self._indirect,
                    inflight,
                )
            except WalkError as exc:
                fault = (exc.fault, exc.detail, head)
                break
            inflight[head] = walk.wlen
            walk.record(head, 1, words, segs)
            nxt = (nxt + 1) & 0xFFFF
        if event and broken_at is None:
            # ORDERING: release store of avail_event (§5.4 rule 6 re-arm).
            upart.atomic.store_u16(event_off, nxt)
        self._next_avail = nxt
        batches = [ChainBatch(words, segs, space, space.io_table())] if words else []
        return batches, fault, broken_at

    def resubmit(
        self, mem: GuestMemory, heads: Sequence[int]
    ) -> tuple[list[DescriptorChain], list[int]]:
        """Build the chains at ``heads`` again (inflight resubmission after a
        reconnect), with the same walk and guards as a pop, and mark them in
        flight. ``next_avail`` does not move (it already counts them).

        Returns:
            The chains, and the heads whose chains are malformed (not
            returned; the caller forgets them).

        Raises:
            RingStateError: the ring is broken or not inside guest memory.
        """
        space = self._use(mem)
        dpart = self._dpart
        inflight = self._walker.inflight
        words: list[int] = []
        segs: list[int] = []
        bad: list[int] = []
        for head in heads:
            # The descriptors were published before the reconnect; the
            # session handshake orders them before us.
            try:
                walk = walk_split(
                    space,
                    dpart.view,
                    dpart.offset,
                    self._size,
                    head,
                    self._indirect,
                    inflight,
                )
            except WalkError:
                bad.append(head)
                continue
            inflight[head] = walk.wlen
            walk.record(head, 1, words, segs)
        batch = ChainBatch(words, segs, space, space.io_table())
        return batch.chains(), bad

    # ------------------------------------------------------------ used ring

    def push(self, mem: GuestMemory, entries: Sequence[int]) -> None:
        """Write used elements ``(id, len)`` (flattened pairs) and publish
        ``used.idx``. All entries are checked first; a bad one writes nothing.

        Raises:
            ValueError: an id is not in flight (never popped, or already
                used), out of range, or its length exceeds the chain's
                writable bytes.
            RingStateError: the used ring is not inside guest memory.
        """
        space = self._space
        if space is None or space.memory is not mem:
            space = self._bind(mem)
        old = self._next_used
        if self._native:
            walker = self._walker
            if len(entries) == 2:
                stop, new, _ = walker.push_one(old, 0, 0, entries[0], entries[1])
            else:
                stop, new, _ = walker.push_bound(old, 0, 0, entries)
            if stop is not RingStop.EMPTY:
                raise self._push_error(stop)
        else:
            new = self._push_python(entries)
        self._pushed(old, new)

    def _pushed(self, old: int, new: int) -> None:
        # After used.idx moved from old to new: log the ring writes, and
        # keep the notification state (as libvhost-user vu_queue_flush).
        self._next_used = new
        count = (new - old) & 0xFFFF
        if self._log is None:
            # The usual case, inline: nothing to log; the notification state
            # as in _after_push.
            if count:
                since = (new - self._signalled) & 0xFFFF
                if since >= 0x8000 or since < count:
                    self._signalled_valid = False
            return
        self._after_push(old, new, count)

    def complete(self, mem: GuestMemory, entries: Sequence[int]) -> tuple[bool, bool]:
        """:meth:`push`, then whether the driver wants an interrupt (as
        :meth:`needs_notification`) and whether more chains are available,
        after one full fence (§5.4 rules 5 and 6: the ``avail_event`` the
        last pop left, or a NO_NOTIFY never set, is the re-arm).

        Returns:
            ``(signal, more)``.

        Raises:
            ValueError: as :meth:`push`; nothing was written.
            RingStateError: the used or available ring is not inside guest
                memory.
        """
        space = self._space
        if space is None or space.memory is not mem:
            space = self._bind(mem)
        old = self._next_used
        if not self._native:
            self._pushed(old, self._push_python(entries))
            apart = self._apart
            # ORDERING: §5.4 rules 5 and 6: full fence, then the driver's words.
            fence_seq_cst()
            # ORDERING: acquire load of avail.flags (after the fence above).
            word = apart.atomic.load_u16(apart.offset)
            if self._event_idx:
                # ORDERING: acquire load of used_event (after the fence above).
                word |= apart.atomic.load_u16(apart.offset + self._used_event) << 16
            # ORDERING: acquire load of avail.idx (§5.4 rule 1).
            more = apart.atomic.load_u16(apart.offset + 2) != self._next_avail
            return self._decide(word), more
        stop, new, _, word, more = self._walker.complete(
            old, 0, self._complete_flags, entries
        )
        return self._completed(stop, old, new, word, more)

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
            ValueError: as :meth:`push` (a chain not in flight: never popped
                here, or already used); nothing was written.
            RingStateError: as :meth:`complete`.
        """
        if not self._native:
            return self.complete(mem, batch._used_entries(count, length, first))
        space = self._space
        if space is None or space.memory is not mem:
            self._bind(mem)
        old = self._next_used
        stop, new, _, word, more = self._walker.complete_records(
            old, 0, self._complete_flags, batch._records(), count, length, first
        )
        return self._completed(stop, old, new, word, more)

    def _completed(
        self, stop: RingStop, old: int, new: int, word: int, more: bool
    ) -> tuple[bool, bool]:
        # After a native completion moved used.idx from old to new: the
        # fault if any, else the state and the notification decision.
        if stop is not RingStop.EMPTY:
            raise self._push_error(stop)
        if self._log is not None or not self._event_idx:
            self._pushed(old, new)
            return self._decide(word), more
        # _pushed and _decide, inline for the usual case (EVENT_IDX, nothing
        # to log): this runs once per completion.
        self._next_used = new
        signalled = self._signalled
        valid = self._signalled_valid
        count = (new - old) & 0xFFFF
        if valid and count:
            since = (new - signalled) & 0xFFFF
            valid = since < 0x8000 and since >= count
        self._signalled = new
        self._signalled_valid = True
        if not valid:
            return True, more
        return (new - (word >> 16) - 1) & 0xFFFF < (new - signalled) & 0xFFFF, more

    def _push_error(self, stop: RingStop) -> Exception:
        # A native push or completion refused (nothing was written).
        walker = self._walker
        if stop is RingStop.RING:
            return RingStateError(
                f"a split ring part at {walker.last_push(stop).detail:#x} is not "
                f"inside one guest memory region, or not aligned in host memory"
            )
        r = walker.last_push(stop)
        return ValueError(f"used entry {r.where}: {fault_message(r.fault, r.detail)}")

    def _push_python(self, entries: Sequence[int]) -> int:
        inflight = self._walker.inflight
        size = self._size
        check_used_entries(entries, inflight, size)
        upart = self._upart
        view, base = upart.view, upart.offset + RING_HEADER
        pos = self._next_used
        for k in range(0, len(entries), 2):
            ident = entries[k]
            # Plain stores: published by the release store of used.idx below.
            _ELEM.pack_into(
                view, base + USED_ELEM * (pos % size), ident, entries[k + 1]
            )
            inflight[ident] = _FREE
            pos = (pos + 1) & 0xFFFF
        # ORDERING: release store of used.idx publishes the elements and the
        # data written before them (§5.4 rule 4; virtio §2.7.14).
        upart.atomic.store_u16(upart.offset + 2, pos)
        return pos

    def _after_push(self, old: int, new: int, count: int) -> None:
        if count == 0:
            return
        if self._log is not None:
            size = self._size
            start = old % size
            if count >= size:
                self._log_used(RING_HEADER, USED_ELEM * size)
            elif start + count <= size:
                self._log_used(RING_HEADER + USED_ELEM * start, USED_ELEM * count)
            else:
                first = size - start
                self._log_used(RING_HEADER + USED_ELEM * start, USED_ELEM * first)
                self._log_used(RING_HEADER, USED_ELEM * (count - first))
            self._log_used(2, 2)
        # libvhost-user vu_queue_flush: once more than 2^15 entries passed
        # since the last decision, the old index says nothing any more.
        since = (new - self._signalled) & 0xFFFF
        if since >= 0x8000:
            since -= 0x10000
        if since < count:
            self._signalled_valid = False

    # ------------------------------------------------------------ notifications

    def enable_notification(self, mem: GuestMemory) -> bool:
        """Ask the driver to kick again (clear NO_NOTIFY, or write
        ``avail_event``), then re-check for work (§5.4 rule 6).

        Returns:
            True if buffers are available: process them before waiting.
        """
        self._use(mem)
        upart = self._upart
        self._notify = True
        if self._event_idx:
            off = RING_HEADER + USED_ELEM * self._size
            # ORDERING: release store of avail_event (§5.4 rule 6, re-arm).
            upart.atomic.store_u16(upart.offset + off, self._next_avail)
            self._log_used(off, 2)
        else:
            # ORDERING: release store of used.flags = 0 (§5.4 rule 6, re-arm).
            upart.atomic.store_u16(upart.offset, 0)
            self._log_used(0, 2)
        # ORDERING: §5.4 rule 6: full fence between re-enabling and re-checking.
        fence_seq_cst()
        # ORDERING: acquire load of avail.idx (§5.4 rule 1).
        idx = self._apart.atomic.load_u16(self._apart.offset + 2)
        return idx != self._next_avail

    def available(self, mem: GuestMemory) -> bool:
        """Whether the driver has made a chain available that was not popped
        yet (one acquire load of ``avail.idx``; no fence, no re-arm)."""
        self._use(mem)
        # ORDERING: acquire load of avail.idx (§5.4 rule 1).
        idx = self._apart.atomic.load_u16(self._apart.offset + 2)
        return idx != self._next_avail

    def disable_notification(self, mem: GuestMemory) -> None:
        """Tell the driver not to kick (NO_NOTIFY; with EVENT_IDX, stop moving
        ``avail_event``, so the driver kicks at most once more)."""
        self._use(mem)
        self._notify = False
        if not self._event_idx:
            # ORDERING: release store of used.flags (a hint; §2.7.10).
            self._upart.atomic.store_u16(self._upart.offset, USED_F_NO_NOTIFY)
            self._log_used(0, 2)

    def needs_notification(self, mem: GuestMemory) -> bool:
        """Whether the driver wants an interrupt for the used entries added
        since the last call (virtio §2.7.10; §5.3 of the reference).

        Returns:
            True to signal the call eventfd.
        """
        space = self._space
        if space is None or space.memory is not mem:
            self._bind(mem)
        apart = self._apart
        # Between publishing used.idx and reading avail.flags / used_event.
        # ORDERING: §5.4 rule 5: full fence, then acquire load of avail.flags.
        word = apart.atomic.fence_load_u16(apart.offset)
        if self._event_idx:
            # ORDERING: acquire load of used_event (after the fence above).
            word |= apart.atomic.load_u16(apart.offset + self._used_event) << 16
        return self._decide(word)

    def _decide(self, word: int) -> bool:
        # The notification decision from the driver's words, read after the
        # fence: avail.flags | used_event << 16. Updates the decision state.
        if not self._event_idx:
            return not word & AVAIL_F_NO_INTERRUPT
        new = self._next_used
        old = self._signalled
        valid = self._signalled_valid
        self._signalled = new
        self._signalled_valid = True
        if not valid:
            return True
        # need_event (_defs.py), inline: this runs once per completion.
        return (new - (word >> 16) - 1) & 0xFFFF < (new - old) & 0xFFFF

    def avail_idx(self, mem: GuestMemory) -> int:
        """``avail.idx`` as the driver last published it."""
        self._bind(mem)
        # ORDERING: acquire load of avail.idx (§5.4 rule 1).
        return self._apart.atomic.load_u16(self._apart.offset + 2)

    def used_idx(self, mem: GuestMemory) -> int:
        """``used.idx`` as it is in guest memory."""
        self._bind(mem)
        # ORDERING: acquire load of used.idx (our own release store).
        return self._upart.atomic.load_u16(self._upart.offset + 2)

    def __repr__(self) -> str:
        return (
            f"<SplitRing size={self._size} next_avail={self._next_avail} "
            f"next_used={self._next_used}>"
        )
