"""The readers-writer lock, and two threads (a worker and the request
thread) on one VringRwLock / VringMutex with no lost update.

The lock tests include a negative control (the same read-modify-write
without a lock loses updates), so they can fail."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Protocol

import pytest

from vubackend.memory import GuestMemoryAtomic
from vubackend.vring import (
    PackedDriverRing,
    QueueFeatures,
    RwLock,
    SplitDriverRing,
    VringMutex,
    VringRwLock,
    packed_layout,
    split_layout,
)

from ._support import DATA, RING_BASE


def run_threads(targets: list[Callable[[], None]], timeout: float = 60.0) -> None:
    """Start the targets together, join them, re-raise the first error."""
    barrier = threading.Barrier(len(targets))
    errors: list[BaseException] = []

    def wrap(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                barrier.wait()
                fn()
            except BaseException as exc:  # reported in the main thread
                errors.append(exc)

        return run

    threads = [threading.Thread(target=wrap(t), daemon=True) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a thread hung"
    if errors:
        raise errors[0]


@pytest.fixture(autouse=True)
def fast_switching() -> Iterator[None]:
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(interval)


# ---------------------------------------------------------------- RwLock


class NoLock:
    """The negative control: a 'lock' that excludes nothing."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


class Ctx(Protocol):
    def __enter__(self) -> None: ...
    def __exit__(self, *exc: object) -> None: ...


def hammer(lock_write: Ctx, threads: int = 4, rounds: int = 300) -> int:
    box = [0]

    def work() -> None:
        for _ in range(rounds):
            with lock_write:
                value = box[0]
                time.sleep(0)  # invite a switch inside the critical section
                box[0] = value + 1

    run_threads([work] * threads)
    return box[0]


def test_writers_exclude_each_other() -> None:
    lock = RwLock()
    assert hammer(lock.write) == 4 * 300


def test_negative_control_loses_updates() -> None:
    assert hammer(NoLock()) < 4 * 300


def test_readers_share_and_see_consistent_pairs() -> None:
    lock = RwLock()
    pair = [0, 0]
    inside = threading.Barrier(3, timeout=10)
    stop = threading.Event()

    def reader() -> None:
        with lock.read:
            inside.wait()  # three readers at once: the read side is shared
        while not stop.is_set():
            with lock.read:
                a = pair[0]
                time.sleep(0)
                assert pair[1] == a

    def writer() -> None:
        with lock.read:
            inside.wait()
        for i in range(500):
            with lock.write:
                pair[0] = i
                time.sleep(0)
                pair[1] = i
        stop.set()

    run_threads([reader, reader, writer])


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_waiting_writer_goes_before_new_readers() -> None:
    lock = RwLock()
    order: list[str] = []
    lock.acquire_read()

    def writer() -> None:
        with lock.write:
            order.append("writer")

    def late_reader() -> None:
        with lock.read:
            order.append("reader")

    w = threading.Thread(target=writer)
    w.start()
    wait_for(lambda: lock._waiting_writers == 1)
    r = threading.Thread(target=late_reader)
    r.start()
    wait_for(lambda: lock._waiting_readers == 1)  # queued behind the writer
    assert order == []
    lock.release_read()
    w.join(10)
    r.join(10)
    assert order == ["writer", "reader"]


def test_waiting_readers_go_before_the_next_writer() -> None:
    # Phase fairness: readers that waited through one writer are not
    # overtaken by the writer after it.
    lock = RwLock()
    order: list[str] = []
    lock.acquire_write()

    def reader() -> None:
        with lock.read:
            order.append("reader")

    def writer2() -> None:
        with lock.write:
            order.append("writer2")

    r = threading.Thread(target=reader)
    r.start()
    wait_for(lambda: lock._waiting_readers == 1)
    w = threading.Thread(target=writer2)
    w.start()
    wait_for(lambda: lock._waiting_writers == 1)
    assert order == []
    lock.release_write()
    r.join(10)
    w.join(10)
    assert order == ["reader", "writer2"]


def test_release_without_hold_is_an_error() -> None:
    lock = RwLock()
    with pytest.raises(RuntimeError):
        lock.release_read()
    with pytest.raises(RuntimeError):
        lock.release_write()


# ---------------------------------------------------------------- vrings


@pytest.mark.parametrize("kind", [VringRwLock, VringMutex])
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_worker_and_request_thread_lose_no_update(
    atomic: GuestMemoryAtomic, kind: type[VringRwLock | VringMutex], packed: bool
) -> None:
    size, total = 16, 1500
    vring = kind(atomic, 256)
    vring.set_queue_features(QueueFeatures(packed=packed, event_idx=True))
    vring.set_queue_size(size)
    layout = packed_layout if packed else split_layout
    desc, avail, used, _ = layout(RING_BASE, size)
    vring.set_queue_info(desc, avail, used)
    vring.set_queue_ready(True)
    vring.set_enabled(True)
    counter = [0]
    bumps = [0, 0]  # per thread, each thread's own (no sharing)
    done = threading.Event()
    guard = atomic.memory()
    mem = guard.memory
    driver: SplitDriverRing | PackedDriverRing
    if packed:
        driver = PackedDriverRing(mem, size, desc, avail, used, event_idx=True)
    else:
        driver = SplitDriverRing(mem, size, desc, avail, used, event_idx=True)
    seen: dict[int, int] = {}

    def bump(who: int) -> None:
        bumps[who] += 1
        with vring.get_mut():
            value = counter[0]
            time.sleep(0)
            counter[0] = value + 1

    def worker() -> None:
        processed = 0
        while processed < total:
            chains = vring.pop_chains()
            for c in chains:
                c.write(c.head.to_bytes(4, "little"))
            vring.add_used_many((c.head, c.bytes_written) for c in chains)
            processed += len(chains)
            if chains:
                bump(0)
            else:
                time.sleep(0)
        done.set()

    def request_thread() -> None:
        # The guest driver and the request handler in one thread: make
        # buffers available, collect used ones, and meanwhile do what the
        # request handler does to a running ring.
        added = collected = 0
        while collected < total:
            while added < total and driver.num_free:
                slot = added % size
                ident = driver.add([(DATA + 0x10 * slot, 4, True)])
                seen.setdefault(ident, 0)
                added += 1
            for ident, length in driver.collect():
                assert length == 4
                seen[ident] += 1
                collected += 1
            base = vring.vring_base()
            assert 0 <= base <= 0xFFFF_FFFF
            # A feature change drops the ring engine (saving its positions)
            # and the worker's next call builds a new one: positions and
            # chains in flight must survive the hand-over.
            vring.set_queue_features(
                QueueFeatures(packed=packed, event_idx=bool(collected & 1))
            )
            vring.queue_next_avail()
            vring.is_enabled()
            vring.set_log_used(collected % 2 == 0)
            bump(1)
            time.sleep(0)

    try:
        run_threads([worker, request_thread])
    finally:
        guard.release()
        vring.close()
    assert done.is_set()
    assert sum(seen.values()) == total
    # Every read-modify-write under get_mut() counted: none was lost.
    assert counter[0] == bumps[0] + bumps[1]
    assert bumps[0] > 0
    assert bumps[1] > 0


@pytest.mark.parametrize("kind", [VringRwLock, VringMutex])
def test_get_mut_counter_has_no_lost_update(
    atomic: GuestMemoryAtomic, kind: type[VringRwLock | VringMutex]
) -> None:
    vring = kind(atomic, 64)
    box = [0]

    def work() -> None:
        for _ in range(400):
            with vring.get_mut() as state:
                value = box[0]
                time.sleep(0)
                box[0] = value + 1
                state.set_enabled(not state.is_enabled())

    def reader() -> None:
        for _ in range(400):
            with vring.get_ref() as state:
                state.queue_next_avail()
            vring.queue_next_avail()

    run_threads([work, work, reader])
    assert box[0] == 800
    assert vring.is_enabled() is False  # toggled an even number of times
    vring.close()
