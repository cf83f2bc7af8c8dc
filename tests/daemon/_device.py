"""A test device for the daemon: a RAM-backed virtio-blk (enough of it for
the frontend's BlkDriver), with counters the tests read."""

from __future__ import annotations

import os
import select
import struct
import threading
from collections.abc import Sequence

from vubackend.daemon import BackendChannel, VhostUserBackend, VhostUserBackendMut
from vubackend.errors import DeviceError
from vubackend.memory import GuestMemoryAtomic
from vubackend.protocol import (
    DeviceStateDirection,
    DeviceStatePhase,
    ProtocolFeatures,
    VirtioFeatures,
)
from vubackend.vring import VringT

SECTOR = 512
BLK_T_IN, BLK_T_OUT, BLK_T_FLUSH, BLK_T_GET_ID = 0, 1, 4, 8
BLK_S_OK, BLK_S_IOERR, BLK_S_UNSUPP = 0, 1, 2
BLK_F_FLUSH = 1 << 9
BLK_ID = b"vubackend-test-disk\0"


class RamDisk(VhostUserBackend):
    """A thread-safe RAM disk with ``queues`` request queues."""

    def __init__(
        self,
        sectors: int = 2048,
        *,
        queues: int = 2,
        per_thread: Sequence[int] | None = None,
        extra_features: int = 0,
    ) -> None:
        self.disk = bytearray(sectors * SECTOR)
        self.queues = queues
        self.per_thread = list(per_thread) if per_thread else [(1 << queues) - 1]
        self.extra_features = extra_features
        self.lock = threading.Lock()
        self.requests = 0
        self.started: list[int] = []
        self.threads_used: set[int] = set()
        self.channel: BackendChannel | None = None
        # struct virtio_blk_config is 60 bytes; capacity first.
        self.config = bytearray(struct.pack("<Q", sectors)) + bytearray(56)
        self.event_idx: bool | None = None
        self.memory_updates = 0

    def num_queues(self) -> int:
        return self.queues

    def max_queue_size(self) -> int:
        return 256

    def features(self) -> int:
        return int(
            VirtioFeatures.VERSION_1
            | VirtioFeatures.PROTOCOL_FEATURES
            | VirtioFeatures.EVENT_IDX
            | VirtioFeatures.INDIRECT_DESC
            | VirtioFeatures.RING_PACKED
            | VirtioFeatures.LOG_ALL
            | BLK_F_FLUSH
            | self.extra_features
        )

    def protocol_features(self) -> ProtocolFeatures:
        return ProtocolFeatures.CONFIG | ProtocolFeatures.MQ

    def queues_per_thread(self) -> Sequence[int]:
        return self.per_thread

    def set_event_idx(self, enabled: bool) -> None:
        self.event_idx = enabled

    def get_config(self, offset: int, size: int) -> bytes:
        return bytes(self.config[offset : offset + size])

    def set_config(self, offset: int, data: bytes) -> None:
        self.config[offset : offset + len(data)] = data

    def update_memory(self, memory: GuestMemoryAtomic) -> None:
        self.memory_updates += 1

    def set_backend_req_fd(self, channel: BackendChannel) -> None:
        self.channel = channel

    def queue_started(self, index: int, vring: VringT) -> None:
        self.started.append(index)

    def handle_event(
        self, device_event: int, evset: int, vrings: Sequence[VringT], thread_id: int
    ) -> None:
        assert evset & select.EPOLLIN
        self.threads_used.add(thread_id)
        vring = vrings[device_event]
        while True:
            vring.disable_notification()
            self._serve(vring)
            if not vring.enable_notification():
                break

    def _serve(self, vring: VringT) -> None:
        for chain in vring.pop_chains():
            header = chain.read(16)
            kind, _reserved, sector = struct.unpack("<IIQ", header)
            payload = chain.read_all()
            written = 0
            status = BLK_S_OK
            with self.lock:
                self.requests += 1
                start = sector * SECTOR
                if kind == BLK_T_OUT:
                    if start + len(payload) > len(self.disk):
                        status = BLK_S_IOERR
                    else:
                        self.disk[start : start + len(payload)] = payload
                elif kind == BLK_T_IN:
                    length = chain.writable_len - 1
                    if start + length > len(self.disk):
                        status = BLK_S_IOERR
                    else:
                        written = chain.write(bytes(self.disk[start : start + length]))
                elif kind == BLK_T_GET_ID:
                    written = chain.write(
                        BLK_ID[: chain.writable_len - 1].ljust(20, b"\0")
                    )
                elif kind != BLK_T_FLUSH:
                    status = BLK_S_UNSUPP
            written += chain.write(bytes([status]))
            vring.add_used(chain.head, written)
        vring.signal_used_queue()


class SerializedRamDisk(RamDisk, VhostUserBackendMut):
    """The same device, its hooks serialised by the daemon."""


class MigratableRamDisk(RamDisk):
    """A RAM disk that saves and loads its contents (DEVICE_STATE)."""

    def __init__(self, sectors: int = 64) -> None:
        super().__init__(sectors, queues=1)
        self.transfer: threading.Thread | None = None
        self.transfer_error: BaseException | None = None

    def protocol_features(self) -> ProtocolFeatures:
        return super().protocol_features() | ProtocolFeatures.DEVICE_STATE

    def set_device_state_fd(
        self, direction: DeviceStateDirection, phase: DeviceStatePhase, fd: int
    ) -> int | None:
        def save() -> None:
            with os.fdopen(fd, "wb") as out:
                out.write(bytes(self.disk))

        def load() -> None:
            try:
                with os.fdopen(fd, "rb") as src:
                    data = src.read()
                if len(data) != len(self.disk):
                    raise DeviceError(
                        f"state of {len(data)} bytes, expected {len(self.disk)}"
                    )
                self.disk[:] = data
            except BaseException as exc:
                self.transfer_error = exc

        # The transfer must not block the request thread.
        work = save if direction is DeviceStateDirection.SAVE else load
        self.transfer = threading.Thread(target=work)
        self.transfer.start()
        return None

    def check_device_state(self) -> None:
        if self.transfer is not None:
            self.transfer.join()
        if self.transfer_error is not None:
            raise DeviceError(f"the last state transfer failed: {self.transfer_error}")
