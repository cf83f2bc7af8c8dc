"""The driver-side rings on their own: kick decisions (including the packed
DESC mode our device never asks for), interrupts, full rings, and a device
that returns ids it was never given."""

from __future__ import annotations

import struct

import pytest

from vubackend.errors import RingStateError
from vubackend.memory import GuestAddress
from vubackend.vring import PackedDriverRing, SplitDriverRing, need_event

from ._support import DATA, Harness
from .conftest import MakeHarness


def split(h: Harness) -> SplitDriverRing:
    assert isinstance(h.driver, SplitDriverRing)
    return h.driver


def packed(h: Harness) -> PackedDriverRing:
    assert isinstance(h.driver, PackedDriverRing)
    return h.driver


def test_split_driver_full_ring_and_bad_chain(harness: MakeHarness) -> None:
    h = harness(packed=False, native=True, size=4)
    d = split(h)
    with pytest.raises(RingStateError, match="at least one buffer"):
        d.add([])
    d.add([(DATA, 4, False)] * 3)
    with pytest.raises(RingStateError, match="2 descriptors needed, 1 free"):
        d.add([(DATA, 4, False)] * 2)
    d.add([(DATA, 4, True)], indirect_table=DATA + 0x1000)
    assert (d.num_free, d.in_flight, d.avail_idx) == (0, 2, 2)
    assert "free=0" in repr(d)


def test_split_driver_refuses_unknown_used_ids(harness: MakeHarness) -> None:
    h = harness(packed=False, native=True, size=4)
    d = split(h)
    d.add([(DATA, 4, True)])
    # A device that writes a used element for a head it never got.
    h.mem.write(GuestAddress(h.used + 4), struct.pack("<II", 3, 0))
    region, offset = h.mem.locate(GuestAddress(h.used + 2), 2)
    region.atomic.store_u16(offset, 1)  # (test stand-in for a device)
    with pytest.raises(RingStateError, match="id 3, which is not in flight"):
        d.collect()


def test_split_driver_used_event(harness: MakeHarness) -> None:
    h = harness(packed=False, native=True, size=8, event_idx=True)
    d = split(h)
    assert d.enable_interrupts() is False
    ev = int.from_bytes(h.read(h.avail + 4 + 2 * 8, 2), "little")
    assert ev == d.last_used == 0
    d.add([(DATA, 4, True)])
    [c] = h.state.pop_chains()
    h.state.add_used(c.head, 0)
    assert d.used_pending() == 1
    assert d.enable_interrupts() is True  # pending: collect before sleeping
    assert d.collect() == [(c.head, 0)]


@pytest.mark.parametrize("event_off", [0, 1, 2, 3, 5, 7])
def test_packed_driver_kick_in_desc_mode(harness: MakeHarness, event_off: int) -> None:
    size = 8
    h = harness(packed=True, native=True, size=size, event_idx=True)
    d = packed(h)
    # The device asks for a kick when the driver passes slot event_off of
    # wrap 1 (DESC mode, which our device never uses, so write it here).
    h.mem.write(GuestAddress(h.used), struct.pack("<HH", event_off | 1 << 15, 2))
    old = 0
    for batch in (2, 3):
        for _ in range(batch):
            d.add([(DATA, 4, True)])
        new = old + batch
        assert d.kick_needed() == need_event(event_off, new, old), (batch, event_off)
        old = new


def test_packed_driver_kick_modes(harness: MakeHarness) -> None:
    h = harness(packed=True, native=True, size=8)
    d = packed(h)
    assert d.kick_needed() is False  # nothing new
    d.add([(DATA, 4, True)])
    h.mem.write(GuestAddress(h.used + 2), struct.pack("<H", 1))  # DISABLE
    assert d.kick_needed() is False
    d.add([(DATA, 4, True)])
    h.mem.write(GuestAddress(h.used + 2), struct.pack("<H", 0))  # ENABLE
    assert d.kick_needed() is True


def test_packed_driver_unpublished_chains_are_invisible(harness: MakeHarness) -> None:
    h = harness(packed=True, native=True, size=8)
    d = packed(h)
    ident = d.add([(DATA, 4, True), (DATA + 0x10, 4, True)], publish=False)
    assert h.state.pop_chains() == []
    d.publish()
    [c] = h.state.pop_chains()
    assert c.head == ident
    assert d.avail_position == (2, 1)
    assert d.enable_interrupts() is False
    h.state.add_used(c.head, 8)
    assert d.enable_interrupts() is True
    assert d.collect() == [(ident, 8)]
    assert d.used_position == (2, 1)
    d.disable_interrupts()
    assert h.state.needs_notification() is False


def test_packed_driver_refuses_unknown_used_ids(harness: MakeHarness) -> None:
    h = harness(packed=True, native=True, size=4)
    d = packed(h)
    d.add([(DATA, 4, True)])
    used = 1 << 7 | 1 << 15
    h.mem.write(GuestAddress(h.desc + 8), struct.pack("<IHH", 0, 3, used))
    with pytest.raises(RingStateError, match="id 3, which is not in flight"):
        d.collect()
