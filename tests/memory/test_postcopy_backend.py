"""The postcopy memory backend: what it maps and offers, and a session's
userfaultfd with the regions registered on it. (Faults served late, with
the daemon's worker threads, are in tests/daemon/test_postcopy.py.)"""

from __future__ import annotations

import ctypes
import dataclasses
import mmap
import os
import select

import pytest

from vubackend.errors import MappingError
from vubackend.frontend import Userfaultfd, userfaultfd_unavailable
from vubackend.memory import (
    PROTOCOL_FEATURE_PAGEFAULT,
    GuestAddress,
    GuestMemory,
    MemoryBackend,
    MmapBackend,
    PostcopyBackend,
    PostcopyFaults,
    select_backend,
)

from ._support import count_fds, count_mappings, descriptor
from .conftest import MakeMemfd

PAGE = mmap.PAGESIZE

needs_uffd = pytest.mark.skipif(
    userfaultfd_unavailable() is not None,
    reason=f"userfaultfd unavailable: {userfaultfd_unavailable()}",
)


def test_select_backend_gives_the_postcopy_backend() -> None:
    backend: MemoryBackend = select_backend(postcopy=True)
    assert isinstance(backend, PostcopyBackend)
    assert backend.name == "postcopy"
    # PAGEFAULT is this backend's alone.
    assert backend.protocol_features == PROTOCOL_FEATURE_PAGEFAULT == 1 << 8
    assert not MmapBackend().protocol_features & PROTOCOL_FEATURE_PAGEFAULT
    assert backend.needs_native_copies


def test_regions_copy_natively_and_give_everything_back(make_memfd: MakeMemfd) -> None:
    fd = make_memfd(4 * PAGE, b"abc")
    fds, maps = count_fds(), count_mappings()
    memory = GuestMemory.map([descriptor(fd, 0x10000, 4 * PAGE)], PostcopyBackend())
    (region,) = memory.regions
    assert region.native_copies
    assert memory.read(GuestAddress(0x10000), 3) == b"abc"
    memory.write(GuestAddress(0x10000 + PAGE), b"xyz")
    assert os.pread(fd, 3, PAGE) == b"xyz"  # the frontend sees it
    memory.close()
    assert (count_fds(), count_mappings()) == (fds, maps)


def test_xen_flags_are_refused(make_memfd: MakeMemfd) -> None:
    fd = make_memfd(PAGE)
    xen = dataclasses.replace(descriptor(fd, 0, PAGE), xen_flags=1)
    with pytest.raises(MappingError, match="xen"):
        PostcopyBackend().map_region(xen)


@needs_uffd
def test_faults_fd_is_owned_and_shared_as_a_duplicate() -> None:
    fds = count_fds()
    faults = PostcopyFaults.open()
    shared = faults.share_fd()
    assert shared != faults.fileno()
    assert os.stat(shared).st_ino == os.stat(faults.fileno()).st_ino
    os.close(shared)
    faults.close()
    faults.close()  # idempotent
    assert count_fds() == fds
    with pytest.raises(MappingError, match="closed"):
        faults.fileno()


@needs_uffd
def test_a_registered_region_stays_mapped_until_the_faults_close(
    make_memfd: MakeMemfd,
) -> None:
    fd = make_memfd(4 * PAGE, b"here")
    maps = count_mappings()
    memory = GuestMemory.map([descriptor(fd, 0, 4 * PAGE)], PostcopyBackend())
    (region,) = memory.regions
    address = PostcopyFaults.address_of(region)
    assert address % PAGE == 0
    # The address is where this process sees the region.
    assert ctypes.string_at(address, 4) == b"here"
    with PostcopyFaults.open() as faults:
        faults.register(region)
        faults.register(region)  # once is enough
        assert faults.registered == (region,)
        assert faults.is_registered(region)
        memory.close()  # the table goes; the registration keeps the region
        assert count_mappings() == maps + 1
        assert region.read(0, 4) == b"here"
    assert count_mappings() == maps


@needs_uffd
def test_the_frontend_places_missing_pages_through_the_shared_userfaultfd(
    make_memfd: MakeMemfd,
) -> None:
    # Page 1 of the memfd was never written: it is missing. (Touching it
    # would block this thread until placed: the daemon tests do that, in a
    # child process, with worker threads.)
    fd = make_memfd(2 * PAGE, b"present")
    memory = GuestMemory.map([descriptor(fd, 0, 2 * PAGE)], PostcopyBackend())
    (region,) = memory.regions
    try:
        with PostcopyFaults.open() as faults:
            faults.register(region)
            peer = Userfaultfd(faults.share_fd())
            try:
                # The present page reads without a fault.
                assert memory.read(GuestAddress(0), 7) == b"present"
                assert not select.select([peer.fileno()], [], [], 0)[0]
                # Place the missing page from the peer's side, as a
                # frontend does after a fault: it is present afterwards.
                page = ctypes.create_string_buffer(b"late" * (PAGE // 4), PAGE)
                base = PostcopyFaults.address_of(region)
                assert peer.copy(base + PAGE, ctypes.addressof(page), PAGE)
                assert memory.read(GuestAddress(PAGE), 4) == b"late"
                assert os.pread(fd, 4, PAGE) == b"late"
            finally:
                peer.close()
    finally:
        memory.close()
