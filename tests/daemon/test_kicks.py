"""No lost kicks: a kick that arrives while a ring is disabled
(SET_VRING_ENABLE 0) is served once the ring is enabled again, without
another kick; the worker's edge-triggered wait sees a kick pending at
registration and every kick written while the device works."""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Sequence

import pytest

from vubackend.daemon import VringEpollHandler
from vubackend.frontend import BlkRequestType
from vubackend.memory import GuestMemoryAtomic
from vubackend.vring import VringMutex, VringT

from ._device import BLK_S_OK, SECTOR, RamDisk
from .conftest import ServeFactory
from .test_daemon import start


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_a_kick_while_disabled_is_served_on_enable(
    serve: ServeFactory, packed: bool
) -> None:
    served = serve()
    with served.connect() as fe:
        [blk] = start(fe, packed=packed, queues=1)
        blk.write(0, b"Z" * SECTOR)  # the ring works
        queue = blk.queue
        fe.set_vring_enable(0, False)
        request = blk.submit(BlkRequestType.OUT, 1, data=b"A" * SECTOR, kick=False)
        fe.kick(queue)  # written to the kick eventfd while disabled
        time.sleep(0.2)
        assert not request.done
        assert served.device.disk[SECTOR : 2 * SECTOR] == bytes(SECTOR)
        fe.set_vring_enable(0, True)  # no kick after this
        blk.wait([request], timeout=5)
        assert request.status == BLK_S_OK
        assert served.device.disk[SECTOR : 2 * SECTOR] == b"A" * SECTOR


class CountingDisk(RamDisk):
    """Counts handle_event calls (and can take its time over each)."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.events = 0
        self.delay = delay
        self.called = threading.Event()

    def handle_event(
        self, device_event: int, evset: int, vrings: Sequence[VringT], thread_id: int
    ) -> None:
        self.events += 1
        self.called.set()
        time.sleep(self.delay)


def _worker(device: CountingDisk) -> tuple[VringEpollHandler, VringMutex]:
    vring = VringMutex(GuestMemoryAtomic(), 256)
    vring.set_enabled(True)
    worker = VringEpollHandler(device, [vring], 0, 1, lambda _t, _e: None)
    worker.start()
    return worker, vring


def test_a_kick_pending_when_the_fd_is_registered_is_served() -> None:
    """Kick fds are edge-triggered: the event of a kick written before the
    fd was registered is reported once, at registration."""
    device = CountingDisk()
    worker, vring = _worker(device)
    kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        os.eventfd_write(kick, 1)
        time.sleep(0.01)  # the worker asleep in its wait
        worker.register_kick(0, kick)
        assert device.called.wait(5), "the pending kick was lost"
    finally:
        worker.unregister_kick(kick)
        worker.close()
        os.close(kick)
        vring.close()


class _WatchedEpoll:
    """An epoll that records, at each register(), whether the worker would
    find the fd's token if the event came at once."""

    def __init__(self, real: select.epoll, tokens: dict[int, int]) -> None:
        self.real = real
        self.tokens = tokens
        self.token_known: list[bool] = []

    def register(self, fd: int, events: int) -> None:
        self.token_known.append(fd in self.tokens)
        self.real.register(fd, events)

    def __getattr__(self, name: str) -> object:
        return getattr(self.real, name)


def test_the_token_is_known_before_the_fd_is_registered() -> None:
    """epoll_ctl runs without the GIL, and the worker may wake (on the very
    event of the registration) before register() returns: its token must
    already be there, or that edge-triggered event is dropped for good."""
    device = CountingDisk()
    vring = VringMutex(GuestMemoryAtomic(), 256)
    worker = VringEpollHandler(device, [vring], 0, 1, lambda _t, _e: None)
    watched = _WatchedEpoll(worker._epoll, worker._tokens)
    worker._epoll = watched  # type: ignore[assignment]
    kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    listener = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        worker.register_kick(0, kick)
        worker.register_listener(listener, select.EPOLLIN, 5)
        assert watched.token_known == [True, True]
    finally:
        worker.unregister_listener(listener)
        worker.unregister_kick(kick)
        worker._epoll = watched.real
        worker.close()
        os.close(listener)
        os.close(kick)
        vring.close()


def test_kicks_during_an_event_are_not_lost() -> None:
    """The eventfd is never read: each write is an event of its own, so a
    kick that comes while the device handles the previous one wakes the
    worker again."""
    device = CountingDisk(delay=0.05)
    worker, vring = _worker(device)
    kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        worker.register_kick(0, kick)
        os.eventfd_write(kick, 1)
        assert device.called.wait(5)
        device.called.clear()
        os.eventfd_write(kick, 1)  # while the first event is being handled
        assert device.called.wait(5), "the second kick was lost"
        deadline = time.monotonic() + 5
        while device.events < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert device.events == 2
        with vring.get_ref() as state:
            assert state.kicks == 2
        # A disabled ring's kick is counted and not handed to the device.
        vring.set_enabled(False)
        os.eventfd_write(kick, 1)
        time.sleep(0.2)
        assert device.events == 2
    finally:
        worker.unregister_kick(kick)
        worker.close()
        os.close(kick)
        vring.close()
