"""Postcopy against qemu-storage-daemon (libvhost-user), the way QEMU plays
a migration destination: PAGEFAULT is negotiated, POSTCOPY_ADVISE hands us
the daemon's userfaultfd, POSTCOPY_LISTEN, then SET_MEM_TABLE in postcopy
mode (the daemon registers its mapping with its uffd after our answer).
Guest buffers, headers, status bytes and ring pages are missing from the
shared memory, their content only in the pager's "source": the daemon
faults on them, our fault thread places them with UFFDIO_COPY and wakes it
with UFFDIO_WAKE, and the virtio-blk I/O completes with the right data,
checked against the image file on the host. Then POSTCOPY_END."""

from __future__ import annotations

import gc
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vubackend.frontend import (
    DEFAULT_PROTOCOL_FEATURES,
    SECTOR_SIZE,
    BlkDriver,
    BlkRequestType,
    BlkStatus,
    DriverRing,
    Frontend,
    FrontendQueue,
    GuestRam,
    PostcopyPager,
    make_driver_ring,
    userfaultfd_unavailable,
)
from vubackend.protocol import ProtocolFeatures, VirtioFeatures

from ..fdutil import open_fds
from .peers import StorageDaemon, storage_daemon

PAGE = 4096
IMAGE_MB = 16
HEADER = struct.Struct("<IIQ")  # virtio-blk request header
WAIT = 5.0


@pytest.fixture
def qsd(tmp_path: Path) -> Iterator[StorageDaemon]:
    reason = userfaultfd_unavailable()
    if reason is not None:
        pytest.skip(f"userfaultfd unavailable: {reason}")
    with storage_daemon(tmp_path, size_mb=IMAGE_MB, num_queues=1) as daemon:
        yield daemon


class Chains:
    """virtio-blk requests built by hand, so that every buffer can live in
    pages that are only in the source: the driver ring is written by the
    frontend, the buffers never are (BlkDriver writes its buffers through
    GuestRam, which would fill missing pages with zeros)."""

    def __init__(
        self, ram: GuestRam, pager: PostcopyPager, queue: FrontendQueue
    ) -> None:
        self.ram = ram
        self.pager = pager
        self.queue = queue
        self.ring: DriverRing[str] = make_driver_ring(ram, queue)
        self.staged = 0  # pages made missing by stage()
        self.status: dict[str, int] = {}
        self.reads: dict[str, tuple[int, int]] = {}

    def _stage(self, data: bytes) -> int:
        # Whole pages of their own, page aligned, in whichever region fits.
        pages = -(-len(data) // PAGE)
        gpa = self.ram.alloc(pages * PAGE, PAGE)
        self.staged += self.pager.stage(gpa, data.ljust(pages * PAGE, b"\0"))
        return gpa

    def _request(self, name: str, kind: BlkRequestType, sector: int) -> int:
        header = self._stage(HEADER.pack(int(kind), 0, sector))
        self.status[name] = self._stage(b"\xff")
        return header

    def write(self, name: str, sector: int, data: bytes) -> None:
        header = self._request(name, BlkRequestType.OUT, sector)
        buffer = self._stage(data)
        self.ring.add(
            [(header, 16), (buffer, len(data))], [(self.status[name], 1)], name
        )

    def read(self, name: str, sector: int, length: int) -> None:
        header = self._request(name, BlkRequestType.IN, sector)
        # The source holds junk there: the device's data must replace it.
        buffer = self._stage(b"\x5a" * length)
        self.reads[name] = (buffer, length)
        self.ring.add([(header, 16)], [(buffer, length), (self.status[name], 1)], name)

    def run(self, count: int) -> dict[str, int]:
        """Make the descriptor table missing too, kick, and wait for
        ``count`` completions; returns name -> bytes written."""
        self.staged += self.pager.evict(self.queue.desc, 16 * self.queue.size)
        self.queue.kick.signal()
        done: dict[str, int] = {}
        deadline = time.monotonic() + WAIT
        while len(done) < count and time.monotonic() < deadline:
            self.queue.call.wait(0.05)
            done.update(self.ring.collect())
        assert len(done) == count, (
            f"{count - len(done)} request(s) pending; pager {self.pager.stats}, "
            f"errors {self.pager.errors}"
        )
        return done


def test_backend_faults_on_missing_pages_are_resolved_from_the_source(
    qsd: StorageDaemon,
) -> None:
    gc.collect()
    fds_before = open_fds()
    with Frontend.connect(qsd.socket, timeout=5) as fe:
        fe.handshake(
            int(VirtioFeatures.VERSION_1),
            DEFAULT_PROTOCOL_FEATURES | ProtocolFeatures.PAGEFAULT,
        )
        assert fe.has_protocol_feature(ProtocolFeatures.PAGEFAULT)
        # Two regions: a small one for the ring and a few buffers, a large
        # one for the rest, so that faults are mapped back through both
        # client bases. SET_MEM_TABLE, not ADD_MEM_REG: libvhost-user 7.2
        # checks the fd count before it looks for QEMU's fd-less answer to
        # a postcopy ADD_MEM_REG, and panics.
        ram = GuestRam([64 << 10, 4 << 20])
        pager = fe.enter_postcopy(ram, use_add_mem_reg=False)
        assert [fe.postcopy] == [pager]
        assert pager.running
        # libvhost-user echoes the table it was sent (its addresses go into
        # a copy); the frontend found the daemon's own in /proc/<pid>/maps.
        assert set(fe.postcopy_bases) == {r.gpa for r in ram.regions}
        for region in ram.regions:
            assert fe.postcopy_bases[region.gpa] != region.faddr

        # Ring pages missing when the ring starts: libvhost-user reads the
        # used index while it handles SET_VRING_ADDR, so it faults in the
        # middle of a request, and the fault thread serves it while this
        # thread waits for the ack.
        queue = fe.setup_queue(0, 256, start=False)
        assert pager.evict(queue.desc, queue.used + queue.used_len - queue.desc) == 2
        fe.start_queue(queue)
        assert pager.faults_resolved >= 1
        # The frontend writes descriptors through GuestRam, which does not
        # fault: place the table before it does.
        assert pager.place(queue.desc, 16 * queue.size) == 1
        chains = Chains(ram, pager, queue)

        # Writes: the daemon reads headers and data from missing pages.
        small = os.urandom(3 * PAGE)  # lands in the first region
        large = os.urandom(32 * PAGE)  # too big for it: the second region
        chains.write("small", 8, small)
        chains.write("large", 4096, large)
        placed_before = pager.stats.placed
        chains.run(2)
        assert pager.missing_pages == ()
        # Every missing page was placed, by a fault: nothing else places.
        assert pager.stats.placed - placed_before == chains.staged == 40
        for name in ("small", "large"):
            assert ram.read(chains.status[name], 1)[0] == BlkStatus.OK
        assert qsd.read_image(8 * SECTOR_SIZE, len(small)) == small
        assert qsd.read_image(4096 * SECTOR_SIZE, len(large)) == large

        # Reads: the daemon writes into missing pages (write faults); the
        # source's junk is placed first, then overwritten by the disk data.
        faulted = 1 + chains.staged  # the used-ring page, then the writes
        chains.staged = 0
        chains.read("small-back", 8, len(small))
        chains.read("large-back", 4096, len(large))
        done = chains.run(2)
        assert pager.missing_pages == ()
        faulted += chains.staged
        assert done["large-back"] == len(large) + 1  # data and status
        for name, expected in (("small-back", small), ("large-back", large)):
            assert ram.read(chains.status[name], 1)[0] == BlkStatus.OK
            gpa, length = chains.reads[name]
            assert ram.read(gpa, length) == expected

        stats = pager.stats
        # At least one fault a page (two threads may fault on one page).
        assert stats.faults >= faulted == 81
        assert stats.resolved == stats.faults
        assert (stats.pending, stats.errors, stats.missing) == (0, 0, 0)
        assert pager.errors == ()

        # A page the daemon never touched is placed when postcopy ends.
        spare = ram.alloc(PAGE, PAGE)
        pager.stage(spare, b"left over")
        fe.leave_postcopy()
        assert fe.postcopy is None
        assert pager.closed
        assert ram.read(spare, 9) == b"left over"
        assert stats.placed < pager.stats.placed

        # After POSTCOPY_END the session goes on as usual.
        blk = BlkDriver(fe, queue)
        assert blk.read(8, len(small) // SECTOR_SIZE) == small
        blk.write(20000, b"\xc3" * SECTOR_SIZE)
        assert qsd.read_image(20000 * SECTOR_SIZE, SECTOR_SIZE) == b"\xc3" * SECTOR_SIZE
    assert qsd.running
    assert "vu_panic" not in qsd.log.read_text()
    gc.collect()
    assert open_fds() == fds_before
