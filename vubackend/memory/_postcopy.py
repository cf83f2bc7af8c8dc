# The postcopy memory backend (vhost-user-protocol.md §4.8, the
# `vubackend[postcopy]` extra): PostcopyBackend maps regions as plain shared
# mappings whose data is copied by GIL-free native calls and offers
# PAGEFAULT; PostcopyFaults is one session's userfaultfd and the regions
# registered with it.
#
# Rules of this module:
# - The GIL: a thread that touches a registered page missing from the shared
#   file blocks in the kernel until the frontend places it. If it held the
#   GIL, the frontend's answer could never be processed by this process (and
#   in a frontend written in Python, in the same process, by nobody): every
#   region this backend maps has native_copies on, and the ring layer then
#   walks and publishes rings in the native helper only.
# - Registration (§4.8 item 3) happens only after the frontend's answer to
#   the postcopy memory reply: drop the pages from this process
#   (MADV_DONTNEED), then UFFDIO_REGISTER in MISSING mode over the whole
#   region, rounded out to its pages, checking that UFFDIO_COPY is allowed.
# - A registered region is kept mapped (one reference, MappedRegion.incref)
#   until close(), which unregisters it first: unregistering wakes any
#   thread still waiting on a fault, and keeping the reference means the
#   range unregistered is still the region's.
# - Ownership: PostcopyFaults owns its userfaultfd; share_fd() gives the
#   caller a duplicate (the one POSTCOPY_ADVISE hands over).

from __future__ import annotations

import contextlib
import os
import threading
from typing import Final, final

from vubackend.bitmap import DirtyLogSlot
from vubackend.errors import MappingError
from vubackend.memory._backend import PROTOCOL_FEATURE_PAGEFAULT
from vubackend.memory._descriptor import RegionDescriptor
from vubackend.memory._mmap_backend import MmapBackend
from vubackend.memory._postcopy_uffd import (
    IOCTL_COPY,
    drop_pages,
    host_address,
    mapping_page_size,
    open_userfaultfd,
    register_missing,
    unregister,
)
from vubackend.memory._region import MappedRegion

__all__ = ["PostcopyBackend", "PostcopyFaults"]

_NATIVE_MMAP: Final = MmapBackend(native_copies=True)


@final
class PostcopyBackend:
    """Maps regions for postcopy live migration (PAGEFAULT).

    Satisfies :class:`~vubackend.memory.MemoryBackend`; chosen with
    ``select_backend(postcopy=True)``. Regions are shared mappings whose data
    is copied by GIL-free native calls, so that a thread blocked on a page
    that has not arrived yet stalls no other thread. The session's
    userfaultfd is a :class:`PostcopyFaults`.
    """

    __slots__ = ()

    @property
    def name(self) -> str:
        """``"postcopy"``."""
        return "postcopy"

    @property
    def protocol_features(self) -> int:
        """:data:`~vubackend.memory.PROTOCOL_FEATURE_PAGEFAULT`."""
        return PROTOCOL_FEATURE_PAGEFAULT

    @property
    def needs_native_copies(self) -> bool:
        """True: every guest-memory access may block on a page fault."""
        return True

    def map_region(
        self, descriptor: RegionDescriptor, log: DirtyLogSlot | None = None
    ) -> MappedRegion:
        """Map one region shared and read-write, with native copies.

        Args:
            descriptor: the region; its fd is borrowed.
            log: the session's dirty-log slot, or None for no logging.

        Returns:
            The mapped region, owned by the caller.

        Raises:
            MappingError: the descriptor has Xen flags, or the range cannot
                be mapped.
        """
        if descriptor.xen_flags:
            raise MappingError(
                f"memory region at GPA {descriptor.gpa:#x}: xen mapping flags "
                f"{descriptor.xen_flags:#x} cannot be used with the postcopy "
                "memory backend"
            )
        # A plain shared mapping whose copies are native: MmapBackend's.
        return _NATIVE_MMAP.map_region(descriptor, log)

    def __repr__(self) -> str:
        return "PostcopyBackend()"


@final
class PostcopyFaults:
    """One session's userfaultfd and the regions registered with it.

    Made by :meth:`open` at POSTCOPY_ADVISE; :meth:`register` each region
    once the frontend has its address; :meth:`close` at POSTCOPY_END or when
    the session ends. Thread-safe.
    """

    __slots__ = ("_fd", "_lock", "_registered")

    def __init__(self, fd: int) -> None:
        # Private: use open().
        self._fd: int | None = fd
        self._lock = threading.Lock()
        self._registered: list[tuple[MappedRegion, int, int]] = []

    @classmethod
    def open(cls) -> PostcopyFaults:
        """Create the userfaultfd (``O_CLOEXEC | O_NONBLOCK``, API features 0).

        Raises:
            MappingError: userfaultfd is unavailable in this process (not
                root and ``vm.unprivileged_userfaultfd`` is 0, no
                /dev/userfaultfd access), with the reasons.
        """
        return cls(open_userfaultfd())

    def fileno(self) -> int:
        """The userfaultfd (borrowed).

        Raises:
            MappingError: it was closed.
        """
        fd = self._fd
        if fd is None:
            raise MappingError("the postcopy userfaultfd is closed")
        return fd

    def share_fd(self) -> int:
        """A duplicate of the userfaultfd for the frontend (owned by the
        caller).

        Raises:
            MappingError: it was closed.
        """
        return os.dup(self.fileno())

    @staticmethod
    def address_of(region: MappedRegion) -> int:
        """This process's address of the region's first byte (what the
        postcopy replies to SET_MEM_TABLE and ADD_MEM_REG carry)."""
        return host_address(region.view)

    @property
    def registered(self) -> tuple[MappedRegion, ...]:
        """The regions registered so far."""
        with self._lock:
            return tuple(region for region, _, _ in self._registered)

    def is_registered(self, region: MappedRegion) -> bool:
        """Whether ``region`` is registered."""
        with self._lock:
            return any(r is region for r, _, _ in self._registered)

    def register(self, region: MappedRegion) -> None:
        """Drop the region's pages from this process and register it in
        MISSING mode, so that a touch of a page missing from the shared
        memory faults to the frontend. Keeps the region mapped until
        :meth:`close`. Registering a region again does nothing.

        Raises:
            MappingError: the kernel refused, or UFFDIO_COPY is not allowed
                on the range (the frontend could not place pages there).
        """
        with self._lock:
            fd = self.fileno()
            if any(r is region for r, _, _ in self._registered):
                return
            address = host_address(region.view)
            page = mapping_page_size(address)
            start = address - address % page
            end = -(-(address + region.size) // page) * page
            drop_pages(start, end - start)
            ioctls = register_missing(fd, start, end - start)
            if not ioctls & IOCTL_COPY:
                unregister(fd, start, end - start)
                raise MappingError(
                    f"memory region at GPA {region.gpa:#x}: UFFDIO_COPY is not "
                    f"allowed on it (ioctls {ioctls:#x})"
                )
            region.incref()
            self._registered.append((region, start, end - start))

    def close(self) -> None:
        """Unregister every region (waking threads still waiting on a
        fault), drop the references on them and close the userfaultfd.
        Idempotent; errors of unregistering are not raised (the fd goes
        anyway)."""
        with self._lock:
            fd, self._fd = self._fd, None
            registered, self._registered = self._registered, []
        if fd is None:
            return
        try:
            for region, start, length in registered:
                # On failure, unmapping the region ends its registration.
                with contextlib.suppress(MappingError):
                    unregister(fd, start, length)
                region.close()
        finally:
            os.close(fd)

    def __enter__(self) -> PostcopyFaults:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._fd is None else f"fd={self._fd}"
        return f"<PostcopyFaults {state} {len(self._registered)} registered>"
