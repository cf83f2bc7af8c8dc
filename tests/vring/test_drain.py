"""VringState.drain: the data path's loop (pop, serve, complete with one
publication, signal as the driver asks, until empty), on split and packed
rings, native and Python engines, with and without EVENT_IDX; its batch
form drain_batches (a batch to serve whole, returned from its records with
used length 0; a partial take, a budget); and the completion they are built
on (engine.complete: push, one fence, the driver's notification word, "more
available")."""

from __future__ import annotations

import os
import threading

import pytest

from vubackend.memory import GuestMemoryAtomic
from vubackend.vring import ChainBatch, DescriptorChain, SplitDriverRing

from ._support import DATA, RING_BASE, Harness
from .conftest import MakeHarness

CASES = [
    pytest.param(packed, native, event_idx, id=f"{k}-{n}-{e}")
    for packed, k in ((False, "split"), (True, "packed"))
    for native, n in ((True, "native"), (False, "python"))
    for event_idx, e in ((True, "event_idx"), (False, "plain"))
]


def _eventfd_count(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


@pytest.mark.parametrize(("packed", "native", "event_idx"), CASES)
def test_drain_serves_every_chain_and_returns_them_all(
    harness: MakeHarness, packed: bool, native: bool, event_idx: bool
) -> None:
    h = harness(packed=packed, native=native, event_idx=event_idx)
    call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    h.state.set_call(call)
    heads = [h.driver.add([(DATA + 0x100 * i, 16, True)]) for i in range(5)]
    seen: list[int] = []

    def serve(chain: DescriptorChain) -> int:
        seen.append(chain.head)
        return chain.write(bytes([chain.head]) * 16)

    assert h.state.drain(serve) == 5
    assert seen == heads
    used = h.driver.collect()
    assert used == [(head, 16) for head in heads]
    for i, head in enumerate(heads):
        assert h.read(DATA + 0x100 * i, 16) == bytes([head]) * 16
    # The driver asked for interrupts (none suppressed): one per batch.
    assert _eventfd_count(call) == 1 == h.state.calls
    assert h.state.drain(serve) == 0, "nothing left"


@pytest.mark.parametrize(("packed", "native", "event_idx"), CASES)
def test_a_chain_added_during_the_drain_is_served_or_kicked(
    harness: MakeHarness, packed: bool, native: bool, event_idx: bool
) -> None:
    """The drain's last look after completing (one fence for the driver's
    word and for avail.idx) must not miss a chain the driver published
    after the pop: either the same drain serves it, or the driver is told
    to kick (§5.4 rule 6)."""
    h = harness(packed=packed, native=native, event_idx=event_idx)
    h.driver.add([(DATA, 8, True)])
    h.driver.kick_needed()  # the first kick, consumed
    added: list[int] = []

    def serve(chain: DescriptorChain) -> int:
        if not added:
            added.append(h.driver.add([(DATA + 0x100, 8, True)]))
            added.append(int(h.driver.kick_needed()))
        return chain.write(b"x" * 8)

    served = h.state.drain(serve)
    _head, kicked = added
    assert served == 2 or kicked, "the second chain was neither served nor kicked"
    if served == 1:
        assert h.state.drain(serve) == 1


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_drain_honours_event_idx_suppression(
    harness: MakeHarness, packed: bool, native: bool
) -> None:
    h = harness(packed=packed, native=native, event_idx=True)
    call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    h.state.set_call(call)
    h.driver.disable_interrupts()
    h.driver.add([(DATA, 8, True)])
    assert h.state.drain(lambda c: c.write(b"y" * 8)) == 1
    h.driver.collect()
    h.driver.add([(DATA, 8, True)])
    assert h.state.drain(lambda c: c.write(b"y" * 8)) == 1
    # Split: the first completion after the ring starts always signals (no
    # earlier decision to compare with), suppressed ones after it don't.
    # Packed: the driver's DISABLE flag suppresses every one.
    expected = 0 if packed else 1
    assert h.state.calls == expected
    assert _eventfd_count(call) == expected


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_drain_with_a_busy_poll_window_serves_a_late_chain(
    harness: MakeHarness, packed: bool
) -> None:
    h = harness(packed=packed, native=True, event_idx=True)
    h.driver.add([(DATA, 8, True)])
    late = threading.Timer(0.05, lambda: h.driver.add([(DATA + 0x100, 8, True)]))
    late.start()
    try:
        served = h.state.drain(lambda c: c.write(b"z" * 8), busy_poll=0.5)
    finally:
        late.join()
    assert served == 2
    # Kicks are back on once the drain returns.
    h.driver.add([(DATA + 0x200, 8, True)])
    assert h.driver.kick_needed()


def test_drain_max_chains_bounds_each_batch(harness: MakeHarness) -> None:
    h = harness(packed=False, native=True, event_idx=True)
    for i in range(6):
        h.driver.add([(DATA + 0x100 * i, 8, True)])
    published: list[int] = []

    driver = h.driver
    assert isinstance(driver, SplitDriverRing)

    def serve(chain: DescriptorChain) -> int:
        published.append(driver.used_pending())
        return 0

    assert h.state.drain(serve, max_chains=4) == 6
    # One publication per batch: the first 4 were used before the 5th was
    # served, none before.
    assert published == [0, 0, 0, 0, 4, 4]


def test_a_serve_that_raises_propagates(harness: MakeHarness) -> None:
    h = harness(packed=False, native=True)
    h.driver.add([(DATA, 8, True)])

    def serve(chain: DescriptorChain) -> int:
        raise RuntimeError("device bug")

    with pytest.raises(RuntimeError, match="device bug"):
        h.state.drain(serve)


# ---------------------------------------------------------------- drain_batches


@pytest.mark.parametrize(("packed", "native", "event_idx"), CASES)
def test_drain_batches_returns_every_chain_with_used_length_0(
    harness: MakeHarness, packed: bool, native: bool, event_idx: bool
) -> None:
    h = harness(packed=packed, native=native, event_idx=event_idx)
    call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    h.state.set_call(call)
    heads = [
        h.driver.add([(DATA + 0x100 * i, 20 + i, False), (DATA + 0x80, 4, True)])
        for i in range(5)
    ]
    seen: list[tuple[list[int], int]] = []

    def serve(batch: ChainBatch) -> int:
        seen.append((batch.heads, batch.readable_bytes(12)))
        return len(batch)

    assert h.state.drain_batches(serve, max_chains=3) == 5
    assert seen == [(heads[:3], 8 + 9 + 10), (heads[3:], 11 + 12)]
    assert h.driver.collect() == [(head, 0) for head in heads]
    # One interrupt per batch the driver wanted one for (no suppression
    # without EVENT_IDX; with it, the first batch's and then only when
    # used_event was passed).
    assert h.state.calls == _eventfd_count(call) >= 1
    if not event_idx:
        assert h.state.calls == 2
    assert h.state.drain_batches(serve) == 0, "nothing left"


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_a_partial_take_ends_the_drain_and_leaves_the_rest_in_flight(
    harness: MakeHarness, packed: bool, native: bool
) -> None:
    h = harness(packed=packed, native=native, event_idx=True)
    heads = [h.driver.add([(DATA + 0x100 * i, 8, False)]) for i in range(4)]
    kept: list[DescriptorChain] = []

    def serve(batch: ChainBatch) -> int:
        kept.extend(batch.chains()[1:])
        return 1

    assert h.state.drain_batches(serve) == 1
    assert h.driver.collect() == [(heads[0], 0)]
    assert [c.head for c in kept] == heads[1:]
    # The rest is the caller's: returned later, in any order.
    h.state.add_used_many([(c.head, 0) for c in reversed(kept)])
    assert h.driver.collect() == [(head, 0) for head in reversed(heads[1:])]
    later = h.driver.add([(DATA, 8, False)])
    assert h.state.drain_batches(lambda b: len(b)) == 1
    assert h.driver.collect() == [(later, 0)]


def test_drain_batches_budget_and_bad_counts(harness: MakeHarness) -> None:
    h = harness(packed=False, native=True, event_idx=True)
    for i in range(7):
        h.driver.add([(DATA + 0x100 * i, 8, False)])
    sizes: list[int] = []

    def serve(batch: ChainBatch) -> int:
        sizes.append(len(batch))
        return len(batch)

    # A batch is never split: the budget is reached after the second.
    assert h.state.drain_batches(serve, max_chains=2, budget=3) == 4
    assert h.state.drain_batches(serve, max_chains=2) == 3
    assert sizes == [2, 2, 2, 1]
    h.driver.add([(DATA, 8, False)])
    with pytest.raises(ValueError, match="took 2 chains of a batch of 1"):
        h.state.drain_batches(lambda b: 2)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_drain_batches_busy_poll_serves_a_late_chain(
    harness: MakeHarness, packed: bool
) -> None:
    h = harness(packed=packed, native=True, event_idx=True)
    h.driver.add([(DATA, 8, False)])
    late = threading.Timer(0.05, lambda: h.driver.add([(DATA + 0x100, 8, False)]))
    late.start()
    try:
        served = h.state.drain_batches(len, busy_poll=0.5)
    finally:
        late.join()
    assert served == 2
    h.driver.add([(DATA + 0x200, 8, False)])
    assert h.driver.kick_needed()


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("event_idx", [True, False], ids=["event_idx", "plain"])
def test_complete_matches_push_then_needs_notification(
    atomic: GuestMemoryAtomic, packed: bool, event_idx: bool
) -> None:
    """The native completion decides the interrupt as the Python path does
    (push, then needs_notification), round after round, with the driver
    moving its used_event and turning interrupts off and on."""
    rings = {
        native: Harness(
            atomic, packed=packed, native=native, event_idx=event_idx, base=base
        )
        for native, base in ((True, RING_BASE), (False, RING_BASE + 0x8000))
    }
    try:
        for step in range(40):
            decisions = []
            for native, h in rings.items():
                data = DATA + (0 if native else 0x4000)
                if step % 7 == 3:
                    h.driver.disable_interrupts()
                elif step % 7 == 5:
                    h.driver.enable_interrupts()
                for i in range(1 + step % 3):
                    h.driver.add([(data + 0x100 * i, 8, True)])
                engine = h.state.queue.plain_engine(h.mem)
                assert engine is not None
                chains = engine.pop(h.mem, 64)
                flat = [v for c in chains for v in (c.head, c.write(b"w" * 8))]
                if native:
                    signal, more = engine.complete(h.mem, flat)
                    assert not more
                else:
                    engine.push(h.mem, flat)
                    signal = engine.needs_notification(h.mem)
                decisions.append(signal)
                h.driver.collect()
            assert decisions[0] == decisions[1], f"step {step}"
    finally:
        for h in rings.values():
            h.close()
