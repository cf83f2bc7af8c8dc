# Request ids, feature bits, header flags and protocol limits.
#
# Rules:
# * Names keep the spelling of the QEMU spec (docs/interop/vhost-user.rst)
#   minus its prefix, so they stay greppable: FrontendReq.SET_VRING_KICK,
#   ProtocolFeatures.LOG_SHMFD, VirtioFeatures.RING_PACKED.
# * Front-end/back-end, never master/slave.
# * Bits that implementations still disagree on (protocol features 20 and up)
#   live in one marked block below, with the alternatives written down.
# * Every limit is a named constant with its provenance.

from __future__ import annotations

import enum
from typing import Final

__all__ = [
    "CONFIG_SPACE_LIMIT",
    "HEADER_SIZE",
    "MAX_CONFIG_SIZE",
    "MAX_FDS_PER_MESSAGE",
    "MAX_MEM_REGIONS",
    "MAX_MEM_SLOTS",
    "MAX_PAYLOAD_SIZE",
    "MAX_QUEUE_SIZE",
    "PROTOCOL_FEATURE_CONVENTIONS",
    "SHMEM_CONFIG_REGION_COUNTS",
    "VRING_INDEX_MASK",
    "VRING_NOFD",
    "BackendReq",
    "ConfigFlags",
    "DeviceStateDirection",
    "DeviceStatePhase",
    "FrontendReq",
    "HeaderFlags",
    "IotlbPerm",
    "IotlbType",
    "ProtocolFeatures",
    "ShmemMapFlags",
    "VirtioFeatures",
    "VringAddrFlags",
    "XenMmapFlags",
]


class FrontendReq(enum.IntEnum):
    """Requests the front-end sends on the main socket (ids 1-44)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43
    GET_SHMEM_CONFIG = 44


class BackendReq(enum.IntEnum):
    """Requests the back-end sends on the backend channel (ids 1-10); the
    channel is the socket passed with SET_BACKEND_REQ_FD."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8
    SHMEM_MAP = 9
    SHMEM_UNMAP = 10


class ProtocolFeatures(enum.IntFlag):
    """vhost-user protocol features (GET/SET_PROTOCOL_FEATURES)."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16
    XEN_MMAP = 1 << 17
    SHARED_OBJECT = 1 << 18
    DEVICE_STATE = 1 << 19
    # ------------------------------------------------------------------
    # UNSETTLED: bits 20 and up. Implementations disagree on these (see
    # PROTOCOL_FEATURE_CONVENTIONS). The values here follow rust-vmm's vhost
    # 0.16, the one released implementation; a daemon that must talk to a
    # peer using another numbering maps names to bits through that table.
    GET_VRING_BASE_INFLIGHT = 1 << 20
    SHMEM = 1 << 21
    # ------------------------------------------------------------------


# UNSETTLED: which bit each name has in each numbering seen in the wild.
PROTOCOL_FEATURE_CONVENTIONS: Final[dict[str, dict[str, int]]] = {
    # rust-vmm vhost 0.16 (PR #347 shifted SHMEM to make room at 20).
    "rust-vmm-0.16": {"GET_VRING_BASE_INFLIGHT": 20, "SHMEM": 21},
    # QEMU SHMEM series v9 alone (before the inflight series).
    "qemu-shmem-v9": {"SHMEM": 20},
    # Spec text proposed alongside rust-vmm PR #367.
    "spec-367": {"GET_VRING_BASE_INFLIGHT": 20, "GPA_ADDRESSES": 21, "SHMEM": 22},
}


class VirtioFeatures(enum.IntFlag):
    """The virtio and vhost feature bits a back-end needs to know about.

    Device-specific bits (0-23, 41, 42, 50-127) belong to each device."""

    NOTIFY_ON_EMPTY = 1 << 24
    LOG_ALL = 1 << 26
    ANY_LAYOUT = 1 << 27
    INDIRECT_DESC = 1 << 28
    EVENT_IDX = 1 << 29
    # The reserved "UNUSED(30)" virtio bit; vhost-user uses it to announce
    # GET/SET_PROTOCOL_FEATURES. Acking it means rings start disabled.
    PROTOCOL_FEATURES = 1 << 30
    VERSION_1 = 1 << 32
    ACCESS_PLATFORM = 1 << 33
    RING_PACKED = 1 << 34
    IN_ORDER = 1 << 35
    ORDER_PLATFORM = 1 << 36
    SR_IOV = 1 << 37
    NOTIFICATION_DATA = 1 << 38
    RING_RESET = 1 << 40


class HeaderFlags(enum.IntFlag):
    """The flags word of the 12-byte header. Bits 0-1 hold the version,
    which must be 1; bits 4-31 are reserved and must be zero."""

    VERSION_1 = 0x1
    REPLY = 0x4
    NEED_REPLY = 0x8


VERSION_MASK: Final = 0x3
RESERVED_FLAGS_MASK: Final = 0xFFFF_FFF0


class VringAddrFlags(enum.IntFlag):
    """Flags of SET_VRING_ADDR."""

    LOG = 0x1  # VHOST_VRING_F_LOG: log writes to the used ring


class ConfigFlags(enum.IntFlag):
    """Flags of GET/SET_CONFIG. QEMU sends 0 for a guest write and 1 for a
    migration restore; rust-vmm names the bits WRITABLE and LIVE_MIGRATION."""

    WRITABLE = 0x1
    LIVE_MIGRATION = 0x2


class XenMmapFlags(enum.IntFlag):
    """xen_mmap_flags of a memory region when XEN_MMAP is negotiated.

    No flag at all is a plain mapping of the fd (rust-vmm's ``UNIX``). The
    "map on demand" bit is UNSETTLED: the spec text says bit 8, the rust-vmm
    frontends (vm-memory ``NO_ADVANCE_MAP``) send 0x8; both are accepted."""

    FOREIGN = 0x1
    GRANT = 0x2
    NO_ADVANCE_MAP_VM_MEMORY = 0x8  # what rust-vmm frontends send
    NO_ADVANCE_MAP = 0x100  # map and unmap on demand, per access (spec text)


class ShmemMapFlags(enum.IntFlag):
    """Flags of BACKEND_SHMEM_MAP. UNSETTLED: the spec text says 0 = RO and
    1 = RW (rust-vmm WRITABLE = 1); QEMU's CI code uses bit 0 = R and
    bit 1 = W. Validators therefore accept bits 0 and 1."""

    WRITABLE = 0x1
    QEMU_WRITE = 0x2


class IotlbPerm(enum.IntEnum):
    """struct vhost_iotlb_msg perm."""

    NONE = 0
    RO = 1
    WO = 2
    RW = 3


class IotlbType(enum.IntEnum):
    """struct vhost_iotlb_msg type."""

    MISS = 1
    UPDATE = 2
    INVALIDATE = 3
    ACCESS_FAIL = 4


class DeviceStateDirection(enum.IntEnum):
    """SET_DEVICE_STATE_FD direction."""

    SAVE = 0
    LOAD = 1


class DeviceStatePhase(enum.IntEnum):
    """SET_DEVICE_STATE_FD phase; only STOPPED is defined."""

    STOPPED = 0


HEADER_SIZE: Final = 12
# No protocol constant exists; rust-vmm caps at 0x1000 and every payload we
# know fits (the largest, VhostUserShMemConfig, is 2056 bytes).
MAX_PAYLOAD_SIZE: Final = 4096
# QEMU VHOST_MEMORY_BASELINE_NREGIONS and VHOST_USER_BACKEND_MAX_FDS;
# libvhost-user and DPDK size their control buffer for 8.
MAX_FDS_PER_MESSAGE: Final = 8
# SET_MEM_TABLE carries at most 8 regions (one fd each).
MAX_MEM_REGIONS: Final = 8
# What we answer to GET_MAX_MEM_SLOTS: libvhost-user and rust-vmm say 509,
# QEMU caps at 512.
MAX_MEM_SLOTS: Final = 509
# Ring index in SET_VRING_KICK/CALL/ERR is 8 bits; bit 8 means "no fd".
VRING_INDEX_MASK: Final = 0xFF
VRING_NOFD: Final = 0x100
# A 16-bit free-running index must tell full from empty.
MAX_QUEUE_SIZE: Final = 32768
# VHOST_USER_MAX_CONFIG_SIZE in QEMU, DPDK and libvhost-user.
MAX_CONFIG_SIZE: Final = 256
# rust-vmm VHOST_USER_CONFIG_SIZE: offset + size must stay below this.
CONFIG_SPACE_LIMIT: Final = 0x1000
# UNSETTLED: VhostUserShMemConfig has 256 sizes in the spec and rust-vmm;
# one QEMU revision used 8. We accept both on input and send 256.
SHMEM_CONFIG_REGION_COUNTS: Final = (256, 8)
