# The inflight I/O tracking buffer (INFLIGHT_SHMFD; vhost-user-protocol.md
# §4.9): shared memory the back-end allocates (GET_INFLIGHT_FD) and the
# front-end keeps across back-end restarts (SET_INFLIGHT_FD), in which the
# back-end records which descriptor heads it has popped and not yet used.
#
# Rules:
# * Only the back-end that allocated the buffer interprets it, but we use
#   the layout of the spec (and libvhost-user / DPDK), so a buffer survives
#   a restart of our own daemon.
# * Sizes from the front-end are checked before mapping: mmap_size must hold
#   num_queues regions of the per-queue size and lie inside the file
#   (libvhost-user and DPDK map whatever size comes, §7.2 "Inflight").
# * A buffer we create is a sealed memfd (no grow, no shrink): a front-end
#   cannot truncate it under us.
# * SplitQueueTracker is one queue's view, the vring's InflightTracker: the
#   rings call it under their lock. Counters go on from the largest one in
#   the buffer, so resubmitted heads stay the oldest. Heads a front-end
#   wrote out of range are ignored. The buffer is only ever read back by a
#   back-end after a reconnect, so plain stores in program order (Python
#   makes no reordering) are the spec's "compiler barriers".
# * PackedQueueTracker: used descriptors overwrite the ring, so each popped
#   chain's ring descriptors (addr/len/id/flags, as read from the ring right
#   after the pop; an indirect chain's one ring descriptor, the table is
#   walked again) are recorded in entries taken from the free list (chained
#   by next, num and last in the head entry; DPDK's layout). link() puts a
#   batch's entries back on the free list and advances used_idx and its
#   wrap counter by their slots; complete() clears the flags and copies
#   the state to the old_* shadows. A crash between the two is settled at
#   recovery by the used descriptor at old_used_idx: published, the batch
#   is cleared; not, the shadows are restored. Recovery rebuilds the free
#   list from the in-flight entries (nothing leaks).

from __future__ import annotations

import fcntl
import mmap
import os
import struct
from collections.abc import Callable, Sequence
from typing import Final, final

from vubackend.errors import MappingError

__all__ = [
    "InflightBuffer",
    "PackedQueueTracker",
    "SplitQueueTracker",
    "queue_region_size",
]

_ALIGN: Final = 64
# Split: {u64 features; u16 version; u16 desc_num; u16 last_batch_head;
# u16 used_idx} then DescStateSplit {u8 inflight; u8 pad[5]; u16 next;
# u64 counter} per descriptor.
_SPLIT_HEAD: Final = struct.Struct("=QHHHH")
_SPLIT_DESC: Final = struct.Struct("=B5xHQ")
# Fields the split trackers write on their own (offsets in the header and a
# descriptor of _SPLIT_HEAD / _SPLIT_DESC).
_U16: Final = struct.Struct("=H")
_LAST_BATCH_AT: Final = 12
_USED_IDX_AT: Final = 14
_NEXT_AT: Final = 6
# Packed: {u64 features; u16 version; u16 desc_num; u16 free_head;
# u16 old_free_head; u16 used_idx; u16 old_used_idx; u8 used_wrap_counter;
# u8 old_used_wrap_counter; u8 pad[7]} then DescStatePacked {u8 inflight;
# u8 pad; u16 next; u16 last; u16 num; u64 counter; u16 id; u16 flags;
# u32 len; u64 addr} per descriptor. The header is 32 bytes: pad[7] ends at
# 29, and C aligns desc[] (a u64 inside) to 8, as in DPDK's structs.
_PACKED_HEAD: Final = struct.Struct("=QHHHHHHBB10x")
_PACKED_DESC: Final = struct.Struct("=BxHHHQHHIQ")
_VERSION: Final = 1
# A recorded packed descriptor: (addr, len, id, flags).
PackedDesc = tuple[int, int, int, int]


def _align(value: int) -> int:
    return (value + _ALIGN - 1) // _ALIGN * _ALIGN


def queue_region_size(queue_size: int, *, packed: bool) -> int:
    """Bytes of one queue's region (DPDK's sizes, which match the layout)."""
    if packed:
        return _align(_PACKED_HEAD.size + _PACKED_DESC.size * queue_size)
    return _align(_SPLIT_HEAD.size + _SPLIT_DESC.size * queue_size)


@final
class InflightBuffer:
    """A mapped inflight buffer: ``num_queues`` regions of ``queue_size``
    descriptor states each."""

    def __init__(
        self,
        mapping: mmap.mmap,
        fd: int | None,
        *,
        num_queues: int,
        queue_size: int,
        packed: bool,
        base: int = 0,
    ) -> None:
        self._map = mapping
        self._fd = fd
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.packed = packed
        self.region_size = queue_region_size(queue_size, packed=packed)
        self._base = base

    @classmethod
    def create(
        cls, num_queues: int, queue_size: int, *, packed: bool
    ) -> InflightBuffer:
        """A new zeroed, sealed buffer with every queue region initialised.

        Raises:
            MappingError: the memfd could not be made or mapped.
        """
        if not 0 < queue_size <= 32768:
            raise MappingError(f"inflight queue size {queue_size} is not in 1..32768")
        size = num_queues * queue_region_size(queue_size, packed=packed)
        try:
            fd = os.memfd_create(
                "vubackend-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
            )
        except OSError as exc:
            raise MappingError(f"cannot create the inflight buffer: {exc}") from exc
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(
                fd,
                fcntl.F_ADD_SEALS,
                fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL,
            )
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED)
        except OSError as exc:
            os.close(fd)
            raise MappingError(f"cannot map the inflight buffer: {exc}") from exc
        buffer = cls(
            mapping, fd, num_queues=num_queues, queue_size=queue_size, packed=packed
        )
        for queue in range(num_queues):
            buffer._initialise(queue)
        return buffer

    @classmethod
    def adopt(
        cls,
        fd: int,
        *,
        size: int,
        offset: int,
        num_queues: int,
        queue_size: int,
        packed: bool,
    ) -> InflightBuffer:
        """Map a buffer the front-end kept (SET_INFLIGHT_FD). Takes
        ownership of ``fd`` (closed once mapped, or on error).

        Raises:
            MappingError: the sizes do not fit or the mapping fails.
        """
        try:
            needed = num_queues * queue_region_size(queue_size, packed=packed)
            if size < needed:
                raise MappingError(
                    f"inflight buffer of {size} bytes cannot hold {num_queues} "
                    f"queues of {queue_size} ({needed} bytes)"
                )
            if offset + size >= 1 << 64:
                raise MappingError("inflight offset + size overflows")
            if os.fstat(fd).st_size < offset + size:
                raise MappingError(
                    "the inflight buffer lies beyond the end of its file"
                )
            page = mmap.ALLOCATIONGRANULARITY
            aligned = offset - offset % page
            mapping = mmap.mmap(
                fd, size + offset - aligned, mmap.MAP_SHARED, offset=aligned
            )
        except OSError as exc:
            raise MappingError(f"cannot map the inflight buffer: {exc}") from exc
        finally:
            os.close(fd)
        return cls(
            mapping,
            None,
            num_queues=num_queues,
            queue_size=queue_size,
            packed=packed,
            base=offset - aligned,
        )

    @property
    def size(self) -> int:
        return self.num_queues * self.region_size

    @property
    def fd(self) -> int:
        """The memfd of a buffer we created (to send with GET_INFLIGHT_FD)."""
        if self._fd is None:
            raise ValueError("this buffer was adopted; it has no fd of ours")
        return self._fd

    def take_fd(self) -> int:
        """Hand our memfd over (to send with GET_INFLIGHT_FD, then close);
        the mapping stays."""
        fd = self.fd
        self._fd = None
        return fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if not self._map.closed:
            self._map.close()

    def _region(self, queue: int) -> int:
        if not 0 <= queue < self.num_queues:
            raise IndexError(f"inflight queue {queue} out of range")
        return self._base + queue * self.region_size

    def _initialise(self, queue: int) -> None:
        start = self._region(queue)
        if self.packed:
            _PACKED_HEAD.pack_into(
                self._map, start, 0, _VERSION, self.queue_size, 0, 0, 0, 0, 1, 1
            )
            first = start + _PACKED_HEAD.size
            for i in range(self.queue_size):
                _PACKED_DESC.pack_into(
                    self._map,
                    first + i * _PACKED_DESC.size,
                    0,
                    i + 1,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                )
        else:
            _SPLIT_HEAD.pack_into(self._map, start, 0, _VERSION, self.queue_size, 0, 0)

    # ------------------------------------------------------------ split rings

    def split_begin(self, queue: int, head: int, counter: int) -> None:
        """Record that descriptor ``head`` was popped (the ``counter``-th)."""
        at = self._desc_at(queue, head)
        _SPLIT_DESC.pack_into(self._map, at, 1, 0, counter)

    def split_complete(self, queue: int, heads: list[int], used_idx: int) -> None:
        """Record that ``heads`` were put in the used ring, whose index is now
        ``used_idx``: last_batch_head links them, then they are cleared."""
        start = self._region(queue)
        features, version, desc_num, last_batch, _ = _SPLIT_HEAD.unpack_from(
            self._map, start
        )
        for head in heads:
            at = self._desc_at(queue, head)
            flag, _next, counter = _SPLIT_DESC.unpack_from(self._map, at)
            _SPLIT_DESC.pack_into(self._map, at, flag, last_batch, counter)
            last_batch = head
        _SPLIT_HEAD.pack_into(
            self._map, start, features, version, desc_num, last_batch, used_idx
        )
        for head in heads:
            at = self._desc_at(queue, head)
            _flag, nxt, counter = _SPLIT_DESC.unpack_from(self._map, at)
            _SPLIT_DESC.pack_into(self._map, at, 0, nxt, counter)

    def split_pending(self, queue: int) -> list[int]:
        """Heads still in flight, oldest first (to resubmit after a
        reconnect)."""
        pending = []
        for head in range(self.queue_size):
            flag, _next, counter = _SPLIT_DESC.unpack_from(
                self._map, self._desc_at(queue, head)
            )
            if flag:
                pending.append((counter, head))
        return [head for _, head in sorted(pending)]

    def split_used_idx(self, queue: int) -> int:
        """The used index recorded with the last completed batch."""
        return int(_SPLIT_HEAD.unpack_from(self._map, self._region(queue))[4])

    def split_link(self, queue: int, heads: Sequence[int]) -> None:
        """Link ``heads`` through ``last_batch_head`` (before the used ring is
        written): ``desc[i].next = last_batch_head; last_batch_head = i``."""
        start = self._region(queue)
        features, version, desc_num, last_batch, used_idx = _SPLIT_HEAD.unpack_from(
            self._map, start
        )
        for head in heads:
            at = self._desc_at(queue, head)
            flag, _next, counter = _SPLIT_DESC.unpack_from(self._map, at)
            _SPLIT_DESC.pack_into(self._map, at, flag, last_batch, counter)
            last_batch = head
        _SPLIT_HEAD.pack_into(
            self._map, start, features, version, desc_num, last_batch, used_idx
        )

    def split_clear(self, queue: int, heads: Sequence[int], used_idx: int) -> None:
        """Clear the inflight flag of ``heads``, then record ``used_idx``
        (after used.idx was published)."""
        for head in heads:
            at = self._desc_at(queue, head)
            _flag, nxt, counter = _SPLIT_DESC.unpack_from(self._map, at)
            _SPLIT_DESC.pack_into(self._map, at, 0, nxt, counter)
        self._set_split_used_idx(queue, used_idx)

    def split_fix_up(self, queue: int, used_idx: int) -> None:
        """The reconnect fix-up (§4.9): if the recorded used index is not
        ``used_idx`` (used->idx), the last batch reached the used ring
        before we crashed: clear its heads (``used_idx - recorded`` of them,
        from ``last_batch_head`` along ``next``) and record ``used_idx``."""
        start = self._region(queue)
        _f, _v, _n, last_batch, recorded = _SPLIT_HEAD.unpack_from(self._map, start)
        if recorded == used_idx & 0xFFFF:
            return
        count = min((used_idx - recorded) & 0xFFFF, self.queue_size)
        head = last_batch
        for _ in range(count):
            if not 0 <= head < self.queue_size:
                break
            at = self._desc_at(queue, head)
            _flag, nxt, counter = _SPLIT_DESC.unpack_from(self._map, at)
            _SPLIT_DESC.pack_into(self._map, at, 0, nxt, counter)
            head = nxt
        self._set_split_used_idx(queue, used_idx)

    def split_max_counter(self, queue: int) -> int:
        """The largest counter of an in-flight head (0 if none)."""
        top = 0
        for head in range(self.queue_size):
            flag, _next, counter = _SPLIT_DESC.unpack_from(
                self._map, self._desc_at(queue, head)
            )
            if flag and counter > top:
                top = counter
        return int(top)

    def _set_split_used_idx(self, queue: int, used_idx: int) -> None:
        start = self._region(queue)
        features, version, desc_num, last_batch, _ = _SPLIT_HEAD.unpack_from(
            self._map, start
        )
        _SPLIT_HEAD.pack_into(
            self._map, start, features, version, desc_num, last_batch, used_idx & 0xFFFF
        )

    def tracker(self, queue: int) -> SplitQueueTracker | PackedQueueTracker:
        """Queue ``queue``'s tracker, to attach to its ring.

        Raises:
            IndexError: no such queue.
        """
        self._region(queue)
        if self.packed:
            return PackedQueueTracker(self, queue)
        return SplitQueueTracker(self, queue)

    # ------------------------------------------------------------ packed rings

    def packed_head(self, queue: int) -> list[int]:
        """[free_head, old_free_head, used_idx, old_used_idx, used_wrap,
        old_used_wrap]."""
        return list(_PACKED_HEAD.unpack_from(self._map, self._region(queue))[3:])

    def packed_set_head(self, queue: int, values: Sequence[int]) -> None:
        start = self._region(queue)
        features, version, desc_num = _PACKED_HEAD.unpack_from(self._map, start)[:3]
        _PACKED_HEAD.pack_into(self._map, start, features, version, desc_num, *values)

    def packed_entry(self, queue: int, index: int) -> list[int]:
        """[inflight, next, last, num, counter, id, flags, len, addr]."""
        return list(_PACKED_DESC.unpack_from(self._map, self._desc_at(queue, index)))

    def packed_set_entry(self, queue: int, index: int, values: Sequence[int]) -> None:
        _PACKED_DESC.pack_into(self._map, self._desc_at(queue, index), *values)

    def packed_pending(self, queue: int) -> list[tuple[int, list[PackedDesc]]]:
        """The recorded chains still in flight, oldest first: ``(id,
        descriptors)``; ``id`` is the last descriptor's."""
        found = []
        for head in range(self.queue_size):
            entry = self.packed_entry(queue, head)
            if entry[0]:
                descs = self._packed_chain(queue, head)
                if descs:
                    found.append((entry[4], descs[-1][2], descs))
        return [(ident, descs) for _, ident, descs in sorted(found)]

    def chain_entries(self, queue: int, head: int) -> list[int] | None:
        """The entries of the chain recorded at entry ``head``, or None if
        its links are out of range."""
        entry = self.packed_entry(queue, head)
        num = entry[3]
        if not 0 < num <= self.queue_size:
            return None
        indexes = [head]
        for _ in range(num - 1):
            index = self.packed_entry(queue, indexes[-1])[1]
            if not 0 <= index < self.queue_size or index in indexes:
                return None
            indexes.append(index)
        return indexes if indexes[-1] == entry[2] else None

    def _packed_chain(self, queue: int, head: int) -> list[PackedDesc] | None:
        # The descriptors of the chain recorded at entry `head`.
        indexes = self.chain_entries(queue, head)
        if indexes is None:
            return None
        descs: list[PackedDesc] = []
        for index in indexes:
            e = self.packed_entry(queue, index)
            descs.append((e[8], e[7], e[5], e[6]))
        return descs

    def _desc_at(self, queue: int, head: int) -> int:
        if not 0 <= head < self.queue_size:
            raise IndexError(f"descriptor {head} out of range")
        head_size = _PACKED_HEAD.size if self.packed else _SPLIT_HEAD.size
        desc_size = _PACKED_DESC.size if self.packed else _SPLIT_DESC.size
        return self._region(queue) + head_size + head * desc_size


@final
class SplitQueueTracker:
    """One queue's region of a split :class:`InflightBuffer`, as the
    vring's ``InflightTracker``."""

    def __init__(self, buffer: InflightBuffer, queue: int) -> None:
        self._buffer = buffer
        self._queue = queue
        self.counter = buffer.split_max_counter(queue) + 1
        # begin/link/complete run on every request of a ring walked in
        # Python: they write the region directly (its header, then 16-byte
        # descriptors), as InflightBuffer's split_* methods do one field at
        # a time. Native rings record in region() themselves.
        self._map = buffer._map
        self._start = buffer._region(queue)
        self._desc0 = self._start + _SPLIT_HEAD.size
        self._size = buffer.queue_size

    def region(self) -> tuple[memoryview, int]:
        end = self._desc0 + _SPLIT_DESC.size * self._size
        return memoryview(self._map)[self._start : end], self._size

    def begin(self, heads: Sequence[int]) -> None:
        mapping, desc0, size = self._map, self._desc0, self._size
        counter = self.counter
        for head in heads:
            if 0 <= head < size:
                _SPLIT_DESC.pack_into(mapping, desc0 + 16 * head, 1, 0, counter)
                counter += 1
        self.counter = counter

    def link(self, heads: Sequence[int]) -> None:
        # desc[i].next = last_batch_head; last_batch_head = i, in order.
        mapping, desc0, size = self._map, self._desc0, self._size
        at = self._start + _LAST_BATCH_AT
        last = _U16.unpack_from(mapping, at)[0]
        for head in heads:
            if 0 <= head < size:
                _U16.pack_into(mapping, desc0 + 16 * head + _NEXT_AT, last)
                last = head
        _U16.pack_into(mapping, at, last)

    def complete(self, heads: Sequence[int], used_idx: int) -> None:
        mapping, desc0, size = self._map, self._desc0, self._size
        for head in heads:
            if 0 <= head < size:
                mapping[desc0 + 16 * head] = 0  # the inflight flag
        _U16.pack_into(mapping, self._start + _USED_IDX_AT, used_idx & 0xFFFF)

    def pending(self) -> list[int]:
        return self._buffer.split_pending(self._queue)

    def recover(self, used_idx: int) -> list[int]:
        self._buffer.split_fix_up(self._queue, used_idx)
        self.counter = self._buffer.split_max_counter(self._queue) + 1
        return self.pending()


@final
class PackedQueueTracker:
    """One queue's region of a packed :class:`InflightBuffer`, as the
    vring's ``PackedInflightTracker``."""

    def __init__(self, buffer: InflightBuffer, queue: int) -> None:
        self._buffer = buffer
        self._queue = queue
        self._ring_size = buffer.queue_size
        self._ids: dict[int, int] = {}
        self._counter = 1

    def begin_chains(self, chains: Sequence[Sequence[PackedDesc]]) -> None:
        buffer, queue, size = self._buffer, self._queue, self._buffer.queue_size
        for descs in chains:
            values = buffer.packed_head(queue)
            indexes = []
            index = values[0]
            for _ in descs:
                if not 0 <= index < size:
                    break
                indexes.append(index)
                index = buffer.packed_entry(queue, index)[1]
            if not descs or len(indexes) < len(descs):
                continue  # no room (a corrupt free list): not recorded
            head, last = indexes[0], indexes[-1]
            for at, (addr, length, ident, flags) in zip(indexes, descs, strict=True):
                nxt = buffer.packed_entry(queue, at)[1]
                buffer.packed_set_entry(
                    queue, at, (0, nxt, last, 0, 0, ident, flags, length, addr)
                )
            entry = buffer.packed_entry(queue, head)
            entry[0], entry[2], entry[3], entry[4] = 1, last, len(descs), self._counter
            buffer.packed_set_entry(queue, head, entry)
            self._counter += 1
            values[0] = values[1] = index
            buffer.packed_set_head(queue, values)
            self._ids[descs[-1][2]] = head

    def link(self, heads: Sequence[int]) -> None:
        buffer, queue = self._buffer, self._queue
        values = buffer.packed_head(queue)
        for ident in heads:
            head = self._ids.get(ident)
            if head is None:
                continue
            entry = buffer.packed_entry(queue, head)
            last = buffer.packed_entry(queue, entry[2])
            last[1] = values[0]
            buffer.packed_set_entry(queue, entry[2], last)
            values[0] = head
            values[2] += entry[3]
            if values[2] >= self._ring_size:
                values[2] -= self._ring_size
                values[4] ^= 1
        buffer.packed_set_head(queue, values)

    def unlink(self) -> None:
        """Undo :meth:`link` (the push failed): restore the shadows."""
        values = self._buffer.packed_head(self._queue)
        values[0], values[2], values[4] = values[1], values[3], values[5]
        self._buffer.packed_set_head(self._queue, values)

    def complete(self, heads: Sequence[int], used_idx: int) -> None:
        del used_idx  # the position was recorded by link()
        self._clear(heads)

    def _clear(self, heads: Sequence[int]) -> None:
        buffer, queue = self._buffer, self._queue
        for ident in heads:
            head = self._ids.pop(ident, None)
            if head is not None:
                entry = buffer.packed_entry(queue, head)
                entry[0] = 0
                buffer.packed_set_entry(queue, head, entry)
        values = buffer.packed_head(queue)
        values[1], values[3], values[5] = values[0], values[2], values[4]
        buffer.packed_set_head(queue, values)

    def drop(self, heads: Sequence[int]) -> None:
        """Forget ``heads`` without using them (malformed on resubmission)."""
        buffer, queue = self._buffer, self._queue
        values = buffer.packed_head(queue)
        for ident in heads:
            head = self._ids.get(ident)
            if head is None:
                continue
            entry = buffer.packed_entry(queue, head)
            last = buffer.packed_entry(queue, entry[2])
            last[1] = values[0]
            buffer.packed_set_entry(queue, entry[2], last)
            values[0] = head
        buffer.packed_set_head(queue, values)
        self._clear(heads)

    def pending(self) -> list[int]:
        return [ident for ident, _ in self._buffer.packed_pending(self._queue)]

    def recover_packed(
        self, ring_size: int, published: Callable[[int, int], bool]
    ) -> tuple[int, int, list[tuple[int, list[PackedDesc]]]]:
        buffer, queue, size = self._buffer, self._queue, self._buffer.queue_size
        self._ring_size = ring_size
        values = buffer.packed_head(queue)
        free, old_free, used, old_used, wrap, old_wrap = values
        if (used, wrap) != (old_used, old_wrap):
            if published(old_used, old_wrap):
                # The batch reached the ring: clear it (free_head along the
                # relinked entries down to old_free_head).
                head = free
                for _ in range(size):
                    if head == old_free or not 0 <= head < size:
                        break
                    entry = buffer.packed_entry(queue, head)
                    entry[0] = 0
                    buffer.packed_set_entry(queue, head, entry)
                    if not 0 <= entry[2] < size:
                        break
                    head = buffer.packed_entry(queue, entry[2])[1]
            else:
                used, wrap = old_used, old_wrap
        # The free list again: every entry no in-flight chain holds.
        held: set[int] = set()
        for head in range(size):
            entry = buffer.packed_entry(queue, head)
            if not entry[0]:
                continue
            chain = buffer.chain_entries(queue, head)
            if chain is None:
                entry[0] = 0
                buffer.packed_set_entry(queue, head, entry)
            else:
                held.update(chain)
        free_entries = [i for i in range(size) if i not in held]
        for k, index in enumerate(free_entries):
            entry = buffer.packed_entry(queue, index)
            entry[0] = 0
            entry[1] = free_entries[k + 1] if k + 1 < len(free_entries) else size
            buffer.packed_set_entry(queue, index, entry)
        first = free_entries[0] if free_entries else size
        buffer.packed_set_head(queue, (first, first, used, used, wrap, wrap))
        pending = buffer.packed_pending(queue)
        self._ids = {}
        top = 0
        for head in range(size):
            entry = buffer.packed_entry(queue, head)
            if entry[0]:
                top = max(top, entry[4])
                chain = buffer.chain_entries(queue, head)
                assert chain is not None
                self._ids[buffer.packed_entry(queue, chain[-1])[5]] = head
        self._counter = top + 1
        return used, wrap, pending
