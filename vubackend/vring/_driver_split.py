# SplitDriverRing: the driver (guest) side of a split virtqueue, for tests
# and for the frontend, which drives real backends with it.
#
# Rules of this module:
# - It does what a guest driver does (virtio 1.x §2.7.13-§2.7.14): takes free
#   descriptors, writes a chain (optionally through an indirect table it is
#   given room for), puts the head in avail.ring, publishes avail.idx with a
#   release store, decides whether to kick (NO_NOTIFY / avail_event, after a
#   full fence), and collects used elements after an acquire of used.idx.
# - It trusts the device no more than it must: a used id that is not a chain
#   we made available raises RingStateError instead of corrupting the free
#   list.
# - The ring parts live in one GuestMemory snapshot that the caller owns and
#   keeps mapped (the frontend's own memory). Writes go through the region
#   views directly; the driver's writes are not the backend's to log.
# - Raw access (write_descriptor, push_head, set_avail_idx) lets tests build
#   hostile rings that no well-behaved driver would.

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Final, final

from vubackend._native import fence_seq_cst
from vubackend.errors import RingStateError
from vubackend.memory import GuestAddress, GuestMemory
from vubackend.vring._defs import (
    AVAIL_ELEM,
    AVAIL_F_NO_INTERRUPT,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    DESC_SIZE,
    RING_HEADER,
    USED_ELEM,
    USED_F_NO_NOTIFY,
    need_event,
    split_ring_sizes,
)
from vubackend.vring._space import locate_part as _part

__all__ = ["SplitDriverRing", "split_layout"]

_DESC: Final = struct.Struct("<QIHH")
_U16: Final = struct.Struct("<H")
_ELEM: Final = struct.Struct("<II")


def _int(fmt: struct.Struct, view: memoryview, offset: int) -> int:
    value: int = fmt.unpack_from(view, offset)[0]
    return value


def split_layout(
    base: int, size: int, *, event_idx: bool = True
) -> tuple[int, int, int, int]:
    """Addresses of a split ring laid out from ``base`` (16-byte aligned):
    descriptor table, available ring, used ring (4-aligned after the avail
    ring), and the first address after the ring.

    Args:
        base: guest address of the descriptor table.
        size: queue size.
        event_idx: leave room for the event fields.

    Returns:
        ``(desc, avail, used, end)``.
    """
    dlen, alen, ulen = split_ring_sizes(size, event_idx)
    desc = base
    avail = desc + dlen
    used = (avail + alen + 3) & ~3
    return desc, avail, used, used + ulen


@final
class SplitDriverRing:
    """The driver side of one split virtqueue over a guest memory snapshot."""

    __slots__ = (
        "_avail",
        "_chains",
        "_desc",
        "_event_idx",
        "_free",
        "_kicked_at",
        "_last_used",
        "_mem",
        "_published",
        "_shadow",
        "_size",
        "_used",
    )

    def __init__(
        self,
        mem: GuestMemory,
        size: int,
        desc: int,
        avail: int,
        used: int,
        *,
        event_idx: bool = False,
        reset: bool = True,
        start: int = 0,
    ) -> None:
        """Attach to a ring (and by default zero its rings: a fresh queue).

        Args:
            mem: the guest memory holding the ring.
            size: queue size (power of two).
            desc: descriptor table address.
            avail: available ring address.
            used: used ring address.
            event_idx: whether EVENT_IDX was negotiated.
            reset: zero the available and used rings first; False attaches
                to a ring that has been running (indices from memory, no
                chain in flight).
            start: with ``reset``, start both indices here, as if the ring
                had run that far (``avail.idx = used.idx = start``).

        Raises:
            RingStateError: a ring part is not mapped.
        """
        dlen, alen, ulen = split_ring_sizes(size, event_idx)
        self._mem = mem
        self._size = size
        self._event_idx = event_idx
        self._desc = _part(mem, desc, dlen, "descriptor table")
        self._avail = _part(mem, avail, alen, "available ring")
        self._used = _part(mem, used, ulen, "used ring")
        if reset:
            for part, length in ((self._avail, alen), (self._used, ulen)):
                part.view[part.offset : part.offset + length] = bytes(length)
        self._free: list[int] = list(range(size - 1, -1, -1))
        self._chains: dict[int, list[int]] = {}
        if not reset:
            # Attach to a running ring: continue from the indices in memory
            # (the descriptors of chains in flight are not known: none are
            # free until the ring drains, which collect() cannot tell; the
            # caller attaches when nothing is in flight).
            start = _int(_U16, self._avail.view, self._avail.offset + 2)
            last_used = _int(_U16, self._used.view, self._used.offset + 2)
        else:
            start = last_used = start & 0xFFFF
            if start:
                _U16.pack_into(self._avail.view, self._avail.offset + 2, start)
                _U16.pack_into(self._used.view, self._used.offset + 2, start)
        self._shadow = start
        self._published = start
        self._kicked_at = start
        self._last_used = last_used

    # ------------------------------------------------------------ facts

    @property
    def size(self) -> int:
        """The queue size."""
        return self._size

    @property
    def num_free(self) -> int:
        """Free descriptors."""
        return len(self._free)

    @property
    def in_flight(self) -> int:
        """Chains made available and not yet collected."""
        return len(self._chains)

    @property
    def avail_idx(self) -> int:
        """The avail index as published."""
        return self._published

    @property
    def last_used(self) -> int:
        """The used index up to which entries were collected."""
        return self._last_used

    # ------------------------------------------------------------ raw access

    def write_descriptor(
        self, index: int, addr: int, length: int, flags: int, nxt: int
    ) -> None:
        """Write descriptor ``index`` verbatim (tests build hostile tables).

        Args:
            index: table slot, below the size.
            addr: buffer address (u64).
            length: buffer length (u32).
            flags: descriptor flags (u16).
            nxt: next index (u16).
        """
        part = self._desc
        _DESC.pack_into(
            part.view, part.offset + DESC_SIZE * index, addr, length, flags, nxt
        )

    def push_head(self, head: int) -> None:
        """Put ``head`` (any u16) in the next avail entry without publishing."""
        part = self._avail
        off = part.offset + RING_HEADER + AVAIL_ELEM * (self._shadow % self._size)
        _U16.pack_into(part.view, off, head)
        self._shadow = (self._shadow + 1) & 0xFFFF

    def set_avail_idx(self, value: int) -> None:
        """Publish ``avail.idx = value`` as is (tests: jumps, rewinds).

        Args:
            value: u16.
        """
        self._shadow = value & 0xFFFF
        self.publish()

    # ------------------------------------------------------------ adding

    def add(
        self,
        buffers: Sequence[tuple[int, int, bool]],
        *,
        indirect_table: int | None = None,
        publish: bool = True,
    ) -> int:
        """Make a chain available: readable buffers first, then writable
        ones (the caller orders them).

        Args:
            buffers: ``(gpa, length, writable)`` per buffer, at least one.
            indirect_table: put the buffers in an indirect table at this
                guest address (16 bytes per buffer, written here) and use one
                ring descriptor.
            publish: publish ``avail.idx`` now (else call :meth:`publish`).

        Returns:
            The head index (the id the device hands back).

        Raises:
            RingStateError: not enough free descriptors, or no buffer.
        """
        if not buffers:
            raise RingStateError("a chain needs at least one buffer")
        needed = 1 if indirect_table is not None else len(buffers)
        if needed > len(self._free):
            raise RingStateError(
                f"driver ring: {needed} descriptors needed, {len(self._free)} free"
            )
        taken = [self._free.pop() for _ in range(needed)]
        if indirect_table is not None:
            table = bytearray()
            for i, (gpa, length, writable) in enumerate(buffers):
                flags = (DESC_F_WRITE if writable else 0) | (
                    DESC_F_NEXT if i + 1 < len(buffers) else 0
                )
                table += _DESC.pack(
                    gpa, length, flags, i + 1 if i + 1 < len(buffers) else 0
                )
            self._mem.write(GuestAddress(indirect_table), table)
            self.write_descriptor(
                taken[0], indirect_table, len(table), DESC_F_INDIRECT, 0
            )
        else:
            for i, (gpa, length, writable) in enumerate(buffers):
                last = i + 1 == len(buffers)
                flags = (DESC_F_WRITE if writable else 0) | (0 if last else DESC_F_NEXT)
                self.write_descriptor(
                    taken[i], gpa, length, flags, 0 if last else taken[i + 1]
                )
        head = taken[0]
        self._chains[head] = taken
        self.push_head(head)
        if publish:
            self.publish()
        return head

    def publish(self) -> None:
        """Publish the entries added so far (``avail.idx``), after the
        descriptors and ring entries they refer to."""
        part = self._avail
        # ORDERING: release store of avail.idx: descriptors and ring entries
        # before it (driver side of §5.4 rule 1; virtio §2.7.13).
        part.atomic.store_u16(part.offset + 2, self._shadow)
        self._published = self._shadow

    def kick_needed(self) -> bool:
        """Whether to kick the device for the entries published since the
        last call (virtio §2.7.10 / §2.7.13.4).

        Returns:
            True to write the kick eventfd.
        """
        # Between publishing avail.idx and reading the device's suppression.
        # ORDERING: full fence (the driver's mirror of §5.4 rule 5).
        fence_seq_cst()
        new, old = self._published, self._kicked_at
        self._kicked_at = new
        used = self._used
        if self._event_idx:
            # ORDERING: acquire load of avail_event (after the fence above).
            event = used.atomic.load_u16(
                used.offset + RING_HEADER + USED_ELEM * self._size
            )
            return need_event(event, new, old)
        # ORDERING: acquire load of used.flags (after the fence above).
        return not used.atomic.load_u16(used.offset) & USED_F_NO_NOTIFY

    # ------------------------------------------------------------ collecting

    def used_pending(self) -> int:
        """Used entries the device published that were not collected yet."""
        # ORDERING: acquire load of used.idx (virtio §2.7.14).
        idx = self._used.atomic.load_u16(self._used.offset + 2)
        return (idx - self._last_used) & 0xFFFF

    def collect(self) -> list[tuple[int, int]]:
        """Collect the used entries and free their descriptors.

        Returns:
            ``(id, len)`` per used element, in order.

        Raises:
            RingStateError: the device returned an id that is not in flight.
        """
        used = self._used
        # The elements below are read after this load.
        # ORDERING: acquire load of used.idx (virtio §2.7.14, §5.4 rule 4).
        idx = used.atomic.load_u16(used.offset + 2)
        out: list[tuple[int, int]] = []
        while self._last_used != idx:
            off = used.offset + RING_HEADER + USED_ELEM * (self._last_used % self._size)
            ident, length = _ELEM.unpack_from(used.view, off)
            taken = self._chains.pop(ident, None)
            if taken is None:
                raise RingStateError(
                    f"device returned id {ident}, which is not in flight"
                )
            self._free.extend(reversed(taken))
            out.append((ident, length))
            self._last_used = (self._last_used + 1) & 0xFFFF
        return out

    # ------------------------------------------------------------ interrupts

    def enable_interrupts(self) -> bool:
        """Ask for interrupts again (clear NO_INTERRUPT, or set ``used_event``
        to the next entry), then re-check.

        Returns:
            True if used entries are pending (collect before sleeping).
        """
        avail = self._avail
        if self._event_idx:
            off = avail.offset + RING_HEADER + AVAIL_ELEM * self._size
            # ORDERING: release store of used_event (driver side of rule 6).
            avail.atomic.store_u16(off, self._last_used)
        else:
            # ORDERING: release store of avail.flags (driver side of rule 6).
            avail.atomic.store_u16(avail.offset, 0)
        # ORDERING: full fence, then re-check used.idx (mirror of §5.4 rule 6).
        fence_seq_cst()
        return self.used_pending() != 0

    def disable_interrupts(self) -> None:
        """Ask for no interrupts (NO_INTERRUPT; a hint the device may ignore)."""
        avail = self._avail
        # ORDERING: release store of avail.flags (a hint; virtio §2.7.10).
        avail.atomic.store_u16(avail.offset, AVAIL_F_NO_INTERRUPT)

    def set_used_event(self, value: int) -> None:
        """Write ``used_event`` (EVENT_IDX): interrupt when used.idx passes it.

        Args:
            value: u16.
        """
        avail = self._avail
        off = avail.offset + RING_HEADER + AVAIL_ELEM * self._size
        # ORDERING: release store of used_event.
        avail.atomic.store_u16(off, value & 0xFFFF)

    def __repr__(self) -> str:
        return (
            f"<SplitDriverRing size={self._size} avail={self._published} "
            f"used={self._last_used} free={len(self._free)}>"
        )
