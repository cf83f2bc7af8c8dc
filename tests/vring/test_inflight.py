"""Inflight tracking on a split ring, without the daemon: what the ring
records, in which order, and what it resubmits after a "reconnect" (a new
VringState on the same guest rings)."""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Sequence

import pytest

from vubackend.daemon._inflight import InflightBuffer
from vubackend.errors import DescriptorChainError, RingStateError
from vubackend.memory import GuestMemoryAtomic
from vubackend.vring import (
    DescriptorChain,
    PackedDriverRing,
    QueueFeatures,
    SplitDriverRing,
    VringState,
)
from vubackend.vring._packed import decode_packed_base
from vubackend.vring._tracker import NativeInflightTracker

from ._support import DATA, Harness
from .conftest import MakeHarness

SIZE = 16


def split(h: Harness) -> SplitDriverRing:
    assert isinstance(h.driver, SplitDriverRing)
    return h.driver


def used_idx(h: Harness) -> int:
    return int(struct.unpack("<H", h.read(h.used + 2, 2))[0])


def add(h: Harness, n: int) -> list[int]:
    return [split(h).add([(DATA + 0x100 * i, 8, True)]) for i in range(n)]


def restart(h: Harness, atomic: GuestMemoryAtomic, native: bool) -> VringState:
    """A new back-end's ring on the same guest rings (after a reconnect)."""
    state = VringState(atomic, 32768, native=native)
    state.set_queue_features(QueueFeatures(indirect=True))
    state.set_queue_size(SIZE)
    state.set_queue_info(h.desc, h.avail, h.used)
    state.set_queue_ready(True)
    return state


class Recorder:
    """A tracker that logs its calls with used.idx as the driver sees it."""

    def __init__(self, h: Harness) -> None:
        self.h = h
        self.calls: list[tuple[str, list[int], int]] = []

    def begin(self, heads: Sequence[int]) -> None:
        self.calls.append(("begin", list(heads), used_idx(self.h)))

    def link(self, heads: Sequence[int]) -> None:
        self.calls.append(("link", list(heads), used_idx(self.h)))

    def complete(self, heads: Sequence[int], used: int) -> None:
        assert used == used_idx(self.h), "completed before used.idx was published"
        self.calls.append(("complete", list(heads), used))

    def pending(self) -> list[int]:
        return []

    def recover(self, used: int) -> list[int]:
        self.calls.append(("recover", [], used))
        return []


def test_calls_follow_the_spec_order(harness: MakeHarness, native: bool) -> None:
    h = harness(packed=False, native=native, size=SIZE)
    recorder = Recorder(h)
    assert h.state.set_inflight(recorder) == 0
    heads = add(h, 3)
    chains = h.state.pop_chains()
    assert [c.head for c in chains] == heads
    h.state.add_used(heads[1], 0)
    h.state.add_used_many([(heads[0], 1), (heads[2], 2)])
    assert recorder.calls == [
        ("recover", [], 0),
        ("begin", heads, 0),
        ("link", [heads[1]], 0),
        ("complete", [heads[1]], 1),
        ("link", [heads[0], heads[2]], 1),
        ("complete", [heads[0], heads[2]], 3),
    ]
    # A push that fails is not completed.
    with pytest.raises(ValueError):
        h.state.add_used(heads[0], 0)
    assert recorder.calls[-1][0] == "link"


def test_a_drain_records_in_the_spec_order_and_clears_after_signalling(
    harness: MakeHarness, native: bool
) -> None:
    """drain() with a tracker: each chain recorded before it is served, its
    batch linked before used.idx moves, cleared after it moved; the clear
    comes once the driver was signalled, and before the next pop."""
    h = harness(packed=False, native=native, size=SIZE, event_idx=True)
    recorder = Recorder(h)
    h.state.set_inflight(recorder)
    call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    h.state.set_call(call)
    heads = add(h, 2)
    signalled_at: list[int] = []

    def serve(chain: DescriptorChain) -> int:
        if chain.head == heads[0]:
            # The driver reuses nothing yet; a second batch comes later.
            return 0
        return 1

    assert h.state.drain(serve) == 2
    with contextlib.suppress(BlockingIOError):
        signalled_at.append(os.eventfd_read(call))
    assert signalled_at == [1]
    split(h).collect()
    again = add(h, 1)
    assert h.state.drain(serve) == 1
    assert recorder.calls == [
        ("recover", [], 0),
        ("begin", heads, 0),
        ("link", heads, 0),
        ("complete", heads, 2),
        ("begin", again, 2),
        ("link", again, 2),
        ("complete", again, 3),
    ]


def test_a_batch_drain_records_like_a_drain(harness: MakeHarness, native: bool) -> None:
    """drain_batches() with a tracker: the same records as drain(), the
    clear after the signal."""
    h = harness(packed=False, native=native, size=SIZE, event_idx=True)
    recorder = Recorder(h)
    h.state.set_inflight(recorder)
    call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    h.state.set_call(call)
    heads = add(h, 3)
    assert h.state.drain_batches(len) == 3
    assert os.eventfd_read(call) == 1
    assert split(h).collect() == [(head, 0) for head in heads]
    assert recorder.calls == [
        ("recover", [], 0),
        ("begin", heads, 0),
        ("link", heads, 0),
        ("complete", heads, 3),
    ]


def drive_and_record(h: Harness, buffer: InflightBuffer) -> bytes:
    """Every path that pops or returns chains, on a tracked ring; the
    queue's region afterwards (heads still in flight included)."""
    h.state.set_inflight(buffer.tracker(0))
    add(h, 3)
    chains = h.state.pop_chains()
    h.state.add_used(chains[0].head, 8)  # one push
    h.state.add_used_many([(c.head, 4) for c in chains[1:]])
    add(h, 2)
    assert h.state.drain(lambda chain: 8) == 2
    add(h, 3)
    assert h.state.drain_batches(len) == 3
    add(h, 2)
    [batch] = h.state.pop_batches()
    h.state.add_used_batch(batch, 1)  # the second stays in flight
    add(h, 1)
    h.state.pop_chains()  # in flight too
    tracker = buffer.tracker(0)
    assert isinstance(tracker, NativeInflightTracker)
    region, count = tracker.region()
    try:
        assert count == SIZE
        return bytes(region)
    finally:
        region.release()


def test_native_rings_record_what_python_rings_record(harness: MakeHarness) -> None:
    """The walker writes the region itself on native rings: byte for byte
    what the Python record writes (flags, counters, links, used_idx)."""
    records = []
    for native in (True, False):
        h = harness(packed=False, native=native, size=SIZE)
        buffer = InflightBuffer.create(1, SIZE, packed=False)
        try:
            records.append(drive_and_record(h, buffer))
            assert len(buffer.split_pending(0)) == 2
            assert buffer.split_used_idx(0) == used_idx(h) == 9
        finally:
            h.state.set_inflight(None)
            buffer.close()  # nothing left pinned: the walker let go
    assert records[0] == records[1]


def test_pending_heads_are_resubmitted_first_after_a_reconnect(
    harness: MakeHarness, atomic: GuestMemoryAtomic, native: bool
) -> None:
    h = harness(packed=False, native=native, size=SIZE)
    buffer = InflightBuffer.create(1, SIZE, packed=False)
    try:
        h.state.set_inflight(buffer.tracker(0))
        heads = add(h, 4)
        assert [c.head for c in h.state.pop_chains()] == heads
        h.state.add_used(heads[1], 8)
        h.state.add_used(heads[3], 8)
        assert buffer.split_pending(0) == [heads[0], heads[2]]
        assert buffer.split_used_idx(0) == 2
        h.state.close()  # the back-end goes away with two in flight

        state = restart(h, atomic, native)
        try:
            assert state.set_inflight(buffer.tracker(0)) == 2
            assert state.queue_next_avail() == 4  # used.idx 2 + 2 pending
            new = add(h, 1)
            chains = state.pop_chains()
            assert [c.head for c in chains] == [heads[0], heads[2], *new]
            assert [c.writable_len for c in chains] == [8, 8, 8]
            assert state.pop_chains() == []
            state.add_used_many([(c.head, 8) for c in chains])
            assert used_idx(h) == 5
            assert buffer.split_pending(0) == []
            assert buffer.split_used_idx(0) == 5
            # A second start resubmits nothing.
            assert state.set_inflight(buffer.tracker(0)) == 0
            assert state.pop_chains() == []
        finally:
            state.close()
    finally:
        buffer.close()


def test_a_batch_published_before_the_crash_is_not_resubmitted(
    harness: MakeHarness, atomic: GuestMemoryAtomic, native: bool
) -> None:
    h = harness(packed=False, native=native, size=SIZE)
    buffer = InflightBuffer.create(1, SIZE, packed=False)
    try:
        tracker = buffer.tracker(0)
        h.state.set_inflight(tracker)
        heads = add(h, 3)
        h.state.pop_chains()
        # Crash between "publish used.idx" and "clear the flags": linked and
        # used, never cleared.
        tracker.link([heads[0], heads[1]])
        h.state.set_inflight(None)
        h.state.add_used_many([(heads[0], 0), (heads[1], 0)])
        assert buffer.split_pending(0) == heads
        assert buffer.split_used_idx(0) == 0
        h.state.close()

        state = restart(h, atomic, native)
        try:
            assert state.set_inflight(buffer.tracker(0)) == 1
            assert buffer.split_used_idx(0) == 2
            assert [c.head for c in state.pop_chains()] == [heads[2]]
            assert state.queue_next_avail() == 3
        finally:
            state.close()
    finally:
        buffer.close()


def test_a_malformed_resubmitted_chain_is_dropped(
    harness: MakeHarness, atomic: GuestMemoryAtomic, native: bool
) -> None:
    h = harness(packed=False, native=native, size=SIZE)
    buffer = InflightBuffer.create(1, SIZE, packed=False)
    try:
        h.state.set_inflight(buffer.tracker(0))
        [head] = add(h, 1)
        h.state.pop_chains()
        h.state.close()
        # The guest rewrote the descriptor to point outside its memory.
        h.write(h.desc + 16 * head, struct.pack("<Q", 1 << 60))
        state = restart(h, atomic, native)
        try:
            assert state.set_inflight(buffer.tracker(0)) == 1
            with pytest.raises(DescriptorChainError):
                state.pop_chains()
            assert buffer.split_pending(0) == []
            assert state.pop_chains() == []
        finally:
            state.close()
    finally:
        buffer.close()


def packed(h: Harness) -> PackedDriverRing:
    assert isinstance(h.driver, PackedDriverRing)
    return h.driver


def restart_packed(
    h: Harness, atomic: GuestMemoryAtomic, native: bool, size: int
) -> VringState:
    state = VringState(atomic, 32768, native=native)
    state.set_queue_features(QueueFeatures(packed=True, indirect=True))
    state.set_queue_size(size)
    state.set_queue_info(h.desc, h.avail, h.used)
    state.set_queue_ready(True)
    return state


def test_split_rings_refuse_a_packed_tracker(
    harness: MakeHarness, native: bool
) -> None:
    h = harness(packed=False, native=native, size=SIZE)
    buffer = InflightBuffer.create(1, SIZE, packed=True)
    try:
        with pytest.raises(RingStateError, match="split"):
            h.state.set_inflight(buffer.tracker(0))
    finally:
        buffer.close()


def test_packed_pop_records_and_complete_clears(
    harness: MakeHarness, native: bool
) -> None:
    h = harness(packed=True, native=native, size=SIZE)
    buffer = InflightBuffer.create(1, SIZE, packed=True)
    try:
        assert h.state.set_inflight(buffer.tracker(0)) == 0
        d = packed(h)
        a = d.add([(DATA, 8, False), (DATA + 0x100, 8, True)])
        b = d.add([(DATA + 0x200, 8, True)], indirect_table=DATA + 0x1000)
        c = d.add([(DATA + 0x300, 4, True)])
        assert [ch.head for ch in h.state.pop_chains()] == [a, b, c]
        pending = buffer.packed_pending(0)
        assert [ident for ident, _ in pending] == [a, b, c]
        assert [len(descs) for _, descs in pending] == [2, 1, 1]
        assert pending[0][1][0][:2] == (DATA, 8)
        assert pending[1][1][0][0] == DATA + 0x1000  # the indirect pointer
        h.state.add_used(b, 8)
        assert [ident for ident, _ in buffer.packed_pending(0)] == [a, c]
        # A push that fails leaves the record as it was.
        with pytest.raises(ValueError):
            h.state.add_used(b, 0)
        head = buffer.packed_head(0)
        assert head[2:] == [1, 1, 1, 1]
        h.state.add_used_many([(a, 8), (c, 4)])
        assert buffer.packed_pending(0) == []
        assert buffer.packed_head(0)[2:] == [4, 4, 1, 1]
    finally:
        buffer.close()


@pytest.mark.parametrize("rounds", [0, 3])
def test_packed_recovery_resubmits_oldest_first(
    harness: MakeHarness, atomic: GuestMemoryAtomic, native: bool, rounds: int
) -> None:
    size = 4
    h = harness(packed=True, native=native, size=size)
    buffer = InflightBuffer.create(1, size, packed=True)
    d = packed(h)
    try:
        h.state.set_inflight(buffer.tracker(0))
        for _ in range(rounds):  # across wrap-arounds
            ids = [d.add([(DATA + 0x100 * k, 8, True)]) for k in range(3)]
            h.state.pop_chains()
            h.state.add_used_many([(i, 8) for i in ids])
            assert sorted(i for i, _ in d.collect()) == sorted(ids)
        ids = [d.add([(DATA + 0x100 * k, 8, True)]) for k in range(3)]
        assert [c.head for c in h.state.pop_chains()] == ids
        h.state.add_used(ids[1], 8)
        used = buffer.packed_head(0)[2:5:2]
        h.state.close()

        state = restart_packed(h, atomic, native, size)
        try:
            assert state.set_inflight(buffer.tracker(0)) == 2
            avail, avail_wrap, next_used, used_wrap = decode_packed_base(
                state.vring_base()
            )
            assert [next_used, used_wrap] == used
            ahead = next_used + 2  # the two pending chains' slots
            assert (avail, avail_wrap) == (
                (ahead - size, used_wrap ^ 1) if ahead >= size else (ahead, used_wrap)
            )
            new = d.add([(DATA + 0x800, 8, True)])
            chains = state.pop_chains()
            assert [c.head for c in chains] == [ids[0], ids[2], new]
            assert [c.writable_len for c in chains] == [8, 8, 8]
            state.add_used_many([(c.head, 8) for c in chains])
            got = sorted(i for i, _ in d.collect())
            assert got == sorted([ids[0], ids[1], ids[2], new])
            assert buffer.packed_pending(0) == []
            assert state.set_inflight(buffer.tracker(0)) == 0
        finally:
            state.close()
    finally:
        buffer.close()


def test_a_malformed_recorded_packed_chain_is_dropped(
    harness: MakeHarness, atomic: GuestMemoryAtomic, native: bool
) -> None:
    h = harness(packed=True, native=native, size=SIZE)
    buffer = InflightBuffer.create(1, SIZE, packed=True)
    try:
        h.state.set_inflight(buffer.tracker(0))
        d = packed(h)
        bad = d.add([(DATA, 8, True)])
        good = d.add([(DATA + 0x100, 8, True)])
        h.state.pop_chains()
        h.state.close()
        # The record of `bad` points outside guest memory.
        [entry] = [
            i
            for i in range(SIZE)
            if buffer.packed_entry(0, i)[0] and buffer.packed_entry(0, i)[5] == bad
        ]
        values = buffer.packed_entry(0, entry)
        values[8] = 1 << 60
        buffer.packed_set_entry(0, entry, values)
        state = restart_packed(h, atomic, native, SIZE)
        try:
            assert state.set_inflight(buffer.tracker(0)) == 2
            assert [c.head for c in state.pop_chains()] == [good]
            assert [i for i, _ in buffer.packed_pending(0)] == [good]
            state.add_used(good, 8)
            assert buffer.packed_pending(0) == []
            assert state.pop_chains() == []
        finally:
            state.close()
    finally:
        buffer.close()


@pytest.mark.parametrize("published", [True, False])
def test_a_packed_batch_cut_by_a_crash_is_settled(
    harness: MakeHarness, atomic: GuestMemoryAtomic, native: bool, published: bool
) -> None:
    h = harness(packed=True, native=native, size=SIZE)
    buffer = InflightBuffer.create(1, SIZE, packed=True)
    try:
        tracker = buffer.tracker(0)
        h.state.set_inflight(tracker)
        d = packed(h)
        ids = [d.add([(DATA + 0x100 * k, 8, True)]) for k in range(3)]
        h.state.pop_chains()
        # Crash after "link" and, if published, after the used descriptor was
        # written, but before the flags were cleared.
        tracker.link([ids[0]])
        h.state.set_inflight(None)
        if published:
            h.state.add_used(ids[0], 8)
        h.state.close()

        state = restart_packed(h, atomic, native, SIZE)
        try:
            expect = ids[1:] if published else ids
            assert state.set_inflight(buffer.tracker(0)) == len(expect)
            assert [c.head for c in state.pop_chains()] == expect
            assert buffer.packed_head(0)[2] == (1 if published else 0)
            state.add_used_many([(i, 8) for i in expect])
            assert sorted(i for i, _ in d.collect()) == sorted(ids)
            assert buffer.packed_pending(0) == []
        finally:
            state.close()
    finally:
        buffer.close()
