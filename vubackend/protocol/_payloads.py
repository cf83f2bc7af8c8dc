# Every message payload of vhost-user as a frozen dataclass with an exact
# C layout (docs/reference/vhost-user-protocol.md §1.4; native byte order).
#
# Rules:
# * A payload class knows its wire size rule (`size_problem`), how to
#   `pack`/`unpack` itself, and its syntactic validator (`validate`), which
#   raises LocalProtocolError with a plain-words reason. The codec turns that
#   into RemoteProtocolError for input, as h11 does at its one input point.
# * Semantics (feature gates, ring state, queue counts) are not checked
#   here: they belong to whoever holds the session state.
# * Arithmetic on peer-supplied sizes is checked against 2**64 explicitly
#   (CVE-2020-10722 was a size+offset overflow).

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, fields
from typing import ClassVar, Final, Self, final
from uuid import UUID

from vubackend.errors import LocalProtocolError
from vubackend.protocol._constants import (
    CONFIG_SPACE_LIMIT,
    MAX_CONFIG_SIZE,
    MAX_MEM_REGIONS,
    MAX_PAYLOAD_SIZE,
    SHMEM_CONFIG_REGION_COUNTS,
    VRING_INDEX_MASK,
    VRING_NOFD,
    ConfigFlags,
    DeviceStateDirection,
    DeviceStatePhase,
    IotlbPerm,
    IotlbType,
    VringAddrFlags,
    XenMmapFlags,
)

__all__ = [
    "U64",
    "Config",
    "ConfigReply",
    "DeviceStateTransfer",
    "Empty",
    "Inflight",
    "IotlbMsg",
    "Log",
    "MemoryRegion",
    "MemoryTable",
    "Opaque",
    "PackedRingPosition",
    "Payload",
    "SharedObject",
    "ShmemConfig",
    "ShmemMap",
    "SingleMemoryRegion",
    "VringAddr",
    "VringArea",
    "VringFile",
    "VringState",
    "XenMemoryRegion",
    "XenMemoryTable",
    "XenSingleMemoryRegion",
]

_U64_LIMIT: Final = 1 << 64


def _fail(reason: str) -> LocalProtocolError:
    return LocalProtocolError(reason)


def _values(enum_type: type[enum.IntEnum]) -> frozenset[int]:
    return frozenset(member.value for member in enum_type)


def _check_span(name: str, start: int, length: int) -> None:
    if start + length > _U64_LIMIT:
        raise _fail(f"{name} {start:#x} + size {length:#x} overflows 64 bits")


class Payload:
    """Base of every payload. Subclasses are frozen dataclasses."""

    __slots__ = ()
    # The exact wire size, or None when it depends on the content.
    SIZE: ClassVar[int | None] = None

    @classmethod
    def size_problem(cls, size: int) -> str | None:
        """Why a payload of ``size`` bytes cannot be this type, or None."""
        if cls.SIZE is not None and size != cls.SIZE:
            return f"expected a {cls.SIZE}-byte payload, got {size} bytes"
        return None

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        """Decode ``data``, whose size passed :meth:`size_problem`."""
        raise NotImplementedError

    def pack(self) -> bytes:
        """Encode to wire bytes."""
        raise NotImplementedError

    def validate(self) -> None:
        """Check field values; raise LocalProtocolError with the reason."""


class _Struct(Payload):
    """A payload that is exactly one struct, fields in declaration order."""

    __slots__ = ()
    STRUCT: ClassVar[struct.Struct]

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        return cls(*cls.STRUCT.unpack(data))

    def pack(self) -> bytes:
        values = [getattr(self, f.name) for f in fields(self)]  # type: ignore[arg-type]
        try:
            return self.STRUCT.pack(*values)
        except struct.error as exc:
            raise _fail(f"{type(self).__name__}: field out of range ({exc})") from exc


def _struct(fmt: str) -> struct.Struct:
    return struct.Struct("=" + fmt)


@final
@dataclass(frozen=True, slots=True)
class Empty(Payload):
    """No payload (size 0)."""

    SIZE: ClassVar[int | None] = 0

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        return cls()

    def pack(self) -> bytes:
        return b""


@final
@dataclass(frozen=True, slots=True)
class U64(_Struct):
    """A single u64: features, a status, an ack (0 = success), a queue count."""

    value: int
    STRUCT: ClassVar[struct.Struct] = _struct("Q")
    SIZE: ClassVar[int | None] = 8


@final
@dataclass(frozen=True, slots=True)
class VringState(_Struct):
    """``struct vhost_vring_state``: a ring index and a number (ring size,
    base index, enable flag). For packed rings see PackedRingPosition."""

    index: int
    num: int
    STRUCT: ClassVar[struct.Struct] = _struct("II")
    SIZE: ClassVar[int | None] = 8


@final
@dataclass(frozen=True, slots=True)
class PackedRingPosition:
    """The packed-ring meaning of VringState.num in SET/GET_VRING_BASE:
    bits 0-14 last_avail_idx, 15 avail wrap, 16-30 used idx, 31 used wrap."""

    last_avail_idx: int
    avail_wrap: bool
    used_idx: int
    used_wrap: bool

    @classmethod
    def from_num(cls, num: int) -> PackedRingPosition:
        return cls(
            last_avail_idx=num & 0x7FFF,
            avail_wrap=bool(num & (1 << 15)),
            used_idx=(num >> 16) & 0x7FFF,
            used_wrap=bool(num & (1 << 31)),
        )

    def to_num(self) -> int:
        if not (0 <= self.last_avail_idx <= 0x7FFF and 0 <= self.used_idx <= 0x7FFF):
            raise _fail("packed ring indices must fit in 15 bits")
        return (
            self.last_avail_idx
            | (int(self.avail_wrap) << 15)
            | (self.used_idx << 16)
            | (int(self.used_wrap) << 31)
        )


@final
@dataclass(frozen=True, slots=True)
class VringAddr(_Struct):
    """``struct vhost_vring_addr``. Addresses are front-end virtual addresses
    (or IOVAs with ACCESS_PLATFORM). Note the order: used before avail."""

    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int
    STRUCT: ClassVar[struct.Struct] = _struct("IIQQQQ")
    SIZE: ClassVar[int | None] = 40

    def validate(self) -> None:
        unknown = self.flags & ~int(VringAddrFlags.LOG)
        if unknown:
            raise _fail(f"unknown vring address flags {unknown:#x}")
        # Alignments of virtio 1.x (split: 16/2/4; packed: 16/4/4, which
        # these weaker checks also admit).
        if self.desc & 0xF:
            raise _fail(f"descriptor table address {self.desc:#x} not 16-byte aligned")
        if self.avail & 0x1:
            raise _fail(f"avail ring address {self.avail:#x} not 2-byte aligned")
        if self.used & 0x3:
            raise _fail(f"used ring address {self.used:#x} not 4-byte aligned")


@dataclass(frozen=True, slots=True)
class MemoryRegion(_Struct):
    """``VhostUserMemoryRegion``: guest physical address, size, front-end
    virtual address, and the offset of the region in its fd."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int
    STRUCT: ClassVar[struct.Struct] = _struct("QQQQ")
    SIZE: ClassVar[int | None] = 32

    def validate(self) -> None:
        if self.memory_size == 0:
            raise _fail(f"memory region at gpa {self.guest_phys_addr:#x} has size 0")
        _check_span("guest address", self.guest_phys_addr, self.memory_size)
        _check_span("userspace address", self.userspace_addr, self.memory_size)
        _check_span("mmap offset", self.mmap_offset, self.memory_size)


@final
@dataclass(frozen=True, slots=True)
class XenMemoryRegion(MemoryRegion):
    """A memory region with the Xen fields (XEN_MMAP negotiated): flags
    (exactly one of FOREIGN and GRANT, plus optional NO_ADVANCE_MAP) and
    ``xen_mmap_data`` (the domain id for foreign mappings)."""

    xen_mmap_flags: int = 0
    xen_mmap_data: int = 0
    STRUCT: ClassVar[struct.Struct] = _struct("QQQQII")
    SIZE: ClassVar[int | None] = 40

    def validate(self) -> None:
        MemoryRegion.validate(self)
        on_demand = int(
            XenMmapFlags.NO_ADVANCE_MAP | XenMmapFlags.NO_ADVANCE_MAP_VM_MEMORY
        )
        flags = self.xen_mmap_flags
        unknown = flags & ~(int(XenMmapFlags.FOREIGN | XenMmapFlags.GRANT) | on_demand)
        if unknown:
            raise _fail(f"unknown xen mmap flags {unknown:#x}")
        # rust-vmm's MmapXenFlags::is_valid: at most one of foreign and
        # grant; on-demand mapping only for grants; no flag = plain mapping.
        if flags & XenMmapFlags.FOREIGN and flags & XenMmapFlags.GRANT:
            raise _fail("a xen memory region cannot be both foreign and grant")
        if flags & on_demand and not flags & XenMmapFlags.GRANT:
            raise _fail("only a xen grant region may be mapped on demand")


_TABLE_HEAD: Final = _struct("II")


@dataclass(frozen=True, slots=True)
class MemoryTable(Payload):
    """SET_MEM_TABLE: 1 to 8 regions, one fd each (in the same order)."""

    regions: tuple[MemoryRegion, ...]
    REGION: ClassVar[type[MemoryRegion]] = MemoryRegion

    @classmethod
    def size_problem(cls, size: int) -> str | None:
        region = cls.REGION.SIZE
        assert region is not None
        if size < _TABLE_HEAD.size or (size - _TABLE_HEAD.size) % region:
            return f"size {size} is not 8 + {region} * n"
        return None

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        count, padding = _TABLE_HEAD.unpack_from(data)
        region_size = cls.REGION.SIZE
        assert region_size is not None
        present = (len(data) - _TABLE_HEAD.size) // region_size
        if count != present:
            raise _fail(f"table says {count} regions but the payload holds {present}")
        if padding:
            raise _fail(f"memory table padding is {padding:#x}, not 0")
        regions = tuple(
            cls.REGION.unpack(data[off : off + region_size])
            for off in range(_TABLE_HEAD.size, len(data), region_size)
        )
        return cls(regions)

    def pack(self) -> bytes:
        for region in self.regions:
            if type(region) is not self.REGION:
                raise _fail(f"{type(self).__name__} holds {self.REGION.__name__} only")
        return _TABLE_HEAD.pack(len(self.regions), 0) + b"".join(
            r.pack() for r in self.regions
        )

    def validate(self) -> None:
        if not 1 <= len(self.regions) <= MAX_MEM_REGIONS:
            raise _fail(
                f"a memory table holds 1 to {MAX_MEM_REGIONS} regions, "
                f"not {len(self.regions)}"
            )
        for region in self.regions:
            region.validate()


@final
@dataclass(frozen=True, slots=True)
class XenMemoryTable(MemoryTable):
    """SET_MEM_TABLE when XEN_MMAP is negotiated (40-byte regions)."""

    REGION: ClassVar[type[MemoryRegion]] = XenMemoryRegion


_PADDING_U64: Final = _struct("Q")


@dataclass(frozen=True, slots=True)
class SingleMemoryRegion(Payload):
    """ADD_MEM_REG / REM_MEM_REG: 8 bytes of padding, then one region."""

    region: MemoryRegion
    REGION: ClassVar[type[MemoryRegion]] = MemoryRegion

    @classmethod
    def size_problem(cls, size: int) -> str | None:
        region = cls.REGION.SIZE
        assert region is not None
        expected = _PADDING_U64.size + region
        if size != expected:
            return f"expected a {expected}-byte payload, got {size} bytes"
        return None

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        # The padding u64 is ignored, as every implementation does.
        return cls(cls.REGION.unpack(data[_PADDING_U64.size :]))

    def pack(self) -> bytes:
        if type(self.region) is not self.REGION:
            raise _fail(f"{type(self).__name__} holds {self.REGION.__name__} only")
        return _PADDING_U64.pack(0) + self.region.pack()

    def validate(self) -> None:
        self.region.validate()


@final
@dataclass(frozen=True, slots=True)
class XenSingleMemoryRegion(SingleMemoryRegion):
    """ADD/REM_MEM_REG when XEN_MMAP is negotiated (48 bytes)."""

    REGION: ClassVar[type[MemoryRegion]] = XenMemoryRegion


@final
@dataclass(frozen=True, slots=True)
class Log(_Struct):
    """SET_LOG_BASE: the dirty log's mmap size and offset in the fd."""

    mmap_size: int
    mmap_offset: int
    STRUCT: ClassVar[struct.Struct] = _struct("QQ")
    SIZE: ClassVar[int | None] = 16

    def validate(self) -> None:
        if self.mmap_size == 0:
            raise _fail("dirty log size is 0")
        _check_span("log mmap offset", self.mmap_offset, self.mmap_size)


@final
@dataclass(frozen=True, slots=True)
class IotlbMsg(_Struct):
    """``struct vhost_iotlb_msg``: iova, size, uaddr, perm, type."""

    iova: int
    size: int
    uaddr: int
    perm: int
    msg_type: int
    STRUCT: ClassVar[struct.Struct] = _struct("QQQBB6x")
    SIZE: ClassVar[int | None] = 32

    def validate(self) -> None:
        if self.perm not in _values(IotlbPerm):
            raise _fail(f"unknown IOTLB permission {self.perm}")
        if self.msg_type not in _values(IotlbType):
            raise _fail(f"unknown IOTLB message type {self.msg_type}")
        _check_span("IOTLB iova", self.iova, self.size)
        _check_span("IOTLB uaddr", self.uaddr, self.size)


_CONFIG_HEAD: Final = _struct("III")


@dataclass(frozen=True, slots=True)
class Config(Payload):
    """GET/SET_CONFIG: offset and size in the device config space, flags,
    then ``size`` bytes (zeroes in a GET_CONFIG request)."""

    offset: int
    size: int
    flags: int
    data: bytes

    @classmethod
    def size_problem(cls, size: int) -> str | None:
        if size < _CONFIG_HEAD.size:
            return f"config payload of {size} bytes is shorter than its 12-byte head"
        return None

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        offset, size, flags = _CONFIG_HEAD.unpack_from(data)
        return cls(offset, size, flags, bytes(data[_CONFIG_HEAD.size :]))

    def pack(self) -> bytes:
        try:
            return _CONFIG_HEAD.pack(self.offset, self.size, self.flags) + self.data
        except struct.error as exc:
            raise _fail(f"config field out of range ({exc})") from exc

    def validate(self) -> None:
        if self.size != len(self.data):
            raise _fail(
                f"config size field says {self.size} but {len(self.data)} bytes follow"
            )
        unknown = self.flags & ~int(ConfigFlags.WRITABLE | ConfigFlags.LIVE_MIGRATION)
        if unknown:
            raise _fail(f"unknown config flags {unknown:#x}")
        if self.size == 0:
            raise _fail("config size is 0")
        if self.size > MAX_CONFIG_SIZE:
            raise _fail(f"config size {self.size} exceeds {MAX_CONFIG_SIZE} bytes")
        if self.offset + self.size > CONFIG_SPACE_LIMIT:
            raise _fail(
                f"config range {self.offset}+{self.size} lies beyond "
                f"{CONFIG_SPACE_LIMIT:#x}"
            )


@final
@dataclass(frozen=True, slots=True)
class ConfigReply(Config):
    """The reply to GET_CONFIG. A size of 0 (a 12-byte head with size 0, or
    an empty payload) is how a back-end reports failure: see ``failed``."""

    @classmethod
    def size_problem(cls, size: int) -> str | None:
        return None if size == 0 else Config.size_problem(size)

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        if not data:
            return cls(0, 0, 0, b"")
        offset, size, flags = _CONFIG_HEAD.unpack_from(data)
        return cls(offset, size, flags, bytes(data[_CONFIG_HEAD.size :]))

    @property
    def failed(self) -> bool:
        return self.size == 0

    def validate(self) -> None:
        if self.failed:
            if self.data:
                raise _fail("a failed GET_CONFIG reply must carry no data")
            return
        Config.validate(self)


@final
@dataclass(frozen=True, slots=True)
class VringArea(_Struct):
    """BACKEND_VRING_HOST_NOTIFIER_MSG: ring index (bits 0-7) and NOFD
    (bit 8) in ``u64``, then the size and offset of the notifier page."""

    u64: int
    size: int
    offset: int
    STRUCT: ClassVar[struct.Struct] = _struct("QQQ")
    SIZE: ClassVar[int | None] = 24

    @property
    def index(self) -> int:
        return self.u64 & VRING_INDEX_MASK

    @property
    def nofd(self) -> bool:
        return bool(self.u64 & VRING_NOFD)

    def validate(self) -> None:
        if self.u64 & ~(VRING_INDEX_MASK | VRING_NOFD):
            raise _fail(f"reserved bits set in vring area word {self.u64:#x}")
        _check_span("notifier offset", self.offset, self.size)


@final
@dataclass(frozen=True, slots=True)
class Inflight(_Struct):
    """GET/SET_INFLIGHT_FD: mmap size and offset of the inflight buffer,
    number of queues and queue size (C pads it to 24 bytes)."""

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int
    STRUCT: ClassVar[struct.Struct] = _struct("QQHH4x")
    SIZE: ClassVar[int | None] = 24

    def validate(self) -> None:
        if self.num_queues == 0 or self.queue_size == 0:
            raise _fail("inflight num_queues and queue_size must not be 0")
        _check_span("inflight mmap offset", self.mmap_offset, self.mmap_size)


@final
@dataclass(frozen=True, slots=True)
class SharedObject(Payload):
    """A shared-object UUID (16 bytes; the first three fields big-endian,
    which is how ``uuid.UUID(bytes=...)`` reads them)."""

    uuid: bytes
    SIZE: ClassVar[int | None] = 16

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        return cls(bytes(data))

    def pack(self) -> bytes:
        if len(self.uuid) != 16:
            raise _fail(f"a UUID has 16 bytes, not {len(self.uuid)}")
        return self.uuid

    @property
    def as_uuid(self) -> UUID:
        return UUID(bytes=self.uuid)

    def validate(self) -> None:
        if len(self.uuid) != 16:
            raise _fail(f"a UUID has 16 bytes, not {len(self.uuid)}")
        if self.uuid in (bytes(16), b"\xff" * 16):
            raise _fail("the nil and max UUIDs name no shared object")


@final
@dataclass(frozen=True, slots=True)
class DeviceStateTransfer(_Struct):
    """SET_DEVICE_STATE_FD: transfer direction (SAVE 0, LOAD 1) and phase
    (STOPPED 0)."""

    direction: int
    phase: int
    STRUCT: ClassVar[struct.Struct] = _struct("II")
    SIZE: ClassVar[int | None] = 8

    def validate(self) -> None:
        if self.direction not in _values(DeviceStateDirection):
            raise _fail(f"unknown device state direction {self.direction}")
        if self.phase not in _values(DeviceStatePhase):
            raise _fail(f"unknown device state phase {self.phase}")


@final
@dataclass(frozen=True, slots=True)
class ShmemMap(_Struct):
    """BACKEND_SHMEM_MAP / UNMAP: shared-memory region id, offsets in the fd
    and in the region, length and flags."""

    shmid: int
    fd_offset: int
    shm_offset: int
    length: int
    flags: int
    STRUCT: ClassVar[struct.Struct] = _struct("B7xQQQQ")
    SIZE: ClassVar[int | None] = 40

    def validate(self) -> None:
        if self.length == 0:
            raise _fail("shmem mapping length is 0")
        _check_span("shmem fd offset", self.fd_offset, self.length)
        _check_span("shmem offset", self.shm_offset, self.length)
        if self.flags & ~0x3:
            raise _fail(f"unknown shmem map flags {self.flags:#x}")


_SHMEM_HEAD: Final = _struct("II")
_SHMEM_PAGE: Final = 4096


@final
@dataclass(frozen=True, slots=True)
class ShmemConfig(Payload):
    """GET_SHMEM_CONFIG reply: the number of shared-memory regions and the
    size of each (index = shmid). Sent with 256 sizes."""

    nregions: int
    memory_sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        # One canonical form whatever the wire held: 256 sizes.
        padding = (0,) * (256 - len(self.memory_sizes))
        object.__setattr__(self, "memory_sizes", tuple(self.memory_sizes) + padding)

    @classmethod
    def size_problem(cls, size: int) -> str | None:
        allowed = [_SHMEM_HEAD.size + 8 * n for n in SHMEM_CONFIG_REGION_COUNTS]
        if size not in allowed:
            want = " or ".join(map(str, allowed))
            return f"expected a payload of {want} bytes, got {size}"
        return None

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        nregions, _padding = _SHMEM_HEAD.unpack_from(data)
        count = (len(data) - _SHMEM_HEAD.size) // 8
        sizes = struct.unpack_from(f"={count}Q", data, _SHMEM_HEAD.size)
        return cls(nregions, tuple(sizes))

    def pack(self) -> bytes:
        try:
            sizes = struct.pack("=256Q", *self.memory_sizes)
            return _SHMEM_HEAD.pack(self.nregions, 0) + sizes
        except struct.error as exc:
            raise _fail(f"shmem config field out of range ({exc})") from exc

    def validate(self) -> None:
        limit = max(SHMEM_CONFIG_REGION_COUNTS)
        if len(self.memory_sizes) > limit or self.nregions > limit:
            raise _fail(f"at most {limit} shared memory regions")
        for shmid, size in enumerate(self.memory_sizes):
            if size % _SHMEM_PAGE:
                raise _fail(
                    f"shared memory region {shmid} size {size:#x} is not "
                    "a multiple of 4 KiB"
                )


@final
@dataclass(frozen=True, slots=True)
class VringFile(Payload):
    """SET_VRING_KICK/CALL/ERR: a u64 holding the ring index (bits 0-7)
    and NOFD (bit 8: no fd attached, poll instead)."""

    index: int
    nofd: bool = False
    SIZE: ClassVar[int | None] = 8

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        (value,) = _PADDING_U64.unpack(data)
        if value & ~(VRING_INDEX_MASK | VRING_NOFD):
            raise _fail(f"reserved bits set in vring file word {value:#x}")
        return cls(value & VRING_INDEX_MASK, bool(value & VRING_NOFD))

    def pack(self) -> bytes:
        self.validate()
        return _PADDING_U64.pack(self.index | (VRING_NOFD if self.nofd else 0))

    def validate(self) -> None:
        if not 0 <= self.index <= VRING_INDEX_MASK:
            raise _fail(f"vring index {self.index} does not fit in 8 bits")


@final
@dataclass(frozen=True, slots=True)
class Opaque(Payload):
    """Bytes we carry without interpreting (crypto sessions)."""

    data: bytes

    @classmethod
    def size_problem(cls, size: int) -> str | None:
        if size > MAX_PAYLOAD_SIZE:
            return f"payload of {size} bytes exceeds {MAX_PAYLOAD_SIZE}"
        return None

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        return cls(bytes(data))

    def pack(self) -> bytes:
        return self.data
