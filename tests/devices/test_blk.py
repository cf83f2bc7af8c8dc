"""virtio-blk (BlkDevice) served by the daemon over a real image file, driven
by the frontend's BlkDriver: every request type, the image on disk checked
after each, the config space, read-only and multi-queue, O_DIRECT, and
hostile requests."""

from __future__ import annotations

import contextlib
import os
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest

from tests.fdutil import open_fds
from vubackend.daemon import VhostUserDaemon
from vubackend.devices import BlkDevice, BlkFeatures
from vubackend.errors import DeviceError, RemoteProtocolError
from vubackend.frontend import (
    BlkDriver,
    BlkRequest,
    BlkRequestType,
    BlkStatus,
    Frontend,
)
from vubackend.memory import GuestMemoryAtomic, select_backend
from vubackend.protocol import VirtioFeatures

SECTOR = 512
MIB = 1 << 20


@dataclass
class Served:
    device: BlkDevice
    image: Path
    fe: Frontend
    blk: BlkDriver

    def on_disk(self, sector: int, length: int) -> bytes:
        with self.image.open("rb") as f:
            f.seek(sector * SECTOR)
            return f.read(length)


def make_image(path: Path, size: int, fill: bytes = b"") -> Path:
    with path.open("wb") as f:
        f.truncate(size)
        if fill:
            f.write(fill)
    return path


@contextlib.contextmanager
def served_blk(
    tmp_path: Path,
    *,
    size: int = 4 * MIB,
    packed: bool = False,
    features: int = BlkFeatures.FLUSH,
    queue: int = 0,
    postcopy_memory: bool = False,
    **options: object,
) -> Iterator[Served]:
    """A BlkDevice over a fresh image, its daemon, and a started frontend
    with one BlkDriver on ``queue``; fds are checked after teardown."""
    before = open_fds()
    image = make_image(tmp_path / "disk.img", size)
    device = BlkDevice(image, **options)  # type: ignore[arg-type]
    memory = None
    if postcopy_memory:
        # Regions with GIL-free native copies only (the device must not
        # touch guest memory through memoryviews).
        memory = GuestMemoryAtomic(backend=select_backend(postcopy=True))
    daemon = VhostUserDaemon("blk", device, memory)
    path = tmp_path / "blk.sock"
    server = threading.Thread(target=daemon.serve, args=(path,), daemon=True)
    server.start()
    try:
        with Frontend.connect(path, retry_for=5.0, timeout=5.0) as fe:
            virtio = VirtioFeatures.VERSION_1 | VirtioFeatures.EVENT_IDX
            if packed:
                virtio |= VirtioFeatures.RING_PACKED
            fe.handshake(int(virtio) | features)
            fe.create_memory([4 * MIB, 4 * MIB])
            blk = BlkDriver(fe, fe.setup_queue(queue, 64))
            fe.start_device()
            yield Served(device, image, fe, blk)
    finally:
        daemon.close()
        server.join(timeout=10)
        device.close()
    assert open_fds() == before


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_writes_reach_the_image_and_read_back(tmp_path: Path, packed: bool) -> None:
    data = os.urandom(64 * 1024)
    with served_blk(tmp_path, packed=packed) as s:
        s.blk.write(100, data)
        s.blk.write(8191, data[:SECTOR])  # the last sector
        assert s.blk.read(100, len(data) // SECTOR) == data
        s.blk.flush()
        assert s.on_disk(100, len(data)) == data
        assert s.on_disk(8191, SECTOR) == data[:SECTOR]
        assert s.device.stats.writes == 2
        assert s.device.stats.bytes_written == len(data) + SECTOR
        assert s.device.stats.flushes == 1


def test_reads_see_data_written_on_the_host(tmp_path: Path) -> None:
    with served_blk(tmp_path) as s:
        content = os.urandom(8 * SECTOR)
        with s.image.open("r+b") as f:
            f.seek(40 * SECTOR)
            f.write(content)
        assert s.blk.read(40, 8) == content


def test_config_space_describes_the_image(tmp_path: Path) -> None:
    with served_blk(tmp_path, size=3 * MIB + 700, queues=2, block_size=4096) as s:
        config = s.fe.get_config(0, 60)
        (capacity,) = struct.unpack_from("<Q", config, 0)
        (seg_max,) = struct.unpack_from("<I", config, 12)
        (blk_size,) = struct.unpack_from("<I", config, 20)
        (num_queues,) = struct.unpack_from("<H", config, 34)
        max_discard, discard_seg = struct.unpack_from("<II", config, 36)
        assert capacity == 3 * MIB // SECTOR, "rounded down to whole blocks"
        assert seg_max == 254
        assert blk_size == 4096
        assert num_queues == 2
        assert max_discard > 0
        assert discard_seg > 0
        assert config[32] == 1, "write-back cache on by default"
        offered = s.fe.get_features()
        for bit in (BlkFeatures.MQ, BlkFeatures.FLUSH, BlkFeatures.DISCARD):
            assert offered & bit
        assert not offered & BlkFeatures.RO


def test_get_id_defaults_to_the_file_name(tmp_path: Path) -> None:
    with served_blk(tmp_path) as s:
        assert s.blk.get_id().rstrip(b"\0") == b"disk.img"
    with served_blk(tmp_path, serial="serial-0123456789ab") as s:
        assert s.blk.get_id() == b"serial-0123456789ab\0"


def test_discard_punches_a_hole_and_write_zeroes_zeroes(tmp_path: Path) -> None:
    data = os.urandom(32 * SECTOR)
    with served_blk(tmp_path) as s:
        s.blk.write(0, data)
        s.blk.write(64, data)
        s.blk.flush()
        s.blk.discard(8, 8)
        s.blk.write_zeroes(72, 4)
        s.blk.write_zeroes(80, 4, unmap=True)
        assert s.blk.read(8, 8) == bytes(8 * SECTOR), "a punched hole reads zeroes"
        assert s.blk.read(0, 8) == data[: 8 * SECTOR]
        assert s.blk.read(72, 4) == bytes(4 * SECTOR)
        assert s.blk.read(80, 4) == bytes(4 * SECTOR)
        assert s.blk.read(76, 4) == data[12 * SECTOR : 16 * SECTOR]
        assert s.on_disk(72, 4 * SECTOR) == bytes(4 * SECTOR)
        assert s.device.stats.discards == 1
        assert s.device.stats.write_zeroes == 2


def test_read_only_device_refuses_writes_and_keeps_the_image(tmp_path: Path) -> None:
    with served_blk(tmp_path, read_only=True) as s:
        offered = s.fe.get_features()
        assert offered & BlkFeatures.RO
        assert not offered & BlkFeatures.DISCARD
        with pytest.raises(RemoteProtocolError, match="IOERR"):
            s.blk.write(0, b"x" * SECTOR)
        assert s.blk.read(0) == bytes(SECTOR)
        assert s.on_disk(0, SECTOR) == bytes(SECTOR)
        assert s.device.stats.errors == 1


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_second_queue_is_served_by_its_own_worker(tmp_path: Path, packed: bool) -> None:
    data = os.urandom(4 * SECTOR)
    with served_blk(tmp_path, queues=2, queue=1, packed=packed) as s:
        s.blk.write(10, data)
        assert s.blk.read(10, 4) == data
        assert s.on_disk(10, len(data)) == data
    assert BlkDevice(s.image, queues=2).queues_per_thread() == [1, 2]


def test_direct_io_through_the_bounce_buffer(tmp_path: Path) -> None:
    data = os.urandom(16 * SECTOR)
    try:
        with served_blk(tmp_path, direct=True) as s:
            s.blk.write(3, data)  # a sector offset that is not page aligned
            assert s.blk.read(3, 16) == data
            assert s.on_disk(3, len(data)) == data
    except DeviceError as exc:  # pragma: no cover - depends on the file system
        pytest.skip(f"O_DIRECT is not supported on the temp dir: {exc}")


def test_out_of_range_and_unknown_requests_get_a_status(tmp_path: Path) -> None:
    with served_blk(tmp_path, size=MIB) as s:
        blk = s.blk
        checks = [
            (blk.submit(BlkRequestType.IN, 2047, read_len=2 * SECTOR), BlkStatus.IOERR),
            (blk.submit(BlkRequestType.IN, 1 << 60, read_len=SECTOR), BlkStatus.IOERR),
            (blk.submit(BlkRequestType.OUT, 2048, data=b"x" * SECTOR), BlkStatus.IOERR),
            (blk.submit(BlkRequestType.IN, 0, read_len=100), BlkStatus.IOERR),
            (blk.submit(BlkRequestType.FLUSH, 0), BlkStatus.OK),
            # A request type the device does not know.
            (blk.submit(cast("BlkRequestType", 99), 0), BlkStatus.UNSUPP),
        ]
        # A discard whose payload is not whole 16-byte segments.
        checks.append(
            (blk.submit(BlkRequestType.DISCARD, 0, data=b"x" * 10), BlkStatus.IOERR)
        )
        # A discard of too many segments.
        segments = struct.pack("<QII", 0, 1, 0) * 33
        checks.append(
            (blk.submit(BlkRequestType.DISCARD, 0, data=segments), BlkStatus.IOERR)
        )
        # A discard with flags (only write zeroes has one).
        flagged = struct.pack("<QII", 0, 1, 1)
        checks.append(
            (blk.submit(BlkRequestType.DISCARD, 0, data=flagged), BlkStatus.UNSUPP)
        )
        blk.wait([request for request, _ in checks], timeout=5.0)
        assert [r.status for r, _ in checks] == [int(status) for _, status in checks]
        # The device still works after all of that.
        blk.write(1, b"y" * SECTOR)
        assert blk.read(1) == b"y" * SECTOR


def test_request_without_room_for_a_status_is_dropped_not_fatal(tmp_path: Path) -> None:
    with served_blk(tmp_path) as s:
        ram = s.fe.ram
        header = ram.alloc(16, 16)
        ram.write(header, struct.pack("<IIQ", 0, 0, 0))
        # Driver-side ring of the BlkDriver: a chain with no writable buffer.
        ring = s.blk._ring
        token = BlkRequest(BlkRequestType.IN, 0)
        ring.add([(header, 16)], [], token)
        ring.kick()
        done = []
        for _ in range(100):
            done = ring.collect()
            if done:
                break
            threading.Event().wait(0.02)
        assert done == [(token, 0)]
        ram.free(header, 16)
        assert s.device.stats.errors == 1
        s.blk.write(0, b"z" * SECTOR)
        assert s.blk.read(0) == b"z" * SECTOR


def write_through(device: BlkDevice) -> bool:
    # A call, not the property, so mypy does not narrow it across requests.
    return device.write_through


def test_write_through_without_flush_syncs_every_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    real = os.fdatasync

    def counting(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", counting)
    with served_blk(tmp_path, features=0) as s:
        assert write_through(s.device)
        s.blk.write(0, b"a" * SECTOR)
        s.blk.write(1, b"b" * SECTOR)
        assert len(synced) == 2, "each write synced before it completed"
    synced.clear()
    with served_blk(tmp_path) as s:  # FLUSH negotiated: write-back
        assert not write_through(s.device)
        s.blk.write(0, b"a" * SECTOR)
        assert synced == []
        s.blk.flush()
        assert len(synced) == 1
        # The guest turns the cache off through the writeback byte.
        s.fe.set_config(32, b"\0")
        assert write_through(s.device)
        s.blk.write(1, b"b" * SECTOR)
        assert len(synced) == 2


def test_config_writes_other_than_writeback_are_refused(tmp_path: Path) -> None:
    with served_blk(tmp_path) as s:
        with pytest.raises(RemoteProtocolError):
            s.fe.set_config(0, b"\xff" * 8)
        (capacity,) = struct.unpack_from("<Q", s.fe.get_config(0, 8))
        assert capacity == 4 * MIB // SECTOR


@pytest.mark.parametrize(
    ("size", "options", "message"),
    [
        (100, {}, "less than one 512-byte block"),
        (MIB, {"queues": 0}, "queues must be in 1..64"),
        (MIB, {"queue_size": 100}, "not a power of two"),
        (MIB, {"block_size": 1000}, "not a power of two"),
        (MIB, {"serial": "x" * 21}, "longer than 20 bytes"),
    ],
)
def test_bad_configuration_is_refused(
    tmp_path: Path, size: int, options: dict[str, object], message: str
) -> None:
    before = open_fds()
    image = make_image(tmp_path / "small.img", size)
    with pytest.raises(DeviceError, match=message):
        BlkDevice(image, **options)  # type: ignore[arg-type]
    assert open_fds() == before


def test_missing_image_and_directory_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DeviceError, match=r"cannot open the image .*No such file"):
        BlkDevice(tmp_path / "nope.img")
    with pytest.raises(DeviceError, match=r"Is a directory|neither a regular file"):
        BlkDevice(tmp_path, read_only=True)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_busy_poll_serves_requests_without_waiting_for_kicks(
    tmp_path: Path, packed: bool
) -> None:
    data = os.urandom(8 * SECTOR)
    with served_blk(tmp_path, packed=packed, busy_poll=0.05) as s:
        for sector in range(0, 64, 8):
            s.blk.write(sector, data)
            assert s.blk.read(sector, 8) == data
        assert s.on_disk(56, len(data)) == data
        assert s.device.stats.writes == 8
    with pytest.raises(DeviceError, match="busy-poll window"):
        BlkDevice(s.image, busy_poll=5.0)


def test_header_split_across_buffers_is_read_whole(tmp_path: Path) -> None:
    # A driver may split the 16-byte header over two buffers; the device
    # then reads it through the cursor, and a discard's segments still
    # start right after it.
    with served_blk(tmp_path) as s:
        s.blk.write(0, b"d" * 8 * SECTOR)
        s.blk.flush()
        ram = s.fe.ram
        head = ram.alloc(16, 16)
        segment = ram.alloc(16, 16)
        status = ram.alloc(1, 1)
        ram.write(head, struct.pack("<IIQ", 11, 0, 0))  # DISCARD
        ram.write(segment, struct.pack("<QII", 2, 2, 0))
        ram.write(status, b"\xff")
        token = BlkRequest(BlkRequestType.DISCARD, 0)
        ring = s.blk._ring
        ring.add([(head, 8), (head + 8, 8), (segment, 16)], [(status, 1)], token)
        ring.kick()
        for _ in range(200):
            if ring.collect():
                break
            threading.Event().wait(0.01)
        assert ram.read(status, 1) == bytes([BlkStatus.OK])
        assert s.blk.read(2, 2) == bytes(2 * SECTOR), "the discarded sectors"
        assert s.blk.read(0, 2) == b"d" * 2 * SECTOR, "the ones before are kept"
        for gpa, size in ((head, 16), (segment, 16), (status, 1)):
            ram.free(gpa, size)


@pytest.mark.parametrize("direct", [False, True], ids=["cached", "direct"])
def test_postcopy_memory_goes_through_native_copies(
    tmp_path: Path, direct: bool
) -> None:
    data = os.urandom(16 * SECTOR)
    with served_blk(tmp_path, postcopy_memory=True, direct=direct) as s:
        s.blk.write(5, data)
        assert s.blk.read(5, 16) == data
        s.blk.flush()
        assert s.on_disk(5, len(data)) == data
