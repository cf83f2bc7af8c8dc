"""End-to-end: the Python frontend drives a VhostUserDaemon serving a RAM
disk, over a real socket, through both ring layouts."""

from __future__ import annotations

import os
import select
import time
from collections.abc import Sequence

import pytest

from vubackend.errors import RequestRefusedError, TransportError
from vubackend.frontend import BlkDriver, BlkRequestType, Frontend
from vubackend.protocol import ProtocolFeatures, VirtioFeatures
from vubackend.vring import VringT

from ._device import BLK_F_FLUSH, BLK_ID, SECTOR, RamDisk, SerializedRamDisk
from .conftest import ServeFactory

FEATURES = int(VirtioFeatures.VERSION_1 | VirtioFeatures.EVENT_IDX | BLK_F_FLUSH)


def start(fe: Frontend, *, packed: bool = False, queues: int = 2) -> list[BlkDriver]:
    features = FEATURES | (VirtioFeatures.RING_PACKED if packed else 0)
    fe.handshake(features)
    fe.create_memory([4 << 20, 4 << 20])
    drivers = [BlkDriver(fe, fe.setup_queue(i, 128)) for i in range(queues)]
    fe.start_device()
    return drivers


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_writes_and_reads_through_both_queues(
    serve: ServeFactory, packed: bool
) -> None:
    served = serve()
    with served.connect() as fe:
        q0, q1 = start(fe, packed=packed)
        pattern = os.urandom(8 * SECTOR)
        q0.write(10, pattern)
        q1.write(100, pattern[::-1])
        assert q1.read(10, 8) == pattern
        assert q0.read(100, 8) == pattern[::-1]
        q0.flush()
        assert q1.get_id().rstrip(b"\0") == BLK_ID.rstrip(b"\0")
    assert served.device.disk[10 * SECTOR : 18 * SECTOR] == pattern
    assert served.device.event_idx is True


def test_many_requests_in_flight(serve: ServeFactory) -> None:
    served = serve()
    with served.connect() as fe:
        (q0,) = start(fe, queues=1)
        blocks = {sector: os.urandom(SECTOR) for sector in range(0, 64, 2)}
        writes = [
            q0.submit(BlkRequestType.OUT, sector, data=data, kick=False)
            for sector, data in blocks.items()
        ]
        fe.kick(q0.queue)
        q0.wait(writes)
        assert all(request.status == 0 for request in writes)
        reads = [
            q0.submit(BlkRequestType.IN, sector, read_len=SECTOR, kick=False)
            for sector in blocks
        ]
        fe.kick(q0.queue)
        q0.wait(reads)
        assert [request.data for request in reads] == list(blocks.values())


def test_config_space_round_trip(serve: ServeFactory) -> None:
    served = serve()
    with served.connect() as fe:
        start(fe)
        assert int.from_bytes(fe.get_config(0, 8), "little") == 2048
        fe.set_config(8, b"\x01\x02")
        assert fe.get_config(8, 2) == b"\x01\x02"


def test_reconnect_gives_a_fresh_session(serve: ServeFactory) -> None:
    served = serve()
    for round_ in range(3):
        with served.connect() as fe:
            q0, _ = start(fe)
            data = bytes([round_]) * SECTOR
            q0.write(round_, data)
            assert q0.read(round_) == data
    assert served.device.disk[2 * SECTOR : 3 * SECTOR] == b"\x02" * SECTOR


def test_stop_and_restart_rings_many_times(serve: ServeFactory) -> None:
    served = serve()
    with served.connect() as fe:
        q0, _ = start(fe)
        for i in range(20):
            q0.write(i, bytes([i]) * SECTOR)
            fe.stop_queue(q0.queue)
            fe.start_queue(q0.queue)
        for i in range(20):
            assert q0.read(i) == bytes([i]) * SECTOR


def test_unsupported_requests_are_refused_and_the_session_goes_on(
    serve: ServeFactory,
) -> None:
    served = serve()
    with served.connect() as fe:
        q0, _ = start(fe)
        assert fe.has_protocol_feature(ProtocolFeatures.REPLY_ACK)
        with pytest.raises(RequestRefusedError):
            fe.set_vring_num(7, 64)  # no ring 7
        q0.write(3, b"x" * SECTOR)
        assert q0.read(3) == b"x" * SECTOR


def test_queues_served_by_several_worker_threads(serve: ServeFactory) -> None:
    device = RamDisk(queues=3, per_thread=[0b001, 0b010, 0b100])
    served = serve(device)
    with served.connect() as fe:
        drivers = start(fe, queues=3)
        for i, driver in enumerate(drivers):
            driver.write(i, bytes([i + 1]) * SECTOR)
            assert driver.read(i) == bytes([i + 1]) * SECTOR
    assert device.threads_used == {0, 1, 2}
    assert len(served.daemon.get_epoll_handlers()) == 3


def test_serialized_backend_flavour(serve: ServeFactory) -> None:
    served = serve(SerializedRamDisk())
    with served.connect() as fe:
        q0, q1 = start(fe)
        q0.write(1, b"a" * SECTOR)
        assert q1.read(1) == b"a" * SECTOR


def test_queue_started_hook_runs_when_rings_start(serve: ServeFactory) -> None:
    served = serve()
    with served.connect() as fe:
        q0, _ = start(fe)
        fe.stop_queue(q0.queue)
        fe.start_queue(q0.queue)
    assert sorted(served.device.started) == [0, 0, 1]


class FailingDisk(RamDisk):
    """A device whose handle_event always raises."""

    def handle_event(
        self, device_event: int, evset: int, vrings: Sequence[VringT], thread_id: int
    ) -> None:
        raise RuntimeError("the device broke")


def test_a_failing_device_stops_its_worker_not_the_daemon(serve: ServeFactory) -> None:
    device = FailingDisk(queues=2, per_thread=[0b01, 0b10])
    served = serve(device)
    with served.connect() as fe:
        q0, _ = start(fe)
        request = q0.submit(BlkRequestType.IN, 0, read_len=SECTOR)
        with pytest.raises(TransportError):
            q0.wait([request], timeout=0.5)
        deadline = time.monotonic() + 5
        while not served.daemon.worker_errors and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [str(e) for e in served.daemon.worker_errors] == ["the device broke"]
        # The request thread still answers.
        assert fe.get_queue_num() == 2
    served.daemon.worker_errors.clear()


class ListeningDisk(RamDisk):
    """Counts events of a custom listener registered with the worker."""

    def __init__(self) -> None:
        super().__init__(queues=1)
        self.custom: list[int] = []
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def handle_event(
        self, device_event: int, evset: int, vrings: Sequence[VringT], thread_id: int
    ) -> None:
        if device_event > self.num_queues():
            os.eventfd_read(self.fd)
            self.custom.append(device_event)
            return
        super().handle_event(device_event, evset, vrings, thread_id)


def test_custom_listeners_on_the_worker(serve: ServeFactory) -> None:
    device = ListeningDisk()
    served = serve(device)
    (worker,) = served.daemon.get_epoll_handlers()
    with pytest.raises(ValueError, match="reserved"):
        worker.register_listener(device.fd, select.EPOLLIN, 1)
    worker.register_listener(device.fd, select.EPOLLIN, 42)
    os.eventfd_write(device.fd, 1)
    deadline = time.monotonic() + 5
    while not device.custom and time.monotonic() < deadline:
        time.sleep(0.01)
    assert device.custom == [42]
    worker.unregister_listener(device.fd)
    os.close(device.fd)
