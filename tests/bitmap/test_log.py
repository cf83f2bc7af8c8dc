"""DirtyLog: one bit per 4 KiB guest physical page, in the frontend's log."""

from __future__ import annotations

import os

import pytest

from vubackend.bitmap import U64_LIMIT, Bitmap, DirtyLog, NoopBitmap
from vubackend.errors import MappingError

from ._support import count_fds, count_mappings
from .conftest import MakeMemfd


def set_pages(log_bytes: bytes | bytearray) -> set[int]:
    """The pages whose bit is set, read the way QEMU reads the log."""
    return {
        byte * 8 + bit
        for byte, value in enumerate(log_bytes)
        for bit in range(8)
        if value >> bit & 1
    }


def test_a_one_byte_write_sets_exactly_its_pages_bit() -> None:
    buf = bytearray(4)
    log = DirtyLog(buf)
    log.mark_dirty(0x5123, 1)  # page 5: byte 0, bit 5
    assert buf == bytearray([0x20, 0, 0, 0])
    assert log.dirty_at(0x5000)
    assert log.dirty_at(0x5FFF)
    assert not log.dirty_at(0x4FFF)
    assert not log.dirty_at(0x6000)


def test_a_write_straddling_two_pages_sets_both() -> None:
    buf = bytearray(4)
    DirtyLog(buf).mark_dirty(0x7FFF, 2)  # pages 7 and 8: across a log byte too
    assert set_pages(buf) == {7, 8}
    assert buf[:2] == bytes([0x80, 0x01])


def test_a_long_write_sets_every_page_it_touches_and_no_other() -> None:
    buf = bytearray(8)
    DirtyLog(buf).mark_dirty(0x3800, 0x14000)  # pages 3 .. 0x17
    assert set_pages(buf) == set(range(3, 0x18))


def test_a_write_ending_on_a_page_boundary_does_not_mark_the_next_page() -> None:
    buf = bytearray(2)
    DirtyLog(buf).mark_dirty(0x1000, 0x2000)  # exactly pages 1 and 2
    assert set_pages(buf) == {1, 2}


def test_existing_bits_are_kept() -> None:
    buf = bytearray([0b1000_0001])
    DirtyLog(buf).mark_dirty(0x2000, 1)
    assert buf[0] == 0b1000_0101


def test_zero_length_marks_nothing_and_negatives_are_refused() -> None:
    buf = bytearray(1)
    log = DirtyLog(buf)
    log.mark_dirty(0x1000, 0)
    assert buf == bytearray(1)
    with pytest.raises(ValueError, match="negative"):
        log.mark_dirty(-1, 1)
    with pytest.raises(ValueError, match="negative"):
        log.mark_dirty(0, -1)
    assert not log.dirty_at(-1)


def test_writes_beyond_the_log_are_dropped_and_counted() -> None:
    buf = bytearray(1)  # covers pages 0..7: GPA [0, 0x8000)
    log = DirtyLog(buf)
    assert log.end_gpa == 0x8000
    assert log.pages == 8
    log.mark_dirty(0x8000, 1)
    assert buf[0] == 0
    assert log.dropped_pages == 1
    log.mark_dirty(0x6000, 0x4000)  # pages 6, 7 inside; 8, 9 beyond
    assert set_pages(buf) == {6, 7}
    assert log.dropped_pages == 3
    log.mark_dirty(U64_LIMIT - 1, 1)  # the last guest address: no crash
    assert log.dropped_pages == 4
    assert not log.dirty_at(0x8000)


def test_a_closed_log_marks_nothing_and_counts_the_drop() -> None:
    buf = bytearray(1)
    log = DirtyLog(buf)
    log.close()
    assert log.closed
    assert log.unmapped
    assert not log.try_mark_dirty(0, 0x2000)
    assert log.dropped_pages == 2
    assert not log.dirty_at(0)
    buf.extend(b"\0")  # unpinned: the buffer can be resized again


def test_an_empty_buffer_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one byte"):
        DirtyLog(bytearray())


def test_close_waits_for_a_mark_in_progress() -> None:
    log = DirtyLog(bytearray(1))
    # A lease, as every mark_dirty() holds for its duration.
    assert log._enter()
    log.close()
    assert log.closed
    assert not log.unmapped  # a writer is still inside: not yet
    log._exit()
    assert log.unmapped


def test_maps_the_log_from_a_set_log_base_fd_at_an_unaligned_offset(
    make_memfd: MakeMemfd,
) -> None:
    fd = make_memfd(3 * 4096)
    fds, maps = count_fds(), count_mappings()
    log = DirtyLog.map(fd, size=16, offset=4096 + 100)
    assert log.size == 16
    assert log.end_gpa == 16 * 8 * 4096
    log.mark_dirty(9 * 4096, 1)  # page 9: byte 1, bit 1
    assert os.pread(fd, 2, 4096 + 100) == b"\x00\x02"
    # The frontend clears bits at any time; dirty_at reads what is there.
    os.pwrite(fd, b"\x00", 4096 + 101)
    assert not log.dirty_at(9 * 4096)
    log.close()
    assert count_mappings() == maps
    assert count_fds() == fds
    os.fstat(fd)  # borrowed, not closed


@pytest.mark.parametrize(
    ("size", "offset", "words"),
    [
        (0, 0, "must be > 0"),
        (8, U64_LIMIT - 4, "overflows a u64"),
        (8, -8, "fit in a u64"),
        (4097, 0, "past the end"),
        (8, 4090, "past the end"),
    ],
)
def test_map_rejects_bad_sizes_and_offsets(
    make_memfd: MakeMemfd, size: int, offset: int, words: str
) -> None:
    fd = make_memfd(4096)
    maps = count_mappings()
    with pytest.raises(MappingError, match=f"dirty log: .*{words}"):
        DirtyLog.map(fd, size=size, offset=offset)
    assert count_mappings() == maps


def test_log_and_noop_bitmap_are_bitmaps() -> None:
    bitmaps: list[Bitmap] = [DirtyLog(bytearray(1)), NoopBitmap()]
    for bitmap in bitmaps:
        bitmap.mark_dirty(0, 1)
    assert bitmaps[0].dirty_at(0)
    assert not bitmaps[1].dirty_at(0)
