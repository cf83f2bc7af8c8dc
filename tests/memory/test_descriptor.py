"""RegionDescriptor validation and the layout rules of a memory table."""

from __future__ import annotations

import dataclasses

import pytest

from vubackend.errors import MappingError
from vubackend.memory import (
    MAX_MEM_SLOTS,
    FrontendAddress,
    GuestAddress,
    RegionDescriptor,
    check_layout,
)

from ._support import descriptor

U64 = 1 << 64


def make(**changes: int) -> RegionDescriptor:
    fields = {
        "gpa": 0x1000,
        "size": 0x2000,
        "frontend_addr": 0x7F00_0000_0000,
        "mmap_offset": 0,
        "fd": 3,
    }
    fields.update(changes)
    return RegionDescriptor(
        gpa=GuestAddress(fields["gpa"]),
        size=fields["size"],
        frontend_addr=FrontendAddress(fields["frontend_addr"]),
        mmap_offset=fields["mmap_offset"],
        fd=fields["fd"],
        xen_flags=changes.get("xen_flags", 0),
        xen_data=changes.get("xen_data", 0),
    )


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"size": 0}, "size 0x0 must be > 0"),
        ({"size": -4096}, "must be > 0"),
        ({"size": U64}, "must be > 0"),
        ({"fd": -1}, "invalid fd"),
        ({"gpa": -1}, "guest address -0x1 is not a u64"),
        ({"gpa": U64}, "guest address .* is not a u64"),
        ({"gpa": U64 - 0x1000}, "guest address .* overflows a u64"),
        ({"frontend_addr": U64 - 0x1000}, "frontend address .* overflows a u64"),
        ({"mmap_offset": U64 - 0x1FFF}, "mmap offset .* overflows a u64"),
        ({"mmap_offset": -1}, "mmap offset -0x1 is not a u64"),
        ({"xen_flags": 0x4}, "unknown xen mapping flags 0x4"),
        ({"xen_flags": 1 << 32}, "xen flags .* is not a u32"),
        ({"xen_data": -1}, "xen data .* is not a u32"),
    ],
)
def test_rejects_invalid_fields(changes: dict[str, int], words: str) -> None:
    with pytest.raises(MappingError, match=words):
        make(**changes)


def test_a_region_may_end_at_the_top_of_the_address_space() -> None:
    top = make(gpa=U64 - 0x2000, frontend_addr=U64 - 0x2000, mmap_offset=U64 - 0x2000)
    assert top.end == U64


def test_descriptors_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        make().gpa = GuestAddress(0)  # type: ignore[misc]


def test_adjacent_regions_in_any_order_are_a_valid_layout() -> None:
    check_layout(
        [
            descriptor(3, 0x3000, 0x1000),
            descriptor(3, 0x0, 0x1000),
            descriptor(3, 0x1000, 0x2000),
        ]
    )


def test_rejects_overlapping_guest_physical_addresses() -> None:
    with pytest.raises(
        MappingError, match=r"overlap in guest physical .*\[0x0, 0x2001\)"
    ):
        check_layout([descriptor(3, 0x2000, 0x1000), descriptor(3, 0x0, 0x2001)])


def test_rejects_overlapping_frontend_addresses() -> None:
    with pytest.raises(MappingError, match="overlap in frontend addresses"):
        check_layout(
            [
                descriptor(3, 0x0, 0x1000, frontend_addr=0x10000),
                descriptor(3, 0x8000, 0x1000, frontend_addr=0x10800),
            ]
        )


def test_rejects_more_than_max_mem_slots_regions() -> None:
    table = [descriptor(3, i * 0x1000, 0x1000) for i in range(MAX_MEM_SLOTS + 1)]
    check_layout(table[:MAX_MEM_SLOTS])
    with pytest.raises(MappingError, match="too many memory regions: 510"):
        check_layout(table)
