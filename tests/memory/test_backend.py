"""Memory backends: MmapBackend, MappedRegion, select_backend."""

from __future__ import annotations

import mmap
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vubackend.bitmap import DirtyLog, DirtyLogSlot, NoopBitmap, fd_page_size
from vubackend.errors import InternalError, MappingError, UnmappedAddressError
from vubackend.memory import (
    BACKEND_PROTOCOL_FEATURES,
    PROTOCOL_FEATURE_PAGEFAULT,
    PROTOCOL_FEATURE_XEN_MMAP,
    GuestAddress,
    MemoryBackend,
    MmapBackend,
    RegionDescriptor,
    select_backend,
)

from ._support import count_fds, count_mappings, descriptor
from .conftest import MakeMemfd

PAGE = mmap.PAGESIZE
CONTENT = bytes(range(256)) * 64  # 16 KiB


def test_maps_a_region_at_an_unaligned_offset(make_memfd: MakeMemfd) -> None:
    fd = make_memfd(len(CONTENT), CONTENT)
    region = MmapBackend().map_region(
        descriptor(fd, 0x10000, 0x1800, mmap_offset=0x1234)
    )
    try:
        assert region.view.tobytes() == CONTENT[0x1234 : 0x1234 + 0x1800]
        assert region.read(0, 4) == CONTENT[0x1234:0x1238]
        region.write(0x10, b"hello")
        assert os.pread(fd, 5, 0x1244) == b"hello"  # the frontend sees it
        assert (region.gpa, region.end, region.size) == (0x10000, 0x11800, 0x1800)
        assert region.mmap_offset == 0x1234
        assert region.contains(GuestAddress(0x117FF))
        assert not region.contains(GuestAddress(0x11800))
        assert isinstance(region.bitmap, NoopBitmap)
    finally:
        region.close()


def test_region_fd_is_borrowed_and_teardown_gives_everything_back(
    make_memfd: MakeMemfd,
) -> None:
    fd = make_memfd(4 * PAGE)
    fds, maps = count_fds(), count_mappings()
    region = MmapBackend().map_region(descriptor(fd, 0, 4 * PAGE))
    assert count_mappings() == maps + 1
    region.close()
    assert not region.mapped
    assert count_mappings() == maps
    assert count_fds() == fds
    os.fstat(fd)  # still ours


def test_region_access_outside_the_region_is_an_unmapped_address(
    make_memfd: MakeMemfd,
) -> None:
    region = MmapBackend().map_region(descriptor(make_memfd(PAGE), 0x4000, PAGE))
    try:
        for offset, length in ((PAGE - 1, 2), (-1, 1), (PAGE, 1)):
            with pytest.raises(UnmappedAddressError) as info:
                region.read(offset, length)
            assert info.value.address == 0x4000 + offset
            assert info.value.length == length
        with pytest.raises(UnmappedAddressError):
            region.write(PAGE - 2, b"abc")
        assert region.read(PAGE - 1, 1) == b"\0"
    finally:
        region.close()


def test_region_writes_mark_exactly_the_written_pages(make_memfd: MakeMemfd) -> None:
    buf = bytearray(4)
    slot = DirtyLogSlot(DirtyLog(buf))
    region = MmapBackend().map_region(
        descriptor(make_memfd(4 * PAGE), 0x8000, 0x4000), slot
    )
    try:
        region.write(0x0FFF, b"ab")  # GPA 0x8fff..0x9000: pages 8 and 9
        assert buf == bytearray([0, 0b11, 0, 0])
        assert region.bitmap.dirty_at(0x1000)
        region.view[0x3000] = 1  # raw views are not logged
        assert buf == bytearray([0, 0b11, 0, 0])
    finally:
        region.close()


@pytest.mark.parametrize("native", [False, True])
def test_native_and_slicing_copies_agree(make_memfd: MakeMemfd, native: bool) -> None:
    backend = MmapBackend(native_copies=native)
    assert backend.needs_native_copies is native
    region = backend.map_region(descriptor(make_memfd(len(CONTENT), CONTENT), 0, PAGE))
    try:
        assert region.native_copies is native
        assert region.read(100, 50) == CONTENT[100:150]
        out = bytearray(20)
        assert region.read_into(7, out) == 20
        assert out == CONTENT[7:27]
        region.write(5, memoryview(b"0123456789")[2:6])
        assert region.read(5, 4) == b"2345"
        with pytest.raises(TypeError):
            region.read_into(0, b"read-only")
    finally:
        region.close()


def test_beyond_the_end_of_the_file_is_refused(make_memfd: MakeMemfd) -> None:
    fd = make_memfd(2 * PAGE)
    maps = count_mappings()
    with pytest.raises(MappingError, match=r"GPA 0x0: range .* past the end"):
        MmapBackend().map_region(descriptor(fd, 0, PAGE, mmap_offset=PAGE + 1))
    assert count_mappings() == maps


def test_xen_flags_need_the_xen_backend(make_memfd: MakeMemfd) -> None:
    fd = make_memfd(PAGE)
    xen = RegionDescriptor(
        gpa=GuestAddress(0),
        size=PAGE,
        frontend_addr=descriptor(fd, 0, 1).frontend_addr,
        mmap_offset=0,
        fd=fd,
        xen_flags=0x1,
        xen_data=7,
    )
    with pytest.raises(MappingError, match="need the xen memory backend"):
        MmapBackend().map_region(xen)


def test_a_closed_fd_is_refused_with_the_oserror_as_cause(
    make_memfd: MakeMemfd,
) -> None:
    fd = os.dup(make_memfd(PAGE))
    os.close(fd)
    with pytest.raises(MappingError) as info:
        MmapBackend().map_region(descriptor(fd, 0, PAGE))
    assert isinstance(info.value.__cause__, OSError)


def test_region_references_unmap_on_the_last_close(make_memfd: MakeMemfd) -> None:
    maps = count_mappings()
    region = MmapBackend().map_region(descriptor(make_memfd(PAGE), 0, PAGE))
    region.incref()
    region.close()
    assert region.mapped
    assert count_mappings() == maps + 1
    region.close()
    assert count_mappings() == maps
    region.close()  # extra closes do nothing
    with pytest.raises(InternalError, match="after it was unmapped"):
        region.incref()
    with pytest.raises(ValueError, match="released"):
        region.read(0, 1)


def test_select_backend_defaults_to_plain_mmap() -> None:
    backend: MemoryBackend = select_backend()
    assert isinstance(backend, MmapBackend)
    assert backend.name == "mmap"
    assert backend.protocol_features == 0
    assert not backend.needs_native_copies


def test_select_backend_refuses_xen_with_postcopy() -> None:
    xen, postcopy = True, True  # as from a configuration file: bools
    with pytest.raises(MappingError, match="exclude each other"):
        select_backend(xen=xen, postcopy=postcopy)  # type: ignore[call-overload]


def test_backend_feature_bits_are_the_spec_bits() -> None:
    # VHOST_USER_PROTOCOL_F_PAGEFAULT = 8, VHOST_USER_PROTOCOL_F_XEN_MMAP = 17
    assert PROTOCOL_FEATURE_PAGEFAULT == 1 << 8
    assert PROTOCOL_FEATURE_XEN_MMAP == 1 << 17
    assert BACKEND_PROTOCOL_FEATURES == (1 << 8) | (1 << 17)


def _free_huge_pages() -> int:
    text = Path("/proc/meminfo").read_text()
    found = re.search(r"^HugePages_Free:\s+(\d+)", text, re.MULTILINE)
    return int(found.group(1)) if found else 0


@pytest.mark.needs_hugetlb
def test_maps_a_hugetlbfs_region_at_an_unaligned_offset() -> None:
    if not hasattr(os, "MFD_HUGETLB") or _free_huge_pages() < 2:
        pytest.skip("needs 2 free huge pages (/proc/sys/vm/nr_hugepages)")
    try:
        fd = os.memfd_create("vubackend-test-memory", os.MFD_HUGETLB | os.MFD_CLOEXEC)
    except OSError as exc:
        pytest.skip(f"memfd_create(MFD_HUGETLB) failed: {exc}")
    try:
        huge = fd_page_size(fd)
        assert huge > PAGE
        os.ftruncate(fd, 2 * huge)
        # The frontend's own mapping, which allocates the pages.
        with mmap.mmap(fd, 2 * huge) as frontend:
            frontend[huge + 0x100 : huge + 0x104] = b"huge"
            region = MmapBackend().map_region(
                descriptor(fd, 0x40000000, 0x1000, mmap_offset=huge + 0x100)
            )
            try:
                assert region.read(0, 4) == b"huge"
                region.write(4, b"!")
                assert frontend[huge + 0x104] == ord("!")
            finally:
                region.close()
    finally:
        os.close(fd)


def test_xen_with_postcopy_is_a_type_error(tmp_path: Path) -> None:
    """mypy refuses both backends at once, as literals or as two bools that
    could both be True, and accepts one bool with the other left out. (In a
    subprocess: mypy's objects would slow every later gc.collect().)"""
    snippet = tmp_path / "choose.py"
    snippet.write_text(
        "from vubackend.memory import MmapBackend, select_backend\n"
        "select_backend(xen=True, postcopy=True)\n"  # line 2: error
        "def choose(xen: bool, postcopy: bool) -> None:\n"
        "    select_backend(xen=xen)\n"
        "    select_backend(postcopy=postcopy)\n"
        "    select_backend(xen=xen, postcopy=postcopy)\n"  # line 6: error
        "    if not postcopy:\n"
        "        select_backend(xen=xen, postcopy=postcopy)\n"
        "    plain: MmapBackend = select_backend()\n"
    )
    root = Path(__file__).parents[2]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(root / "pyproject.toml"),
            "--cache-dir",
            str(tmp_path / "cache"),
            str(snippet),
        ],
        cwd=root,  # the config's mypy_path is relative to the working directory
        capture_output=True,
        text=True,
        check=False,
    )
    stdout = result.stdout
    # Only the snippet's errors: the library's own are mypy's job elsewhere.
    errors = [
        line
        for line in stdout.splitlines()
        if line.startswith(str(snippet)) and ": error:" in line
    ]
    assert result.returncode == 1, stdout + result.stderr  # 2: mypy crashed
    assert [int(line.split(":")[1]) for line in errors] == [2, 6], stdout
    assert all('No overload variant of "select_backend"' in line for line in errors)
