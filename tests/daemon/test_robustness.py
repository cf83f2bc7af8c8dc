"""Dirty logging, inflight buffers, device requests and bad input against a
live daemon: clear refusals, the session (or the next one) goes on, and the
open-fd count returns to where it started (checked by the fixture)."""

from __future__ import annotations

import os
import socket
import struct

import pytest

from vubackend.errors import PeerDisconnectedError, RequestRefusedError
from vubackend.frontend import BlkDriver, BlkRequestType, RawOutcome, frame
from vubackend.protocol import BackendReq, FrontendReq, ProtocolFeatures, VirtioFeatures

from ._device import SECTOR, MigratableRamDisk, RamDisk
from .conftest import ServeFactory
from .test_daemon import FEATURES, start


def read_request(driver: BlkDriver, sector: int) -> int:
    """Submit a read and return the GPA the device wrote the data to."""
    request = driver.submit(BlkRequestType.IN, sector, read_len=SECTOR)
    assert request._read is not None
    gpa = request._read[0]
    driver.wait([request])
    assert request.status == 0
    return gpa


def test_dirty_log_marks_device_writes_and_stops_with_log_all(
    serve: ServeFactory,
) -> None:
    served = serve()
    with served.connect() as fe:
        q0, _ = start(fe)
        log = fe.start_dirty_log()
        log.take_dirty()
        gpa = read_request(q0, 5)
        dirty = log.take_dirty()
        assert gpa // 4096 in dirty, "the page the device wrote is not marked"
        used_gpa = q0.queue.used
        assert used_gpa // 4096 in dirty, "the used ring write is not marked"
        fe.stop_dirty_log()
        log.take_dirty()
        read_request(q0, 6)
        assert log.take_dirty() == [], "writes were logged after LOG_ALL was cleared"


def test_every_request_of_a_typical_session(serve: ServeFactory) -> None:
    served = serve()
    with served.connect() as fe:
        q0, _ = start(fe)
        assert fe.get_queue_num() == 2
        assert fe.get_max_mem_slots() == 509
        fe.set_status(0x0F)
        assert fe.get_status() == 0x0F
        with pytest.raises(RequestRefusedError):
            fe.set_vring_enable(9, True)
        q0.write(0, b"y" * SECTOR)
        base = fe.stop_queue(q0.queue)
        assert base > 0
        fe.start_queue(q0.queue)
        q0.write(0, b"z" * SECTOR)
        fe.reset_device()
        assert served.device.memory_updates >= 1


def test_inflight_buffer_round_trip(serve: ServeFactory) -> None:
    served = serve()
    with served.connect() as fe:
        fe.handshake(FEATURES)
        assert fe.has_protocol_feature(ProtocolFeatures.INFLIGHT_SHMFD)
        inflight = fe.get_inflight_fd(2, 128)
        assert inflight is not None, "the daemon answered 'inflight unsupported'"
        assert inflight.mmap_size >= 2 * 64
        fe.set_inflight_fd(inflight)
        inflight.close()


def test_device_state_is_not_offered_without_the_hooks(serve: ServeFactory) -> None:
    served = serve()
    with served.connect() as fe:
        start(fe)
        assert not fe.has_protocol_feature(ProtocolFeatures.DEVICE_STATE)


def test_device_state_save_then_load_into_a_new_session(serve: ServeFactory) -> None:
    device = MigratableRamDisk()
    served = serve(device)
    with served.connect() as fe:
        (q0,) = start(fe, queues=1)
        q0.write(3, b"s" * SECTOR)
        fe.stop_queue(q0.queue)
        saved = fe.save_device_state()
    assert saved == bytes(device.disk)
    device.disk[:] = bytes(len(device.disk))
    with served.connect() as fe:
        fe.handshake(FEATURES)
        fe.load_device_state(saved)
    assert device.disk[3 * SECTOR : 4 * SECTOR] == b"s" * SECTOR


def test_backend_channel_config_change(serve: ServeFactory) -> None:
    served = serve()
    with served.connect() as fe:
        start(fe)
        assert served.device.channel is not None
        served.device.channel.config_change()
        channel = fe.backend_channel
        assert channel is not None
        channel.wait_for(BackendReq.CONFIG_CHANGE_MSG)
        assert channel.config_changes == 1


def test_malformed_frames_end_only_that_session(serve: ServeFactory) -> None:
    served = serve()
    with served.connect() as fe:
        start(fe)
        fe.send_raw(frame(FrontendReq.SET_OWNER, size=8000))
        with fe.read_raw(timeout=2.0) as reply:
            assert reply.outcome is RawOutcome.DISCONNECTED
    with served.connect() as fe:
        q0, _ = start(fe)
        q0.write(1, b"k" * SECTOR)
        assert q0.read(1) == b"k" * SECTOR


def test_wrong_fd_counts_and_bogus_rings_are_refused(serve: ServeFactory) -> None:
    served = serve()
    with served.connect() as fe:
        q0, _ = start(fe)
        # Ring addresses outside guest memory.
        with pytest.raises(RequestRefusedError):
            fe.set_vring_addr(1, desc=0x10, used=0x20, avail=0x40, log=0, flags=0)
        # Out of order: SET_VRING_BASE on a ring that does not exist.
        with pytest.raises(RequestRefusedError):
            fe.set_vring_base(200, 0)
        q0.write(2, b"q" * SECTOR)
        assert q0.read(2) == b"q" * SECTOR
        # SET_VRING_KICK with two fds and NEED_REPLY: a failing ack, and the
        # connection stays open.
        a, b = os.eventfd(0), os.eventfd(0)
        payload = struct.pack("=Q", 0)
        fe.send_raw(frame(FrontendReq.SET_VRING_KICK, payload, flags=0x9), [a, b])
        os.close(a)
        os.close(b)
        with fe.read_raw(timeout=2.0) as reply:
            assert reply.outcome is RawOutcome.ANSWERED
            assert reply.data == frame(
                FrontendReq.SET_VRING_KICK,
                payload[:0] + struct.pack("=Q", 1),
                flags=0x5,
            )
        # The session goes on: a raw GET_FEATURES is answered.
        fe.send_raw(frame(FrontendReq.GET_FEATURES))
        with fe.read_raw(timeout=2.0) as reply:
            assert reply.outcome is RawOutcome.ANSWERED
            assert reply.headers()[0] == (FrontendReq.GET_FEATURES, 0x5, 8)


def test_a_frontend_vanishing_mid_message(serve: ServeFactory) -> None:
    served = serve()
    served.connect().close()  # waits until the daemon listens
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(served.path))
    sock.sendall(frame(FrontendReq.SET_FEATURES, struct.pack("=Q", 1))[:14])
    sock.close()
    with served.connect() as fe:
        q0, _ = start(fe)
        q0.write(4, b"v" * SECTOR)
        assert q0.read(4) == b"v" * SECTOR


def test_second_set_owner_is_refused(serve: ServeFactory) -> None:
    served = serve()
    with served.connect() as fe:
        start(fe)
        with pytest.raises(RequestRefusedError):
            fe.set_owner()


def test_shutdown_ends_a_live_session(serve: ServeFactory) -> None:
    served = serve()
    fe = served.connect()
    start(fe)
    served.daemon.shutdown()
    served.thread.join(timeout=5)
    assert not served.thread.is_alive(), "serve() did not return after shutdown()"
    with pytest.raises(PeerDisconnectedError):
        fe.get_features()
    fe.close()


class LegacyDisk(RamDisk):
    """Offers no PROTOCOL_FEATURES: rings are enabled by SET_FEATURES."""

    def features(self) -> int:
        return super().features() & ~int(VirtioFeatures.PROTOCOL_FEATURES)


def test_rings_start_enabled_without_protocol_features(serve: ServeFactory) -> None:
    served = serve(LegacyDisk())
    with served.connect() as fe:
        q0, _ = start(fe)
        assert not fe.acked_features & VirtioFeatures.PROTOCOL_FEATURES
        q0.write(7, b"L" * SECTOR)
        assert q0.read(7) == b"L" * SECTOR
