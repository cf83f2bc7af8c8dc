"""DirtyLogSlot and RegionBitmap: per-region views onto a replaceable log."""

from __future__ import annotations

import os
import sys
import threading
import time
from array import array
from typing import Any

import pytest

from vubackend._native import RegionTable, pin_records, pin_segments
from vubackend.bitmap import Bitmap, DirtyLog, DirtyLogSlot, RegionBitmap

from ._support import count_fds, count_mappings
from .conftest import MakeMemfd
from .test_log import set_pages


def test_without_a_log_marks_are_no_ops() -> None:
    slot = DirtyLogSlot()
    view = RegionBitmap(slot, 0x10000)
    view.mark_dirty(0, 4096)
    assert not view.dirty_at(0)
    assert slot.current is None


def test_a_region_view_marks_by_guest_physical_address() -> None:
    buf = bytearray(8)
    slot = DirtyLogSlot(DirtyLog(buf))
    view = RegionBitmap(slot, 0x10000)  # the region starts at page 0x10
    view.mark_dirty(0x1000, 1)  # region offset 0x1000 is GPA 0x11000
    assert set_pages(buf) == {0x11}
    assert view.dirty_at(0x1000)
    assert slot.dirty_at(0x11000)
    assert not view.dirty_at(0)
    assert not view.dirty_at(-1)


def test_views_of_two_regions_share_the_log() -> None:
    buf = bytearray(8)
    slot = DirtyLogSlot(DirtyLog(buf))
    low, high = RegionBitmap(slot, 0), RegionBitmap(slot, 0x20000)
    low.mark_dirty(0x1FFFF, 1)
    high.mark_dirty(0, 1)
    assert set_pages(buf) == {0x1F, 0x20}


def test_replacing_the_log_closes_the_old_one_and_marks_go_to_the_new() -> None:
    old_buf, new_buf = bytearray(1), bytearray(1)
    old = DirtyLog(old_buf)
    slot = DirtyLogSlot(old)
    view: Bitmap = RegionBitmap(slot, 0)
    slot.replace(DirtyLog(new_buf))
    assert old.closed
    assert old.unmapped
    view.mark_dirty(0x3000, 1)
    assert set_pages(new_buf) == {3}
    assert old_buf == bytearray(1)
    slot.close()
    assert slot.current is None
    view.mark_dirty(0x4000, 1)
    assert set_pages(new_buf) == {3}


def test_a_mark_racing_a_replacement_goes_to_the_new_log(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The race, made deterministic: the handler replaces the log after the
    writer loaded the old one but before it took its lease."""
    old_buf, new_buf = bytearray(1), bytearray(1)
    old, new = DirtyLog(old_buf), DirtyLog(new_buf)
    slot = DirtyLogSlot(old)
    try_mark_dirty = DirtyLog.try_mark_dirty

    def racing(self: DirtyLog, offset: int, length: int) -> bool:
        if self is old and slot.current is old:
            slot.replace(new)  # after the slot loaded `old`, before its lease
        return try_mark_dirty(self, offset, length)

    monkeypatch.setattr(DirtyLog, "try_mark_dirty", racing)
    RegionBitmap(slot, 0x1000).mark_dirty(0x2000, 1)
    assert set_pages(new_buf) == {3}
    assert old.unmapped
    assert old_buf == bytearray(1)


def test_a_batch_of_chains_marked_in_one_call_follows_the_slot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """mark_chains goes to the current log, is redone on a replacement
    that raced it, and does nothing without a log; pages past the log are
    counted."""
    memory = bytearray(0x3000)
    table = RegionTable([(0x10000, memory)])  # pages 0x10..0x12
    segs = pin_segments(array("Q", [0x1800, 0x1000 | 1 << 63, 0x2000, 0x10 | 1 << 63]))
    # Two chains of one writable segment each, as a pop records them.
    records = pin_records(
        array("I", [0, 1, 0, 1, 0, 0, 0x1000, 1, 1, 1, 1, 1, 0, 0, 0x10, 1])
    )
    old_buf, new_buf = bytearray(3), bytearray(3)
    old, new = DirtyLog(old_buf), DirtyLog(new_buf)
    slot = DirtyLogSlot(old)
    slot.mark_chains(table, segs, 2, records, 0, 2, array("I", [0x1000, 1]))
    assert set_pages(old_buf) == {0x11, 0x12}
    try_mark_chains = DirtyLog.try_mark_chains

    def racing(self: DirtyLog, *args: Any) -> bool:
        if self is old and slot.current is old:
            slot.replace(new)  # after the slot loaded `old`, before its lease
        return try_mark_chains(self, *args)

    monkeypatch.setattr(DirtyLog, "try_mark_chains", racing)
    slot.mark_chains(table, segs, 2, records, 1, 1, array("I", [1]))
    assert set_pages(new_buf) == {0x12}
    assert old.unmapped
    small = DirtyLog(bytearray(2))  # 16 pages: 0x10 and up are past it
    slot.replace(small)
    slot.mark_chains(table, segs, 2, records, 0, 2, array("I", [0x801, 1]))
    assert small.dropped_pages == 3
    slot.close()
    slot.mark_chains(table, segs, 2, records, 0, 2, array("I", [1, 1]))
    assert set_pages(new_buf) == {0x12}


def test_a_log_closed_by_hand_is_not_spun_on() -> None:
    log = DirtyLog(bytearray(1))
    slot = DirtyLogSlot(log)
    log.close()
    slot.mark_dirty(0, 1)  # returns: nothing to mark, no newer log
    assert log.dropped_pages == 1


def test_log_replacement_while_threads_write_loses_no_mark(
    make_memfd: MakeMemfd,
) -> None:
    """Writers mark distinct pages, each once, without pause while the log is
    replaced at least 200 times (with a tiny GIL switch interval, so that threads
    interleave between loading the log and marking it). No writer fails,
    every mark lands in some log (the union of all logs, read back from their
    memfds, has every marked page), and every old log is unmapped."""
    log_size = 1 << 16  # bytes: 512 Ki pages, more than the writers reach
    writers = 4
    fds, maps = count_fds(), count_mappings()
    memfds = [make_memfd(log_size) for _ in range(201)]
    slot = DirtyLogSlot(DirtyLog.map(memfds[0], size=log_size, offset=0))
    views = [RegionBitmap(slot, 0) for _ in range(writers)]
    stop = threading.Event()
    marked: list[list[int]] = [[] for _ in range(writers)]
    errors: list[BaseException] = []

    def write(me: int) -> None:
        try:
            page = me
            while not stop.is_set() and page < log_size * 8:
                views[me].mark_dirty(page * 4096 + 7, 1)
                marked[me].append(page)
                page += writers
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
        for thread in threads:
            thread.start()
        # At least 200 replacements, and until every writer has marked a
        # few hundred pages (a thread may start late); memfds are reused.
        deadline = time.monotonic() + 20
        swaps = 0
        while swaps < 200 or (
            min(len(pages) for pages in marked) < 300 and time.monotonic() < deadline
        ):
            swaps += 1
            slot.replace(
                DirtyLog.map(memfds[swaps % len(memfds)], size=log_size, offset=0)
            )
        stop.set()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)

    assert errors == []
    assert min(len(pages) for pages in marked) >= 300  # all ran during the swaps
    union = 0
    for fd in memfds:
        union |= int.from_bytes(os.pread(fd, log_size, 0), "little")
    lost = [p for pages in marked for p in pages if not union >> p & 1]
    assert lost == []
    # Only the current log is still mapped; closing it leaves nothing behind.
    assert count_mappings() == maps + 1
    slot.close()
    assert count_mappings() == maps
    assert count_fds() == fds + len(memfds)
