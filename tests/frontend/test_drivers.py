"""The driver-side ring writers and RngDriver against a tiny device that
runs in a thread on the same shared memory (split and packed layouts)."""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator

import pytest

from vubackend.frontend import Frontend, FrontendQueue, GuestRam, RngDriver
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
