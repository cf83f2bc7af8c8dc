"""The Xen memory backend over the fake privcmd/gntdev drivers: ioctl
numbers and argument bytes as the kernel reads them, foreign and grant
mappings, per-access grant mapping, unmapping, refusals; and what happens on
this host, which has no Xen (the clear one-line errors)."""

from __future__ import annotations

import errno
import gc
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fdutil import open_fds
from tests.test_cli import one_line_error, run
from vubackend.errors import MappingError, UnmappedAddressError, XenUnavailableError
from vubackend.memory import (
    XEN_FOREIGN,
    XEN_GRANT,
    XEN_GRANT_ADDR_OFF,
    XEN_NO_ADVANCE_MAP,
    FrontendAddress,
    GuestAddress,
    GuestMemory,
    HostXenDevices,
    RegionDescriptor,
    XenBackend,
    XenLibraries,
    _xen_libs,
    select_backend,
    xen_flags_from_wire,
)
from vubackend.memory import _xen_devices as layouts

from ._fake_xen import (
    GNTDEV_MAP_GRANT_REF,
    GNTDEV_UNMAP_GRANT_REF,
    PAGE,
    PRIVCMD_MMAPBATCH_V2,
    FakeXen,
)

DOMID = 9
SIZE = 64 * PAGE
GRANT_BASE = XEN_GRANT_ADDR_OFF | 0x40_0000  # grant refs from 0x400


@pytest.fixture
def fake() -> Iterator[FakeXen]:
    """A FakeXen; after the test no grant map or Xen mapping is left."""
    xen = FakeXen()
    yield xen
    gc.collect()
    assert xen.grant_maps() == 0, "a grant map was never unmapped"
    assert xen.live_mappings == 0, "a Xen mapping was never unmapped"
    xen.close()


@pytest.fixture
def guest() -> Iterator[int]:
    """The domain's memory: a memfd of SIZE bytes, page i filled with i."""
    fd = os.memfd_create("xen-guest", os.MFD_CLOEXEC)
    os.ftruncate(fd, SIZE)
    for page in range(SIZE // PAGE):
        os.pwrite(fd, bytes([page]) * PAGE, page * PAGE)
    yield fd
    os.close(fd)


def _descriptor(
    fd: int, gpa: int, flags: int, *, size: int = SIZE, offset: int = 0
) -> RegionDescriptor:
    return RegionDescriptor(
        gpa=GuestAddress(gpa),
        size=size,
        frontend_addr=FrontendAddress(0x7000_0000_0000),
        mmap_offset=offset,
        fd=fd,
        xen_flags=flags,
        xen_data=DOMID,
    )


# ------------------------------------------------------------ pinned ABI


def test_ioctl_numbers_are_the_kernels() -> None:
    # rust-vmm-vhost-user-backend.md §3.5; include/uapi/xen/privcmd.h and
    # gntdev.h: _IOC(_IOC_NONE, 'P', 4, 32), ('G', 0, 24), ('G', 1, 16).
    assert layouts.IOCTL_PRIVCMD_MMAPBATCH_V2 == 0x00205004
    assert layouts.IOCTL_GNTDEV_MAP_GRANT_REF == 0x00184700
    assert layouts.IOCTL_GNTDEV_UNMAP_GRANT_REF == 0x00104701
    # The fake's numbers are built independently from the same headers.
    assert layouts.IOCTL_PRIVCMD_MMAPBATCH_V2 == PRIVCMD_MMAPBATCH_V2
    assert layouts.IOCTL_GNTDEV_MAP_GRANT_REF == GNTDEV_MAP_GRANT_REF
    assert layouts.IOCTL_GNTDEV_UNMAP_GRANT_REF == GNTDEV_UNMAP_GRANT_REF


def test_argument_layouts_are_the_kernels() -> None:
    # privcmd_mmapbatch_v2: u32 num @0, u16 dom @4, u64 addr @8,
    # arr pointer @16, err pointer @24; 32 bytes.
    packed = layouts.PRIVCMD_MMAPBATCH_V2.pack(3, 0x1234, 0xA000, 0xB000, 0xC000)
    assert packed == (
        (3).to_bytes(4, "little")
        + (0x1234).to_bytes(2, "little")
        + bytes(2)
        + (0xA000).to_bytes(8, "little")
        + (0xB000).to_bytes(8, "little")
        + (0xC000).to_bytes(8, "little")
    )
    # ioctl_gntdev_map_grant_ref: u32 count, u32 pad, u64 index, then refs
    # of {u32 domid, u32 ref}; ioctl_gntdev_unmap_grant_ref: u64 index,
    # u32 count, u32 pad.
    assert layouts.GNTDEV_MAP_HEADER.pack(2, 0, 7) == struct.pack("<IIQ", 2, 0, 7)
    assert layouts.GNTDEV_GRANT_REF.pack(5, 6) == struct.pack("<II", 5, 6)
    assert layouts.GNTDEV_UNMAP.pack(0x3000, 2, 0) == struct.pack("<QII", 0x3000, 2, 0)
    assert layouts.GNTDEV_MAP_HEADER.size == 16
    assert layouts.GNTDEV_UNMAP.size == 16


def test_wire_flags_convert_to_vm_memory_values() -> None:
    # The message's NO_ADVANCE_MAP is bit 8; vm-memory's value is 0x8.
    assert xen_flags_from_wire(0x1) == XEN_FOREIGN
    assert xen_flags_from_wire(0x2) == XEN_GRANT
    assert xen_flags_from_wire(0x102) == XEN_GRANT | XEN_NO_ADVANCE_MAP
    with pytest.raises(MappingError, match="unknown xen mmap flags 0x10"):
        xen_flags_from_wire(0x10 | 0x2)


# ------------------------------------------------------------ foreign


def test_foreign_region_maps_the_domains_frames(fake: FakeXen, guest: int) -> None:
    fake.add_memory(DOMID, 0x100, guest, SIZE // PAGE)
    handle = fake.open("/dev/xen/privcmd")
    before = open_fds()
    region = XenBackend(devices=fake).map_region(
        _descriptor(handle, 0x100 * PAGE, XEN_FOREIGN)
    )
    (call,) = fake.calls
    num, dom = struct.unpack_from("<IH", call.arg)
    assert (num, dom) == (SIZE // PAGE, DOMID)
    assert call.frames == list(range(0x100, 0x100 + SIZE // PAGE))
    # Both ways: the domain's bytes are seen, and writes land in them.
    assert region.read(5 * PAGE, 4) == bytes([5]) * 4
    region.write(7 * PAGE + 1, b"xyz")
    assert os.pread(guest, 3, 7 * PAGE + 1) == b"xyz"
    region.close()
    assert fake.live_mappings == 0
    assert open_fds() == before
    os.close(handle)


def test_foreign_frame_error_is_a_mapping_error(fake: FakeXen, guest: int) -> None:
    # Only half of the frames exist: the per-frame error array says so.
    fake.add_memory(DOMID, 0, guest, SIZE // PAGE // 2)
    handle = fake.open("/dev/xen/privcmd")
    before = open_fds()
    with pytest.raises(MappingError, match="frame 0x20 of domain 9 could not be"):
        XenBackend(devices=fake).map_region(_descriptor(handle, 0, XEN_FOREIGN))
    gc.collect()
    assert fake.live_mappings == 0
    assert open_fds() == before
    os.close(handle)


def test_an_fd_that_is_no_xen_device_is_refused(fake: FakeXen, guest: int) -> None:
    before = open_fds()
    with pytest.raises(MappingError, match="privcmd refused"):
        XenBackend(devices=fake).map_region(_descriptor(guest, 0, XEN_FOREIGN))
    with pytest.raises(MappingError, match="gntdev refused"):
        XenBackend(devices=fake).map_region(_descriptor(guest, GRANT_BASE, XEN_GRANT))
    gc.collect()
    assert open_fds() == before


# ------------------------------------------------------------ grant


def _refs(arg: bytes) -> list[tuple[int, int]]:
    count = int.from_bytes(arg[0:4], "little")
    return [struct.unpack_from("<II", arg, 16 + 8 * i) for i in range(count)]


def test_grant_region_maps_refs_derived_from_the_gpa(fake: FakeXen, guest: int) -> None:
    fake.add_grants(DOMID, 0x400, guest, SIZE // PAGE)
    handle = fake.open("/dev/xen/gntdev")
    before = open_fds()
    region = XenBackend(devices=fake).map_region(
        _descriptor(handle, GRANT_BASE, XEN_GRANT)
    )
    (mapped,) = fake.calls
    assert mapped.request == GNTDEV_MAP_GRANT_REF
    assert struct.unpack_from("<II", mapped.arg) == (SIZE // PAGE, 0)
    assert _refs(mapped.arg) == [(DOMID, 0x400 + i) for i in range(SIZE // PAGE)]
    assert region.read(3 * PAGE, 2) == b"\x03\x03"
    region.write(PAGE, b"grant")
    assert os.pread(guest, 5, PAGE) == b"grant"
    # A translated view outlives the region: unmapped when it dies.
    memory = GuestMemory([region])
    view = memory.translate(GuestAddress(GRANT_BASE + 2 * PAGE), 4)[0]
    memory.close()
    assert fake.grant_maps() == 1
    assert bytes(view) == b"\x02" * 4
    del view
    assert fake.grant_maps() == 0
    unmapped = fake.calls[-1]
    assert unmapped.request == GNTDEV_UNMAP_GRANT_REF
    assert struct.unpack("<QII", unmapped.arg) == (0, SIZE // PAGE, 0)
    assert open_fds() == before
    os.close(handle)


def test_on_demand_grant_region_maps_per_access(fake: FakeXen, guest: int) -> None:
    fake.add_grants(DOMID, 0x400, guest, SIZE // PAGE)
    handle = fake.open("/dev/xen/gntdev")
    before = open_fds()
    region = XenBackend(devices=fake).map_region(
        _descriptor(handle, GRANT_BASE, XEN_GRANT | XEN_NO_ADVANCE_MAP)
    )
    assert region.on_demand
    assert fake.calls == []  # nothing mapped in advance
    memory = GuestMemory([region])
    # A read across a page boundary maps exactly the two pages it covers.
    assert (
        memory.read(GuestAddress(GRANT_BASE + 3 * PAGE - 2), 4) == b"\x02\x02\x03\x03"
    )
    assert _refs(fake.calls[0].arg) == [(DOMID, 0x403 - 1), (DOMID, 0x403)]
    assert fake.grant_maps() == 0  # and unmapped right after
    memory.write_u32(GuestAddress(GRANT_BASE + 0x10), 0xDEADBEEF)
    assert os.pread(guest, 4, 0x10) == struct.pack("<I", 0xDEADBEEF)
    assert memory.read_u32(GuestAddress(GRANT_BASE + 0x10)) == 0xDEADBEEF
    out = bytearray(3)
    memory.read_into(GuestAddress(GRANT_BASE + 5 * PAGE), out)
    assert out == b"\x05\x05\x05"
    views = memory.translate(GuestAddress(GRANT_BASE + 6 * PAGE), 8)
    assert fake.grant_maps() == 1  # alive with the view
    views[0][:2] = b"ok"
    del views
    assert fake.grant_maps() == 0
    assert os.pread(guest, 2, 6 * PAGE) == b"ok"
    # No fixed mapping: ring structures cannot be located there.
    with pytest.raises(UnmappedAddressError, match="mapped on demand"):
        memory.locate(GuestAddress(GRANT_BASE), 16)
    memory.close()
    assert open_fds() == before
    os.close(handle)


def test_on_demand_mapping_failure_is_a_mapping_error(
    fake: FakeXen, guest: int
) -> None:
    # Only the first page is granted.
    fake.add_grants(DOMID, 0x400, guest, 1)
    handle = fake.open("/dev/xen/gntdev")
    region = XenBackend(devices=fake).map_region(
        _descriptor(handle, GRANT_BASE, XEN_GRANT | XEN_NO_ADVANCE_MAP)
    )
    assert region.read(0, 1) == b"\x00"
    with pytest.raises(MappingError, match="cannot mmap grants 0x401"):
        region.read(PAGE, 1)
    region.close()
    os.close(handle)


# ------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    ("flags", "gpa", "offset", "why"),
    [
        (XEN_FOREIGN | XEN_GRANT, 0, 0, "both foreign and grant"),
        (XEN_FOREIGN | XEN_NO_ADVANCE_MAP, 0, 0, "only a grant region"),
        (XEN_NO_ADVANCE_MAP, 0, 0, "only a grant region"),
        (XEN_GRANT, GRANT_BASE, PAGE, "mmap offset 0x1000 must be 0"),
        (XEN_FOREIGN, 0x800, 0, "must start on a 0x1000-byte page"),
    ],
)
def test_invalid_xen_regions_are_refused(
    fake: FakeXen, flags: int, gpa: int, offset: int, why: str
) -> None:
    handle = fake.open("/dev/xen/gntdev")
    before = open_fds()
    with pytest.raises(MappingError, match=why):
        XenBackend(devices=fake).map_region(
            _descriptor(handle, gpa, flags, offset=offset)
        )
    assert fake.calls == []
    assert open_fds() == before
    os.close(handle)


def test_flags_zero_is_a_plain_mapping(fake: FakeXen, guest: int) -> None:
    region = XenBackend(devices=fake).map_region(_descriptor(guest, 0, 0))
    assert region.read(2 * PAGE, 1) == b"\x02"
    assert fake.calls == []
    region.close()


# ------------------------------------------------------------ this host


def test_host_without_xen_says_what_is_missing() -> None:
    if os.path.exists("/dev/xen"):
        pytest.skip("this host has /dev/xen")
    assert HostXenDevices().missing() == (
        "/dev/xen does not exist (not running under a Xen hypervisor)"
    )
    with pytest.raises(XenUnavailableError) as caught:
        select_backend(xen=True)
    message = str(caught.value)
    assert "\n" not in message
    assert "xen memory backend cannot run: /dev/xen does not exist" in message


def test_xen_with_postcopy_is_refused_in_one_line() -> None:
    xen, postcopy = True, True
    with pytest.raises(MappingError, match="exclude each other") as caught:
        select_backend(xen=xen, postcopy=postcopy)  # type: ignore[call-overload]
    assert "\n" not in str(caught.value)


def test_libraries_missing_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(_xen_libs._SONAMES, "xengnttab", "libxengnttab-absent.so.1")
    with pytest.raises(XenUnavailableError) as caught:
        XenLibraries.load()
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("Xen library libxengnttab-absent.so.1 is not installed")


def test_libraries_without_hypervisor_fail_to_open_with_enoent() -> None:
    # scripts/setup.sh installs libxen-dev: the libraries load, and their
    # open calls fail with ENOENT as there is no /dev/xen here.
    if os.path.exists("/dev/xen"):
        pytest.skip("this host has /dev/xen")
    libs = XenLibraries.load()
    for open_call in (
        libs.xenforeignmemory_open,
        libs.xengnttab_open,
        libs.xc_interface_open,
    ):
        with pytest.raises(XenUnavailableError) as caught:
            open_call()
        message = str(caught.value)
        assert "\n" not in message
        assert os.strerror(errno.ENOENT) in message
        assert "/dev/xen/" in message


def test_setup_installs_the_xen_libraries() -> None:
    setup = Path(__file__).parents[2] / "scripts" / "setup.sh"
    assert "libxen-dev" in setup.read_text()


def test_cli_xen_option_without_xen_is_one_line(tmp_path: Path) -> None:
    if os.path.exists("/dev/xen"):
        pytest.skip("this host has /dev/xen")
    result = run("rng", "--socket", str(tmp_path / "s"), "--xen")
    one_line_error(result, "xen memory backend cannot run", "/dev/xen does not exist")


def test_on_demand_flag_of_either_convention_maps_on_demand() -> None:
    # Bit 8 (the spec text) or 0x8 (what rust-vmm frontends send).
    for wire in (0x102, 0x0A):
        assert xen_flags_from_wire(wire) == XEN_GRANT | XEN_NO_ADVANCE_MAP
    assert xen_flags_from_wire(0) == 0
