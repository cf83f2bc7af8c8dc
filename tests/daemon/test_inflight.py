"""Inflight I/O tracking (INFLIGHT_SHMFD) across a reconnect: requests the
device popped and never completed are served, exactly once, by the next
session that gets the same buffer back (vhost-user-protocol.md §4.9)."""

from __future__ import annotations

import struct
import threading
import time

import pytest

from vubackend.frontend import BlkDriver, BlkRequestType, Frontend
from vubackend.protocol import Inbound, ProtocolFeatures, VirtioFeatures, connect
from vubackend.vring import VringT

from ._device import BLK_F_FLUSH, BLK_S_OK, BLK_T_IN, BLK_T_OUT, SECTOR, RamDisk
from .conftest import Served, ServeFactory

FEATURES = int(VirtioFeatures.VERSION_1 | VirtioFeatures.EVENT_IDX | BLK_F_FLUSH)
QSIZE = 128


class HoldingDisk(RamDisk):
    """A RAM disk that pops its first ``hold`` requests and never completes
    them (as if it crashed with them in flight), and logs what it serves."""

    def __init__(self, hold: int) -> None:
        super().__init__(queues=1)
        self.hold = hold
        self.held: list[int] = []
        self.served: list[tuple[int, int]] = []
        self.cond = threading.Condition()

    def _serve(self, vring: VringT) -> None:
        chains = vring.pop_chains()
        kept = []
        for chain in chains:
            with self.cond:
                holding = self.hold > 0
                if holding:
                    self.hold -= 1
                    self.held.append(chain.head)
                    self.cond.notify_all()
            if not holding:
                kept.append(chain)
        for chain in kept:
            kind, _r, sector = struct.unpack("<IIQ", chain.read(16))
            with self.cond:
                self.served.append((kind, sector))
            payload = chain.read_all()
            start = sector * SECTOR
            written = 0
            with self.lock:
                if kind == BLK_T_OUT:
                    self.disk[start : start + len(payload)] = payload
                elif kind == BLK_T_IN:
                    length = chain.writable_len - 1
                    written = chain.write(bytes(self.disk[start : start + length]))
            written += chain.write(bytes([BLK_S_OK]))
            vring.add_used(chain.head, written)
        if kept:
            vring.signal_used_queue()

    def wait_held(self, count: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.held) >= count, timeout=5)


def _session(fe: Frontend, packed: bool = False) -> None:
    features = FEATURES | (VirtioFeatures.RING_PACKED if packed else 0)
    fe.handshake(features, backend_channel=False)
    assert fe.has_protocol_feature(ProtocolFeatures.INFLIGHT_SHMFD)


def _reconnect(fe: Frontend, served: Served) -> None:
    # The back-end "restarts": the socket goes, the guest RAM, the rings and
    # the inflight buffer stay with the front-end (as QEMU keeps them).
    fe._conn.close()
    fe._conn = connect(
        served.path, Inbound.FRONTEND_REPLIES, retry_for=5.0, timeout=5.0
    )


def _used_idx(data: bytes, packed: bool = False) -> int:
    # Split region: u64 features, u16 version, desc_num, last_batch_head,
    # used_idx. Packed: u64 features, u16 version, desc_num, free_head,
    # old_free_head, used_idx (the used slot).
    return int(struct.unpack_from("<H", data, 16 if packed else 14)[0])


def _used_wrap(data: bytes) -> int:
    # Packed region: u8 used_wrap_counter after old_used_idx.
    return data[20]


def _inflight_heads(data: bytes, qsize: int, packed: bool = False) -> list[int]:
    if not packed:
        return [h for h in range(qsize) if data[16 + 16 * h]]
    # Packed: 32-byte header, 32-byte entries {u8 inflight; u8 pad; u16
    # next; u16 last; u16 num; u64 counter; u16 id; ...}; a chain's id is
    # that of its last entry.
    ids = []
    for h in range(qsize):
        at = 32 + 32 * h
        if data[at]:
            (last,) = struct.unpack_from("<H", data, at + 4)
            ids.append(int(struct.unpack_from("<H", data, 32 + 32 * last + 16)[0]))
    return ids


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("base_from", ["get_vring_base", "inflight_used_idx"])
def test_held_requests_are_served_once_after_a_reconnect(
    serve: ServeFactory, base_from: str, packed: bool
) -> None:
    device = HoldingDisk(hold=2)
    served = serve(device)
    with served.connect() as fe:
        _session(fe, packed)
        ram = fe.create_memory([4 << 20])
        inflight = fe.get_inflight_fd(1, QSIZE)
        assert inflight is not None
        try:
            fe.set_inflight_fd(inflight)
            queue = fe.setup_queue(0, QSIZE, packed=packed)
            fe.start_device()
            blk = BlkDriver(fe, queue)
            held = [
                blk.submit(BlkRequestType.OUT, 1, data=b"A" * SECTOR),
                blk.submit(BlkRequestType.OUT, 2, data=b"B" * SECTOR),
            ]
            device.wait_held(2)
            blk.write(3, b"C" * SECTOR)
            assert not any(r.done for r in held)
            data = inflight.read()
            # One request done: one used entry (split), its slots (packed).
            slots = _used_idx(data, packed)
            assert slots == 1 if not packed else slots >= 1
            assert sorted(_inflight_heads(data, QSIZE, packed)) == sorted(device.held)

            if base_from == "get_vring_base":
                # Packed: avail 3 chains on, used one, both wrap counters 1.
                packed_base = 3 * slots | 1 << 15 | (slots | 1 << 15) << 16
                assert fe.stop_queue(queue) == (packed_base if packed else 3)
            elif packed:  # the back-end crashed: the used position (with
                # avail = used); the inflight record sets both.
                queue.base = slots | _used_wrap(data) << 15
            else:  # the back-end crashed: the used index is all there is
                queue.base = _used_idx(data)
            _reconnect(fe, served)
            _session(fe, packed)
            fe.share_memory(ram)
            fe.set_inflight_fd(inflight)
            fe.start_queue(queue)
            fe.start_device()

            blk.wait(held)
            assert [r.status for r in held] == [BLK_S_OK, BLK_S_OK]
            assert device.disk[SECTOR : 3 * SECTOR] == b"A" * SECTOR + b"B" * SECTOR
            # New requests go on after the resubmitted ones.
            blk.write(4, b"D" * SECTOR)
            assert blk.read(1) == b"A" * SECTOR
            assert blk.read(3) == b"C" * SECTOR
            deadline = time.monotonic() + 1
            while time.monotonic() < deadline and len(device.served) < 6:
                time.sleep(0.01)
            outs = [s for kind, s in device.served if kind == BLK_T_OUT]
            assert sorted(outs) == [1, 2, 3, 4], "each write served exactly once"
            data = inflight.read()
            assert _inflight_heads(data, QSIZE, packed) == []
            assert _used_idx(data, packed) == 6 * slots
        finally:
            inflight.close()


def test_without_a_buffer_nothing_is_resubmitted(serve: ServeFactory) -> None:
    device = HoldingDisk(hold=1)
    served = serve(device)
    with served.connect() as fe:
        _session(fe)
        ram = fe.create_memory([4 << 20])
        queue = fe.setup_queue(0, QSIZE)
        blk = BlkDriver(fe, queue)
        lost = blk.submit(BlkRequestType.OUT, 1, data=b"A" * SECTOR)
        device.wait_held(1)
        queue.base = fe.stop_queue(queue)
        _reconnect(fe, served)
        _session(fe)
        fe.share_memory(ram)
        fe.start_queue(queue)
        blk.write(2, b"B" * SECTOR)
        assert not lost.done
        assert [s for _, s in device.served] == [2]
