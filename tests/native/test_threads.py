"""Multi-threaded tests of vubackend._native: atomicity, publication, GIL release.

cffi's API mode drops the GIL around each C call, so these threads really do
run the C side in parallel (the machine needs two CPUs for that; with one, the
tests still check the results). The GIL-release test also runs a negative
control, a copy that holds the GIL, to show that its detector can fail.
"""

from __future__ import annotations

import mmap
import os
import sys
import threading
import time
from typing import TYPE_CHECKING

import pytest

from vubackend._native import AtomicView, copy

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

N_THREADS = 8
LOG_BYTES = 4096


def run_threads(targets: list[Callable[[], None]], timeout: float = 120.0) -> None:
    """Start all targets behind a barrier, join them, re-raise the first error."""
    barrier = threading.Barrier(len(targets))
    errors: list[BaseException] = []

    def wrap(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                barrier.wait()
                fn()
            except BaseException as exc:  # reported in the main thread
                errors.append(exc)
                barrier.abort()

        return run

    threads = [threading.Thread(target=wrap(t), daemon=True) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a worker thread hung"
    if errors:
        raise errors[0]


@pytest.fixture
def log_view() -> Iterator[AtomicView]:
    m = mmap.mmap(-1, LOG_BYTES)
    v = AtomicView(m)
    yield v
    v.release()
    m.close()


# ---------------------------------------------------------------- or_u8


def test_or_u8_own_bit_from_8_threads(log_view: AtomicView) -> None:
    """Each thread ORs its own bit into every byte, several rounds, starting at
    a different place; a lost update would leave a byte below 0xff. The
    returned old byte must show the thread's bit clear exactly once per byte
    (its first OR there) and set on every later round."""
    rounds = 4
    first_seen: list[list[int]] = [[] for _ in range(N_THREADS)]

    def worker(bit: int) -> Callable[[], None]:
        def run() -> None:
            mask = 1 << bit
            start = bit * (LOG_BYTES // N_THREADS)
            or_u8 = log_view.or_u8
            for _ in range(rounds):
                for i in range(LOG_BYTES):
                    off = (start + i) % LOG_BYTES
                    if not or_u8(off, mask) & mask:
                        first_seen[bit].append(off)

        return run

    run_threads([worker(b) for b in range(N_THREADS)])
    assert log_view.read(0, LOG_BYTES) == b"\xff" * LOG_BYTES
    for bit in range(N_THREADS):
        assert sorted(first_seen[bit]) == list(range(LOG_BYTES)), bit


def test_or_u8_same_bit_race_has_one_winner(log_view: AtomicView) -> None:
    """All threads race to set the same bits (bit r in round r, every byte).
    With an atomic fetch-or exactly one thread sees each (byte, bit) clear;
    a torn read-modify-write would let two threads both see it clear, or
    lose a bit."""
    winners = [[0] * 8 for _ in range(LOG_BYTES)]
    lock = threading.Lock()

    def worker(t: int) -> Callable[[], None]:
        def run() -> None:
            mine: list[tuple[int, int]] = []
            or_u8 = log_view.or_u8
            for bit in range(8):
                mask = 1 << bit
                for i in range(LOG_BYTES):
                    off = (i * 7 + t * 512) % LOG_BYTES  # 7 is odd: a permutation
                    if not or_u8(off, mask) & mask:
                        mine.append((off, bit))
            with lock:
                for off, bit in mine:
                    winners[off][bit] += 1

        return run

    run_threads([worker(t) for t in range(N_THREADS)])
    assert log_view.read(0, LOG_BYTES) == b"\xff" * LOG_BYTES
    assert all(count == [1] * 8 for count in winners)


# ---------------------------------------------------------------- publication


@pytest.mark.parametrize("width", [2, 4])
def test_release_acquire_ring_publishes_payloads(width: int) -> None:
    """A single-producer single-consumer ring, shaped like a virtqueue: the
    producer writes a payload into a slot and then publishes its index with a
    release store; the consumer loads the index with acquire, checks every
    payload up to it and hands the slot back with its own release store.
    With u16 indices, 70 000 entries wrap the index."""
    slots, slot_size = 32, 64
    total = 70_000 if width == 2 else 20_000
    mod = 1 << (8 * width)
    buf = mmap.mmap(-1, 64 + slots * slot_size)
    view = AtomicView(buf)
    prod_off, cons_off = 0, 8  # both naturally aligned in a page-aligned mmap

    def load(off: int) -> int:
        if width == 2:
            # ORDERING: acquire pairs with the peer's release store of this index.
            return view.load_u16(off)
        # ORDERING: acquire pairs with the peer's release store of this index.
        return view.load_u32(off)

    def store(off: int, value: int) -> None:
        if width == 2:
            # ORDERING: release publishes the slot written (or read) before it.
            view.store_u16(off, value % mod)
        else:
            # ORDERING: release publishes the slot written (or read) before it.
            view.store_u32(off, value % mod)

    def payload(seq: int) -> bytes:
        return seq.to_bytes(4, "little") * (slot_size // 4)

    deadline = time.monotonic() + 60

    def producer() -> None:
        for seq in range(total):
            while (seq - load(cons_off)) % mod >= slots:
                assert time.monotonic() < deadline, "consumer stalled"
                time.sleep(0)  # let the consumer have the GIL
            view.write(64 + (seq % slots) * slot_size, payload(seq))
            store(prod_off, seq + 1)

    def consumer() -> None:
        seq = 0
        while seq < total:
            avail = (load(prod_off) - seq) % mod
            assert avail <= slots
            if not avail:
                assert time.monotonic() < deadline, "producer stalled"
                time.sleep(0)  # let the producer have the GIL
                continue
            for _ in range(avail):
                got = view.read(64 + (seq % slots) * slot_size, slot_size)
                assert got == payload(seq), (seq, got[:4])
                seq += 1
            store(cons_off, seq)

    try:
        run_threads([producer, consumer])
        assert load(prod_off) == total % mod
        assert load(cons_off) == total % mod
    finally:
        view.release()
        buf.close()


# ---------------------------------------------------------------- copies


def test_concurrent_copies_of_disjoint_chunks() -> None:
    chunk, n_chunks = 256 * 1024, 16
    src = os.urandom(chunk * n_chunks)
    dst = mmap.mmap(-1, chunk * n_chunks)
    mid = bytearray(chunk * n_chunks)
    view = AtomicView(dst)

    def worker(t: int) -> Callable[[], None]:
        def run() -> None:
            out = bytearray(chunk)
            for c in range(t, n_chunks, 4):
                off = c * chunk
                for _ in range(3):
                    copy(mid, off, src, off, chunk)  # bytes -> bytearray
                    view.write(off, memoryview(mid)[off : off + chunk])
                    assert view.read_into(off, out) == chunk
                    assert out == src[off : off + chunk]
                    assert view.read(off, chunk) == src[off : off + chunk]

        return run

    try:
        run_threads([worker(t) for t in range(4)])
        assert view.read(0, len(src)) == src
        assert mid == src
    finally:
        view.release()
        dst.close()


# ---------------------------------------------------------------- GIL release


BIG = 256 * 1024 * 1024
SWITCH_INTERVAL = 0.0001
# A quarter of this must dwarf SWITCH_INTERVAL. A 256 MiB copy takes about
# 20 ms on the development machine.
MIN_DURATION = 0.004


def _ticks_during(op: Callable[[], None]) -> tuple[int, float]:
    """Run ``op`` in this thread while another thread records the time of each
    of its loop iterations. Returns how many iterations fell in the middle
    half of the call, and the call's duration in seconds.

    Only the middle half counts: the main thread may lose the GIL for one
    switch interval just before or after the call; the interval is set to
    0.1 ms here, far shorter than a quarter of a 256 MiB copy (the tests
    require the call to last at least MIN_DURATION).
    """
    ticks: list[float] = []
    stop = threading.Event()
    started = threading.Event()

    def spin() -> None:
        clock = time.perf_counter
        started.set()
        while not stop.is_set():
            ticks.append(clock())

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL)
    t = threading.Thread(target=spin, daemon=True)
    try:
        t.start()
        assert started.wait(10)
        t0 = time.perf_counter()
        op()
        t1 = time.perf_counter()
    finally:
        stop.set()
        t.join(30)
        sys.setswitchinterval(old_interval)
    quarter = (t1 - t0) / 4
    middle = sum(1 for x in ticks if t0 + quarter < x < t1 - quarter)
    return middle, t1 - t0


@pytest.fixture(scope="module")
def big_buffers() -> Iterator[tuple[mmap.mmap, mmap.mmap]]:
    src = mmap.mmap(-1, BIG)
    dst = mmap.mmap(-1, BIG)
    # Fill both so the copies measure memory speed, not first-touch faults.
    chunk = bytes(range(251)) * (1024 * 1024 // 251 + 1)
    for off in range(0, BIG, 1024 * 1024):
        src[off : off + 1024 * 1024] = chunk[: 1024 * 1024]
        dst[off : off + 1024 * 1024] = bytes(1024 * 1024)
    yield src, dst
    src.close()
    dst.close()


def test_gil_holding_copy_is_detected(big_buffers: tuple[mmap.mmap, mmap.mmap]) -> None:
    """Negative control: a copy done under the GIL (memoryview slice
    assignment) leaves the other thread no tick in the middle of the call."""
    src, dst = big_buffers
    with memoryview(src) as s, memoryview(dst) as d:

        def op() -> None:
            d[:] = s

        middle, duration = _ticks_during(op)
    assert duration > MIN_DURATION, "copy too fast for the detector to mean anything"
    assert middle == 0
    assert dst[BIG - mmap.PAGESIZE] == src[BIG - mmap.PAGESIZE]


# AtomicView.read is left out: it allocates and zeroes its result and then
# converts it to bytes under the GIL, which takes longer than its GIL-free copy
# (the same C call as these), so the middle-half detector cannot single out
# the copy there.
@pytest.mark.parametrize("api", ["copy", "read_into", "write"])
def test_native_copy_releases_the_gil(
    big_buffers: tuple[mmap.mmap, mmap.mmap], api: str
) -> None:
    """While a 256 MiB native copy runs, another Python thread makes progress:
    what postcopy needs, where a copy may block in a page fault."""
    src, dst = big_buffers
    dst[0] = 0x55
    src_view = AtomicView(src)
    dst_view = AtomicView(dst)

    def op() -> None:
        if api == "copy":
            copy(dst, 0, src, 0, BIG)
        elif api == "read_into":
            src_view.read_into(0, dst)
        else:
            dst_view.write(0, src)

    try:
        # Up to three tries: on a loaded machine the OS may not schedule the
        # other thread inside one 20 ms window. Holding the GIL fails all three.
        for _ in range(3):
            middle, duration = _ticks_during(op)
            assert duration > MIN_DURATION
            if middle > 0:
                break
    finally:
        src_view.release()
        dst_view.release()
    assert middle > 0, f"no progress in another thread during a {duration:.3f}s copy"
    assert dst[0] == src[0]
    assert dst[:: mmap.PAGESIZE + 1] == src[:: mmap.PAGESIZE + 1]
