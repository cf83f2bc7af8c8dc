"""Inflight tracking on a split ring, without the daemon: what the ring
records, in which order, and what it resubmits after a "reconnect" (a new
VringState on the same guest rings)."""

from __future__ import annotations

import struct
from collections.abc import Sequence

import pytest

from vubackend.daemon._inflight import InflightBuffer
from vubackend.errors import DescriptorChainError, RingStateError
from vubackend.memory import GuestMemoryAtomic
from vubackend.vring import QueueFeatures, SplitDriverRing, VringState

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


def test_packed_rings_refuse_a_tracker(harness: MakeHarness, native: bool) -> None:
    h = harness(packed=True, native=native, size=SIZE)
    with pytest.raises(RingStateError, match="packed"):
        h.state.set_inflight(Recorder(h))
    assert h.state.set_inflight(None) == 0


def test_the_packed_buffer_has_no_tracker() -> None:
    buffer = InflightBuffer.create(1, SIZE, packed=True)
    try:
        with pytest.raises(ValueError, match="packed"):
            buffer.tracker(0)
    finally:
        buffer.close()
