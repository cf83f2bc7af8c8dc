# THE table of the protocol: for every request of both channels, its payload
# type (and so its size rule), the file descriptors it carries, the protocol
# or virtio feature that gates it, and what it replies.
#
# Rules:
# * This table is the single source: the decoder validates input against it,
#   the encoder validates output against it, the daemon checks gates with it,
#   and the frontend uses it to know which requests wait for a reply body.
# * "reply" lists the payload types a reply body may have. An empty tuple
#   means the request has no reply body: it is answered only with a REPLY_ACK
#   u64 (0 = success), and only when NEED_REPLY is set and REPLY_ACK is
#   negotiated. A request with a reply body never gets a second ack.
# * Facts come from docs/reference/vhost-user-protocol.md §2 and §3 and the
#   rust-vmm notes (§2.4-§2.7). Where implementations disagree the row says
#   so and takes the lenient side on input.

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, final

from vubackend.protocol._constants import (
    BackendReq,
    FrontendReq,
    ProtocolFeatures,
    VirtioFeatures,
)
from vubackend.protocol._payloads import (
    U64,
    Config,
    ConfigReply,
    DeviceStateTransfer,
    Empty,
    Inflight,
    IotlbMsg,
    Log,
    MemoryTable,
    Opaque,
    Payload,
    SharedObject,
    ShmemConfig,
    ShmemMap,
    SingleMemoryRegion,
    VringAddr,
    VringArea,
    VringFile,
    VringState,
    XenMemoryTable,
    XenSingleMemoryRegion,
)

__all__ = [
    "BACKEND_REQUEST_SPEC",
    "FRONTEND_REQUEST_SPEC",
    "FdRule",
    "RequestSpec",
    "fd_count_problem",
    "gate_problem",
    "spec_for",
]


class FdRule(enum.Enum):
    """How many file descriptors a message carries."""

    NONE = "no fd"
    ONE = "exactly 1 fd"
    # REM_MEM_REG (the spec allows one and asks to close it), replies that
    # carry an fd only on success.
    OPTIONAL = "0 or 1 fd"
    # SET_MEM_TABLE: one per region, in region order.
    PER_REGION = "1 fd per region"
    # SET_VRING_KICK/CALL/ERR, HOST_NOTIFIER: one unless the NOFD bit is set.
    VRING_FILE = "1 fd unless NOFD is set"


@final
@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One row of the protocol table. See the module comment."""

    request: FrontendReq | BackendReq
    payload: type[Payload]
    fds: FdRule = FdRule.NONE
    gate: ProtocolFeatures | None = None
    virtio_gate: VirtioFeatures | None = None
    reply: tuple[type[Payload], ...] = ()
    reply_fds: FdRule = FdRule.NONE
    # With XEN_MMAP negotiated the memory payloads grow (40-byte regions).
    xen_payload: type[Payload] | None = None
    # In postcopy the memory requests are answered with the table itself.
    postcopy_reply: type[Payload] | None = None

    @property
    def has_reply_body(self) -> bool:
        """True when the request is always answered with a body."""
        return bool(self.reply)

    def payload_type(self, *, xen_mmap: bool = False) -> type[Payload]:
        if xen_mmap and self.xen_payload is not None:
            return self.xen_payload
        return self.payload


_F = FrontendReq
_P = ProtocolFeatures
_ONE = FdRule.ONE


def _table(
    *rows: RequestSpec,
) -> Mapping[FrontendReq | BackendReq, RequestSpec]:
    return MappingProxyType({row.request: row for row in rows})


FRONTEND_REQUEST_SPEC: Final = _table(
    RequestSpec(_F.GET_FEATURES, Empty, reply=(U64,)),
    RequestSpec(_F.SET_FEATURES, U64),
    RequestSpec(_F.SET_OWNER, Empty),
    RequestSpec(_F.RESET_OWNER, Empty),
    RequestSpec(
        _F.SET_MEM_TABLE,
        MemoryTable,
        fds=FdRule.PER_REGION,
        xen_payload=XenMemoryTable,
        postcopy_reply=MemoryTable,
    ),
    # QEMU reads back a u64; rust-vmm echoes the Log body. Accept both.
    RequestSpec(_F.SET_LOG_BASE, Log, fds=_ONE, gate=_P.LOG_SHMFD, reply=(U64, Log)),
    RequestSpec(_F.SET_LOG_FD, Empty, fds=_ONE),
    RequestSpec(_F.SET_VRING_NUM, VringState),
    RequestSpec(_F.SET_VRING_ADDR, VringAddr),
    RequestSpec(_F.SET_VRING_BASE, VringState),
    RequestSpec(_F.GET_VRING_BASE, VringState, reply=(VringState,)),
    RequestSpec(_F.SET_VRING_KICK, VringFile, fds=FdRule.VRING_FILE),
    RequestSpec(_F.SET_VRING_CALL, VringFile, fds=FdRule.VRING_FILE),
    RequestSpec(_F.SET_VRING_ERR, VringFile, fds=FdRule.VRING_FILE),
    # Gated by the back-end *offering* virtio bit 30, not by acking it.
    RequestSpec(_F.GET_PROTOCOL_FEATURES, Empty, reply=(U64,)),
    RequestSpec(_F.SET_PROTOCOL_FEATURES, U64),
    RequestSpec(_F.GET_QUEUE_NUM, Empty, gate=_P.MQ, reply=(U64,)),
    RequestSpec(
        _F.SET_VRING_ENABLE, VringState, virtio_gate=VirtioFeatures.PROTOCOL_FEATURES
    ),
    RequestSpec(_F.SEND_RARP, U64, gate=_P.RARP),
    RequestSpec(_F.NET_SET_MTU, U64, gate=_P.MTU),
    RequestSpec(_F.SET_BACKEND_REQ_FD, Empty, fds=_ONE, gate=_P.BACKEND_REQ),
    # QEMU always sets NEED_REPLY and waits for the u64.
    RequestSpec(
        _F.IOTLB_MSG,
        IotlbMsg,
        virtio_gate=VirtioFeatures.ACCESS_PLATFORM,
        reply=(U64,),
    ),
    RequestSpec(_F.SET_VRING_ENDIAN, VringState, gate=_P.CROSS_ENDIAN),
    RequestSpec(_F.GET_CONFIG, Config, gate=_P.CONFIG, reply=(ConfigReply,)),
    RequestSpec(_F.SET_CONFIG, Config, gate=_P.CONFIG),
    RequestSpec(
        _F.CREATE_CRYPTO_SESSION, Opaque, gate=_P.CRYPTO_SESSION, reply=(Opaque,)
    ),
    RequestSpec(_F.CLOSE_CRYPTO_SESSION, U64, gate=_P.CRYPTO_SESSION),
    # The reply is empty and carries the userfaultfd (no fd on failure).
    RequestSpec(
        _F.POSTCOPY_ADVISE,
        Empty,
        gate=_P.PAGEFAULT,
        reply=(Empty,),
        reply_fds=FdRule.OPTIONAL,
    ),
    # QEMU sets NEED_REPLY on both and reads the u64 even without REPLY_ACK.
    RequestSpec(_F.POSTCOPY_LISTEN, Empty, gate=_P.PAGEFAULT, reply=(U64,)),
    RequestSpec(_F.POSTCOPY_END, Empty, gate=_P.PAGEFAULT, reply=(U64,)),
    # mmap_size 0 in the reply means "not supported" and comes without fd.
    RequestSpec(
        _F.GET_INFLIGHT_FD,
        Inflight,
        gate=_P.INFLIGHT_SHMFD,
        reply=(Inflight,),
        reply_fds=FdRule.OPTIONAL,
    ),
    RequestSpec(_F.SET_INFLIGHT_FD, Inflight, fds=_ONE, gate=_P.INFLIGHT_SHMFD),
    RequestSpec(_F.GPU_SET_SOCKET, Empty, fds=_ONE),
    RequestSpec(_F.RESET_DEVICE, Empty, gate=_P.RESET_DEVICE),
    RequestSpec(_F.VRING_KICK, VringState, gate=_P.INBAND_NOTIFICATIONS),
    RequestSpec(_F.GET_MAX_MEM_SLOTS, Empty, gate=_P.CONFIGURE_MEM_SLOTS, reply=(U64,)),
    RequestSpec(
        _F.ADD_MEM_REG,
        SingleMemoryRegion,
        fds=_ONE,
        gate=_P.CONFIGURE_MEM_SLOTS,
        xen_payload=XenSingleMemoryRegion,
        postcopy_reply=SingleMemoryRegion,
    ),
    # The spec lets a front-end attach the region's fd; we accept and close it.
    RequestSpec(
        _F.REM_MEM_REG,
        SingleMemoryRegion,
        fds=FdRule.OPTIONAL,
        gate=_P.CONFIGURE_MEM_SLOTS,
        xen_payload=XenSingleMemoryRegion,
    ),
    RequestSpec(_F.SET_STATUS, U64, gate=_P.STATUS),
    RequestSpec(_F.GET_STATUS, Empty, gate=_P.STATUS, reply=(U64,)),
    # u64 status (libvhost-user) or an empty body (rust-vmm), fd on success.
    RequestSpec(
        _F.GET_SHARED_OBJECT,
        SharedObject,
        gate=_P.SHARED_OBJECT,
        reply=(U64, Empty),
        reply_fds=FdRule.OPTIONAL,
    ),
    # Reply bits 0-7 error, bit 8 "no fd"; otherwise one fd replaces the
    # front-end's.
    RequestSpec(
        _F.SET_DEVICE_STATE_FD,
        DeviceStateTransfer,
        fds=_ONE,
        gate=_P.DEVICE_STATE,
        reply=(U64,),
        reply_fds=FdRule.OPTIONAL,
    ),
    RequestSpec(_F.CHECK_DEVICE_STATE, Empty, gate=_P.DEVICE_STATE, reply=(U64,)),
    RequestSpec(_F.GET_SHMEM_CONFIG, Empty, gate=_P.SHMEM, reply=(ShmemConfig,)),
)

_B = BackendReq

BACKEND_REQUEST_SPEC: Final = _table(
    RequestSpec(_B.IOTLB_MSG, IotlbMsg, virtio_gate=VirtioFeatures.ACCESS_PLATFORM),
    RequestSpec(_B.CONFIG_CHANGE_MSG, Empty, gate=_P.CONFIG),
    RequestSpec(
        _B.VRING_HOST_NOTIFIER_MSG,
        VringArea,
        fds=FdRule.VRING_FILE,
        gate=_P.HOST_NOTIFIER,
    ),
    RequestSpec(_B.VRING_CALL, VringState, gate=_P.INBAND_NOTIFICATIONS),
    RequestSpec(_B.VRING_ERR, VringState, gate=_P.INBAND_NOTIFICATIONS),
    RequestSpec(_B.SHARED_OBJECT_ADD, SharedObject, gate=_P.SHARED_OBJECT),
    RequestSpec(_B.SHARED_OBJECT_REMOVE, SharedObject, gate=_P.SHARED_OBJECT),
    # The one back-end request that is always answered: u64 plus the
    # dma-buf fd (no fd when not found).
    RequestSpec(
        _B.SHARED_OBJECT_LOOKUP,
        SharedObject,
        gate=_P.SHARED_OBJECT,
        reply=(U64,),
        reply_fds=FdRule.OPTIONAL,
    ),
    RequestSpec(_B.SHMEM_MAP, ShmemMap, fds=_ONE, gate=_P.SHMEM),
    RequestSpec(_B.SHMEM_UNMAP, ShmemMap, gate=_P.SHMEM),
)


def spec_for(request: FrontendReq | BackendReq) -> RequestSpec:
    """The table row of ``request``."""
    if isinstance(request, FrontendReq):
        return FRONTEND_REQUEST_SPEC[request]
    return BACKEND_REQUEST_SPEC[request]


def fd_count_problem(rule: FdRule, payload: Payload, count: int) -> str | None:
    """Why ``count`` fds do not fit ``rule`` for this payload, or None."""
    match rule:
        case FdRule.NONE:
            expected: tuple[int, ...] = (0,)
        case FdRule.ONE:
            expected = (1,)
        case FdRule.OPTIONAL:
            expected = (0, 1)
        case FdRule.PER_REGION:
            regions = payload.regions if isinstance(payload, MemoryTable) else ()
            expected = (len(regions),)
        case FdRule.VRING_FILE:
            nofd = isinstance(payload, VringFile | VringArea) and payload.nofd
            expected = (0,) if nofd else (1,)
    if count in expected:
        return None
    want = " or ".join(str(n) for n in expected)
    noun = "fd" if expected == (1,) else "fds"
    return f"expected {want} {noun}, got {count}"


def gate_problem(
    spec: RequestSpec,
    *,
    protocol_features: ProtocolFeatures,
    virtio_features: VirtioFeatures,
) -> str | None:
    """Why ``spec.request`` is not allowed under the acked features, or None.

    Args:
        protocol_features: the protocol features the front-end acked.
        virtio_features: the virtio features the front-end acked.
    """
    if spec.gate is not None and not spec.gate & protocol_features:
        return f"needs protocol feature {spec.gate.name}, which was not negotiated"
    if spec.virtio_gate is not None and not spec.virtio_gate & virtio_features:
        return f"needs virtio feature {spec.virtio_gate.name}, which was not negotiated"
    return None
