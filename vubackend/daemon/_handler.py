# The request handler: applies each front-end request to the session's
# memory, rings and device, and builds the reply.
#
# Rules (h11's Rule 1 for this layer): only this module changes session
# state; the daemon's request loop only moves messages.
#
# * Syntax (sizes, fd counts, field values) was checked by the Decoder;
#   feature gates and semantics are checked here, from the protocol table.
# * A request that fails is answered with a failure where the protocol has a
#   way to say so (a non-zero REPLY_ACK, GET_CONFIG size 0, inflight
#   mmap_size 0, ...) and the session goes on; the reason is logged. Only
#   SessionEndedError stops the session.
# * fd ownership: every fd of a request sits in an OwnedFds that the loop
#   closes after the handler; a handler that keeps one takes it (fds.take).
# * Replies to requests that change what workers see (SET_MEM_TABLE,
#   SET_VRING_ENABLE, SET_FEATURES with LOG_ALL) are built only after the
#   change is visible to them: the rings read memory through leases of
#   GuestMemoryAtomic and every ring call takes the ring's lock.

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, final

from vubackend.daemon._backend import VhostUserBackend
from vubackend.daemon._channel import BackendChannel
from vubackend.daemon._dirty_log import SessionDirtyLog
from vubackend.daemon._inflight import InflightBuffer
from vubackend.daemon._postcopy import PostcopySession
from vubackend.daemon._worker import VringEpollHandler
from vubackend.errors import (
    DeviceError,
    GuestMemoryError,
    LocalProtocolError,
    SessionEndedError,
    VhostUserError,
    VringError,
)
from vubackend.memory import (
    FrontendAddress,
    GuestAddress,
    GuestMemoryAtomic,
    RegionDescriptor,
    xen_flags_from_wire,
)
from vubackend.protocol import (
    MAX_MEM_SLOTS,
    U64,
    Config,
    ConfigReply,
    Connection,
    DeviceStateDirection,
    DeviceStatePhase,
    DeviceStateTransfer,
    Empty,
    FrontendReq,
    Inbound,
    Inflight,
    Log,
    MemoryRegion,
    MemoryTable,
    Message,
    Opaque,
    OwnedFds,
    Payload,
    ProtocolFeatures,
    SharedObject,
    ShmemConfig,
    SingleMemoryRegion,
    VirtioFeatures,
    VringAddr,
    VringFile,
    VringState,
    XenMemoryRegion,
    close_fds,
    gate_problem,
)
from vubackend.vring import QueueFeatures, VringT

__all__ = ["RequestHandler"]

log = logging.getLogger("vubackend.daemon")

# What the daemon itself implements, whatever the device offers.
DAEMON_PROTOCOL_FEATURES: Final = (
    ProtocolFeatures.MQ
    | ProtocolFeatures.REPLY_ACK
    | ProtocolFeatures.CONFIGURE_MEM_SLOTS
    | ProtocolFeatures.LOG_SHMFD
    | ProtocolFeatures.INFLIGHT_SHMFD
    | ProtocolFeatures.RESET_DEVICE
    | ProtocolFeatures.STATUS
    | ProtocolFeatures.BACKEND_REQ
    | ProtocolFeatures.BACKEND_SEND_FD
)
# Offered only when the device implements the hooks behind them.
DEVICE_PROTOCOL_FEATURES: Final = (
    ProtocolFeatures.CONFIG
    | ProtocolFeatures.SHARED_OBJECT
    | ProtocolFeatures.DEVICE_STATE
    | ProtocolFeatures.SHMEM
    | ProtocolFeatures.INBAND_NOTIFICATIONS
)
# Backend-selected bits (memory backend): never from the device.
_MEMORY_BACKEND_BITS: Final = ProtocolFeatures.XEN_MMAP | ProtocolFeatures.PAGEFAULT


class _RefusedError(Exception):
    """A request is refused; the reason is logged and the front-end told."""


@dataclass
class _Ring:
    vring: VringT
    worker: VringEpollHandler | None = None
    # Position of the ring in its worker's list (its epoll token).
    position: int = 0
    # The kick fd, borrowed from the vring (which owns and closes it), so
    # that it can be unregistered from the worker before it is replaced.
    kick: int | None = None
    started: bool = False
    enabled: bool = False
    addr: VringAddr | None = None


@final
class RequestHandler:
    """One session's protocol state machine (the seed's VhostUserHandler).

    Args:
        backend: the device (already wrapped by ``serialized``).
        memory: the session's guest memory.
        vrings: one ring object per queue.
        workers: the worker threads, in queues_per_thread order.
    """

    def __init__(
        self,
        backend: VhostUserBackend,
        memory: GuestMemoryAtomic,
        vrings: Sequence[VringT],
        workers: Sequence[VringEpollHandler],
        masks: Sequence[int],
    ) -> None:
        self.backend = backend
        self.memory = memory
        self.num_queues = backend.num_queues()
        self.max_queue_size = backend.max_queue_size()
        self.rings = [_Ring(vring) for vring in vrings]
        for index, ring in enumerate(self.rings):
            # A queue in several masks is served by the first (as the seed).
            for worker, mask in zip(workers, masks, strict=True):
                if mask >> index & 1:
                    ring.worker = worker
                    ring.position = bin(mask & ((1 << index) - 1)).count("1")
                    break
        self.owned = False
        self.offered_features = backend.features()
        self.acked_features = 0
        self.acked_protocol = ProtocolFeatures(0)
        self.protocol_negotiated = False
        self.status = 0
        self.channel: BackendChannel | None = None
        self.inflight: InflightBuffer | None = None
        self.dirty = SessionDirtyLog(memory)
        self.postcopy = PostcopySession(memory)
        self._handlers: dict[
            FrontendReq, Callable[[Message, OwnedFds], Payload | None]
        ] = {
            FrontendReq.GET_FEATURES: self._get_features,
            FrontendReq.SET_FEATURES: self._set_features,
            FrontendReq.SET_OWNER: self._set_owner,
            FrontendReq.RESET_OWNER: self._reset_owner,
            FrontendReq.SET_MEM_TABLE: self._set_mem_table,
            FrontendReq.SET_LOG_BASE: self._set_log_base,
            FrontendReq.SET_LOG_FD: self._set_log_fd,
            FrontendReq.SET_VRING_NUM: self._set_vring_num,
            FrontendReq.SET_VRING_ADDR: self._set_vring_addr,
            FrontendReq.SET_VRING_BASE: self._set_vring_base,
            FrontendReq.GET_VRING_BASE: self._get_vring_base,
            FrontendReq.SET_VRING_KICK: self._set_vring_kick,
            FrontendReq.SET_VRING_CALL: self._set_vring_call,
            FrontendReq.SET_VRING_ERR: self._set_vring_err,
            FrontendReq.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            FrontendReq.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            FrontendReq.GET_QUEUE_NUM: self._get_queue_num,
            FrontendReq.SET_VRING_ENABLE: self._set_vring_enable,
            FrontendReq.SET_BACKEND_REQ_FD: self._set_backend_req_fd,
            FrontendReq.GET_CONFIG: self._get_config,
            FrontendReq.SET_CONFIG: self._set_config,
            FrontendReq.GET_INFLIGHT_FD: self._get_inflight_fd,
            FrontendReq.SET_INFLIGHT_FD: self._set_inflight_fd,
            FrontendReq.RESET_DEVICE: self._reset_device,
            FrontendReq.GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            FrontendReq.ADD_MEM_REG: self._add_mem_reg,
            FrontendReq.REM_MEM_REG: self._rem_mem_reg,
            FrontendReq.SET_STATUS: self._set_status,
            FrontendReq.GET_STATUS: self._get_status,
            FrontendReq.GET_SHARED_OBJECT: self._get_shared_object,
            FrontendReq.SET_DEVICE_STATE_FD: self._set_device_state_fd,
            FrontendReq.CHECK_DEVICE_STATE: self._check_device_state,
            FrontendReq.GET_SHMEM_CONFIG: self._get_shmem_config,
            FrontendReq.POSTCOPY_ADVISE: self._postcopy_advise,
            FrontendReq.POSTCOPY_LISTEN: self.postcopy.listen,
            FrontendReq.POSTCOPY_END: self.postcopy.end,
        }

    # ------------------------------------------------------------ features

    def offered_protocol_features(self) -> ProtocolFeatures:
        device = ProtocolFeatures(self.backend.protocol_features())
        own = DAEMON_PROTOCOL_FEATURES | (device & DEVICE_PROTOCOL_FEATURES)
        memory = ProtocolFeatures(self.memory.backend.protocol_features)
        return own | (memory & _MEMORY_BACKEND_BITS)

    @property
    def reply_ack(self) -> bool:
        return bool(self.acked_protocol & ProtocolFeatures.REPLY_ACK) and bool(
            self.offered_features & VirtioFeatures.PROTOCOL_FEATURES
        )

    # ------------------------------------------------------------ dispatch

    def handle(self, message: Message, fds: OwnedFds) -> Message | None:
        """Apply one request; returns the reply to send, or None.

        Raises:
            SessionEndedError: the session cannot continue.
        """
        request = message.request
        assert isinstance(request, FrontendReq)
        spec = message.spec
        # Ack when REPLY_ACK was negotiated before the request or by it:
        # RESET_OWNER forgets REPLY_ACK yet its own ack is due, and the
        # SET_PROTOCOL_FEATURES that acks REPLY_ACK is acked (as libvhost-user
        # and rust-vmm do).
        acked_before = self.reply_ack
        try:
            # Bit 30 counts as negotiated once the protocol features were:
            # QEMU's net device sends SET_VRING_ENABLE before SET_FEATURES
            # (and never again after it), as DPDK's vhost library accepts.
            virtio = VirtioFeatures(self.acked_features)
            if self.protocol_negotiated:
                virtio |= VirtioFeatures.PROTOCOL_FEATURES
            problem = gate_problem(
                spec, protocol_features=self.acked_protocol, virtio_features=virtio
            )
            # Queries that come before negotiation are never gated.
            if problem is not None and request not in (
                FrontendReq.GET_QUEUE_NUM,
                FrontendReq.GET_MAX_MEM_SLOTS,
            ):
                raise _RefusedError(problem)
            handler = self._handlers.get(request)
            if handler is None:
                raise _RefusedError("not supported by vubackend")
            body = handler(message, fds)
        except SessionEndedError:
            raise
        except (
            _RefusedError,
            DeviceError,
            GuestMemoryError,
            VringError,
            LocalProtocolError,
        ) as exc:
            log.warning("%s refused: %s", request.name, exc)
            return self._failure(message, acked_before or self.reply_ack)
        except (OSError, VhostUserError) as exc:
            log.warning("%s failed: %s", request.name, exc)
            return self._failure(message, acked_before or self.reply_ack)
        except Exception:
            # A bug in a device hook: refuse this request, keep the session.
            log.exception("%s: the device failed unexpectedly", request.name)
            return self._failure(message, acked_before or self.reply_ack)
        reply_fds, self._reply_fds = self._reply_fds, ()
        # A memory request is answered with a body in postcopy mode only.
        if spec.has_reply_body or body is not None:
            assert body is not None
            # The caller sends these fds and then closes them.
            return Message.new_reply(request, body, fds=reply_fds)
        close_fds(reply_fds)
        if message.need_reply and (acked_before or self.reply_ack):
            return Message.ack(request, success=True)
        return None

    _reply_fds: tuple[int, ...] = ()

    def _failure(self, message: Message, reply_ack: bool) -> Message | None:
        close_fds(self._reply_fds)
        self._reply_fds = ()
        request = message.request
        assert isinstance(request, FrontendReq)
        failure = _FAILURE_REPLIES.get(request)
        if failure is not None:
            return Message.new_reply(request, failure(message.payload))
        if message.spec.has_reply_body:
            raise SessionEndedError(f"{request.name} failed and has no failure reply")
        if message.need_reply and reply_ack:
            return Message.ack(request, success=False)
        return None

    # ------------------------------------------------------------ owner, features

    def _get_features(self, message: Message, fds: OwnedFds) -> Payload:
        return U64(self.offered_features)

    def _set_features(self, message: Message, fds: OwnedFds) -> None:
        assert isinstance(message.payload, U64)
        features = message.payload.value
        unknown = features & ~self.offered_features
        if unknown:
            raise _RefusedError(f"features {unknown:#x} were not offered")
        self.acked_features = features
        queue_features = QueueFeatures.from_virtio_features(features)
        for ring in self.rings:
            ring.vring.set_queue_features(queue_features)
        # Without PROTOCOL_FEATURES rings are enabled as soon as they start.
        if not features & VirtioFeatures.PROTOCOL_FEATURES:
            for index in range(len(self.rings)):
                self._set_enabled(index, True)
        logging_all = bool(features & VirtioFeatures.LOG_ALL)
        if self.dirty.set_logging_all(logging_all):
            self._apply_ring_logging()
            log.info("dirty logging %s", "on" if logging_all else "off")
        self.backend.set_event_idx(queue_features.event_idx)
        self.backend.acked_features(features)

    def _set_owner(self, message: Message, fds: OwnedFds) -> None:
        if self.owned:
            raise _RefusedError("the session already has an owner")
        self.owned = True

    def _reset_owner(self, message: Message, fds: OwnedFds) -> None:
        for index in range(len(self.rings)):
            self._stop_ring(index)
            self._set_enabled(index, False)
        self.owned = False
        self.acked_features = 0
        self.acked_protocol = ProtocolFeatures(0)
        self.protocol_negotiated = False

    def _get_protocol_features(self, message: Message, fds: OwnedFds) -> Payload:
        return U64(int(self.offered_protocol_features()))

    def _set_protocol_features(self, message: Message, fds: OwnedFds) -> None:
        assert isinstance(message.payload, U64)
        value = message.payload.value
        unknown = value & ~int(self.offered_protocol_features())
        if unknown:
            raise _RefusedError(f"protocol features {unknown:#x} were not offered")
        acked = ProtocolFeatures(value)
        inband = ProtocolFeatures.INBAND_NOTIFICATIONS
        needs = ProtocolFeatures.BACKEND_REQ | ProtocolFeatures.REPLY_ACK
        if acked & inband and (acked & needs) != needs:
            raise SessionEndedError(
                "INBAND_NOTIFICATIONS needs BACKEND_REQ and REPLY_ACK"
            )
        self.acked_protocol = acked
        if self.offered_protocol_features() & ~int(acked) & ProtocolFeatures.XEN_MMAP:
            # Acked, then refused, as rust-vmm does: the backend requires it.
            raise _RefusedError("the xen memory backend requires XEN_MMAP")
        self.protocol_negotiated = True

    def _get_queue_num(self, message: Message, fds: OwnedFds) -> Payload:
        return U64(self.num_queues)

    def _reset_device(self, message: Message, fds: OwnedFds) -> None:
        for index in range(len(self.rings)):
            self._stop_ring(index)
            self._set_enabled(index, False)
        self.acked_features = 0
        self.status = 0
        self.backend.reset_device()

    def _set_status(self, message: Message, fds: OwnedFds) -> None:
        assert isinstance(message.payload, U64)
        if message.payload.value > 0xFF:
            raise _RefusedError(
                f"status {message.payload.value:#x} does not fit in a byte"
            )
        self.status = message.payload.value

    def _get_status(self, message: Message, fds: OwnedFds) -> Payload:
        return U64(self.status)

    # ------------------------------------------------------------ memory

    def _descriptor(self, region: MemoryRegion, fd: int) -> RegionDescriptor:
        xen_flags = xen_data = 0
        if isinstance(region, XenMemoryRegion):
            xen_flags = xen_flags_from_wire(region.xen_mmap_flags)
            xen_data = region.xen_mmap_data
        elif self.memory.backend.protocol_features & ProtocolFeatures.XEN_MMAP:
            raise _RefusedError("the xen memory backend needs XEN_MMAP regions")
        return RegionDescriptor(
            gpa=GuestAddress(region.guest_phys_addr),
            size=region.memory_size,
            frontend_addr=FrontendAddress(region.userspace_addr),
            mmap_offset=region.mmap_offset,
            fd=fd,
            xen_flags=xen_flags,
            xen_data=xen_data,
        )

    def _set_mem_table(self, message: Message, fds: OwnedFds) -> Payload | None:
        assert isinstance(message.payload, MemoryTable)
        regions = message.payload.regions
        descriptors = [
            self._descriptor(region, fds.borrow(i)) for i, region in enumerate(regions)
        ]
        self.memory.set_mem_table(descriptors)
        self._memory_changed()
        return self.postcopy.memory_reply(FrontendReq.SET_MEM_TABLE, message.payload)

    def _add_mem_reg(self, message: Message, fds: OwnedFds) -> Payload | None:
        assert isinstance(message.payload, SingleMemoryRegion)
        with self.memory.memory() as current:
            if len(current.regions) >= MAX_MEM_SLOTS:
                raise _RefusedError(f"all {MAX_MEM_SLOTS} memory slots are in use")
        self.memory.add_region(self._descriptor(message.payload.region, fds.borrow(0)))
        self._memory_changed()
        return self.postcopy.memory_reply(FrontendReq.ADD_MEM_REG, message.payload)

    def _rem_mem_reg(self, message: Message, fds: OwnedFds) -> None:
        assert isinstance(message.payload, SingleMemoryRegion)
        region = message.payload.region
        self.memory.remove_region(
            GuestAddress(region.guest_phys_addr),
            FrontendAddress(region.userspace_addr),
            region.memory_size,
        )
        self._memory_changed()

    def _get_max_mem_slots(self, message: Message, fds: OwnedFds) -> Payload:
        return U64(MAX_MEM_SLOTS)

    def _memory_changed(self) -> None:
        # Rings whose addresses are set are re-translated on the new table.
        for index, ring in enumerate(self.rings):
            if ring.addr is not None:
                try:
                    self._apply_addr(index, ring.addr, reload_used=False)
                except (GuestMemoryError, VringError) as exc:
                    log.warning(
                        "ring %d is not in the new memory table: %s", index, exc
                    )
        # Re-translation reset where used rings are logged (log_guest_addr).
        self._apply_ring_logging()
        self.backend.update_memory(self.memory)

    def _set_log_base(self, message: Message, fds: OwnedFds) -> Payload:
        assert isinstance(message.payload, Log)
        size, offset = message.payload.mmap_size, message.payload.mmap_offset
        self.dirty.set_base(fds.take(0), size, offset)
        return U64(0)

    def _set_log_fd(self, message: Message, fds: OwnedFds) -> None:
        # Optional; we never need to wake the front-end after logging.
        log.debug("SET_LOG_FD: the log eventfd is not used")

    def _apply_ring_logging(self) -> None:
        # Each ring logs its own writes when LOG_ALL is on and its
        # SET_VRING_ADDR asked for it (VHOST_VRING_F_LOG).
        for ring in self.rings:
            ring.vring.set_log_used(*self.dirty.ring_log(ring.addr))

    # ------------------------------------------------------------ rings

    def _ring(self, index: int) -> _Ring:
        if not 0 <= index < len(self.rings):
            raise _RefusedError(
                f"ring {index} does not exist (the device has {len(self.rings)})"
            )
        return self.rings[index]

    def _set_vring_num(self, message: Message, fds: OwnedFds) -> None:
        assert isinstance(message.payload, VringState)
        ring = self._ring(message.payload.index)
        size = message.payload.num
        if not 0 < size <= self.max_queue_size:
            raise _RefusedError(f"ring size {size} is not in 1..{self.max_queue_size}")
        ring.vring.set_queue_size(size)

    def _set_vring_addr(self, message: Message, fds: OwnedFds) -> None:
        assert isinstance(message.payload, VringAddr)
        index = message.payload.index
        self._ring(index)
        self._apply_addr(index, message.payload, reload_used=True)
        self._apply_ring_logging()

    def _apply_addr(self, index: int, addr: VringAddr, *, reload_used: bool) -> None:
        ring = self.rings[index]
        with self.memory.memory() as mem:
            desc = mem.faddr_to_gpa(FrontendAddress(addr.desc), 1)
            avail = mem.faddr_to_gpa(FrontendAddress(addr.avail), 1)
            used = mem.faddr_to_gpa(FrontendAddress(addr.used), 1)
        ring.vring.set_queue_info(desc, avail, used)
        ring.addr = addr
        if reload_used and not self.acked_features & VirtioFeatures.RING_PACKED:
            # Continue from the used index in memory, as libvhost-user does
            # (the seed's fix #180): a restarted back-end then does not
            # complete requests twice.
            ring.vring.set_queue_next_used(ring.vring.queue_used_idx())

    def _set_vring_base(self, message: Message, fds: OwnedFds) -> None:
        assert isinstance(message.payload, VringState)
        ring = self._ring(message.payload.index)
        ring.vring.set_vring_base(message.payload.num)

    def _get_vring_base(self, message: Message, fds: OwnedFds) -> Payload:
        assert isinstance(message.payload, VringState)
        index = message.payload.index
        ring = self._ring(index)
        self._stop_ring(index)
        base = ring.vring.vring_base()
        self._close_ring_fds(ring)
        return VringState(index, base)

    def _vring_fd(self, message: Message, fds: OwnedFds) -> tuple[_Ring, int | None]:
        assert isinstance(message.payload, VringFile)
        ring = self._ring(message.payload.index)
        return ring, None if message.payload.nofd else fds.take(0)

    def _set_vring_kick(self, message: Message, fds: OwnedFds) -> None:
        ring, fd = self._vring_fd(message, fds)
        index = self.rings.index(ring)
        if ring.kick is not None and ring.worker is not None:
            ring.worker.unregister_kick(ring.kick)
        ring.kick = fd
        ring.vring.set_kick(fd)  # takes fd over and closes the old one
        # All three reference back-ends start the ring on this message.
        ring.started = True
        ring.vring.set_queue_ready(True)
        # libvhost-user and DPDK check the inflight buffer at kick time.
        self._attach_inflight(index)
        self._update_registration(index)
        if ring.enabled:
            self.backend.queue_started(index, ring.vring)

    def _set_vring_call(self, message: Message, fds: OwnedFds) -> None:
        ring, fd = self._vring_fd(message, fds)
        ring.vring.set_call(fd)  # takes fd over and closes the old one

    def _set_vring_err(self, message: Message, fds: OwnedFds) -> None:
        ring, fd = self._vring_fd(message, fds)
        ring.vring.set_err(fd)  # takes fd over and closes the old one

    def _set_vring_enable(self, message: Message, fds: OwnedFds) -> None:
        assert isinstance(message.payload, VringState)
        index, enable = message.payload.index, message.payload.num
        self._ring(index)
        if enable not in (0, 1):
            raise _RefusedError(f"SET_VRING_ENABLE takes 0 or 1, not {enable}")
        self._set_enabled(index, bool(enable))

    def _set_enabled(self, index: int, enabled: bool) -> None:
        ring = self.rings[index]
        was = ring.enabled and ring.started
        ring.enabled = enabled
        ring.vring.set_enabled(enabled)
        self._update_registration(index)
        if enabled and ring.started and not was:
            self.backend.queue_started(index, ring.vring)

    def _update_registration(self, index: int) -> None:
        ring = self.rings[index]
        if ring.worker is None or ring.kick is None:
            return
        if ring.started and ring.enabled:
            ring.worker.register_kick(ring.position, ring.kick)
        else:
            ring.worker.unregister_kick(ring.kick)

    def _stop_ring(self, index: int) -> None:
        ring = self.rings[index]
        ring.started = False
        if ring.worker is None:
            ring.vring.set_queue_ready(False)
            return
        # No new kick reaches the device, and the event it may be handling
        # on this ring finishes, before the ring stops under it.
        if ring.kick is not None:
            ring.worker.unregister_kick(ring.kick)
        with ring.worker.paused():
            ring.vring.set_queue_ready(False)

    def _close_ring_fds(self, ring: _Ring) -> None:
        if ring.worker is not None and ring.kick is not None:
            ring.worker.unregister_kick(ring.kick)
        ring.kick = None
        ring.vring.set_kick(None)
        ring.vring.set_call(None)

    # ------------------------------------------------------------ device requests

    def _set_backend_req_fd(self, message: Message, fds: OwnedFds) -> None:
        connection = Connection.from_fd(
            fds.take(0), Inbound.BACKEND_REPLIES, timeout=30
        )
        if self.channel is not None:
            self.channel.close()
        self.channel = BackendChannel(
            connection, self.acked_protocol, VirtioFeatures(self.acked_features)
        )
        self.backend.set_backend_req_fd(self.channel)

    def _get_config(self, message: Message, fds: OwnedFds) -> Payload:
        assert isinstance(message.payload, Config)
        request = message.payload
        data = self.backend.get_config(request.offset, request.size)
        if len(data) != request.size:
            raise _RefusedError(
                f"the device gave {len(data)} config bytes for a "
                f"{request.size}-byte read"
            )
        return ConfigReply(request.offset, request.size, request.flags, bytes(data))

    def _set_config(self, message: Message, fds: OwnedFds) -> None:
        assert isinstance(message.payload, Config)
        self.backend.set_config(message.payload.offset, message.payload.data)

    def _get_shared_object(self, message: Message, fds: OwnedFds) -> Payload:
        assert isinstance(message.payload, SharedObject)
        fd = self.backend.get_shared_object(message.payload.uuid)
        self._reply_fds = (fd,)
        return U64(0)

    def _set_device_state_fd(self, message: Message, fds: OwnedFds) -> Payload:
        assert isinstance(message.payload, DeviceStateTransfer)
        direction = DeviceStateDirection(message.payload.direction)
        phase = DeviceStatePhase(message.payload.phase)
        if any(ring.started for ring in self.rings):
            raise _RefusedError("device state moves only while every ring is stopped")
        reply_fd = self.backend.set_device_state_fd(direction, phase, fds.take(0))
        if reply_fd is None:
            return U64(0x100)  # success, no fd of our own
        self._reply_fds = (reply_fd,)
        return U64(0)

    def _check_device_state(self, message: Message, fds: OwnedFds) -> Payload:
        self.backend.check_device_state()
        return U64(0)

    def _get_shmem_config(self, message: Message, fds: OwnedFds) -> Payload:
        sizes = tuple(self.backend.get_shmem_config())
        return ShmemConfig(len(sizes), sizes)

    def _postcopy_advise(self, message: Message, fds: OwnedFds) -> Payload:
        self._reply_fds = (self.postcopy.advise(),)
        return Empty()

    # ------------------------------------------------------------ inflight

    def _attach_inflight(self, index: int) -> None:
        # Attach queue `index`'s inflight region to its ring (recovering
        # positions and the heads to resubmit), or detach a stale one. With
        # heads to resubmit, kick the ring ourselves, as libvhost-user does
        # "in case of I/O hang": the worker then serves them.
        ring = self.rings[index]
        buffer = self.inflight
        tracker = None
        if buffer is not None and index < buffer.num_queues:
            with ring.vring.get_ref() as state:
                size = state.queue.size
            if size > buffer.queue_size:
                log.warning(
                    "ring %d: size %d exceeds the inflight queue size %d; not tracked",
                    index,
                    size,
                    buffer.queue_size,
                )
            else:
                tracker = buffer.tracker(index)
        try:
            pending = ring.vring.set_inflight(tracker)
        except (GuestMemoryError, VringError) as exc:
            log.warning("ring %d: inflight tracking is off: %s", index, exc)
            ring.vring.set_inflight(None)
            return
        if pending and ring.kick is not None:
            log.info("ring %d: resubmitting %d inflight request(s)", index, pending)
            try:
                os.eventfd_write(ring.kick, 1)
            except OSError as exc:
                log.warning("ring %d: cannot kick for the resubmission: %s", index, exc)

    def _detach_inflight(self) -> None:
        # Before the buffer is replaced or closed: no ring may write to it.
        for ring in self.rings:
            ring.vring.set_inflight(None)

    def _get_inflight_fd(self, message: Message, fds: OwnedFds) -> Payload:
        assert isinstance(message.payload, Inflight)
        request = message.payload
        if not 0 < request.num_queues <= self.num_queues:
            raise _RefusedError(
                f"inflight for {request.num_queues} queues; "
                f"the device has {self.num_queues}"
            )
        packed = bool(self.acked_features & VirtioFeatures.RING_PACKED)
        buffer = InflightBuffer.create(
            request.num_queues, request.queue_size, packed=packed
        )
        if self.inflight is not None:
            self._detach_inflight()
            self.inflight.close()
        self.inflight = buffer
        self._reply_fds = (buffer.take_fd(),)
        return Inflight(buffer.size, 0, request.num_queues, request.queue_size)

    def _set_inflight_fd(self, message: Message, fds: OwnedFds) -> None:
        assert isinstance(message.payload, Inflight)
        request = message.payload
        if not 0 < request.num_queues <= self.num_queues:
            raise _RefusedError(
                f"inflight for {request.num_queues} queues; "
                f"the device has {self.num_queues}"
            )
        packed = bool(self.acked_features & VirtioFeatures.RING_PACKED)
        buffer = InflightBuffer.adopt(
            fds.take(0),
            size=request.mmap_size,
            offset=request.mmap_offset,
            num_queues=request.num_queues,
            queue_size=request.queue_size,
            packed=packed,
        )
        if self.inflight is not None:
            self._detach_inflight()
            self.inflight.close()
        self.inflight = buffer

    # ------------------------------------------------------------ teardown

    def close(self) -> None:
        """End the session: stop rings, close every fd, unmap memory."""
        # First: unregistering wakes workers blocked on a fault (stopping
        # a ring waits for them).
        self.postcopy.close()
        for index, ring in enumerate(self.rings):
            self._stop_ring(index)
            ring.enabled = False
            self._close_ring_fds(ring)
            ring.addr = None
            ring.vring.reset()  # positions, addresses, eventfds
        self.dirty.close()
        self.memory.set_mem_table([])
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.inflight is not None:
            self._detach_inflight()
            self.inflight.close()
            self.inflight = None


def _config_failure(payload: Payload) -> Payload:
    assert isinstance(payload, Config)
    return ConfigReply(payload.offset, 0, payload.flags, b"")


def _crypto_failure(payload: Payload) -> Payload:
    # VhostUserCryptoSession starts with the i64 session id; negative = failed.
    assert isinstance(payload, Opaque)
    return Opaque(struct.pack("=q", -1) + payload.data[8:])


def _inflight_failure(payload: Payload) -> Payload:
    assert isinstance(payload, Inflight)
    return Inflight(0, 0, payload.num_queues, payload.queue_size)


_FAILURE_REPLIES: Final[dict[FrontendReq, Callable[[Payload], Payload]]] = {
    FrontendReq.GET_CONFIG: _config_failure,
    FrontendReq.GET_INFLIGHT_FD: _inflight_failure,
    FrontendReq.SET_LOG_BASE: lambda _: U64(1),
    FrontendReq.GET_SHARED_OBJECT: lambda _: U64(1),
    FrontendReq.SET_DEVICE_STATE_FD: lambda _: U64(0x101),
    FrontendReq.CHECK_DEVICE_STATE: lambda _: U64(1),
    FrontendReq.GET_SHMEM_CONFIG: lambda _: ShmemConfig(0, ()),
    FrontendReq.IOTLB_MSG: lambda _: U64(1),
    FrontendReq.CREATE_CRYPTO_SESSION: _crypto_failure,
    # No fd: the front-end sees that postcopy cannot start (rust-vmm #277).
    FrontendReq.POSTCOPY_ADVISE: lambda _: Empty(),
    FrontendReq.POSTCOPY_LISTEN: lambda _: U64(1),
    FrontendReq.POSTCOPY_END: lambda _: U64(1),
}
