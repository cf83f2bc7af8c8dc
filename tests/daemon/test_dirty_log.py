"""Pre-copy dirty logging, our frontend against our daemon: while LOG_ALL is
on, every page the device writes (data, status bytes, ring updates) is
marked in the log, and nothing else is; once LOG_ALL is off (the migration
ended or was cancelled) nothing is marked any more, and the daemon keeps
nothing of the log; a later migration logs into its own new log."""

from __future__ import annotations

import os
import struct

import pytest

from tests.fdutil import open_fds
from vubackend.frontend import (
    BlkRequestType,
    DirtyLogBuffer,
    DriverRing,
    Frontend,
    FrontendQueue,
    make_driver_ring,
)
from vubackend.protocol import VirtioFeatures

from ._device import BLK_F_FLUSH, SECTOR
from .conftest import ServeFactory

PAGE = 4096
REGION = 4 << 20
HEADER = struct.Struct("<IIQ")  # virtio-blk request header
WAIT = 5.0


def log_buffer_fds(end_gpa: int) -> int:
    """How many fds a frontend's DirtyLogBuffer holds."""
    before = open_fds()
    with DirtyLogBuffer(end_gpa):
        return len(open_fds() - before)


def pages(gpa: int, length: int) -> set[int]:
    """The log pages (4 KiB) under ``[gpa, gpa + length)``."""
    return set(range(gpa // PAGE, (gpa + length - 1) // PAGE + 1))


class Reads:
    """virtio-blk reads built by hand, every device-writable buffer on pages
    of its own, so that the pages the device writes are known exactly."""

    def __init__(self, fe: Frontend, queue: FrontendQueue) -> None:
        self.fe = fe
        self.queue = queue
        self.ring: DriverRing[int] = make_driver_ring(
            fe.ram, queue, features=fe.acked_features
        )
        self.count = 0

    def ring_pages(self) -> set[int]:
        """Every page of the queue's rings (the device writes some of them)."""
        start = min(self.queue.desc, self.queue.avail, self.queue.used)
        end = self.queue.used + self.queue.used_len
        return pages(start, end - start)

    def run(self, buffers: list[tuple[int, int]]) -> set[int]:
        """One read per ``(gpa, length)`` buffer (``length`` a whole number
        of sectors), each with a status byte on a page of its own; wait for
        all of them. Returns the pages of the buffers and status bytes."""
        written: set[int] = set()
        ram = self.fe.ram
        for token, (gpa, length) in enumerate(buffers):
            header = ram.alloc(HEADER.size, 16)
            ram.write(header, HEADER.pack(int(BlkRequestType.IN), 0, 8))
            status = ram.alloc(PAGE, PAGE) + 100
            ram.write(status, b"\xff")
            self.ring.add([(header, HEADER.size)], [(gpa, length), (status, 1)], token)
            written |= pages(gpa, length) | pages(status, 1)
        self.ring.kick()
        done = self.ring.wait(timeout=WAIT, until=len(buffers))
        assert len(done) == len(buffers), "the device did not complete every read"
        # The data and the status byte, for each read.
        assert sorted(done) == [(i, n + 1) for i, (_, n) in enumerate(buffers)]
        return written


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_device_writes_are_logged_exactly_while_log_all_is_on(
    serve: ServeFactory, packed: bool
) -> None:
    served = serve()
    served.device.disk[8 * SECTOR : 16 * SECTOR] = os.urandom(8 * SECTOR)
    with served.connect() as fe:
        features = VirtioFeatures.VERSION_1 | VirtioFeatures.EVENT_IDX | BLK_F_FLUSH
        fe.handshake(int(features | (VirtioFeatures.RING_PACKED if packed else 0)))
        ram = fe.create_memory([REGION, REGION])
        queues = [fe.setup_queue(i, 128) for i in range(2)]
        fe.start_device()
        reads = [Reads(fe, q) for q in queues]
        ring_pages = reads[0].ring_pages() | reads[1].ring_pages()
        # Buffers: one page, three pages from an odd offset, and one that
        # spans the two memory regions (the log is by guest address).
        single = ram.alloc(PAGE, PAGE)
        several = ram.alloc(4 * PAGE, PAGE) + 512
        spanning = REGION - PAGE - 1024
        buffers = [(single, SECTOR), (several, 6 * SECTOR), (spanning, 4 * SECTOR)]
        assert ram.read(spanning, 1) == b"\0"  # nothing allocated there

        own_log_fds = log_buffer_fds(ram.end_gpa)
        fds_before_log = open_fds()
        log = fe.start_dirty_log()
        data_pages = reads[0].run(buffers[:2]) | reads[1].run(buffers[2:])
        # As at the end of a migration: the rings stop (each after the event
        # in progress on it), then the log is read for the last time.
        for q in queues:
            fe.stop_queue(q)
        dirty = set(log.take_dirty())
        assert data_pages <= dirty, "pages the device wrote are not marked"
        # Nothing but what the device wrote: its data and its ring updates
        # (used elements and used.idx, or used descriptors when packed).
        assert dirty - data_pages <= ring_pages
        for q in queues:
            used_idx = q.used + 2 if not packed else q.desc
            assert used_idx // PAGE in dirty, f"queue {q.index}: ring update unmarked"

        # LOG_ALL off: nothing is marked any more, and the daemon has
        # unmapped and closed its side of the log.
        for q in queues:
            fe.start_queue(q)
        fe.stop_dirty_log()
        log.take_dirty()
        assert len(open_fds()) == len(fds_before_log) + own_log_fds, (
            "the daemon kept its log"
        )
        reads[0].run(buffers[:1])
        reads[1].run(buffers[1:])
        assert log.dirty_pages() == [], "writes were logged after LOG_ALL was off"


def test_a_cancelled_migration_leaves_no_logging_behind(serve: ServeFactory) -> None:
    served = serve()
    with served.connect() as fe:
        features = VirtioFeatures.VERSION_1 | VirtioFeatures.EVENT_IDX
        fe.handshake(int(features))
        ram = fe.create_memory([REGION])
        reads = Reads(fe, fe.setup_queue(0, 64))
        fe.start_device()
        buffer = ram.alloc(2 * PAGE, PAGE)
        own_log_fds = log_buffer_fds(ram.end_gpa)
        fds_before = open_fds()

        # A migration starts, the device writes, then it is cancelled: QEMU
        # clears LOG_ALL and the rings' log flag, as when one completes.
        first = fe.start_dirty_log()
        written = reads.run([(buffer, 2 * SECTOR)])
        assert written <= set(first.take_dirty())
        fe.stop_dirty_log()
        first.take_dirty()  # marks made before the cancel was answered
        reads.run([(buffer, 2 * SECTOR)])
        assert first.dirty_pages() == []
        assert len(open_fds()) == len(fds_before) + own_log_fds, (
            "the daemon kept its log"
        )

        # The next attempt hands over a new log: the device's writes land
        # there, and the old log still sees nothing.
        second = DirtyLogBuffer(ram.end_gpa)
        try:
            fe.set_log_base(second)
            fe.set_features(fe.acked_features | VirtioFeatures.LOG_ALL)
            written = reads.run([(buffer + PAGE, SECTOR)])
            assert written <= set(second.dirty_pages())
            assert first.dirty_pages() == []
            fe.set_features(fe.acked_features & ~int(VirtioFeatures.LOG_ALL))
            second.take_dirty()  # marks made before LOG_ALL was off
            reads.run([(buffer, SECTOR)])
            assert second.dirty_pages() == []
        finally:
            second.close()
