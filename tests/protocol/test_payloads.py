"""Payload layouts (§1.4): exact packed sizes, round trips, validators."""

from __future__ import annotations

import struct

import pytest

from vubackend.errors import LocalProtocolError
from vubackend.protocol import (
    U64,
    Config,
    ConfigReply,
    DeviceStateTransfer,
    Empty,
    Inflight,
    IotlbMsg,
    Log,
    MemoryRegion,
    MemoryTable,
    PackedRingPosition,
    Payload,
    SharedObject,
    ShmemConfig,
    ShmemMap,
    SingleMemoryRegion,
    VringAddr,
    VringArea,
    VringFile,
    VringState,
    XenMemoryRegion,
    XenMemoryTable,
    XenSingleMemoryRegion,
)

from .cases import CASES

REGION = MemoryRegion(0x1000, 0x2000, 0x7F00_0000_0000, 0)
XEN_REGION = XenMemoryRegion(0x1000, 0x2000, 0, 0, 0x1, 7)

# (payload, packed size from §1.4, the C layout as a struct format)
SIZES: list[tuple[Payload, int, str]] = [
    (Empty(), 0, ""),
    (U64(5), 8, "=Q"),
    (VringState(1, 2), 8, "=II"),
    (VringAddr(0, 0, 0, 0, 0, 0), 40, "=IIQQQQ"),
    (REGION, 32, "=QQQQ"),
    (XEN_REGION, 40, "=QQQQII"),
    (MemoryTable((REGION,)), 8 + 32, "=II"),
    (MemoryTable((REGION, REGION, REGION)), 8 + 96, "=II"),
    (XenMemoryTable((XEN_REGION,)), 8 + 40, "=II"),
    (SingleMemoryRegion(REGION), 40, "=Q"),
    (XenSingleMemoryRegion(XEN_REGION), 48, "=Q"),
    (Log(0x1000, 0), 16, "=QQ"),
    (IotlbMsg(0, 0, 0, 1, 1), 32, "=QQQBB6x"),
    (Config(0, 4, 0, bytes(4)), 12 + 4, "=III"),
    (VringArea(0, 4096, 0), 24, "=QQQ"),
    (Inflight(0, 0, 1, 256), 24, "=QQHH4x"),
    (SharedObject(bytes(range(1, 17))), 16, "16s"),
    (DeviceStateTransfer(0, 0), 8, "=II"),
    (ShmemMap(0, 0, 0, 1, 0), 40, "=B7xQQQQ"),
    (ShmemConfig(0, ()), 8 + 8 * 256, "=II"),
    (VringFile(0), 8, "=Q"),
]


@pytest.mark.parametrize(
    ("payload", "size", "fmt"), SIZES, ids=[type(p).__name__ for p, _, _ in SIZES]
)
def test_packed_size_matches_the_reference(
    payload: Payload, size: int, fmt: str
) -> None:
    packed = payload.pack()
    assert len(packed) == size
    # The head of every payload has the C layout of the reference.
    if fmt:
        head = struct.Struct(fmt)
        assert head.size <= size
        head.unpack_from(packed)
    assert type(payload).size_problem(size) is None
    assert type(payload).unpack(packed) == payload


def test_field_order_of_vring_addr_puts_used_before_avail() -> None:
    packed = VringAddr(1, 0, 0x1000, used=0x2000, avail=0x3000, log=0).pack()
    assert struct.unpack("=IIQQQQ", packed) == (1, 0, 0x1000, 0x2000, 0x3000, 0)


def test_every_case_payload_round_trips() -> None:
    for case in CASES:
        packed = case.payload.pack()
        assert type(case.payload).unpack(packed) == case.payload, case.id
        case.payload.validate()


def test_packed_ring_position_encoding() -> None:
    position = PackedRingPosition(5, True, 3, False)
    assert position.to_num() == 5 | 1 << 15 | 3 << 16
    assert PackedRingPosition.from_num(position.to_num()) == position
    top = PackedRingPosition(0x7FFF, True, 0x7FFF, True)
    assert top.to_num() == 0xFFFF_FFFF
    with pytest.raises(LocalProtocolError, match="15 bits"):
        PackedRingPosition(0x8000, False, 0, False).to_num()


INVALID: list[tuple[Payload, str]] = [
    (MemoryRegion(0, 0, 0, 0), "size 0"),
    (MemoryRegion(2**64 - 0x1000, 0x2000, 0, 0), "guest address .* overflows"),
    (MemoryRegion(0, 0x2000, 2**64 - 1, 0), "userspace address .* overflows"),
    (MemoryRegion(0, 0x2000, 0, 2**64 - 1), "mmap offset .* overflows"),
    (XenMemoryRegion(0, 0x1000, 0, 0, 0x3, 0), "both foreign and grant"),
    (XenMemoryRegion(0, 0x1000, 0, 0, 0x101, 0), "only a xen grant region may be"),
    (XenMemoryRegion(0, 0x1000, 0, 0, 0x8, 0), "only a xen grant region may be"),
    (XenMemoryRegion(0, 0x1000, 0, 0, 0x1001, 0), "unknown xen mmap flags"),
    (MemoryTable(()), "1 to 8 regions"),
    (MemoryTable((REGION,) * 9), "1 to 8 regions"),
    (Log(0, 0), "log size is 0"),
    (Log(2**63, 2**63 + 1), "overflows"),
    (VringAddr(0, 2, 0, 0, 0, 0), "unknown vring address flags"),
    (VringAddr(0, 0, 0x1008, 0, 0, 0), "not 16-byte aligned"),
    (VringAddr(0, 0, 0, 0x1002, 0, 0), "not 4-byte aligned"),
    (VringAddr(0, 0, 0, 0, 0x1001, 0), "not 2-byte aligned"),
    (Config(0, 4, 0, bytes(3)), "says 4 but 3 bytes follow"),
    (Config(0, 0, 0, b""), "config size is 0"),
    (Config(0, 257, 0, bytes(257)), "exceeds 256"),
    (Config(0xFFF, 2, 0, bytes(2)), "beyond"),
    (Config(0, 1, 4, bytes(1)), "unknown config flags"),
    (ConfigReply(0, 0, 0, b"x"), "no data"),
    (SharedObject(bytes(16)), "nil and max"),
    (SharedObject(b"\xff" * 16), "nil and max"),
    (SharedObject(b"short"), "16 bytes"),
    (DeviceStateTransfer(2, 0), "direction"),
    (DeviceStateTransfer(0, 1), "phase"),
    (ShmemMap(0, 0, 0, 0, 0), "length is 0"),
    (ShmemMap(0, 2**64 - 1, 0, 2, 0), "overflows"),
    (ShmemMap(0, 0, 0, 1, 4), "unknown shmem map flags"),
    (ShmemConfig(300, ()), "at most 256"),
    (ShmemConfig(1, (100,)), "not a multiple of 4 KiB"),
    (IotlbMsg(0, 0, 0, 4, 1), "permission"),
    (IotlbMsg(0, 0, 0, 1, 5), "message type"),
    (VringArea(0x200, 0, 0), "reserved bits"),
    (VringFile(256), "8 bits"),
    (Inflight(2**64 - 1, 2, 1, 1), "overflows"),
]


@pytest.mark.parametrize(("payload", "reason"), INVALID, ids=[r for _, r in INVALID])
def test_validator_rejects_with_a_clear_reason(payload: Payload, reason: str) -> None:
    with pytest.raises(LocalProtocolError, match=reason):
        payload.validate()


def test_out_of_range_fields_are_refused_when_packing() -> None:
    with pytest.raises(LocalProtocolError, match="out of range"):
        U64(2**64).pack()
    with pytest.raises(LocalProtocolError, match="out of range"):
        VringState(-1, 0).pack()


def test_memory_table_unpack_rejects_count_mismatch_and_padding() -> None:
    body = struct.pack("=II", 2, 0) + REGION.pack()
    with pytest.raises(
        LocalProtocolError, match="says 2 regions but the payload holds 1"
    ):
        MemoryTable.unpack(body)
    body = struct.pack("=II", 1, 7) + REGION.pack()
    with pytest.raises(LocalProtocolError, match="padding"):
        MemoryTable.unpack(body)


def test_memory_table_refuses_to_mix_region_kinds() -> None:
    with pytest.raises(LocalProtocolError, match="holds MemoryRegion only"):
        MemoryTable((XEN_REGION,)).pack()


def test_vring_file_rejects_reserved_bits() -> None:
    with pytest.raises(LocalProtocolError, match="reserved bits"):
        VringFile.unpack(struct.pack("=Q", 0x200))


def test_config_reply_failure_forms() -> None:
    assert ConfigReply.unpack(b"").failed
    assert ConfigReply.unpack(struct.pack("=III", 0, 0, 0)).failed
    assert not ConfigReply.unpack(struct.pack("=III", 0, 1, 0) + b"x").failed


def test_shmem_config_accepts_both_region_counts() -> None:
    assert ShmemConfig.size_problem(8 + 8 * 256) is None
    assert ShmemConfig.size_problem(8 + 8 * 8) is None
    assert ShmemConfig.size_problem(8 + 8 * 9) is not None
    short = ShmemConfig.unpack(struct.pack("=II8Q", 1, 0, 4096, 0, 0, 0, 0, 0, 0, 0))
    assert short.memory_sizes[0] == 4096


@pytest.mark.parametrize("flags", [0x0, 0x1, 0x2, 0x102, 0x0A])
def test_xen_region_flags_of_both_conventions_are_valid(flags: int) -> None:
    # 0: plain mapping (rust-vmm UNIX); on-demand as bit 8 (spec text) or 0x8
    # (what rust-vmm frontends send), grants only.
    XenMemoryRegion(0, 0x1000, 0, 0, flags, 0).validate()
