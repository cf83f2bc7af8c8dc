# PackedDriverRing: the driver (guest) side of a packed virtqueue, for tests
# and for the frontend.
#
# Rules of this module:
# - It does what a guest driver does (virtio 1.x §2.8.13-§2.8.14): writes a
#   chain into consecutive slots from its avail position (AVAIL = its wrap
#   counter, USED = the inverse, NEXT on all but the last, the buffer id in
#   every descriptor), the head's flags last with a release store; decides
#   whether to kick from the device's event suppression structure; collects
#   used descriptors in order after an acquire of each one's flags, skipping
#   the slots of the chain each one completes.
# - Buffer ids are 0..size-1, taken from a free list (Linux does the same;
#   the device side relies on it). With IN_ORDER a used descriptor may stand
#   for every earlier outstanding buffer: those are returned with length 0.
# - A used id that is not in flight raises RingStateError.
# - The caller owns the GuestMemory snapshot and keeps it mapped.

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Sequence
from typing import Final, final

from vubackend._native import fence_seq_cst
from vubackend.errors import RingStateError
from vubackend.memory import GuestAddress, GuestMemory
from vubackend.vring._defs import (
    DESC_F_AVAIL,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_USED,
    DESC_F_WRITE,
    DESC_SIZE,
    EVENT_SUPPRESSION_SIZE,
    PACKED_WRAP_BIT,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    need_event,
)
from vubackend.vring._space import locate_part as _part

__all__ = ["PackedDriverRing", "packed_layout"]

_BODY: Final = struct.Struct("<QIH")
_DESC: Final = struct.Struct("<QIHH")
_LEN_ID: Final = struct.Struct("<IH")


def packed_layout(base: int, size: int) -> tuple[int, int, int, int]:
    """Addresses of a packed ring laid out from ``base`` (16-byte aligned):
    descriptor ring, driver event suppression area, device event suppression
    area, and the first address after them.

    Args:
        base: guest address of the descriptor ring.
        size: queue size.

    Returns:
        ``(desc, driver, device, end)``.
    """
    desc = base
    driver = desc + DESC_SIZE * size
    device = driver + EVENT_SUPPRESSION_SIZE
    return desc, driver, device, device + EVENT_SUPPRESSION_SIZE


@final
class PackedDriverRing:
    """The driver side of one packed virtqueue over a guest memory snapshot."""

    __slots__ = (
        "_avail_wrap",
        "_desc",
        "_device",
        "_driver",
        "_event_idx",
        "_free_ids",
        "_in_order",
        "_kick_pos",
        "_mem",
        "_next_avail",
        "_next_used",
        "_order",
        "_pending",
        "_size",
        "_slots",
        "_used_free",
        "_used_wrap",
    )

    def __init__(
        self,
        mem: GuestMemory,
        size: int,
        desc: int,
        driver: int,
        device: int,
        *,
        event_idx: bool = False,
        in_order: bool = False,
        reset: bool = True,
    ) -> None:
        """Attach to a ring (and by default zero it: a fresh queue).

        Args:
            mem: the guest memory holding the ring.
            size: queue size (1..32768).
            desc: descriptor ring address.
            driver: driver event suppression area.
            device: device event suppression area.
            event_idx: whether EVENT_IDX was negotiated.
            in_order: whether IN_ORDER was negotiated.
            reset: zero the descriptor ring and both areas first.

        Raises:
            RingStateError: a ring part is not mapped.
        """
        self._mem = mem
        self._size = size
        self._event_idx = event_idx
        self._in_order = in_order
        self._desc = _part(mem, desc, DESC_SIZE * size, "descriptor ring")
        self._driver = _part(mem, driver, EVENT_SUPPRESSION_SIZE, "driver area")
        self._device = _part(mem, device, EVENT_SUPPRESSION_SIZE, "device area")
        if reset:
            for part, length in (
                (self._desc, DESC_SIZE * size),
                (self._driver, EVENT_SUPPRESSION_SIZE),
                (self._device, EVENT_SUPPRESSION_SIZE),
            ):
                part.view[part.offset : part.offset + length] = bytes(length)
        self._next_avail = 0
        self._avail_wrap = 1
        self._next_used = 0
        self._used_wrap = 1
        self._free_ids: list[int] = list(range(size - 1, -1, -1))
        self._slots: dict[int, int] = {}
        self._order: deque[int] = deque()
        self._used_free = size
        self._pending: list[tuple[int, int]] = []
        self._kick_pos = (0, 1)

    # ------------------------------------------------------------ facts

    @property
    def size(self) -> int:
        """The queue size."""
        return self._size

    @property
    def num_free(self) -> int:
        """Free ring slots."""
        return self._used_free

    @property
    def in_flight(self) -> int:
        """Buffers made available and not yet collected."""
        return len(self._slots)

    @property
    def avail_position(self) -> tuple[int, int]:
        """(next avail slot, avail wrap counter)."""
        return self._next_avail, self._avail_wrap

    @property
    def used_position(self) -> tuple[int, int]:
        """(next used slot to look at, used wrap counter)."""
        return self._next_used, self._used_wrap

    def _avail_flags(self, wrap: int) -> int:
        return DESC_F_AVAIL if wrap else DESC_F_USED

    # ------------------------------------------------------------ raw access

    def write_descriptor(
        self, slot: int, addr: int, length: int, ident: int, flags: int
    ) -> None:
        """Write the descriptor at ``slot`` verbatim (flags included, plain
        store; tests build hostile rings with it).

        Args:
            slot: ring slot, below the size.
            addr: buffer address (u64).
            length: buffer length (u32).
            ident: buffer id (u16).
            flags: descriptor flags (u16).
        """
        part = self._desc
        _DESC.pack_into(
            part.view, part.offset + DESC_SIZE * slot, addr, length, ident, flags
        )

    def avail_flag_bits(self) -> int:
        """AVAIL/USED bits that make a descriptor available at the current
        avail position (for hand-built chains)."""
        return self._avail_flags(self._avail_wrap)

    # ------------------------------------------------------------ adding

    def add(
        self,
        buffers: Sequence[tuple[int, int, bool]],
        *,
        indirect_table: int | None = None,
        publish: bool = True,
    ) -> int:
        """Make a chain available (readable buffers first, then writable).

        Args:
            buffers: ``(gpa, length, writable)`` per buffer, at least one.
            indirect_table: put the buffers in an indirect table at this
                guest address and use one ring slot.
            publish: write the head's flags now (else :meth:`publish`).

        Returns:
            The buffer id.

        Raises:
            RingStateError: not enough free slots or ids, or no buffer.
        """
        if not buffers:
            raise RingStateError("a chain needs at least one buffer")
        needed = 1 if indirect_table is not None else len(buffers)
        if needed > self._used_free or not self._free_ids:
            raise RingStateError(
                f"driver ring: {needed} slots needed, {self._used_free} free"
            )
        ident = self._free_ids.pop()
        if indirect_table is not None:
            table = b"".join(
                _DESC.pack(gpa, length, 0, DESC_F_WRITE if writable else 0)
                for gpa, length, writable in buffers
            )
            self._mem.write(GuestAddress(indirect_table), table)
            descs = [(indirect_table, len(table), DESC_F_INDIRECT)]
        else:
            descs = [
                (
                    gpa,
                    length,
                    (DESC_F_WRITE if writable else 0)
                    | (DESC_F_NEXT if i + 1 < needed else 0),
                )
                for i, (gpa, length, writable) in enumerate(buffers)
            ]
        head_slot, head_wrap = self._next_avail, self._avail_wrap
        part = self._desc
        for i, (gpa, length, flags) in enumerate(descs):
            slot = self._next_avail
            where = part.offset + DESC_SIZE * slot
            _BODY.pack_into(part.view, where, gpa, length, ident)
            if i:
                # Not the head: plain stores, published by the head's release.
                struct.pack_into(
                    "<H",
                    part.view,
                    where + 14,
                    flags | self._avail_flags(self._avail_wrap),
                )
            self._next_avail += 1
            if self._next_avail == self._size:
                self._next_avail = 0
                self._avail_wrap ^= 1
        self._used_free -= needed
        self._slots[ident] = needed
        self._order.append(ident)
        self._pending.append((head_slot, descs[0][2] | self._avail_flags(head_wrap)))
        if publish:
            self.publish()
        return ident

    def publish(self) -> None:
        """Write the pending heads' flags, in order, each with a release
        store: the whole chain becomes visible at once (virtio §2.8.13)."""
        part = self._desc
        for slot, flags in self._pending:
            # ORDERING: release store of a head's flags publishes its chain
            # (driver side of §5.4 rule 2).
            part.atomic.store_u16(part.offset + DESC_SIZE * slot + 14, flags)
        self._pending.clear()

    def kick_needed(self) -> bool:
        """Whether to kick for the chains published since the last call
        (the device's event suppression structure, virtio §2.8.10).

        Returns:
            True to write the kick eventfd.
        """
        # Between publishing flags and reading the device's suppression.
        # ORDERING: full fence (the driver's mirror of §5.4 rule 5).
        fence_seq_cst()
        dev = self._device
        # ORDERING: acquire load of the device's flags (after the fence).
        flags = dev.atomic.load_u16(dev.offset + 2) & 3
        old_pos, _ = self._kick_pos
        new_pos, new_wrap = self._next_avail, self._avail_wrap
        moved = self._kick_pos != (new_pos, new_wrap)
        self._kick_pos = (new_pos, new_wrap)
        if flags == RING_EVENT_FLAGS_DISABLE or not moved:
            return False
        if flags != RING_EVENT_FLAGS_DESC or not self._event_idx:
            return True
        # ORDERING: acquire load of off_wrap (after the fence above).
        off_wrap = dev.atomic.load_u16(dev.offset)
        off = off_wrap & ((1 << PACKED_WRAP_BIT) - 1)
        if new_pos <= old_pos:
            old_pos -= self._size
        if off_wrap >> PACKED_WRAP_BIT != new_wrap:
            off -= self._size
        return need_event(off & 0xFFFF, new_pos, old_pos & 0xFFFF)

    # ------------------------------------------------------------ collecting

    def collect(self) -> list[tuple[int, int]]:
        """Collect used descriptors and free their slots and ids.

        Returns:
            ``(id, len)`` per completed buffer, in order (with IN_ORDER, the
            buffers a used descriptor stands for come first, length 0).

        Raises:
            RingStateError: the device returned an id that is not in flight.
        """
        part = self._desc
        out: list[tuple[int, int]] = []
        while self._slots:
            where = part.offset + DESC_SIZE * self._next_used
            # ORDERING: acquire load of the used flags, then id/len (§2.8.14).
            flags = part.atomic.load_u16(where + 14)
            wrap = self._used_wrap
            if bool(flags & DESC_F_AVAIL) != wrap or bool(flags & DESC_F_USED) != wrap:
                break
            length, ident = _LEN_ID.unpack_from(part.view, where + 8)
            if ident not in self._slots:
                raise RingStateError(
                    f"device returned id {ident}, which is not in flight"
                )
            done = [ident]
            if self._in_order:
                done = []
                while self._order:
                    first = self._order.popleft()
                    done.append(first)
                    if first == ident:
                        break
            else:
                self._order.remove(ident)
            for i, finished in enumerate(done):
                slots = self._slots.pop(finished)
                self._used_free += slots
                self._free_ids.append(finished)
                self._next_used += slots
                if self._next_used >= self._size:
                    self._next_used -= self._size
                    self._used_wrap ^= 1
                out.append((finished, length if i + 1 == len(done) else 0))
        return out

    # ------------------------------------------------------------ interrupts

    def set_interrupts(self, mode: int, off_wrap: int = 0) -> None:
        """Write the driver event suppression structure.

        Args:
            mode: ``0`` ENABLE, ``1`` DISABLE, ``2`` DESC (EVENT_IDX).
            off_wrap: with DESC: interrupt when the device's used position
                passes ``off_wrap & 0x7fff`` in wrap ``off_wrap >> 15``.
        """
        part = self._driver
        # Plain store of off_wrap: published by the flags store below.
        struct.pack_into("<H", part.view, part.offset, off_wrap & 0xFFFF)
        # ORDERING: release store of the driver's flags (virtio §2.8.10).
        part.atomic.store_u16(part.offset + 2, mode & 3)

    def enable_interrupts(self) -> bool:
        """Ask for interrupts on every used descriptor (ENABLE, or DESC at the
        next used position with EVENT_IDX), then re-check.

        Returns:
            True if a used descriptor is waiting.
        """
        if self._event_idx:
            self.set_interrupts(
                RING_EVENT_FLAGS_DESC,
                self._next_used | self._used_wrap << PACKED_WRAP_BIT,
            )
        else:
            self.set_interrupts(RING_EVENT_FLAGS_ENABLE)
        # ORDERING: full fence, then re-check (mirror of §5.4 rule 6).
        fence_seq_cst()
        part = self._desc
        # ORDERING: acquire load of the next used flags.
        flags = part.atomic.load_u16(part.offset + DESC_SIZE * self._next_used + 14)
        wrap = self._used_wrap
        return bool(self._slots) and (
            bool(flags & DESC_F_AVAIL) == wrap and bool(flags & DESC_F_USED) == wrap
        )

    def disable_interrupts(self) -> None:
        """Ask for no interrupts (DISABLE)."""
        self.set_interrupts(RING_EVENT_FLAGS_DISABLE)

    def __repr__(self) -> str:
        return (
            f"<PackedDriverRing size={self._size} avail={self._next_avail}/"
            f"{self._avail_wrap} used={self._next_used}/{self._used_wrap}>"
        )
