"""The postcopy pager without a backend process: the userfaultfd ABI
(ioctl numbers and struct layouts against linux/userfaultfd.h), and the
fault thread against a local userfaultfd on a local mapping of the guest
RAM, playing the backend's part. The faulting accesses come from threads
that release the GIL (``vubackend._native.copy``), as a backend's would."""

from __future__ import annotations

import ctypes
import gc
import mmap
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from vubackend._native import copy as native_copy
from vubackend.errors import DaemonClosedError, MappingError
from vubackend.frontend import (
    GuestRam,
    PostcopyPager,
    UffdEvent,
    Userfaultfd,
    userfaultfd_unavailable,
)
from vubackend.frontend import _uffd as pc

from ..fdutil import open_fds

UNAVAILABLE = userfaultfd_unavailable()
needs_uffd = pytest.mark.skipif(
    UNAVAILABLE is not None, reason=f"userfaultfd unavailable: {UNAVAILABLE}"
)
PAGE = mmap.PAGESIZE
MIB = 1 << 20
WAIT = 5.0  # seconds a resolved fault may take, at most


# ---------------------------------------------------------------- ABI


def test_ioctl_numbers_match_linux_userfaultfd_h() -> None:
    # The values the C preprocessor gives for linux/userfaultfd.h (Linux
    # 6.x, x86-64 and aarch64 alike: asm-generic/ioctl.h encoding).
    assert pc.UFFDIO_API == 0xC018AA3F
    assert pc.UFFDIO_REGISTER == 0xC020AA00
    assert pc.UFFDIO_UNREGISTER == 0x8010AA01
    assert pc.UFFDIO_WAKE == 0x8010AA02
    assert pc.UFFDIO_COPY == 0xC028AA03
    assert pc.UFFDIO_ZEROPAGE == 0xC020AA04
    assert pc.USERFAULTFD_IOC_NEW == 0xAA00
    # _IOWR = dir 3, _IOR = dir 2; size in bits 16-29, type 0xAA, nr.
    assert pc.UFFDIO_COPY == (3 << 30) | (40 << 16) | (0xAA << 8) | 0x03
    assert pc.UFFDIO_WAKE == (2 << 30) | (16 << 16) | (0xAA << 8) | 0x02


def test_struct_layouts_match_the_header() -> None:
    assert pc._API.size == 24  # uffdio_api
    assert pc._RANGE.size == 16  # uffdio_range
    assert pc._REGISTER.size == 32  # uffdio_register
    assert pc._COPY.size == 40  # uffdio_copy
    assert pc._ZEROPAGE.size == 32  # uffdio_zeropage
    assert pc._MSG.size == 32  # uffd_msg
    # uffd_msg: event at 0, pagefault.flags at 8, .address at 16, .ptid at 24.
    raw = bytearray(32)
    raw[0] = 0x12
    raw[8:16] = (1).to_bytes(8, "little")
    raw[16:24] = (0x7F12_3456_7000).to_bytes(8, "little")
    raw[24:28] = (4242).to_bytes(4, "little")
    event = UffdEvent.unpack(bytes(raw))
    assert event == UffdEvent(0x12, 1, 0x7F12_3456_7000, 4242)
    assert event.is_pagefault
    assert event.is_write
    assert not UffdEvent(0x13).is_pagefault  # UFFD_EVENT_FORK
    # uffdio_copy.copy is signed (a negative errno on failure).
    assert pc._COPY.unpack(pc._COPY.pack(1, 2, 3, 0, -17))[4] == -17


@needs_uffd
def test_api_handshake_and_registration_answer_the_kernels_ioctls() -> None:
    fds = open_fds()
    with Userfaultfd.open() as uffd:
        features, ioctls = uffd.api()
        # API, REGISTER and UNREGISTER are allowed on a fresh uffd.
        assert ioctls & (1 << 0x3F)
        assert ioctls & (1 << 0x00)
        assert ioctls & (1 << 0x01)
        assert features  # this kernel offers some UFFD_FEATURE_* bits
        fd = os.memfd_create("uffd-test", os.MFD_CLOEXEC)
        os.ftruncate(fd, 4 * PAGE)
        with mmap.mmap(fd, 4 * PAGE) as mapping:
            pin = ctypes.c_char.from_buffer(mapping)
            address = ctypes.addressof(pin)
            allowed = uffd.register(address, 4 * PAGE)
            assert allowed & (1 << 0x02)  # WAKE
            assert allowed & (1 << 0x03)  # COPY, what placing needs
            src = ctypes.create_string_buffer(b"Q" * PAGE, PAGE)
            assert uffd.copy(address, ctypes.addressof(src), PAGE) is True
            assert uffd.copy(address, ctypes.addressof(src), PAGE) is False  # EEXIST
            uffd.wake(address, PAGE)
            uffd.unregister(address, 4 * PAGE)
            with pytest.raises(MappingError, match="UFFDIO_COPY"):
                uffd.copy(address + PAGE, ctypes.addressof(src), PAGE)
            del pin
        assert os.pread(fd, 2, 0) == b"QQ"
        os.close(fd)
        assert uffd.read_events() == []
    assert uffd.closed
    with pytest.raises(DaemonClosedError):
        uffd.fileno()
    assert open_fds() == fds


def test_peer_pid_names_the_process_at_the_other_end() -> None:
    left, right = socket.socketpair()
    with left, right:
        assert pc.peer_pid(left.fileno()) == os.getpid()


# ---------------------------------------------------------------- faults


@dataclass
class LocalBackend:
    """A backend's part, in this process: a second mapping of every region
    registered MISSING with its own userfaultfd, whose duplicate the pager
    serves (as a backend's uffd reaches QEMU through POSTCOPY_ADVISE)."""

    ram: GuestRam
    uffd: Userfaultfd = field(default_factory=Userfaultfd.open)
    mappings: dict[int, mmap.mmap] = field(default_factory=dict)
    pins: dict[int, ctypes.c_char] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.uffd.api()
        for region in self.ram.regions:
            mapping = mmap.mmap(region.fd, region.size)
            pin = ctypes.c_char.from_buffer(mapping)
            self.mappings[region.gpa] = mapping
            self.pins[region.gpa] = pin
            self.uffd.register(ctypes.addressof(pin), region.size)

    @property
    def bases(self) -> dict[int, int]:
        """Region GPA -> where this "backend" mapped it."""
        return {gpa: ctypes.addressof(pin) for gpa, pin in self.pins.items()}

    def _where(self, gpa: int) -> tuple[mmap.mmap, int]:
        for region in self.ram.regions:
            if region.gpa <= gpa < region.end:
                return self.mappings[region.gpa], gpa - region.gpa
        raise AssertionError(f"{gpa:#x} is in no region")

    def read(self, gpa: int, length: int) -> bytes:
        """Read guest memory without the GIL (may block on a fault)."""
        mapping, offset = self._where(gpa)
        out = bytearray(length)
        native_copy(out, 0, mapping, offset, length)
        return bytes(out)

    def write(self, gpa: int, data: bytes) -> None:
        """Write guest memory without the GIL (may block on a fault)."""
        mapping, offset = self._where(gpa)
        native_copy(mapping, offset, data, 0, len(data))

    def close(self) -> None:
        self.pins.clear()
        for mapping in self.mappings.values():
            mapping.close()
        self.uffd.close()


class Toucher:
    """Runs one guest-memory access on its own thread (it blocks in the
    kernel while the page is missing)."""

    def __init__(self, access: Callable[[], bytes | None]) -> None:
        self.result: bytes | None = None
        self.error: BaseException | None = None
        self._access = access
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result = self._access()
        except BaseException as exc:  # reported by the test
            self.error = exc

    def finished(self, timeout: float = WAIT) -> bool:
        self.thread.join(timeout)
        if self.error is not None:
            raise self.error
        return not self.thread.is_alive()


@dataclass
class Setup:
    ram: GuestRam
    pager: PostcopyPager
    backend: LocalBackend


@pytest.fixture
def setup() -> Iterator[Setup]:
    if UNAVAILABLE is not None:
        pytest.skip(f"userfaultfd unavailable: {UNAVAILABLE}")
    gc.collect()
    fds = open_fds()
    ram = GuestRam([MIB, MIB])
    pager = PostcopyPager(ram)
    backend = LocalBackend(ram)
    try:
        yield Setup(ram, pager, backend)
    finally:
        # Closing the pager closes its duplicate of the backend's uffd; the
        # backend closes its own: a thread still blocked is woken then.
        pager.close()
        backend.close()
        ram.close()
    assert not pager.running
    assert open_fds() == fds


def _attach(s: Setup, *, bases: bool = True) -> None:
    s.pager.attach(os.dup(s.backend.uffd.fileno()), s.backend.bases if bases else None)


def test_a_read_fault_is_resolved_from_the_source(setup: Setup) -> None:
    s = setup
    gpa = MIB + 5 * PAGE  # second region: the base lookup is per region
    source = os.urandom(2 * PAGE)
    assert s.pager.stage(gpa, source) == 2
    assert s.pager.missing_pages == (gpa, gpa + PAGE)
    assert s.pager.is_missing(gpa + PAGE + 7)
    _attach(s)
    s.pager.start()
    assert s.pager.running
    toucher = Toucher(lambda: s.backend.read(gpa, 2 * PAGE))
    assert toucher.finished(), "the backend's read fault was not resolved"
    assert toucher.result == source
    stats = s.pager.stats
    assert stats.faults == stats.resolved == s.pager.faults_resolved == 2
    assert stats.placed == 2
    assert stats.missing == stats.pending == stats.errors == 0
    assert s.pager.clients[0].faults == 2
    # Placed into the shared memory: the frontend's own view agrees.
    assert s.ram.read(gpa, 2 * PAGE) == source


def test_a_write_fault_keeps_the_rest_of_the_source_page(setup: Setup) -> None:
    s = setup
    gpa = 3 * PAGE
    s.ram.write(gpa, b"\x11" * PAGE)  # what the "source" VM had there
    assert s.pager.evict(gpa + 100, 10) == 1  # the whole page goes
    assert s.pager.missing_pages == (gpa,)
    _attach(s)
    s.pager.start()
    toucher = Toucher(lambda: s.backend.write(gpa + 8, b"\x22" * 8))
    assert toucher.finished()
    assert s.ram.read(gpa, 24) == b"\x11" * 8 + b"\x22" * 8 + b"\x11" * 8
    assert s.pager.stats.resolved == 1


def test_a_fault_waits_in_the_kernel_until_the_thread_serves_it(
    setup: Setup,
) -> None:
    s = setup
    gpa = 9 * PAGE
    s.pager.stage(gpa, b"late")
    _attach(s)
    toucher = Toucher(lambda: s.backend.read(gpa, 4))
    # The toucher is blocked in the kernel without the GIL: this thread runs.
    deadline = time.monotonic() + 0.2
    spins = 0
    while time.monotonic() < deadline:
        spins += 1
    assert spins > 1000
    assert not toucher.finished(0.05)
    s.pager.start()
    assert toucher.finished()
    assert toucher.result == b"late"


def test_a_fault_before_the_bases_is_retried_when_they_arrive(
    setup: Setup,
) -> None:
    s = setup
    gpa = 2 * PAGE
    s.pager.stage(gpa, b"bases later")
    _attach(s, bases=False)
    s.pager.start()
    toucher = Toucher(lambda: s.backend.read(gpa, 11))
    deadline = time.monotonic() + WAIT
    while s.pager.stats.pending == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert s.pager.stats.pending == 1
    assert not toucher.finished(0.05)
    client = s.pager.clients[0]
    for gpa_base, address in s.backend.bases.items():
        client.set_base(gpa_base, address)
    assert client.bases == s.backend.bases
    assert toucher.finished()
    assert toucher.result == b"bases later"
    assert s.pager.stats.pending == 0


def test_a_page_the_source_never_had_is_placed_as_zeros(setup: Setup) -> None:
    s = setup
    gpa = MIB - PAGE  # never written: a hole in the memfd
    _attach(s)
    s.pager.start()
    toucher = Toucher(lambda: s.backend.read(gpa, PAGE))
    assert toucher.finished()
    assert toucher.result == bytes(PAGE)
    assert s.pager.stats.resolved == 1


def test_placing_ahead_of_the_backend_means_no_fault(setup: Setup) -> None:
    s = setup
    _attach(s)
    s.pager.start()
    s.pager.stage(4 * PAGE, b"A" * PAGE)
    s.pager.stage(MIB, b"B" * 3 * PAGE)
    assert s.pager.place(4 * PAGE, 1) == 1
    assert s.pager.place(4 * PAGE, 1) == 0  # placed already
    assert s.backend.read(4 * PAGE, 3) == b"AAA"
    assert s.pager.place_all() == 3
    assert s.pager.missing_pages == ()
    assert s.backend.read(MIB + 2 * PAGE, 3) == b"BBB"
    stats = s.pager.stats
    assert (stats.faults, stats.placed, stats.missing) == (0, 4, 0)


def test_staging_outside_the_ram_is_refused(setup: Setup) -> None:
    s = setup
    with pytest.raises(MappingError, match="in no region"):
        s.pager.stage(2 * MIB, b"x")
    with pytest.raises(ValueError, match="positive"):
        s.pager.evict(0, 0)
    assert s.pager.missing_pages == ()


def test_bases_in_process_reads_the_mappings_of_a_process(setup: Setup) -> None:
    s = setup
    found = s.pager.bases_in_process(os.getpid())
    # This process maps each region three times (GuestRam, the pager, the
    # local backend); any of them is a mapping of the region's first byte.
    assert set(found) == {r.gpa for r in s.ram.regions}
    pin = ctypes.c_char.from_buffer(s.ram.memory.regions[1].view)
    candidates = {
        s.backend.bases[MIB],
        s.pager._placements[1].address,
        ctypes.addressof(pin),
    }
    del pin
    assert found[MIB] in candidates
    with pytest.raises(MappingError, match="cannot read the mappings"):
        s.pager.bases_in_process(2**22 + 12345)


def test_a_closed_pager_refuses_work() -> None:
    if UNAVAILABLE is not None:
        pytest.skip(f"userfaultfd unavailable: {UNAVAILABLE}")
    fds = open_fds()
    with GuestRam([MIB]) as ram:
        pager = PostcopyPager(ram)
        pager.start()
        pager.close()
        pager.close()
        assert pager.closed
        assert not pager.running
        with pytest.raises(DaemonClosedError):
            pager.stage(0, b"x")
        with pytest.raises(DaemonClosedError):
            pager.start()
        spare = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        with pytest.raises(DaemonClosedError):
            pager.attach(spare)  # closed by attach, as promised
    assert open_fds() == fds


def test_struct_module_and_ctypes_agree_on_sizes() -> None:
    # The ctypes view of the ioctl argument is the struct's bytes.
    buffer = ctypes.create_string_buffer(pc._COPY.pack(1, 2, 3, 4, 5), pc._COPY.size)
    assert ctypes.sizeof(buffer) == 40
    assert struct.unpack_from("=Q", buffer.raw, 32)[0] == 5
