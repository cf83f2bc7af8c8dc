# PostcopyPager: the destination side of a postcopy migration, played the way
# QEMU plays it (hw/virtio/vhost-user.c, migration/postcopy-ram.c). Pages not
# migrated yet are missing from the shared memory; a backend that touches one
# blocks in the kernel and its userfaultfd reports the fault; the pager's
# fault thread places the page and wakes the backend.
#
# Rules of this module:
# - userfaultfd is reached through ctypes (the frontend may not import
#   vubackend._native): userfaultfd(2) by syscall number (or
#   /dev/userfaultfd), ioctl, mmap/munmap and fallocate from the C library.
#   ctypes releases the GIL around every foreign call, and poll() and
#   os.read() release it too: the fault thread never holds the GIL while it
#   waits, and a thread blocked in the kernel never stalls it.
# - ioctl numbers are _IOWR/_IOR(0xAA, nr, sizeof(struct)) as in
#   linux/userfaultfd.h; struct layouts are struct.Struct formats. The unit
#   tests compare both with the header's values.
# - Three address spaces, with the GPA as the key. The source holds page
#   contents by GPA. The pager maps every region a second time (the
#   "placement" mapping), registered MISSING with the pager's own uffd: the
#   only memory UFFDIO_COPY writes to. Each client (backend) mapped the
#   regions at its "client bases", which turn its fault addresses back into
#   GPAs.
# - Python never reads or writes the placement mapping. GuestRam's own
#   mapping is not registered: a frontend access to a missing page does not
#   fault, the kernel fills the page with zeros and the source content of
#   that page is lost. Place pages (place()) before the frontend touches them.
# - Placing a page = UFFDIO_COPY of its source content (zeros for a page the
#   source does not hold; EEXIST means it is present already), then
#   UFFDIO_WAKE on every client at the page's address there (QEMU's
#   postcopy_notify_shared_wake). One lock serialises placing, staging and
#   the bookkeeping.
# - The fault thread (a daemon) polls the clients' uffds and a wake pipe with
#   a timeout, reads 32-byte uffd_msg records and resolves PAGEFAULT events.
#   A fault at an address no client base covers yet is kept and retried (the
#   bases may arrive after the fault). Failures are recorded in `errors`,
#   never raised in the thread.
# - Ownership: the pager owns its uffd, its placement mappings, duplicates of
#   the region fds, the client uffds given to attach(), the wake pipe and the
#   thread. close() stops the thread and frees all of them, once.

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import select
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import final

from vubackend.errors import DaemonClosedError, MappingError
from vubackend.frontend._memory import HUGE_PAGE_SIZE, GuestRam, RamRegion
from vubackend.frontend._uffd import (
    _FALLOC_FL_KEEP_SIZE,
    _FALLOC_FL_PUNCH_HOLE,
    _IOCTL_COPY_BIT,
    _LIBC,
    _MAP_FAILED,
    _PAGE,
    _POLL_INTERVAL,
    UffdEvent,
    Userfaultfd,
    _last_error,
)

__all__ = ["PostcopyClient", "PostcopyPager", "PostcopyStats"]

# ---------------------------------------------------------------- pager


@final
@dataclass(frozen=True, slots=True)
class PostcopyStats:
    """A snapshot of what a :class:`PostcopyPager` did.

    Attributes:
        faults: page-fault events read from the clients' uffds.
        resolved: faults resolved (page placed or found present, client woken).
        pending: faults waiting for a client base that covers them.
        placed: pages placed with UFFDIO_COPY (faults and place() together).
        already_present: placements that found the page present (EEXIST).
        missing: pages the source still holds.
        errors: failures recorded by the fault thread.
    """

    faults: int
    resolved: int
    pending: int
    placed: int
    already_present: int
    missing: int
    errors: int


@final
class _Placement:
    """One region as the pager maps it (registered with its uffd)."""

    __slots__ = ("address", "fd", "gpa", "mmap_offset", "page_size", "size")

    def __init__(self, region: RamRegion, page_size: int, uffd: Userfaultfd) -> None:
        self.gpa = region.gpa
        self.size = region.size
        self.mmap_offset = region.mmap_offset
        self.page_size = page_size
        self.fd = os.dup(region.fd)
        self.address = 0
        try:
            address = _LIBC.mmap(
                None, region.size, mmap.PROT_READ | mmap.PROT_WRITE,
                mmap.MAP_SHARED, self.fd, region.mmap_offset,
            )  # fmt: skip
            if address is None or address == _MAP_FAILED:
                raise MappingError(
                    f"cannot map region at GPA {region.gpa:#x} for placing: "
                    f"{_last_error()}"
                )
            self.address = int(address)
            ioctls = uffd.register(self.address, self.size)
            if not ioctls & _IOCTL_COPY_BIT:
                raise MappingError(
                    f"region at GPA {region.gpa:#x}: UFFDIO_COPY is not allowed "
                    f"on it (ioctls {ioctls:#x})"
                )
        except BaseException:
            self.close()
            raise

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def punch(self, offset: int, length: int) -> None:
        rc = int(
            _LIBC.fallocate(
                self.fd,
                _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                self.mmap_offset + offset,
                length,
            )
        )
        if rc != 0:
            raise MappingError(
                f"cannot punch [{self.gpa + offset:#x}, +{length:#x}) out of the "
                f"shared memory: {_last_error()}"
            )

    def read_page(self, offset: int) -> bytes:
        # Through the file, not a mapping: no fault, and a hole reads as zeros.
        data = os.pread(self.fd, self.page_size, self.mmap_offset + offset)
        return data.ljust(self.page_size, b"\0")

    def close(self) -> None:
        if self.address:
            _LIBC.munmap(self.address, self.size)
            self.address = 0
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@final
class PostcopyClient:
    """A backend's userfaultfd as the pager sees it: the fd (owned by the
    pager) and the backend's address of each region, its "client bases"
    (what SET_MEM_TABLE / ADD_MEM_REG answer in postcopy mode).

    Made by :meth:`PostcopyPager.attach`.
    """

    def __init__(self, uffd: Userfaultfd, pager: PostcopyPager) -> None:
        self.uffd = uffd
        """The backend's userfaultfd (a duplicate owned by the pager)."""
        self._pager = pager
        self._bases: dict[int, int] = {}
        self.faults = 0
        """Faults of this client the pager resolved."""
        self.alive = True
        """False once reading its uffd failed (it is no longer polled)."""

    @property
    def bases(self) -> dict[int, int]:
        """Region GPA -> the backend's address of the region (a copy)."""
        with self._pager._lock:
            return dict(self._bases)

    def set_base(self, gpa: int, address: int) -> None:
        """Record that the backend mapped the region at ``gpa`` at
        ``address``; faults waiting for it are retried."""
        with self._pager._lock:
            self._bases[gpa] = address
        self._pager._nudge()

    def __repr__(self) -> str:
        return f"<PostcopyClient {self.uffd!r} {len(self._bases)} bases>"


@final
class PostcopyPager:
    """The incoming side of a postcopy migration over a :class:`GuestRam`:
    the "source" pages not migrated yet, their placement, and the fault
    thread that serves the backends' page faults as QEMU does.

    The pager maps every region of ``ram`` again and registers that mapping
    with its own userfaultfd (MISSING mode). Pages are made missing with
    :meth:`stage` or :meth:`evict` (their content goes to the source and the
    page is punched out of the shared memory). A backend that touches one
    faults; the fault thread reads the event from the backend's uffd
    (:meth:`attach`), places the page with UFFDIO_COPY and wakes the backend
    with UFFDIO_WAKE. :meth:`place` and :meth:`place_all` place pages without
    a fault (the background part of a migration).

    The frontend's own accesses through ``ram`` do not fault: a missing page
    touched there reads as zeros and loses its source content. Call
    :meth:`place` for a range before the frontend reads or writes it.

    Args:
        ram: the guest RAM (borrowed; it must outlive the pager).

    Raises:
        MappingError: userfaultfd is unavailable, or a region cannot be
            mapped or registered.
    """

    def __init__(self, ram: GuestRam) -> None:
        self._lock = threading.RLock()
        self._page_size = HUGE_PAGE_SIZE if ram.hugetlb else _PAGE
        self._placements: list[_Placement] = []
        self._clients: list[PostcopyClient] = []
        self._source: dict[int, bytes] = {}
        self._pending: list[tuple[PostcopyClient, int]] = []
        self._errors: list[str] = []
        self._faults = self._resolved = self._placed = self._present = 0
        self._generation = 0
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._closed = False
        self._staging = ctypes.create_string_buffer(self._page_size)
        self._zeros = ctypes.create_string_buffer(self._page_size)
        self._uffd = Userfaultfd.open()
        try:
            self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        except BaseException:
            self._uffd.close()
            raise
        try:
            self._uffd.api()
            for region in ram.regions:
                self.add_region(region)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ setup

    @property
    def page_size(self) -> int:
        """The page size of the RAM (what faults and placements cover)."""
        return self._page_size

    @property
    def uffd(self) -> Userfaultfd:
        """The pager's own userfaultfd (its placement mappings' registration)."""
        return self._uffd

    @property
    def clients(self) -> tuple[PostcopyClient, ...]:
        """The backends' uffds attached so far."""
        with self._lock:
            return tuple(self._clients)

    def add_region(self, region: RamRegion) -> None:
        """Map and register one more region (after ``GuestRam.add_region``).

        Raises:
            MappingError: it overlaps a region the pager has, or cannot be
                mapped or registered.
        """
        with self._lock:
            self._check_open()
            for p in self._placements:
                if p.gpa < region.end and region.gpa < p.end:
                    raise MappingError(
                        f"region at GPA {region.gpa:#x} overlaps one the pager has"
                    )
            self._placements.append(_Placement(region, self._page_size, self._uffd))

    def bases_in_process(self, pid: int) -> dict[int, int]:
        """Where process ``pid`` mapped each region, read from
        ``/proc/<pid>/maps`` (matched by the memfd's device and inode): the
        client bases of a backend whose postcopy reply does not carry them.

        libvhost-user (qemu-storage-daemon, QEMU 7.2 and later) writes its
        addresses into a copy of the table and replies with the table it
        received, so its reply holds the frontend's own addresses.

        Returns:
            Region GPA -> the address of the region's first byte in ``pid``;
            regions it has not mapped are left out.

        Raises:
            MappingError: the maps cannot be read (no such process, or no
                permission).
        """
        try:
            with open(f"/proc/{pid}/maps", encoding="ascii") as maps:
                lines = maps.read().splitlines()
        except OSError as exc:
            raise MappingError(
                f"cannot read the mappings of process {pid}: {exc.strerror}"
            ) from exc
        mappings: dict[tuple[int, int, int], list[tuple[int, int, int]]] = {}
        for line in lines:
            fields = line.split()
            if len(fields) < 6:
                continue  # anonymous
            span, _, file_offset, device, inode = fields[:5]
            start, end = (int(x, 16) for x in span.split("-"))
            major, minor = (int(x, 16) for x in device.split(":"))
            key = (major, minor, int(inode))
            mappings.setdefault(key, []).append((start, end, int(file_offset, 16)))
        out: dict[int, int] = {}
        with self._lock:
            for placement in self._placements:
                st = os.fstat(placement.fd)
                key = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
                for start, end, offset in mappings.get(key, []):
                    if offset <= placement.mmap_offset < offset + (end - start):
                        out[placement.gpa] = start + placement.mmap_offset - offset
        return out

    def attach(self, fd: int, bases: Mapping[int, int] | None = None) -> PostcopyClient:
        """Serve the faults of a backend's userfaultfd (what POSTCOPY_ADVISE
        returned); the pager owns ``fd`` from now on, even on failure.

        Args:
            fd: the backend's uffd.
            bases: region GPA -> the backend's address of the region, when
                known (see :meth:`PostcopyClient.set_base`).

        Returns:
            The client.
        """
        uffd = Userfaultfd(fd)
        try:
            self._check_open()
        except BaseException:
            uffd.close()
            raise
        client = PostcopyClient(uffd, self)
        with self._lock:
            self._clients.append(client)
            self._generation += 1
        for gpa, address in (bases or {}).items():
            client.set_base(gpa, address)
        self._nudge()
        return client

    # ------------------------------------------------------------ source

    def _pages(self, gpa: int, length: int) -> list[tuple[_Placement, int]]:
        """(placement, page offset) of every page touching the range."""
        if length <= 0:
            raise ValueError(f"length {length} must be positive")
        size = self._page_size
        out: list[tuple[_Placement, int]] = []
        page = gpa - gpa % size
        while page < gpa + length:
            for p in self._placements:
                if p.gpa <= page < p.end:
                    out.append((p, page - p.gpa))
                    break
            else:
                raise MappingError(f"guest address {page:#x} is in no region")
            page += size
        return out

    def stage(self, gpa: int, data: bytes) -> int:
        """Make the pages under ``[gpa, gpa + len(data))`` missing, the
        source holding ``data`` there (the rest of those pages keeps its
        current content). The shared memory does not see ``data`` until the
        page is placed.

        Returns:
            How many pages are missing because of this call.

        Raises:
            MappingError: the range leaves the RAM, or the pages cannot be
                punched out.
        """
        return self._stage(gpa, len(data), data)

    def evict(self, gpa: int, length: int) -> int:
        """Make the pages under ``[gpa, gpa + length)`` missing, their
        current content moving to the source (as if they had not been
        migrated yet). The backend must not be using them right now.

        Returns:
            How many pages are missing because of this call.
        """
        return self._stage(gpa, length, None)

    def _stage(self, gpa: int, length: int, data: bytes | None) -> int:
        with self._lock:
            self._check_open()
            pages = self._pages(gpa, length)
            for placement, offset in pages:
                page_gpa = placement.gpa + offset
                content = self._source.get(page_gpa)
                if content is None:
                    content = placement.read_page(offset)
                if data is not None:
                    lo = max(gpa, page_gpa)
                    hi = min(gpa + len(data), page_gpa + self._page_size)
                    content = (
                        content[: lo - page_gpa]
                        + data[lo - gpa : hi - gpa]
                        + content[hi - page_gpa :]
                    )
                self._source[page_gpa] = content
                placement.punch(offset, self._page_size)
            return len(pages)

    @property
    def missing_pages(self) -> tuple[int, ...]:
        """GPAs of the pages the source still holds, in order."""
        with self._lock:
            return tuple(sorted(self._source))

    def is_missing(self, gpa: int) -> bool:
        """Whether the page holding ``gpa`` is still only in the source."""
        with self._lock:
            return gpa - gpa % self._page_size in self._source

    # ------------------------------------------------------------ placing

    def place(self, gpa: int, length: int = 1) -> int:
        """Place the source's pages under ``[gpa, gpa + length)`` (pages the
        source does not hold are skipped), waking the backends.

        Returns:
            How many pages were placed.

        Raises:
            MappingError: a placement failed.
        """
        with self._lock:
            self._check_open()
            count = 0
            for placement, offset in self._pages(gpa, length):
                if placement.gpa + offset in self._source:
                    self._place(placement, offset)
                    count += 1
            return count

    def place_all(self) -> int:
        """Place every page the source still holds (the migration ends).

        Returns:
            How many pages were placed.
        """
        with self._lock:
            count = 0
            for gpa in sorted(self._source):
                count += self.place(gpa)
            return count

    def _place(self, placement: _Placement, offset: int) -> None:
        # The lock is held. Copy the source page (or zeros) into the missing
        # page, then wake every client at its own address of the page.
        size = self._page_size
        page_gpa = placement.gpa + offset
        data = self._source.pop(page_gpa, None)
        if data is None:
            src = ctypes.addressof(self._zeros)
        else:
            ctypes.memmove(self._staging, data, size)
            src = ctypes.addressof(self._staging)
        try:
            placed = self._uffd.copy(placement.address + offset, src, size)
        except BaseException:
            if data is not None:
                self._source[page_gpa] = data
            raise
        if placed:
            self._placed += 1
        else:
            self._present += 1
        for client in self._clients:
            base = client._bases.get(placement.gpa)
            if base is not None and client.alive:
                try:
                    client.uffd.wake(base + offset, size)
                except MappingError as exc:  # the page is placed all the same
                    self._errors.append(f"waking {client.uffd!r}: {exc}")

    # ------------------------------------------------------------ faults

    def _locate(
        self, client: PostcopyClient, address: int
    ) -> tuple[_Placement, int] | None:
        for placement in self._placements:
            base = client._bases.get(placement.gpa)
            if base is not None and base <= address < base + placement.size:
                offset = address - base
                return placement, offset - offset % self._page_size
        return None

    def _resolve(self, client: PostcopyClient, address: int) -> bool:
        # The lock is held. False: no base covers the address (yet).
        located = self._locate(client, address)
        if located is None:
            return False
        self._place(*located)
        self._resolved += 1
        client.faults += 1
        return True

    def _handle(self, client: PostcopyClient, event: UffdEvent) -> None:
        if not event.is_pagefault:
            return  # fork/remap/remove/unmap: not asked for (features 0)
        with self._lock:
            self._faults += 1
            try:
                if not self._resolve(client, event.address):
                    self._pending.append((client, event.address))
            except MappingError as exc:
                self._errors.append(f"fault at {event.address:#x}: {exc}")

    def _retry_pending(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
            for client, address in pending:
                try:
                    if not self._resolve(client, address):
                        self._pending.append((client, address))
                except MappingError as exc:
                    self._errors.append(f"fault at {address:#x}: {exc}")

    @property
    def faults_resolved(self) -> int:
        """Backend page faults resolved so far."""
        with self._lock:
            return self._resolved

    @property
    def errors(self) -> tuple[str, ...]:
        """What went wrong in the fault thread, in order."""
        with self._lock:
            return tuple(self._errors)

    @property
    def stats(self) -> PostcopyStats:
        """A snapshot of the counters."""
        with self._lock:
            return PostcopyStats(
                faults=self._faults,
                resolved=self._resolved,
                pending=len(self._pending),
                placed=self._placed,
                already_present=self._present,
                missing=len(self._source),
                errors=len(self._errors),
            )

    # ------------------------------------------------------------ thread

    @property
    def running(self) -> bool:
        """Whether the fault thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the fault thread (a daemon). Idempotent."""
        self._check_open()
        if self.running:
            return
        self._stopping.clear()
        self._thread = threading.Thread(
            target=self._run, name="vubackend-postcopy-faults", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the fault thread and wait up to ``timeout`` seconds for it.
        Faults still unresolved stay pending. Idempotent."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stopping.set()
        self._nudge()
        thread.join(timeout)

    def _nudge(self) -> None:
        # Wake the thread's poll() (new client, new bases, stop).
        with self._lock:
            if self._closed:
                return
            # A full pipe already wakes the thread.
            with contextlib.suppress(BlockingIOError):
                os.write(self._wake_w, b"\0")

    def _run(self) -> None:
        poller = select.poll()
        generation = -1
        by_fd: dict[int, PostcopyClient] = {}
        while not self._stopping.is_set():
            with self._lock:
                if generation != self._generation:
                    generation = self._generation
                    poller = select.poll()
                    poller.register(self._wake_r, select.POLLIN)
                    by_fd = {c.uffd.fileno(): c for c in self._clients if c.alive}
                    for fd in by_fd:
                        poller.register(fd, select.POLLIN)
            # poll() releases the GIL while it waits.
            for fd, mask in poller.poll(int(_POLL_INTERVAL * 1000)):
                if fd == self._wake_r:
                    self._drain_wake()
                    continue
                client = by_fd.get(fd)
                if client is not None:
                    self._serve(client, mask)
            if self._pending:
                self._retry_pending()

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 4096):
                pass

    def _serve(self, client: PostcopyClient, mask: int) -> None:
        try:
            events = client.uffd.read_events() if mask & select.POLLIN else []
        except OSError as exc:
            events = []
            mask |= select.POLLERR
            with self._lock:
                self._errors.append(f"reading {client.uffd!r}: {exc}")
        if not events and mask & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
            with self._lock:
                client.alive = False
                self._generation += 1
            return
        for event in events:
            self._handle(client, event)

    # ------------------------------------------------------------ lifetime

    def _check_open(self) -> None:
        if self._closed:
            raise DaemonClosedError("the postcopy pager is closed")

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def close(self) -> None:
        """Stop the thread, close the clients' uffds and the pager's own,
        unmap the placement mappings. Pages still missing stay missing (a
        backend touching one blocks until its own uffd is closed). Idempotent.
        """
        if self._closed:
            return
        self.stop()
        with self._lock:
            self._closed = True
            for client in self._clients:
                client.alive = False
                client.uffd.close()
            self._uffd.close()
            for placement in self._placements:
                placement.close()
            self._placements.clear()
            self._source.clear()
            self._pending.clear()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)

    def __enter__(self) -> PostcopyPager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._source)} missing pages"
        return f"<PostcopyPager {state}>"
