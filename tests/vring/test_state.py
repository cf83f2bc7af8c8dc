"""VringState: eventfds (ownership, kicks, calls, errors), the enabled flag,
reset, and the small pure pieces (need_event, QueueFeatures)."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vubackend.errors import RingStateError
from vubackend.memory import GuestMemoryAtomic
from vubackend.vring import QueueFeatures, SplitDriverRing, VringState, need_event

from ._support import DATA
from .conftest import MakeHarness


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def counter(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def test_eventfds_are_owned(atomic: GuestMemoryAtomic) -> None:
    before = fd_count()
    state = VringState(atomic, 64)
    state.set_kick(eventfd())
    state.set_call(eventfd())
    state.set_err(eventfd())
    assert fd_count() == before + 3
    state.set_kick(eventfd())  # the old one is closed
    state.set_call(None)
    assert fd_count() == before + 2
    state.close()
    assert fd_count() == before
    state.close()  # idempotent


def test_read_kick_consumes_and_reports_enabled(atomic: GuestMemoryAtomic) -> None:
    state = VringState(atomic, 64)
    kick = eventfd()
    state.set_kick(kick)
    os.eventfd_write(kick, 3)
    assert state.read_kick() is False  # disabled: consumed, ignored
    assert counter(kick) == 0
    state.set_enabled(True)
    os.eventfd_write(kick, 1)
    assert state.read_kick() is True
    assert state.read_kick() is True  # nothing pending: does not block
    assert state.get_kick() == kick
    state.close()


def test_signal_used_queue_and_err(atomic: GuestMemoryAtomic) -> None:
    state = VringState(atomic, 64)
    state.signal_used_queue()  # no call fd: nothing
    call, err = eventfd(), eventfd()
    state.set_call(call)
    state.set_err(err)
    state.signal_used_queue()
    state.signal_used_queue()
    assert counter(call) == 2
    state.signal_err()
    assert counter(err) == 1
    assert state.get_call() == call
    assert state.get_err() == err
    state.close()


def test_signal_on_a_closed_fd_is_a_ring_error(atomic: GuestMemoryAtomic) -> None:
    state = VringState(atomic, 64)
    fd = eventfd()
    state.set_call(fd)
    os.close(fd)
    with pytest.raises(RingStateError, match="call eventfd"):
        state.signal_used_queue()
    state.set_call(None)


def test_signal_if_needed_honours_suppression(
    harness: MakeHarness, native: bool
) -> None:
    h = harness(packed=False, native=native)
    call = eventfd()
    h.state.set_call(call)
    d = h.driver
    assert isinstance(d, SplitDriverRing)
    d.add([(DATA, 4, True)])
    [c] = h.state.pop_chains()
    h.state.add_used(c.head, 0)
    d.disable_interrupts()
    assert h.state.signal_if_needed() is False
    assert counter(call) == 0
    d.enable_interrupts()
    assert h.state.signal_if_needed() is True
    assert counter(call) == 1


def test_reset_forgets_everything(harness: MakeHarness, native: bool) -> None:
    h = harness(packed=False, native=native)
    d = h.driver
    assert isinstance(d, SplitDriverRing)
    d.add([(DATA, 4, True)])
    assert h.state.pop_chains()
    h.state.set_enabled(True)
    h.state.set_kick(eventfd())
    h.state.reset()
    assert not h.state.is_enabled()
    assert h.state.get_kick() is None
    assert h.state.queue_next_avail() == 0
    with pytest.raises(RingStateError, match="not ready"):
        h.state.pop_chains()
    q = h.state.get_queue()
    assert q is h.state.queue
    assert (q.size, q.addresses, q.ready) == (q.max_size, None, False)


def test_seed_style_setters(atomic: GuestMemoryAtomic) -> None:
    state = VringState(atomic, 64)
    state.set_queue_event_idx(True)
    assert state.queue.features == QueueFeatures(event_idx=True)
    state.set_queue_next_avail(5)
    state.set_queue_next_used(3)
    assert state.queue_next_avail() == 5
    assert state.vring_base() == 5
    with pytest.raises(RingStateError):
        state.set_queue_next_avail(0x10000)
    with pytest.raises(RingStateError):
        state.set_vring_base(0x10000)  # a split base is a u16
    with pytest.raises(RingStateError, match="addresses are not set"):
        state.queue_used_idx()


# ---------------------------------------------------------------- pure pieces


@given(
    event=st.integers(0, 0xFFFF),
    new=st.integers(0, 0xFFFF),
    moved=st.integers(0, 0xFFFF),
)
def test_need_event_is_the_window_test(event: int, new: int, moved: int) -> None:
    old = (new - moved) & 0xFFFF
    # Notify iff event is one of the indices passed since old: old,
    # old + 1, ..., new - 1 (mod 2**16).
    window = {(old + k) & 0xFFFF for k in range(moved)}
    assert need_event(event, new, old) == (event in window)


def test_queue_features_from_virtio_bits() -> None:
    bits = 1 << 28 | 1 << 29 | 1 << 34 | 1 << 35 | 1 << 32 | 1
    assert QueueFeatures.from_virtio_features(bits) == QueueFeatures(
        event_idx=True, packed=True, in_order=True, indirect=True
    )
    assert QueueFeatures.from_virtio_features(1 << 29) == QueueFeatures(event_idx=True)
    assert QueueFeatures.from_virtio_features(0) == QueueFeatures()


def test_kicks_and_calls_are_counted(atomic: GuestMemoryAtomic) -> None:
    state = VringState(atomic, 16)
    kick, call = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    state.set_kick(kick)
    state.set_call(call)
    os.eventfd_write(kick, 3)  # three kicks before the worker looked: one read
    state.read_kick()
    state.read_kick()  # nothing to read: not counted
    state.signal_used_queue()
    state.signal_used_queue()
    assert (state.kicks, state.calls) == (1, 2)
    assert os.eventfd_read(call) == 2
    state.close()
