"""Split rings: chains of every shape, index wrap-around, notification
decisions against the spec's formula, save/restore, configuration rules.

Every test runs on both paths (the native batch walker and the Python
reference), through the ``native`` fixture.
"""

from __future__ import annotations

import os

import pytest

from vubackend.errors import RingStateError
from vubackend.memory import GuestAddress, GuestMemoryAtomic
from vubackend.vring import (
    QueueFeatures,
    SplitDriverRing,
    VringState,
    need_event,
)

from ._support import DATA, R0, SPAN, Harness
from .conftest import MakeHarness

F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4


def split(h: Harness) -> SplitDriverRing:
    assert isinstance(h.driver, SplitDriverRing)
    return h.driver


# ---------------------------------------------------------------- chain shapes


def test_direct_chain_readable_then_writable(
    harness: MakeHarness, native: bool
) -> None:
    h = harness(packed=False, native=native)
    h.write(DATA, b"hello ")
    h.write(DATA + 0x100, b"world")
    head = split(h).add(
        [
            (DATA, 6, False),
            (DATA + 0x100, 5, False),
            (DATA + 0x200, 4, True),
            (DATA + 0x300, 8, True),
        ]
    )
    [chain] = h.state.pop_chains()
    assert chain.head == head
    assert (chain.readable_len, chain.writable_len, chain.descriptor_count) == (
        11,
        12,
        4,
    )
    assert chain.read_all() == b"hello world"
    assert chain.write(b"0123456789abcdefXYZ") == 12  # the rest does not fit
    assert h.read(DATA + 0x200, 4) == b"0123"
    assert h.read(DATA + 0x300, 9) == b"456789ab\x00"
    h.state.add_used(chain.head, chain.bytes_written)
    assert split(h).collect() == [(head, 12)]
    assert h.state.pop_chains() == []


def test_indirect_chain(harness: MakeHarness, native: bool) -> None:
    h = harness(packed=False, native=native)
    h.write(DATA, b"req")
    head = split(h).add(
        [(DATA, 3, False), (DATA + 0x40, 16, True), (DATA + 0x80, 16, True)],
        indirect_table=DATA + 0x1000,
    )
    [chain] = h.state.pop_chains()
    assert chain.head == head
    assert (chain.readable_len, chain.writable_len, chain.descriptor_count) == (
        3,
        32,
        3,
    )
    assert chain.read(2) == b"re"
    assert chain.read(5) == b"q"
    chain.write(b"a" * 20)
    assert h.read(DATA + 0x40, 16) == b"a" * 16
    assert h.read(DATA + 0x80, 5) == b"aaaa\x00"
    assert split(h).num_free == h.size - 1


def test_direct_then_indirect(harness: MakeHarness, native: bool) -> None:
    # A direct descriptor whose NEXT leads to an indirect one (allowed: only
    # INDIRECT together with NEXT is forbidden).
    h = harness(packed=False, native=native)
    d = split(h)
    table = DATA + 0x2000
    h.write(table, bytes(32))
    h.mem.write(
        GuestAddress(table),
        (DATA + 0x10).to_bytes(8, "little")
        + (4).to_bytes(4, "little")
        + F_NEXT.to_bytes(2, "little")
        + (1).to_bytes(2, "little"),
    )
    h.mem.write(
        GuestAddress(table + 16),
        (DATA + 0x20).to_bytes(8, "little")
        + (8).to_bytes(4, "little")
        + F_WRITE.to_bytes(2, "little")
        + bytes(2),
    )
    d.write_descriptor(3, DATA, 2, F_NEXT, 5)
    d.write_descriptor(5, table, 32, F_INDIRECT | F_WRITE, 0)  # WRITE is ignored here
    d.push_head(3)
    d.publish()
    [chain] = h.state.pop_chains()
    assert chain.head == 3
    assert (chain.readable_len, chain.writable_len, chain.descriptor_count) == (6, 8, 3)
    assert [s.gpa for s in chain.segments()] == [DATA, DATA + 0x10, DATA + 0x20]


def test_buffer_spanning_regions(harness: MakeHarness, native: bool) -> None:
    h = harness(packed=False, native=native)
    payload = os.urandom(0x40)
    h.write(SPAN, payload)
    split(h).add([(SPAN, 0x40, False), (SPAN - 0x100, 0x140, True)])
    [chain] = h.state.pop_chains()
    segs = chain.segments()
    assert [(s.gpa, s.length, s.writable) for s in segs] == [
        (SPAN, 0x20, False),
        (0x40000, 0x20, False),
        (SPAN - 0x100, 0x120, True),
        (0x40000, 0x20, True),
    ]
    assert [len(v) for v in chain.readable_buffers()] == [0x20, 0x20]
    assert b"".join(chain.readable_buffers()) == payload
    assert chain.read_all() == payload
    data = os.urandom(0x140)
    assert chain.write(data) == 0x140
    assert h.read(SPAN - 0x100, 0x140) == data


def test_zero_length_descriptor_adds_no_segment(
    harness: MakeHarness, native: bool
) -> None:
    h = harness(packed=False, native=native)
    split(h).add(
        [(DATA, 0, False), (DATA + 0x10, 4, True), (0xDEAD_0000_0000, 0, True)]
    )
    [chain] = h.state.pop_chains()
    assert chain.descriptor_count == 3
    assert [(s.gpa, s.length) for s in chain.segments()] == [(DATA + 0x10, 4)]


def test_pop_limits(harness: MakeHarness, native: bool) -> None:
    h = harness(packed=False, native=native, size=8)
    heads = [split(h).add([(DATA + 0x100 * i, 8, True)]) for i in range(6)]
    first = h.state.pop_chains(2)
    assert [c.head for c in first] == heads[:2]
    one = h.state.pop_chain()
    assert one is not None
    assert one.head == heads[2]
    rest = h.state.pop_chains()
    assert [c.head for c in rest] == heads[3:]
    assert h.state.pop_chain() is None
    assert h.state.queue_next_avail() == 6


# ---------------------------------------------------------------- wrap-around


@pytest.mark.parametrize("start", [0, 0xFFF0, 0xFFFF])
def test_index_wrap_around(harness: MakeHarness, native: bool, start: int) -> None:
    h = harness(packed=False, native=native, size=16, vring_base=start)
    d = split(h)
    done = 0
    for round_ in range(5):
        heads = [
            d.add([(DATA + 0x40 * i, 4, False), (DATA + 0x1000 + 0x40 * i, 4, True)])
            for i in range(7)
        ]
        chains = h.state.pop_chains()
        assert [c.head for c in chains] == heads
        for c in chains:
            c.write(round_.to_bytes(4, "little"))
        h.state.add_used_many((c.head, c.bytes_written) for c in chains)
        assert d.collect() == [(x, 4) for x in heads]
        done += 7
        assert h.state.queue_next_avail() == (start + done) & 0xFFFF
        assert h.state.queue_used_idx() == (start + done) & 0xFFFF


# ---------------------------------------------------------------- notifications


def test_no_notify_flag(harness: MakeHarness, native: bool) -> None:
    h = harness(packed=False, native=native)
    d = split(h)
    d.add([(DATA, 4, True)])
    assert d.kick_needed()
    h.state.disable_notification()
    d.add([(DATA, 4, True)])
    assert not d.kick_needed()
    # Re-enabling reports the pending work (§5.4 rule 6) and re-arms kicks.
    assert h.state.enable_notification()
    d.add([(DATA, 4, True)])
    assert d.kick_needed()
    assert len(h.state.pop_chains()) == 3
    assert not h.state.enable_notification()


def test_no_interrupt_flag(harness: MakeHarness, native: bool) -> None:
    h = harness(packed=False, native=native)
    d = split(h)
    d.add([(DATA, 4, True)])
    [c] = h.state.pop_chains()
    h.state.add_used(c.head, 0)
    assert h.state.needs_notification()
    d.disable_interrupts()
    assert not h.state.needs_notification()
    assert not d.enable_interrupts() or d.collect()


@pytest.mark.parametrize("start", [0, 0xFFF8])
@pytest.mark.parametrize("used_event_delta", [-2, -1, 0, 1, 2, 3, 5, 0x8000])
def test_used_event_decisions_follow_the_formula(
    harness: MakeHarness, native: bool, start: int, used_event_delta: int
) -> None:
    h = harness(packed=False, native=native, size=8, event_idx=True, vring_base=start)
    d = split(h)
    # The first decision after a start is unconditional (no valid old index).
    assert h.state.needs_notification()
    old = start
    for batch in (1, 3, 2):
        for i in range(batch):
            d.add([(DATA + 0x10 * i, 4, True)])
        chains = h.state.pop_chains()
        used_event = (old + used_event_delta) & 0xFFFF
        d.set_used_event(used_event)
        h.state.add_used_many((c.head, 0) for c in chains)
        new = (old + batch) & 0xFFFF
        assert h.state.needs_notification() == need_event(used_event, new, old)
        assert not h.state.needs_notification()  # nothing new since
        d.collect()
        old = new


def test_avail_event_rearms_kicks(harness: MakeHarness, native: bool) -> None:
    h = harness(packed=False, native=native, size=8, event_idx=True)
    d = split(h)
    ev_off = h.used + 4 + 8 * h.size
    d.add([(DATA, 4, True)])
    assert d.kick_needed()  # avail_event is 0, the first entry
    assert h.state.pop_chains()
    # The pop that found the ring empty wrote avail_event = next avail.
    assert int.from_bytes(h.read(ev_off, 2), "little") == 1
    d.add([(DATA, 4, True)])
    assert d.kick_needed()
    d.add([(DATA, 4, True)])
    assert not d.kick_needed()  # the device has not caught up: no new kick
    assert len(h.state.pop_chains()) == 2
    # With notifications disabled, popping no longer moves avail_event.
    h.state.disable_notification()
    d.add([(DATA, 4, True)])
    assert d.kick_needed()
    h.state.pop_chains()
    assert int.from_bytes(h.read(ev_off, 2), "little") == 3
    d.add([(DATA, 4, True)])
    assert not d.kick_needed()
    assert h.state.enable_notification()  # pending: process before sleeping
    assert int.from_bytes(h.read(ev_off, 2), "little") == 4


# ---------------------------------------------------------------- save/restore


def test_save_and_restore_positions(
    harness: MakeHarness, native: bool, atomic: GuestMemoryAtomic
) -> None:
    h = harness(packed=False, native=native, size=8)
    d = split(h)
    heads = [d.add([(DATA + 0x10 * i, 4, True)]) for i in range(5)]
    chains = h.state.pop_chains(3)
    h.state.add_used_many((c.head, 0) for c in chains[:2])
    # GET_VRING_BASE: the next available index.
    assert h.state.vring_base() == 3
    h.state.set_queue_ready(False)
    with pytest.raises(RingStateError, match="not ready"):
        h.state.pop_chains()
    # A new backend resumes at the base; used.idx comes from guest memory.
    resumed = VringState(atomic, 256, native=native)
    resumed.set_queue_size(8)
    resumed.set_vring_base(3)
    resumed.set_queue_info(h.desc, h.avail, h.used)
    resumed.set_queue_ready(True)
    assert resumed.queue_used_idx() == 2
    assert [c.head for c in resumed.pop_chains()] == heads[3:]
    resumed.add_used(heads[3], 0)
    assert d.collect() == [(heads[0], 0), (heads[1], 0), (heads[3], 0)]
    # Chains popped before SET_VRING_BASE are forgotten.
    with pytest.raises(ValueError, match="not in flight"):
        resumed.add_used(heads[2], 0)
    resumed.close()


def test_stop_and_restart_many_times(harness: MakeHarness, native: bool) -> None:
    h = harness(packed=False, native=native, size=4)
    d = split(h)
    for _ in range(5):
        head = d.add([(DATA, 4, True)])
        [c] = h.state.pop_chains()
        h.state.add_used(c.head, 0)
        assert d.collect() == [(head, 0)]
        base = h.state.vring_base()
        h.state.set_queue_ready(False)
        h.state.set_vring_base(base)
        h.state.set_queue_info(h.desc, h.avail, h.used)
        h.state.set_queue_ready(True)


# ---------------------------------------------------------------- configuration rules


@pytest.mark.parametrize("size", [0, 3, 12, 32769, 65536])
def test_size_rules(atomic: GuestMemoryAtomic, size: int) -> None:
    state = VringState(atomic, 32768)
    with pytest.raises(RingStateError):
        state.set_queue_size(size)


def test_size_above_device_maximum(atomic: GuestMemoryAtomic) -> None:
    state = VringState(atomic, 64)
    state.set_queue_size(64)
    with pytest.raises(RingStateError, match="device maximum"):
        state.set_queue_size(128)
    with pytest.raises(RingStateError):
        VringState(atomic, 65536)


@pytest.mark.parametrize(
    ("desc", "avail", "used"),
    [
        (0x1008, 0x2000, 0x3000),
        (0x1000, 0x2001, 0x3000),
        (0x1000, 0x2000, 0x3002),
        (-16, 0, 0),
        (1 << 64, 0, 0),
    ],
)
def test_address_alignment(
    atomic: GuestMemoryAtomic, desc: int, avail: int, used: int
) -> None:
    state = VringState(atomic, 256)
    with pytest.raises(RingStateError):
        state.set_queue_info(desc, avail, used)


def test_rings_must_lie_in_memory(atomic: GuestMemoryAtomic, native: bool) -> None:
    state = VringState(atomic, 256, native=native)
    state.set_queue_size(16)
    state.set_queue_info(0x80000 - 0x80, 0x1000, 0x2000)  # desc runs into the gap
    state.set_queue_ready(True)
    with pytest.raises(RingStateError, match="descriptor table"):
        state.pop_chains()


@pytest.mark.parametrize("event_idx", [False, True])
def test_event_idx_extra_bytes_must_be_mapped(
    atomic: GuestMemoryAtomic, native: bool, event_idx: bool
) -> None:
    size = 16
    used = R0[0] + R0[1] - (4 + 8 * size)  # the used ring ends with region R0
    assert used % 4 == 0
    state = VringState(atomic, 256, native=native)
    state.set_queue_features(QueueFeatures(event_idx=event_idx))
    state.set_queue_size(size)
    state.set_queue_info(0x1000, 0x2000, used)
    state.set_queue_ready(True)
    # R0 is followed by R1, so the 2 extra bytes are mapped but in another
    # region: a ring part must be inside one region.
    if event_idx:
        with pytest.raises(RingStateError, match="used ring"):
            state.pop_chains()
    else:
        assert state.pop_chains() == []


# ---------------------------------------------------------------- used entries


def test_add_used_is_checked(harness: MakeHarness, native: bool) -> None:
    h = harness(packed=False, native=native)
    d = split(h)
    head = d.add([(DATA, 4, False), (DATA + 0x10, 8, True)])
    [c] = h.state.pop_chains()
    with pytest.raises(ValueError, match="exceeds its writable bytes"):
        h.state.add_used(c.head, 9)
    with pytest.raises(ValueError, match="not in flight"):
        h.state.add_used((head + 1) % h.size, 0)
    with pytest.raises(ValueError, match="not below the queue size"):
        h.state.add_used(h.size, 0)
    with pytest.raises(ValueError, match="not in flight"):
        h.state.add_used_many([(c.head, 1), (c.head, 1)])  # twice in one batch
    assert d.used_pending() == 0  # nothing was written
    h.state.add_used(c.head, 8)
    with pytest.raises(ValueError, match="not in flight"):
        h.state.add_used(c.head, 8)
    assert d.collect() == [(head, 8)]


def test_dirty_log_marks_buffers_and_used_ring(
    harness: MakeHarness, native: bool, atomic: GuestMemoryAtomic
) -> None:
    from vubackend.bitmap import DirtyLog

    log_buf = bytearray(0x140000 // 0x1000 // 8)
    atomic.set_log(DirtyLog(log_buf))
    h = harness(packed=False, native=native)
    h.state.set_log_used(True)
    split(h).add([(0x100000 + 0x3000, 0x10, True)])
    [c] = h.state.pop_chains()
    c.write(b"z" * 0x10)
    h.state.add_used(c.head, 0x10)
    pages = {i * 8 + b for i, v in enumerate(log_buf) for b in range(8) if v >> b & 1}
    assert 0x103 in pages  # the buffer's page
    assert h.used // 0x1000 in pages  # the used ring's page
    assert 0x20 not in pages  # DATA: not written
