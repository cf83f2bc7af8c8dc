"""DriverRing (kick decisions, tokens, wrap-around, restart) and RngDriver,
against a tiny device that runs in a thread on the same shared memory
(split and packed layouts)."""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator

import pytest

from vubackend.errors import RingStateError
from vubackend.frontend import (
    DriverRing,
    Frontend,
    FrontendQueue,
    GuestRam,
    RngDriver,
    make_driver_ring,
)
from vubackend.memory import GuestAddress
from vubackend.protocol import VirtioFeatures

DESC = struct.Struct("<QIHH")


def _fill(ram: GuestRam, gpa: int, length: int) -> int:
    ram.write(gpa, bytes((gpa + i) & 0xFF for i in range(length)))
    return length


def _split_device(ram: GuestRam, q: FrontendQueue, stop: threading.Event) -> None:
    m = ram.memory
    last_avail = 0
    used_idx = 0
    while not stop.is_set():
        if not q.kick.wait(0.05):
            continue
        while last_avail != m.read_u16(GuestAddress(q.avail + 2)):
            head = m.read_u16(GuestAddress(q.avail + 4 + 2 * (last_avail % q.size)))
            index, written = head, 0
            while True:
                addr, length, flags, nxt = DESC.unpack(
                    m.read(GuestAddress(q.desc + 16 * index), 16)
                )
                if flags & 2:
                    written += _fill(ram, addr, length)
                if not flags & 1:
                    break
                index = nxt
            m.write(
                GuestAddress(q.used + 4 + 8 * (used_idx % q.size)),
                struct.pack("<II", head, written),
            )
            used_idx = (used_idx + 1) & 0xFFFF
            m.write_u16(GuestAddress(q.used + 2), used_idx)
            last_avail = (last_avail + 1) & 0xFFFF
        q.call.signal()


def _packed_device(ram: GuestRam, q: FrontendQueue, stop: threading.Event) -> None:
    m = ram.memory
    slot, wrap = 0, 1
    while not stop.is_set():
        if not q.kick.wait(0.05):
            continue
        while True:
            flags = m.read_u16(GuestAddress(q.desc + 16 * slot + 14))
            if (flags >> 7 & 1) != wrap or (flags >> 15 & 1) == wrap:
                break
            head, count, written = slot, 0, 0
            while True:
                addr, length, buffer_id, flags = DESC.unpack(
                    m.read(GuestAddress(q.desc + 16 * ((head + count) % q.size)), 16)
                )
                if flags & 2:
                    written += _fill(ram, addr, length)
                count += 1
                if not flags & 1:
                    break
            used_flags = (1 << 7 | 1 << 15) if wrap else 0
            m.write(
                GuestAddress(q.desc + 16 * head + 8),
                struct.pack("<IHH", written, buffer_id, used_flags),
            )
            slot += count
            if slot >= q.size:
                slot -= q.size
                wrap ^= 1
        q.call.signal()


@pytest.fixture(params=["split", "packed"])
def rng(
    frontend: Frontend, request: pytest.FixtureRequest
) -> Iterator[tuple[RngDriver, GuestRam]]:
    frontend.handshake(int(VirtioFeatures.VERSION_1))
    ram = frontend.create_memory([1 << 20])
    packed = request.param == "packed"
    queue = frontend.setup_queue(0, 8, packed=packed)
    stop = threading.Event()
    device = _packed_device if packed else _split_device
    thread = threading.Thread(target=device, args=(ram, queue, stop), daemon=True)
    thread.start()
    try:
        yield RngDriver(frontend, queue), ram
    finally:
        stop.set()
        thread.join(5)


def test_rng_driver_gets_the_bytes_the_device_wrote(
    rng: tuple[RngDriver, GuestRam],
) -> None:
    driver, _ram = rng
    # More requests than ring slots: descriptors and ids are recycled, and
    # the packed ring wraps several times.
    for length in [1, 64, 4096, 7, *range(1, 40)]:
        data = driver.read(length, timeout=2)
        assert len(data) == length
        first = data[0]
        assert data == bytes((first + i) & 0xFF for i in range(length))


# ---------------------------------------------------------------- DriverRing


def _queue(frontend: Frontend, *, packed: bool, size: int = 8) -> FrontendQueue:
    frontend.handshake(int(VirtioFeatures.VERSION_1))
    frontend.create_memory([1 << 20])
    return frontend.setup_queue(0, size, packed=packed)


def test_split_kick_honours_no_notify(frontend: Frontend) -> None:
    queue = _queue(frontend, packed=False)
    ring: DriverRing[str] = make_driver_ring(frontend.ram, queue)
    m = frontend.ram.memory
    m.write_u16(GuestAddress(queue.used), 1)  # VRING_USED_F_NO_NOTIFY
    ring.add([(0x1000, 16)], [], "a")
    assert not ring.kick()
    assert queue.kick.wait(0) == 0
    m.write_u16(GuestAddress(queue.used), 0)
    ring.add([(0x1000, 16)], [(0x2000, 1)], "b")
    assert ring.kick()
    assert queue.kick.wait(0) == 1
    assert ring.in_flight == 2
    assert ring.num_free == 8 - 3


def test_split_kick_honours_avail_event(frontend: Frontend) -> None:
    queue = _queue(frontend, packed=False)
    ring: DriverRing[int] = make_driver_ring(
        frontend.ram, queue, features=int(VirtioFeatures.EVENT_IDX)
    )
    m = frontend.ram.memory
    avail_event = GuestAddress(queue.used + 4 + 8 * queue.size)
    m.write_u16(avail_event, 5)  # the device wants to hear when idx passes 5
    for n in range(5):
        ring.add([(0x1000, 16)], [], n)
        assert not ring.kick(), n
    ring.add([(0x1000, 16)], [], 5)
    assert ring.kick()
    assert queue.kick.wait(0) == 1


def test_packed_kick_honours_device_event_suppression(frontend: Frontend) -> None:
    queue = _queue(frontend, packed=True)
    ring: DriverRing[int] = make_driver_ring(frontend.ram, queue)
    m = frontend.ram.memory
    m.write_u16(GuestAddress(queue.used + 2), 1)  # RING_EVENT_FLAGS_DISABLE
    ring.add([(0x1000, 16)], [], 0)
    assert not ring.kick()
    m.write_u16(GuestAddress(queue.used + 2), 0)  # RING_EVENT_FLAGS_ENABLE
    ring.add([(0x1000, 16)], [], 1)
    assert ring.kick()
    assert not ring.kick()  # nothing new published


@pytest.mark.parametrize("packed", [False, True])
def test_kick_after_restart_even_when_suppressed(
    frontend: Frontend, packed: bool
) -> None:
    queue = _queue(frontend, packed=packed)
    ring: DriverRing[int] = make_driver_ring(frontend.ram, queue)
    flags = GuestAddress(queue.used + 2 if packed else queue.used)
    frontend.ram.memory.write_u16(flags, 1)  # DISABLE / NO_NOTIFY
    ring.add([(0x1000, 16)], [], 0)
    assert not ring.kick()
    frontend.stop_queue(queue)
    frontend.start_queue(queue)
    assert ring.kick()
    assert not ring.kick()


@pytest.mark.parametrize("packed", [False, True])
def test_tokens_come_back_with_several_in_flight_and_wrap(
    frontend: Frontend, packed: bool
) -> None:
    queue = _queue(frontend, packed=packed, size=4)
    stop = threading.Event()
    device = _packed_device if packed else _split_device
    thread = threading.Thread(
        target=device, args=(frontend.ram, queue, stop), daemon=True
    )
    thread.start()
    try:
        ring: DriverRing[str] = make_driver_ring(frontend.ram, queue)
        ram = frontend.ram
        bufs = [ram.alloc(64, 16) for _ in range(4)]
        seen: list[tuple[str, int]] = []
        for rnd in range(5):  # 5 rounds of 2 chains (2 descriptors each)
            names = [f"{rnd}a", f"{rnd}b"]
            ring.add([(bufs[0], 16)], [(bufs[1], 32)], names[0])
            ring.add([(bufs[2], 16)], [(bufs[3], 8)], names[1])
            assert ring.num_free == 0
            with pytest.raises(RingStateError):
                ring.add([(bufs[0], 1)], [], "no room")
            ring.kick()
            got = ring.wait(timeout=2, until=2)
            assert got == [(names[0], 32), (names[1], 8)]
            seen += got
        assert ring.in_flight == 0
        assert len(seen) == 10
    finally:
        stop.set()
        thread.join(5)
