"""Busy-polling a ring for the next chain (poll_available): false after the
window on an idle ring, true as soon as the driver publishes, on both ring
layouts, with nothing popped or re-armed by the poll itself."""

from __future__ import annotations

import threading
import time

import pytest

from ._support import DATA
from .conftest import MakeHarness


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_poll_sees_a_chain_published_during_the_window(
    harness: MakeHarness, packed: bool, native: bool
) -> None:
    h = harness(packed=packed, native=native)
    state = h.state
    assert not state.poll_available(0.01), "an idle ring times out"
    publishing = threading.Event()

    def driver() -> None:
        time.sleep(0.05)
        # Set before the chain becomes visible: a poll that returns True
        # before this is set saw something that was not there.
        publishing.set()
        h.driver.add([(DATA, 64, True)])

    thread = threading.Thread(target=driver)
    thread.start()
    try:
        assert state.poll_available(10.0)
        assert publishing.is_set()
    finally:
        thread.join()
    # The poll only looked: the chain is still there to pop, once.
    assert state.poll_available(0.0)
    chains = state.pop_chains()
    assert len(chains) == 1
    state.add_used(chains[0].head, 0)
    assert not state.poll_available(0.0)


def test_poll_window_of_zero_checks_once(harness: MakeHarness) -> None:
    h = harness(packed=False, native=True)
    assert not h.state.poll_available(0.0)
    h.driver.add([(DATA, 16, False)])
    assert h.state.poll_available(0.0)
