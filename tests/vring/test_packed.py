"""Packed rings: chains of every shape, wrap counters, event suppression
against the spec's formula, the packed GET/SET_VRING_BASE encoding, IN_ORDER
batching. Every test runs on both paths (``native`` fixture)."""

from __future__ import annotations

import os

import pytest

from vubackend.errors import DescriptorChainError, RingStateError
from vubackend.memory import GuestMemoryAtomic
from vubackend.vring import PackedDriverRing, QueueFeatures, VringState, need_event

from ._support import DATA, SPAN, Harness
from .conftest import MakeHarness

AVAIL, USED = 1 << 7, 1 << 15
ENABLE, DISABLE, DESC = 0, 1, 2


def packed(h: Harness) -> PackedDriverRing:
    assert isinstance(h.driver, PackedDriverRing)
    return h.driver


def test_direct_chain(harness: MakeHarness, native: bool) -> None:
    h = harness(packed=True, native=native)
    h.write(DATA, b"abc")
    ident = packed(h).add(
        [(DATA, 3, False), (DATA + 0x10, 4, True), (DATA + 0x20, 4, True)]
    )
    [c] = h.state.pop_chains()
    assert (c.head, c.ring_slots, c.readable_len, c.writable_len) == (ident, 3, 3, 8)
    assert c.read_all() == b"abc"
    assert c.write(b"12345678") == 8
    h.state.add_used(c.head, 8)
    assert packed(h).collect() == [(ident, 8)]
    assert h.read(DATA + 0x10, 4) + h.read(DATA + 0x20, 4) == b"12345678"


def test_indirect_chain_takes_one_slot(harness: MakeHarness, native: bool) -> None:
    h = harness(packed=True, native=native)
    ident = packed(h).add(
        [(DATA, 8, False), (SPAN, 0x40, True)], indirect_table=DATA + 0x1000
    )
    [c] = h.state.pop_chains()
    assert (c.head, c.ring_slots, c.descriptor_count) == (ident, 1, 2)
    assert len(c.writable_buffers()) == 2  # spans R0 and R1
    data = os.urandom(0x40)
    c.write(data)
    assert h.read(SPAN, 0x40) == data
    h.state.add_used(c.head, 0x40)
    assert packed(h).collect() == [(ident, 0x40)]


def test_wrap_counters_over_many_laps(harness: MakeHarness, native: bool) -> None:
    # Chains of 1..3 slots on a 7-slot ring (not a power of two): chains
    # straddle the end of the ring and the wrap counters flip every lap.
    h = harness(packed=True, native=native, size=7)
    d = packed(h)
    lengths = [1, 2, 3, 1, 3, 2, 2, 1, 3, 3, 1, 2] * 4
    i = 0
    laps = 0
    while i < len(lengths):
        batch: list[int] = []
        while i < len(lengths) and lengths[i] <= d.num_free:
            n = lengths[i]
            bufs = [(DATA + 0x100 * i + 0x10 * k, 4, k == n - 1) for k in range(n)]
            batch.append(d.add(bufs))
            i += 1
        chains = h.state.pop_chains()
        assert [c.head for c in chains] == batch
        before = h.state.vring_base()
        h.state.add_used_many((c.head, 4) for c in chains)
        assert d.collect() == [(x, 4) for x in batch]
        if h.state.vring_base() >> 31 != before >> 31:
            laps += 1
    assert laps >= 4
    base = h.state.vring_base()
    assert base & 0x7FFF == d.avail_position[0]
    assert base >> 15 & 1 == d.avail_position[1]
    assert base >> 16 & 0x7FFF == d.used_position[0]
    assert base >> 31 == d.used_position[1]


def test_out_of_order_completion(harness: MakeHarness, native: bool) -> None:
    h = harness(packed=True, native=native, size=8)
    d = packed(h)
    a = d.add([(DATA, 4, True), (DATA + 0x10, 4, True)])
    b = d.add([(DATA + 0x20, 4, True)])
    c = d.add([(DATA + 0x30, 4, True), (DATA + 0x40, 4, True), (DATA + 0x50, 4, True)])
    chains = h.state.pop_chains()
    assert [x.ring_slots for x in chains] == [2, 1, 3]
    h.state.add_used(c, 1)
    h.state.add_used(a, 2)
    h.state.add_used(b, 3)
    assert d.collect() == [(c, 1), (a, 2), (b, 3)]
    assert h.state.vring_base() == 6 | 1 << 15 | 6 << 16 | 1 << 31


def test_in_order_folds_zero_length_entries(harness: MakeHarness, native: bool) -> None:
    h = harness(packed=True, native=native, size=8, in_order=True)
    d = packed(h)
    ids = [d.add([(DATA + 0x10 * i, 4, True)]) for i in range(5)]
    chains = h.state.pop_chains()
    # Lengths 0, 0, 4, 0, 4: two used descriptors (one per run) instead of 5,
    # each at the slot where its run starts (the used position skips the
    # slots of the buffers a descriptor stands for).
    h.state.add_used_many(zip(ids, [0, 0, 4, 0, 4], strict=True))
    ring = h.read(h.desc, 16 * 8)
    used_flags = [
        int.from_bytes(ring[16 * s + 14 : 16 * s + 16], "little") for s in range(8)
    ]
    written = [s for s in range(5) if used_flags[s] & USED]
    assert written == [0, 3]
    assert d.collect() == [
        (ids[0], 0),
        (ids[1], 0),
        (ids[2], 4),
        (ids[3], 0),
        (ids[4], 4),
    ]
    assert len(chains) == 5


def test_packed_base_round_trip(
    harness: MakeHarness, native: bool, atomic: GuestMemoryAtomic
) -> None:
    h = harness(packed=True, native=native, size=5)
    d = packed(h)
    for _ in range(3):
        ids = [d.add([(DATA, 4, True), (DATA + 0x10, 4, True)]) for _ in range(2)]
        chains = h.state.pop_chains()
        h.state.add_used_many((x, 0) for x in ids)
        d.collect()
        assert len(chains) == 2
    # One more chain popped and left in flight: avail and used differ.
    pending = d.add([(DATA, 4, True)])
    assert h.state.pop_chains()
    base = h.state.vring_base()
    assert base == (
        d.avail_position[0]
        | d.avail_position[1] << 15
        | d.used_position[0] << 16
        | d.used_position[1] << 31
    )
    assert base & 0xFFFF != base >> 16
    h.state.set_queue_ready(False)
    resumed = VringState(atomic, 64, native=native)
    resumed.set_queue_features(QueueFeatures(packed=True))
    resumed.set_queue_size(5)
    resumed.set_vring_base(base)
    resumed.set_queue_info(h.desc, h.avail, h.used)
    resumed.set_queue_ready(True)
    assert resumed.vring_base() == base
    nxt = d.add([(DATA, 4, True)])
    assert [c.head for c in resumed.pop_chains()] == [nxt]
    resumed.add_used(nxt, 0)
    # The chain popped before the restart is out of our hands (the frontend
    # rewinds to the base it gave); the new completion lands at the used
    # position the base carried.
    assert d.collect() == [(nxt, 0)]
    assert d.in_flight == 1
    assert pending != nxt
    resumed.close()


def test_sixteen_bit_base_sets_used_to_avail(atomic: GuestMemoryAtomic) -> None:
    state = VringState(atomic, 64)
    state.set_queue_features(QueueFeatures(packed=True))
    state.set_queue_size(8)
    state.set_vring_base(3 | 1 << 15)  # DPDK virtio-user: low 16 bits only
    assert state.vring_base() == 3 | 1 << 15 | 3 << 16 | 1 << 31
    with pytest.raises(RingStateError, match="below the queue size"):
        state.set_vring_base(9)


def test_packed_config_rules(atomic: GuestMemoryAtomic) -> None:
    state = VringState(atomic, 64)
    state.set_queue_features(QueueFeatures(packed=True))
    state.set_queue_size(6)  # packed sizes need not be powers of two
    with pytest.raises(RingStateError):
        state.set_queue_info(0x1008, 0x2000, 0x2004)
    with pytest.raises(RingStateError):
        state.set_queue_info(0x1000, 0x2002, 0x2004)
    state.set_queue_info(0x1000, 0x2000, 0x2004)


# ---------------------------------------------------------------- notifications


def test_device_event_suppression(harness: MakeHarness, native: bool) -> None:
    h = harness(packed=True, native=native)
    d = packed(h)
    d.add([(DATA, 4, True)])
    assert d.kick_needed()
    h.state.disable_notification()
    d.add([(DATA, 4, True)])
    assert not d.kick_needed()
    assert h.state.enable_notification()  # work is pending
    d.add([(DATA, 4, True)])
    assert d.kick_needed()
    assert len(h.state.pop_chains()) == 3
    assert not h.state.enable_notification()


def test_driver_flags_enable_disable(harness: MakeHarness, native: bool) -> None:
    h = harness(packed=True, native=native)
    d = packed(h)
    ident = d.add([(DATA, 4, True)])
    h.state.pop_chains()
    h.state.add_used(ident, 0)
    d.set_interrupts(DISABLE)
    assert not h.state.needs_notification()
    d.set_interrupts(ENABLE)
    assert h.state.needs_notification()
    assert h.state.needs_notification()  # ENABLE: always


@pytest.mark.parametrize("offset", [-3, -1, 0, 1, 2, 4])
def test_desc_event_follows_the_formula(
    harness: MakeHarness, native: bool, offset: int
) -> None:
    size = 8
    h = harness(packed=True, native=native, size=size, event_idx=True)
    d = packed(h)
    assert h.state.needs_notification()  # first decision: unconditional
    old_pos, old_wrap = 0, 1
    for batch in (3, 2, 3, 1, 3):  # crosses the end of the ring
        ids = [d.add([(DATA + 0x10 * i, 4, True)]) for i in range(batch)]
        h.state.pop_chains()
        # The event position, `offset` slots from the old used position.
        event = old_pos + offset
        wrap = old_wrap
        if event >= size:
            event, wrap = event - size, wrap ^ 1
        elif event < 0:
            event, wrap = event + size, wrap ^ 1
        d.set_interrupts(DESC, event | wrap << 15)
        h.state.add_used_many((x, 0) for x in ids)
        new_pos = (old_pos + batch) % size
        new_wrap = old_wrap ^ (old_pos + batch >= size)
        # The spec's test on slot indices, in DPDK's wrap-corrected form.
        o = old_pos - size if new_pos <= old_pos else old_pos
        e = event - size if wrap != new_wrap else event
        expected = need_event(e & 0xFFFF, new_pos, o & 0xFFFF)
        assert h.state.needs_notification() == expected, (batch, event, wrap)
        d.collect()
        old_pos, old_wrap = new_pos, new_wrap


# ---------------------------------------------------------------- faults


def test_bad_id_breaks_the_ring(harness: MakeHarness, native: bool) -> None:
    h = harness(packed=True, native=native, size=4)
    d = packed(h)
    d.write_descriptor(0, DATA, 4, 9, AVAIL | 2)  # id 9 >= size
    with pytest.raises(DescriptorChainError, match="buffer id 9"):
        h.state.pop_chains()
    with pytest.raises(RingStateError, match="broken"):
        h.state.pop_chains()
    # SET_VRING_BASE (a restart) gives the ring another chance.
    h.state.set_vring_base(1 << 15 | 1 << 31)
    d.write_descriptor(0, DATA, 4, 1, AVAIL | 2)
    [c] = h.state.pop_chains()
    assert c.head == 1


def test_good_chains_before_a_bad_one_are_returned(
    harness: MakeHarness, native: bool
) -> None:
    h = harness(packed=True, native=native, size=4)
    d = packed(h)
    ok = d.add([(DATA, 4, True)])
    d.write_descriptor(1, 0x90000, 4, 2, AVAIL)  # unmapped buffer
    [c] = h.state.pop_chains()
    assert c.head == ok
    with pytest.raises(DescriptorChainError, match="not in guest memory"):
        h.state.pop_chains()
