"""DescriptorChain's native data movement: request headers read from the
pop's peek, writes of any buffer, and file I/O straight between a file and
the chain's buffers (write_from_file / read_to_file), across buffers and
regions, with cursors, short files, errors, the dirty log, and a memory
table that changes under a chain."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vubackend.bitmap import DirtyLog
from vubackend.memory import GuestMemoryAtomic
from vubackend.vring import DescriptorChain, SplitDriverRing

from ._support import DATA, REGIONS, SPAN, Harness
from .conftest import MakeHarness
from .test_chain import descriptor_for, pages

# A chain of three readable and three writable buffers, one of each pair
# across the R0/R1 boundary.
READABLE = [(DATA, 0x10, False), (SPAN, 0x40, False), (DATA + 0x100, 0x30, False)]
WRITABLE = [
    (DATA + 0x400, 0x20, True),
    (SPAN - 0x200, 0x300, True),
    (DATA + 0x800, 0x1, True),
]


def chain_of(h: Harness, buffers: list[tuple[int, int, bool]]) -> DescriptorChain:
    driver = h.driver
    assert isinstance(driver, SplitDriverRing)
    driver.add(buffers)
    [chain] = h.state.pop_chains()
    return chain


def readable_bytes(h: Harness) -> bytes:
    return b"".join(h.read(gpa, n) for gpa, n, _ in READABLE)


def writable_bytes(h: Harness) -> bytes:
    return b"".join(h.read(gpa, n) for gpa, n, _ in WRITABLE)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "image"
    path.write_bytes(os.urandom(0x2000))
    return path


def test_the_header_comes_from_the_pop(harness: MakeHarness, native: bool) -> None:
    h = harness(packed=False, native=native)
    payload = os.urandom(0x80)
    for (gpa, n, _), start in zip(READABLE, (0, 0x10, 0x50), strict=True):
        h.write(gpa, payload[start : start + n])
    c = chain_of(h, READABLE)
    # A header: the walk's copy (native) or a read (Python walks) agree.
    assert c.read(12) == payload[:12]
    # Then the cursor goes on, from the chain's memory.
    assert c.read(0x20) == payload[12 : 12 + 0x20]
    c2 = chain_of(h, READABLE)
    assert c2.read(0x30) == payload[:0x30], "a longer first read"
    c3 = chain_of(h, [(DATA, 4, False)])
    assert c3.read(16) == payload[:4], "a header shorter than asked"


def test_the_header_is_a_snapshot_of_the_pop(harness: MakeHarness) -> None:
    """A guest that rewrites its header after making it available gets the
    header as it was popped (the pop read it once)."""
    h = harness(packed=False, native=True)
    h.write(DATA, b"A" * 16)
    c = chain_of(h, [(DATA, 16, False)])
    h.write(DATA, b"B" * 16)
    assert c.read(16) == b"A" * 16


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview"])
def test_write_takes_any_buffer(harness: MakeHarness, kind: str) -> None:
    h = harness(packed=False, native=True)
    c = chain_of(h, WRITABLE)
    data = os.urandom(0x321)
    src: bytes | bytearray | memoryview
    if kind == "bytes":
        src = data
    elif kind == "bytearray":
        src = bytearray(data)
    else:
        src = memoryview(data)
    assert c.write(src[:0x100]) == 0x100
    assert c.write(src[0x100:]) == 0x221
    assert c.write(b"more") == 0, "full"
    assert writable_bytes(h) == data


def test_write_from_file_fills_the_writable_part(
    harness: MakeHarness, native: bool, image: Path
) -> None:
    h = harness(packed=False, native=native)
    content = image.read_bytes()
    c = chain_of(h, READABLE + WRITABLE)
    fd = os.open(image, os.O_RDONLY)
    try:
        assert c.write(b"hd") == 2
        assert c.write_from_file(fd, 0x100, 0x40) == 0x100
        assert c.write_from_file(fd, 0x1000, 0x140) == 0x321 - 0x102, "capped"
        assert c.write_from_file(fd, 10, 0) == 0, "no room left"
    finally:
        os.close(fd)
    assert c.bytes_written == 0x321
    assert writable_bytes(h) == b"hd" + content[0x40 : 0x40 + 0x31F]


def test_write_from_file_stops_at_the_end_of_the_file(
    harness: MakeHarness, image: Path
) -> None:
    h = harness(packed=False, native=True)
    c = chain_of(h, WRITABLE)
    fd = os.open(image, os.O_RDONLY)
    try:
        assert c.write_from_file(fd, 0x321, 0x2000 - 0x10) == 0x10
    finally:
        os.close(fd)
    assert c.bytes_written == 0x10


def test_read_to_file_writes_the_readable_part(
    harness: MakeHarness, native: bool, tmp_path: Path
) -> None:
    h = harness(packed=False, native=native)
    payload = os.urandom(0x80)
    for (gpa, n, _), start in zip(READABLE, (0, 0x10, 0x50), strict=True):
        h.write(gpa, payload[start : start + n])
    c = chain_of(h, READABLE + WRITABLE)
    target = tmp_path / "out"
    target.write_bytes(bytes(0x200))
    fd = os.open(target, os.O_RDWR)
    try:
        assert c.read(8) == payload[:8]
        assert c.read_to_file(fd, 0x1000, 0x100) == 0x78, "the rest of the part"
        assert c.read_to_file(fd, 0x10, 0) == 0
    finally:
        os.close(fd)
    assert target.read_bytes()[0x100:0x178] == payload[8:]
    assert c.bytes_read == 0x80


def test_file_errors_move_nothing(harness: MakeHarness, tmp_path: Path) -> None:
    h = harness(packed=False, native=True)
    c = chain_of(h, READABLE + WRITABLE)
    fd = os.open(tmp_path, os.O_RDONLY)  # a directory: EISDIR on reads
    try:
        with pytest.raises(OSError, match="preadv into a chain"):
            c.write_from_file(fd, 0x10, 0)
        with pytest.raises(OSError, match="pwritev of a chain"):
            c.read_to_file(fd, 0x10, 0)
    finally:
        os.close(fd)
    assert (c.bytes_read, c.bytes_written) == (0, 0)


def test_file_reads_mark_the_dirty_log(
    harness: MakeHarness, atomic: GuestMemoryAtomic, image: Path
) -> None:
    log_buf = bytearray(0x140000 // 0x1000 // 8)
    atomic.set_log(DirtyLog(log_buf))
    h = harness(packed=False, native=True)
    c = chain_of(h, WRITABLE)
    fd = os.open(image, os.O_RDONLY)
    try:
        assert c.write_from_file(fd, 0x100, 0) == 0x100
    finally:
        os.close(fd)
    # 0x20 bytes at DATA + 0x400 (page 0x20), then 0xE0 of the buffer at
    # SPAN - 0x200 (page 0x3F): only what was written.
    assert pages(log_buf) == {0x20, 0x3F}
    c.write(b"s")
    assert pages(log_buf) == {0x20, 0x3F}, "the next byte is on a page marked"


def test_chains_outlive_their_memory_table(
    harness: MakeHarness, memfd: int, image: Path
) -> None:
    """The ring moves on to a new memory table (and releases the one its
    chains were walked against): a chain popped before still moves its
    bytes, through its own pin of the regions."""
    h = harness(packed=False, native=True)
    c = chain_of(h, WRITABLE)
    h.atomic.set_mem_table(
        [descriptor_for(memfd, gpa, size, off) for gpa, size, off in REGIONS]
    )
    h.state.set_queue_info(h.desc, h.avail, h.used)  # what a memory change does
    h.driver.add([(DATA, 8, True)])
    assert len(h.state.pop_chains()) == 1  # the ring is on the new table
    fd = os.open(image, os.O_RDONLY)
    try:
        assert c.write_from_file(fd, 0x20, 0) == 0x20
    finally:
        os.close(fd)
    assert c.write(b"z" * 4) == 4
    assert h.read(WRITABLE[0][0], 0x20) == image.read_bytes()[:0x20]
