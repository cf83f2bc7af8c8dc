# Descriptor chain walks in Python: the reference twin of the C walkers in
# _cffi_src/native.c ("Ring walks").
#
# Rules of this module:
# - Same checks, same order, same fault codes and details as the C code, so
#   that tests can run both on one ring and compare them fault for fault.
#   Per buffer descriptor: readable-before-writable order, the u32 total,
#   then translation into segments (address overflow or any unmapped byte is
#   BUFFER_UNMAPPED, more than MAX_CHAIN_SEGMENTS pieces is
#   TOO_MANY_SEGMENTS). Per indirect descriptor: nesting, negotiation, NEXT,
#   length (non-zero, multiple of 16, at most MAX_INDIRECT entries), then the
#   whole table must be mapped.
# - Every descriptor is read once, with one struct unpack into locals, before
#   anything in it is checked (vhost-user-protocol.md §5.4 rule 3). An
#   indirect table is copied out of guest memory in one read and walked in
#   the copy.
# - Every loop is bounded: a split chain by the queue size (or the indirect
#   table's entries), a packed chain by the queue size, an indirect table by
#   its entries. A walk never writes guest memory.
# - A malformed chain raises WalkError (internal); the ring modules turn it
#   into DescriptorChainError with fault_message().
# - Segments are two ints each: the offset in the region, then
#   len | region_index << 32 | writable << 63 (the C layout).

from __future__ import annotations

import struct
from bisect import bisect_right
from collections.abc import Sequence
from typing import Final

from vubackend._native import MAX_CHAIN_SEGMENTS, MAX_INDIRECT, RingFault
from vubackend.errors import UnmappedAddressError
from vubackend.memory import GuestAddress
from vubackend.vring._defs import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    DESC_SIZE,
    MAX_CHAIN_BYTES,
)
from vubackend.vring._space import MemorySpace

__all__ = [
    "SEG_WRITE",
    "Walk",
    "WalkError",
    "fault_message",
    "walk_packed",
    "walk_split",
]

# Split {le64 addr; le32 len; le16 flags; le16 next};
# packed {le64 addr; le32 len; le16 id; le16 flags}.
DESC: Final = struct.Struct("<QIHH")
# Packed head: addr, len, id (its flags come from the acquire load).
PACKED_HEAD: Final = struct.Struct("<QIH")
SEG_WRITE: Final = 1 << 63
_U64_LIMIT: Final = 1 << 64
_FREE: Final = (1 << 64) - 1
_U32_MAX: Final = 0xFFFF_FFFF


class WalkError(Exception):
    """A malformed chain (internal; never leaves the vring package)."""

    def __init__(self, fault: RingFault, detail: int) -> None:
        super().__init__(fault.name)
        self.fault = fault
        self.detail = detail


def check_used_entries(
    entries: Sequence[int], inflight: Sequence[int], size: int
) -> None:
    """Check (id, len) pairs before any of them is written to a used ring:
    each id in range, in flight and used once, each len within the chain's
    writable bytes (the Python mirror of the native push's checks).

    Raises:
        ValueError: the first bad entry, with the fault in words.
    """
    if len(entries) % 2:
        raise ValueError("used entries must be (id, len) pairs")
    claimed: set[int] = set()
    for k in range(0, len(entries), 2):
        ident, length = entries[k], entries[k + 1]
        if not (0 <= ident <= _U32_MAX and 0 <= length <= _U32_MAX):
            raise ValueError(f"used entry ({ident}, {length}) is not two u32s")
        if ident >= size:
            code = RingFault.ID_RANGE
        elif inflight[ident] == _FREE or ident in claimed:
            code = RingFault.NOT_IN_FLIGHT
        elif length > inflight[ident] & _U32_MAX:
            code = RingFault.USED_LEN
        else:
            claimed.add(ident)
            continue
        raise ValueError(f"used entry {k // 2}: {fault_message(code, ident)}")


def fault_message(fault: RingFault, detail: int) -> str:
    """Words for a fault code and its detail (as the C walker reports it)."""
    match fault:
        case RingFault.HEAD_RANGE:
            return f"head index {detail} is not below the queue size"
        case RingFault.NEXT_RANGE:
            return f"next index {detail} is outside the descriptor table"
        case RingFault.LOOP:
            return f"chain is longer than {detail} descriptors (a loop?)"
        case RingFault.INDIRECT_NOT_NEGOTIATED:
            return "indirect descriptor, but VIRTIO_F_INDIRECT_DESC was not negotiated"
        case RingFault.INDIRECT_WITH_NEXT:
            return "descriptor has both INDIRECT and NEXT"
        case RingFault.INDIRECT_NESTED:
            return "indirect descriptor inside an indirect table"
        case RingFault.INDIRECT_LEN:
            return (
                f"indirect table length {detail} is not a non-zero multiple of "
                f"{DESC_SIZE} of at most {MAX_INDIRECT} entries"
            )
        case RingFault.INDIRECT_UNMAPPED:
            return f"indirect table at {detail:#x} is not in guest memory"
        case RingFault.BUFFER_UNMAPPED:
            return f"buffer at {detail:#x} is not in guest memory"
        case RingFault.TOTAL_OVERFLOW:
            return f"chain length {detail} does not fit in 32 bits"
        case RingFault.WRITABLE_ORDER:
            return "device-readable descriptor after a device-writable one"
        case RingFault.TOO_MANY_SEGMENTS:
            return f"chain has more than {detail} buffer pieces"
        case RingFault.ID_RANGE:
            return f"buffer id {detail} is not below the queue size"
        case RingFault.IN_FLIGHT:
            return f"id {detail} is already in flight (offered twice)"
        case RingFault.NOT_IN_FLIGHT:
            return f"id {detail} is not in flight"
        case RingFault.USED_LEN:
            return f"used length for id {detail} exceeds its writable bytes"
        case RingFault.NONE:
            return "no fault"


class Walk:
    """The state of one chain walk: segments and totals so far."""

    __slots__ = ("ndesc", "nread", "rlen", "seen_write", "segs", "total", "wlen")

    def __init__(self) -> None:
        self.segs: list[int] = []
        self.nread = 0
        self.ndesc = 0
        self.total = 0
        self.rlen = 0
        self.wlen = 0
        self.seen_write = False

    def record(self, ident: int, slots: int, words: list[int], segs: list[int]) -> None:
        """Append this chain to batch arrays in the C layout (vu_record)."""
        words += (
            ident,
            slots,
            len(segs) // 2,
            len(self.segs) // 2,
            self.nread,
            self.rlen,
            self.wlen,
            self.ndesc,
        )
        segs += self.segs

    def add_buffer(
        self, space: MemorySpace, addr: int, length: int, write: bool
    ) -> None:
        """One buffer descriptor: order, total, translation (C: vu_add_buffer)."""
        if write:
            self.seen_write = True
        elif self.seen_write:
            raise WalkError(RingFault.WRITABLE_ORDER, addr)
        self.total += length
        if self.total > MAX_CHAIN_BYTES:
            raise WalkError(RingFault.TOTAL_OVERFLOW, self.total)
        self.ndesc += 1
        if write:
            self.wlen += length
        else:
            self.rlen += length
        if length == 0:
            return
        if addr + length > _U64_LIMIT:
            raise WalkError(RingFault.BUFFER_UNMAPPED, addr)
        starts = space.starts
        sizes = space.sizes
        segs = self.segs
        flag = SEG_WRITE if write else 0
        done = 0
        while done < length:
            here = addr + done
            i = bisect_right(starts, here) - 1
            if i < 0 or here - starts[i] >= sizes[i]:
                raise WalkError(RingFault.BUFFER_UNMAPPED, addr)
            offset = here - starts[i]
            piece = min(sizes[i] - offset, length - done)
            if len(segs) >= 2 * MAX_CHAIN_SEGMENTS:
                raise WalkError(RingFault.TOO_MANY_SEGMENTS, MAX_CHAIN_SEGMENTS)
            segs.append(offset)
            segs.append(piece | i << 32 | flag)
            if not write:
                self.nread += 1
            done += piece


def _indirect_table(
    space: MemorySpace, addr: int, length: int, flags: int, indirect_ok: bool
) -> bytes:
    # Checks of a descriptor with INDIRECT set (C: vu_check_indirect), then
    # one copy of the whole table.
    if not indirect_ok:
        raise WalkError(RingFault.INDIRECT_NOT_NEGOTIATED, 0)
    if flags & DESC_F_NEXT:
        raise WalkError(RingFault.INDIRECT_WITH_NEXT, 0)
    if length == 0 or length % DESC_SIZE or length // DESC_SIZE > MAX_INDIRECT:
        raise WalkError(RingFault.INDIRECT_LEN, length)
    try:
        return space.memory.read(GuestAddress(addr), length)
    except UnmappedAddressError:
        raise WalkError(RingFault.INDIRECT_UNMAPPED, addr) from None


def walk_split(
    space: MemorySpace,
    table: memoryview,
    table_offset: int,
    qsize: int,
    head: int,
    indirect_ok: bool,
    inflight: memoryview,
) -> Walk:
    """Walk the split chain at ``head`` (C: vu_split_walk).

    Args:
        space: the memory snapshot's tables.
        table: the memoryview holding the descriptor table.
        table_offset: the table's offset in ``table``.
        qsize: the queue size (entries of the table).
        head: the head index read from the available ring.
        indirect_ok: whether indirect descriptors were negotiated.
        inflight: the in-flight table (one u64 per head).

    Returns:
        The walk: segments and totals.

    Raises:
        WalkError: the chain is malformed.
    """
    if head >= qsize:
        raise WalkError(RingFault.HEAD_RANGE, head)
    if inflight[head] != _FREE:
        raise WalkError(RingFault.IN_FLIGHT, head)
    walk = Walk()
    unpack = DESC.unpack_from
    buf: memoryview | bytes = table
    base = table_offset
    idx = head
    tsize = limit = qsize
    count = 0
    in_table = False
    while True:
        count += 1
        if count > limit:
            raise WalkError(RingFault.LOOP, limit)
        # One read of the whole descriptor into locals (§5.4 rule 3).
        addr, length, flags, nxt = unpack(buf, base + DESC_SIZE * idx)
        if flags & DESC_F_INDIRECT:
            if in_table:
                raise WalkError(RingFault.INDIRECT_NESTED, 0)
            buf = _indirect_table(space, addr, length, flags, indirect_ok)
            base = 0
            tsize = limit = length // DESC_SIZE
            count = 0
            idx = 0
            in_table = True
            continue
        walk.add_buffer(space, addr, length, bool(flags & DESC_F_WRITE))
        if not flags & DESC_F_NEXT:
            return walk
        if nxt >= tsize:
            raise WalkError(RingFault.NEXT_RANGE, nxt)
        idx = nxt


def walk_packed(
    space: MemorySpace,
    ring: memoryview,
    ring_offset: int,
    qsize: int,
    slot: int,
    head_flags: int,
    indirect_ok: bool,
) -> tuple[Walk, int, int]:
    """Walk the packed chain whose head is at ``slot`` (C: vu_packed_walk).

    Args:
        space: the memory snapshot's tables.
        ring: the memoryview holding the descriptor ring.
        ring_offset: the ring's offset in ``ring``.
        qsize: the queue size (slots).
        slot: the head's slot.
        head_flags: the head's flags, from the acquire load that found it
            available.
        indirect_ok: whether indirect descriptors were negotiated.

    Returns:
        ``(walk, id, slots)``: the walk, the buffer id (from the last
        descriptor) and the ring slots the chain takes.

    Raises:
        WalkError: the chain is malformed.
    """
    walk = Walk()
    count = 0
    while True:
        count += 1
        if count > qsize:
            raise WalkError(RingFault.LOOP, qsize)
        where = ring_offset + DESC_SIZE * slot
        if count == 1:
            addr, length, ident = PACKED_HEAD.unpack_from(ring, where)
            flags = head_flags
        else:
            addr, length, ident, flags = DESC.unpack_from(ring, where)
        if flags & DESC_F_INDIRECT:
            table = _indirect_table(space, addr, length, flags, indirect_ok)
            for j in range(length // DESC_SIZE):
                e_addr, e_len, _, e_flags = DESC.unpack_from(table, DESC_SIZE * j)
                if e_flags & DESC_F_INDIRECT:
                    raise WalkError(RingFault.INDIRECT_NESTED, 0)
                walk.add_buffer(space, e_addr, e_len, bool(e_flags & DESC_F_WRITE))
            return walk, ident, count
        walk.add_buffer(space, addr, length, bool(flags & DESC_F_WRITE))
        if not flags & DESC_F_NEXT:
            return walk, ident, count
        slot = 0 if slot + 1 == qsize else slot + 1
