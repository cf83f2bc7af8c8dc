"""The frontend drives qemu-storage-daemon's vhost-user-blk export (C,
libvhost-user): data written through the rings lands in the image file on
the host, flush works, two queues, stop/restart of the rings keeps the data,
and malformed frames are reported cleanly."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from vubackend.errors import PeerDisconnectedError, RemoteProtocolError
from vubackend.frontend import (
    SECTOR_SIZE,
    BlkDriver,
    BlkRequestType,
    BlkStatus,
    Frontend,
    QueueState,
    RawOutcome,
    frame,
)
from vubackend.protocol import FrontendReq, ProtocolFeatures, VirtioFeatures

from ..fdutil import open_fds
from .peers import StorageDaemon, storage_daemon

# virtio-blk feature bits we accept (virtio 1.x §5.2.3): SIZE_MAX, SEG_MAX,
# BLK_SIZE, FLUSH, TOPOLOGY, CONFIG_WCE, MQ, DISCARD, WRITE_ZEROES.
BLK_FEATURES = (
    (1 << 1) | (1 << 2) | (1 << 6) | (1 << 9) | (1 << 10) | (1 << 11) | (1 << 12)
    | (1 << 13) | (1 << 14)
)  # fmt: skip
FEATURES = int(VirtioFeatures.VERSION_1) | BLK_FEATURES
IMAGE_MB = 16


@pytest.fixture
def qsd(tmp_path: Path) -> Iterator[StorageDaemon]:
    with storage_daemon(tmp_path, size_mb=IMAGE_MB, num_queues=2) as daemon:
        yield daemon


def _session(qsd: StorageDaemon) -> Frontend:
    fe = Frontend.connect(qsd.socket, timeout=5)
    try:
        fe.handshake(FEATURES)
        fe.create_memory([4 << 20, 4 << 20])
    except BaseException:
        fe.close()
        raise
    return fe


def test_blk_data_reaches_the_image_across_two_queues_and_a_ring_restart(
    qsd: StorageDaemon,
) -> None:
    fds_before = open_fds()
    fe = _session(qsd)
    with fe:
        assert fe.has_protocol_feature(ProtocolFeatures.CONFIGURE_MEM_SLOTS)
        assert fe.has_protocol_feature(ProtocolFeatures.REPLY_ACK)
        assert fe.max_queues is not None
        assert fe.max_queues >= 2
        q0 = fe.setup_queue(0, 128)
        q1 = fe.setup_queue(1, 64)
        blk0 = BlkDriver(fe, q0)
        blk1 = BlkDriver(fe, q1)
        # Capacity (config offset 0, in 512-byte sectors) matches the image.
        capacity = struct.unpack("<Q", fe.get_config(0, 8))[0]
        assert capacity * SECTOR_SIZE == IMAGE_MB << 20

        # Several writes in flight on each queue, to scattered sectors; one
        # of them spans the boundary between the two RAM regions.
        patterns = {
            sector: os.urandom(8 * SECTOR_SIZE) for sector in (0, 64, 4096, 30000)
        }
        requests = []
        for i, (sector, data) in enumerate(patterns.items()):
            driver = blk0 if i % 2 == 0 else blk1
            requests.append(driver.submit(BlkRequestType.OUT, sector, data=data))
        blk0.wait()
        blk1.wait()
        assert [r.status for r in requests] == [BlkStatus.OK] * 4
        blk1.flush()
        for sector, data in patterns.items():
            assert blk0.read(sector, 8) == data
            assert blk1.read(sector, 8) == data
            assert qsd.read_image(sector * SECTOR_SIZE, len(data)) == data

        # Stop both rings in the middle, restart them, and go on.
        bases = [fe.stop_queue(q0), fe.stop_queue(q1)]
        assert q0.state is QueueState.STOPPED
        assert bases[0] == q0.base > 0
        fe.start_queue(q0)
        fe.start_queue(q1)
        for sector, data in patterns.items():
            assert blk1.read(sector, 8) == data
        more = os.urandom(16 * SECTOR_SIZE)
        blk0.write(100000 // 4, more)
        blk0.flush()
        assert qsd.read_image((100000 // 4) * SECTOR_SIZE, len(more)) == more
    assert open_fds() == fds_before


def test_blk_get_id_discard_and_write_zeroes(qsd: StorageDaemon) -> None:
    with _session(qsd) as fe:
        blk = BlkDriver(fe, fe.setup_queue(0, 32))
        assert blk.get_id().startswith(b"vhost_user_blk")
        blk.write(8, b"\xa5" * 4 * SECTOR_SIZE)
        blk.write_zeroes(8, 2)
        assert blk.read(8, 4) == bytes(2 * SECTOR_SIZE) + b"\xa5" * 2 * SECTOR_SIZE
        blk.discard(10, 2)  # accepted; the content of discarded sectors is unspecified
        assert qsd.read_image(8 * SECTOR_SIZE, 2 * SECTOR_SIZE) == bytes(
            2 * SECTOR_SIZE
        )


def test_oversized_frame_is_reported_as_a_disconnect(qsd: StorageDaemon) -> None:
    with _session(qsd) as fe:
        reply = fe.exchange_raw(frame(int(FrontendReq.GET_FEATURES), size=0x10000))
        assert reply.outcome is RawOutcome.DISCONNECTED
        with pytest.raises(PeerDisconnectedError):
            fe.get_features()
    # The daemon survives and serves the next session.
    with _session(qsd) as fe:
        assert BlkDriver(fe, fe.setup_queue(0, 16)).read(0, 1) == bytes(SECTOR_SIZE)
    assert qsd.running
    assert "too big message" in qsd.log.read_text()


def test_unknown_request_answer_is_a_typed_error(qsd: StorageDaemon) -> None:
    with _session(qsd) as fe:
        # libvhost-user acks an unknown request (with 0), panics the device
        # and hangs up. Depending on timing the next request meets the stray
        # ack (which arrives where GET_FEATURES's reply should) or the
        # closed socket: either way a typed error that names the request.
        fe.send_raw(frame(999, bytes(8), flags=0x9))
        with pytest.raises(
            (RemoteProtocolError, PeerDisconnectedError), match="GET_FEATURES: "
        ):
            fe.get_features()
        assert fe.broken is not None
    assert "Unhandled request: 999" in qsd.log.read_text()


def test_raw_reply_to_an_unknown_request_is_shown_byte_for_byte(
    qsd: StorageDaemon,
) -> None:
    with _session(qsd) as fe, fe.exchange_raw(frame(999, bytes(8), flags=0x9)) as reply:
        assert reply.outcome is RawOutcome.ANSWERED
        assert reply.headers() == [(999, 0x5, 8)]
        assert fe.broken is not None  # the typed engine will not guess
