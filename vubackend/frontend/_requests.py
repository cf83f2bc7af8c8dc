# One method per front-end request of the protocol (FrontendReq 1-44), each
# a thin typed layer over RequestEngine.request().
#
# Rules of this module:
# - A method builds the payload, sends the request through the engine (which
#   adds NEED_REPLY and checks gates and acks), and turns the reply into a
#   plain Python value. It keeps no state beyond the negotiated features.
# - Fds passed in are borrowed. Fds that come back are returned to the
#   caller, owned (int) or wrapped in an owning result (_results.py).
# - Ring-level orchestration (allocating rings, eventfds, start/stop
#   sequences) is the Frontend's, not here.

from __future__ import annotations

import uuid
from collections.abc import Sequence

from vubackend.errors import RemoteProtocolError
from vubackend.frontend._dirty_log import DirtyLogBuffer
from vubackend.frontend._engine import RequestEngine
from vubackend.frontend._memory import RamRegion
from vubackend.frontend._results import DeviceStateReply, InflightBuffer
from vubackend.protocol import (
    U64,
    Config,
    ConfigReply,
    DeviceStateDirection,
    DeviceStatePhase,
    DeviceStateTransfer,
    Empty,
    FrontendReq,
    Inflight,
    IotlbMsg,
    Log,
    MemoryRegion,
    MemoryTable,
    Message,
    Opaque,
    ProtocolFeatures,
    SharedObject,
    ShmemConfig,
    SingleMemoryRegion,
    VirtioFeatures,
    VringAddr,
    VringFile,
    VringState,
)

__all__ = ["Requests"]

_F = FrontendReq


def _region(region: RamRegion) -> MemoryRegion:
    return MemoryRegion(region.gpa, region.size, region.faddr, region.mmap_offset)


class Requests(RequestEngine):
    """Every request of the protocol as a method (base of ``Frontend``)."""

    # ------------------------------------------------------------ features

    def get_features(self) -> int:
        """GET_FEATURES: the virtio and vhost feature bits the backend offers
        (device bits included); remembered as ``offered_features``."""
        self.offered_features = self._u64_reply(_F.GET_FEATURES)
        return self.offered_features

    def set_features(self, features: int) -> None:
        """SET_FEATURES: ack ``features`` (sent as given; see
        ``Frontend.negotiate`` for masking). Remembered as ``acked_features``."""
        self.request(_F.SET_FEATURES, U64(features))
        self.acked_features = features

    def get_protocol_features(self) -> ProtocolFeatures:
        """GET_PROTOCOL_FEATURES: the protocol features the backend offers."""
        value = self._u64_reply(_F.GET_PROTOCOL_FEATURES)
        self.offered_protocol_features = ProtocolFeatures(value)
        return self.offered_protocol_features

    def set_protocol_features(self, features: ProtocolFeatures) -> None:
        """SET_PROTOCOL_FEATURES: ack ``features`` (as given). From the next
        request on, REPLY_ACK applies if it is among them."""
        self.request(_F.SET_PROTOCOL_FEATURES, U64(int(features)))
        self.acked_protocol_features = ProtocolFeatures(features)
        self._conn.decoder.xen_mmap = bool(features & ProtocolFeatures.XEN_MMAP)

    def set_owner(self) -> None:
        """SET_OWNER: start the session."""
        self.request(_F.SET_OWNER)

    def reset_owner(self) -> None:
        """RESET_OWNER (deprecated): backends disable or reset the rings."""
        self.request(_F.RESET_OWNER)

    def reset_device(self) -> None:
        """RESET_DEVICE: disable the rings and reset the device (RESET_DEVICE)."""
        self.request(_F.RESET_DEVICE)

    def get_queue_num(self) -> int:
        """GET_QUEUE_NUM: the most queues the backend supports (MQ)."""
        return self._u64_reply(_F.GET_QUEUE_NUM)

    # ------------------------------------------------------------ memory

    def set_mem_table(self, regions: Sequence[RamRegion]) -> tuple[int, ...] | None:
        """SET_MEM_TABLE: replace the backend's whole memory table.

        Args:
            regions: 1 to 8 regions; their fds are lent.

        Returns:
            In postcopy listening mode, the backend's addresses of each
            region (what faults are reported at); otherwise None.
        """
        table = MemoryTable(tuple(_region(r) for r in regions))
        fds = [r.fd for r in regions]
        with self._lock:
            reply = self._memory_request(_F.SET_MEM_TABLE, table, fds)
            return self._postcopy_bases(_F.SET_MEM_TABLE, reply)

    def add_mem_region(self, region: RamRegion) -> int | None:
        """ADD_MEM_REG: add one region (CONFIGURE_MEM_SLOTS).

        Returns:
            In postcopy listening mode, the backend's address of the region;
            otherwise None.
        """
        payload = SingleMemoryRegion(_region(region))
        with self._lock:
            reply = self._memory_request(_F.ADD_MEM_REG, payload, [region.fd])
            bases = self._postcopy_bases(_F.ADD_MEM_REG, reply)
        return None if bases is None else bases[0]

    def remove_mem_region(self, region: RamRegion) -> None:
        """REM_MEM_REG: remove one region (CONFIGURE_MEM_SLOTS)."""
        self.request(_F.REM_MEM_REG, SingleMemoryRegion(_region(region)))

    def get_max_mem_slots(self) -> int:
        """GET_MAX_MEM_SLOTS: how many regions the backend can hold."""
        return self._u64_reply(_F.GET_MAX_MEM_SLOTS)

    def _memory_request(
        self,
        request: FrontendReq,
        payload: MemoryTable | SingleMemoryRegion,
        fds: Sequence[int],
    ) -> Message | None:
        # In postcopy listening mode QEMU sends the memory requests without
        # NEED_REPLY: the reply is the table, then comes QEMU's answer and no
        # ack (libvhost-user would echo NEED_REPLY in the table's flags).
        if not self._conn.decoder.postcopy:
            return self.request(request, payload, fds=fds)
        saved, self.need_reply = self.need_reply, False
        try:
            return self.request(request, payload, fds=fds)
        finally:
            self.need_reply = saved

    def _postcopy_bases(
        self, request: FrontendReq, reply: Message | None
    ) -> tuple[int, ...] | None:
        if reply is None:
            return None
        reply.close_fds()
        payload = reply.payload
        if isinstance(payload, MemoryTable):
            regions: tuple[MemoryRegion, ...] = payload.regions
        elif isinstance(payload, SingleMemoryRegion):
            regions = (payload.region,)
        else:
            raise self._fail_reply(request, "the postcopy reply holds no regions")
        # Register the client bases with the fault handling before the
        # answer: from the answer on the backend may fault (QEMU does so).
        bases = self._postcopy_regions_mapped(
            {r.guest_phys_addr: r.userspace_addr for r in regions}
        )
        # QEMU's answer: the same request id, a u64 0, flags = version only.
        self._conn.send_raw(
            int(request).to_bytes(4, "little")
            + (1).to_bytes(4, "little")
            + (8).to_bytes(4, "little")
            + (0).to_bytes(8, "little")
        )
        return tuple(bases[r.guest_phys_addr] for r in regions)

    def _postcopy_regions_mapped(self, bases: dict[int, int]) -> dict[int, int]:
        """Hook: the backend answered a memory request in postcopy mode with
        its address of each region (GPA -> address); called before QEMU's
        answer is sent. Returns the bases to use (the Frontend corrects
        echoed ones and hands them to its fault handling)."""
        return bases

    # ------------------------------------------------------------ dirty log

    def set_log_base(self, log: DirtyLogBuffer) -> None:
        """SET_LOG_BASE: give the backend a dirty log to mark (LOG_SHMFD);
        waits for the backend's reply, after which it logs there."""
        reply = self.request(_F.SET_LOG_BASE, Log(log.size, 0), fds=[log.fileno()])
        if reply is not None:
            reply.close_fds()

    def set_log_fd(self, fd: int) -> None:
        """SET_LOG_FD: an eventfd the backend signals after logging."""
        self.request(_F.SET_LOG_FD, fds=[fd])

    # ------------------------------------------------------------ rings

    def set_vring_num(self, index: int, num: int) -> None:
        """SET_VRING_NUM: ring ``index`` has ``num`` descriptors."""
        self.request(_F.SET_VRING_NUM, VringState(index, num))

    def set_vring_addr(
        self,
        index: int,
        *,
        desc: int,
        used: int,
        avail: int,
        log: int = 0,
        flags: int = 0,
    ) -> None:
        """SET_VRING_ADDR: the ring's frontend virtual addresses (``log`` is
        the used ring's guest physical address, ``flags`` 1 = log it)."""
        self.request(_F.SET_VRING_ADDR, VringAddr(index, flags, desc, used, avail, log))

    def set_vring_base(self, index: int, num: int) -> None:
        """SET_VRING_BASE: the next available index (packed: both indices
        and wrap counters, see ``PackedRingPosition``)."""
        self.request(_F.SET_VRING_BASE, VringState(index, num))

    def get_vring_base(self, index: int) -> int:
        """GET_VRING_BASE: stop ring ``index`` and return its base ``num``."""
        reply = self.request(_F.GET_VRING_BASE, VringState(index, 0))
        assert reply is not None
        payload = reply.payload
        if not isinstance(payload, VringState) or payload.index != index:
            raise self._fail_reply(_F.GET_VRING_BASE, f"reply is not for ring {index}")
        return payload.num

    def _vring_file(self, request: FrontendReq, index: int, fd: int | None) -> None:
        payload = VringFile(index, nofd=fd is None)
        self.request(request, payload, fds=() if fd is None else (fd,))

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        """SET_VRING_KICK: the eventfd we kick ring ``index`` with (None:
        NOFD, the backend polls). The fd is lent."""
        self._vring_file(_F.SET_VRING_KICK, index, fd)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        """SET_VRING_CALL: the eventfd the backend signals used buffers on."""
        self._vring_file(_F.SET_VRING_CALL, index, fd)

    def set_vring_err(self, index: int, fd: int | None) -> None:
        """SET_VRING_ERR: the eventfd the backend signals errors on."""
        self._vring_file(_F.SET_VRING_ERR, index, fd)

    def set_vring_enable(self, index: int, enable: bool) -> None:
        """SET_VRING_ENABLE: enable or disable ring ``index``."""
        self.request(_F.SET_VRING_ENABLE, VringState(index, int(enable)))

    def set_vring_endian(self, index: int, *, big_endian: bool) -> None:
        """SET_VRING_ENDIAN: legacy ring endianness (CROSS_ENDIAN)."""
        self.request(_F.SET_VRING_ENDIAN, VringState(index, int(big_endian)))

    def vring_kick(self, index: int) -> None:
        """VRING_KICK: an in-band kick (INBAND_NOTIFICATIONS)."""
        self.request(_F.VRING_KICK, VringState(index, 0))

    # ------------------------------------------------------------ config

    def get_config(self, offset: int, size: int, flags: int = 0) -> bytes:
        """GET_CONFIG: ``size`` bytes of the device config space at ``offset``.

        Raises:
            RemoteProtocolError: the backend answered with size 0 (failure)
                or with another range.
        """
        reply = self.request(_F.GET_CONFIG, Config(offset, size, flags, bytes(size)))
        assert reply is not None
        payload = reply.payload
        if not isinstance(payload, ConfigReply) or payload.failed:
            raise self._fail_reply(_F.GET_CONFIG, "the backend could not read it")
        if (payload.offset, payload.size) != (offset, size):
            raise self._fail_reply(
                _F.GET_CONFIG,
                f"asked for {size} bytes at {offset}, got {payload.size} at "
                f"{payload.offset}",
            )
        return payload.data

    def set_config(self, offset: int, data: bytes, flags: int = 0) -> None:
        """SET_CONFIG: write ``data`` into the config space at ``offset``."""
        self.request(_F.SET_CONFIG, Config(offset, len(data), flags, bytes(data)))

    # ------------------------------------------------------------ inflight

    def get_inflight_fd(
        self, num_queues: int, queue_size: int
    ) -> InflightBuffer | None:
        """GET_INFLIGHT_FD: ask the backend for an inflight buffer.

        Returns:
            The buffer (owned by the caller), or None when the backend
            answered mmap_size 0 (not supported).
        """
        reply = self.request(_F.GET_INFLIGHT_FD, Inflight(0, 0, num_queues, queue_size))
        assert reply is not None
        payload = reply.payload
        if not isinstance(payload, Inflight):
            reply.close_fds()
            raise self._fail_reply(_F.GET_INFLIGHT_FD, "the reply is not an inflight")
        if payload.mmap_size == 0 or not reply.fds:
            reply.close_fds()
            return None
        return InflightBuffer(
            reply.fds[0],
            mmap_size=payload.mmap_size,
            mmap_offset=payload.mmap_offset,
            num_queues=num_queues,
            queue_size=queue_size,
        )

    def set_inflight_fd(self, buffer: InflightBuffer) -> None:
        """SET_INFLIGHT_FD: give an inflight buffer (back) to the backend."""
        payload = Inflight(
            buffer.mmap_size, buffer.mmap_offset, buffer.num_queues, buffer.queue_size
        )
        self.request(_F.SET_INFLIGHT_FD, payload, fds=[buffer.fileno()])

    # ------------------------------------------------------------ status

    def set_status(self, status: int) -> None:
        """SET_STATUS: the virtio device status byte (STATUS)."""
        self.request(_F.SET_STATUS, U64(status))

    def get_status(self) -> int:
        """GET_STATUS: the backend's device status byte (STATUS)."""
        return self._u64_reply(_F.GET_STATUS)

    # ------------------------------------------------------------ objects

    def get_shared_object(self, object_id: uuid.UUID) -> int | None:
        """GET_SHARED_OBJECT: the dma-buf fd the backend exports under
        ``object_id`` (owned by the caller), or None if it has none."""
        reply = self.request(_F.GET_SHARED_OBJECT, SharedObject(object_id.bytes))
        assert reply is not None
        status = reply.payload.value if isinstance(reply.payload, U64) else 0
        if status != 0 or not reply.fds:
            reply.close_fds()
            return None
        return reply.fds[0]

    def set_device_state_fd(
        self, direction: DeviceStateDirection, fd: int
    ) -> DeviceStateReply:
        """SET_DEVICE_STATE_FD: start a state transfer over ``fd`` (lent; the
        write end of a pipe to SAVE, the read end to LOAD).

        Returns:
            The backend's answer (error code, and maybe its own fd).
        """
        payload = DeviceStateTransfer(int(direction), int(DeviceStatePhase.STOPPED))
        reply = self.request(_F.SET_DEVICE_STATE_FD, payload, fds=[fd])
        assert reply is not None
        value = reply.payload.value if isinstance(reply.payload, U64) else 0xFF
        error = value & 0xFF
        no_fd = bool(value & 0x100)
        if error or no_fd:
            reply.close_fds()
            return DeviceStateReply(error, None)
        return DeviceStateReply(0, reply.fds[0] if reply.fds else None)

    def check_device_state(self) -> int:
        """CHECK_DEVICE_STATE: 0 if the last state transfer succeeded."""
        return self._u64_reply(_F.CHECK_DEVICE_STATE)

    def get_shmem_config(self) -> ShmemConfig:
        """GET_SHMEM_CONFIG: the device's shared-memory regions (SHMEM)."""
        reply = self.request(_F.GET_SHMEM_CONFIG)
        assert reply is not None
        if not isinstance(reply.payload, ShmemConfig):
            raise self._fail_reply(_F.GET_SHMEM_CONFIG, "not a shmem config")
        return reply.payload

    # ------------------------------------------------------------ net

    def send_rarp(self, mac: bytes) -> None:
        """SEND_RARP: ask the backend to announce ``mac`` (6 bytes; RARP)."""
        if len(mac) != 6:
            raise ValueError(f"a MAC address has 6 bytes, not {len(mac)}")
        self.request(_F.SEND_RARP, U64(int.from_bytes(mac + b"\0\0", "little")))

    def net_set_mtu(self, mtu: int) -> None:
        """NET_SET_MTU: tell a net backend the MTU (MTU feature)."""
        self.request(_F.NET_SET_MTU, U64(mtu))

    # ------------------------------------------------------------ rarely used

    def iotlb_msg(self, message: IotlbMsg) -> None:
        """IOTLB_MSG: an IOTLB update or invalidation (ACCESS_PLATFORM).

        Raises:
            RemoteProtocolError: the backend answered non-zero.
        """
        value = self._u64_reply(_F.IOTLB_MSG, message)
        if value:
            raise RemoteProtocolError(
                f"IOTLB_MSG: the backend refused it ({value})",
                request=int(_F.IOTLB_MSG),
                recoverable=True,
            )

    def create_crypto_session(self, session: bytes) -> bytes:
        """CREATE_CRYPTO_SESSION: an opaque session in, the backend's reply
        out (CRYPTO_SESSION)."""
        reply = self.request(_F.CREATE_CRYPTO_SESSION, Opaque(session))
        assert reply is not None
        return reply.payload.data if isinstance(reply.payload, Opaque) else b""

    def close_crypto_session(self, session_id: int) -> None:
        """CLOSE_CRYPTO_SESSION (CRYPTO_SESSION)."""
        self.request(_F.CLOSE_CRYPTO_SESSION, U64(session_id))

    def gpu_set_socket(self, fd: int) -> None:
        """GPU_SET_SOCKET: the vhost-user-gpu sub-protocol socket (lent)."""
        self.request(_F.GPU_SET_SOCKET, fds=[fd])

    # ------------------------------------------------------------ postcopy

    def postcopy_advise(self) -> int:
        """POSTCOPY_ADVISE: get the backend's userfaultfd (owned by the
        caller; PAGEFAULT)."""
        reply = self.request(_F.POSTCOPY_ADVISE, Empty())
        assert reply is not None
        if len(reply.fds) != 1:
            reply.close_fds()
            raise self._fail_reply(_F.POSTCOPY_ADVISE, "no userfaultfd in the reply")
        return reply.fds[0]

    def postcopy_listen(self) -> None:
        """POSTCOPY_LISTEN: from now on memory requests are answered with
        the backend's addresses (PAGEFAULT)."""
        value = self._u64_reply(_F.POSTCOPY_LISTEN)
        if value:
            raise self._fail_reply(_F.POSTCOPY_LISTEN, f"refused ({value})")
        self._conn.decoder.postcopy = True

    def postcopy_end(self) -> None:
        """POSTCOPY_END: leave postcopy mode (PAGEFAULT)."""
        value = self._u64_reply(_F.POSTCOPY_END)
        self._conn.decoder.postcopy = False
        if value:
            raise self._fail_reply(_F.POSTCOPY_END, f"refused ({value})")

    # ------------------------------------------------------------ helpers

    @property
    def protocol_features_offered(self) -> bool:
        """Whether the backend offers GET/SET_PROTOCOL_FEATURES (bit 30)."""
        return bool(self.offered_features & VirtioFeatures.PROTOCOL_FEATURES)
