# GuestMemoryAtomic: the session's guest memory, shared by the request
# handler (the one writer) and the worker threads (the readers).
#
# Rules of this module (the RCU shape of vm-memory's GuestMemoryAtomic):
# - Readers never block on writers. memory() loads the current snapshot (one
#   reference) and takes a lease on it; if the snapshot was retired between
#   the load and the lease, it loads again (the new one is already in place).
#   A reader keeps its snapshot, consistent and mapped, until it releases the
#   lease, however many replacements happen meanwhile.
# - Writers are serialised by one lock. A replacement is one reference swap
#   followed by close() of the old snapshot, whose regions are unmapped when
#   its last lease ends (never under a reader). Regions shared with the new
#   snapshot stay mapped (each region counts its snapshots).
# - Every snapshot and region this object maps carries a view onto its
#   DirtyLogSlot, so SET_LOG_BASE is one set_log() whatever the table.
# - After a writer method returns, every memory() call sees the new table;
#   readers still holding the old one finish with it.

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import final

from vubackend.bitmap import DirtyLog, DirtyLogSlot
from vubackend.errors import InternalError, MappingError
from vubackend.memory._addresses import MAX_MEM_SLOTS, FrontendAddress, GuestAddress
from vubackend.memory._backend import MemoryBackend
from vubackend.memory._descriptor import RegionDescriptor, check_layout
from vubackend.memory._guest_memory import GuestMemory
from vubackend.memory._mmap_backend import MmapBackend

__all__ = ["GuestMemoryAtomic", "MemoryGuard", "MemoryLease"]


@final
class MemoryGuard:
    """A lease on one :class:`GuestMemory` snapshot, from
    :meth:`GuestMemoryAtomic.memory`.

    While the guard is held the snapshot stays mapped. Use it as a context
    manager (``with atomic.memory() as mem:``), or read :attr:`memory` and
    call :meth:`release` when done. Not shared between threads.
    """

    __slots__ = ("_memory",)

    def __init__(self, memory: GuestMemory) -> None:
        # Private: made by GuestMemoryAtomic.memory() with the lease taken.
        self._memory: GuestMemory | None = memory

    @property
    def memory(self) -> GuestMemory:
        """The snapshot.

        Raises:
            ValueError: the guard was released.
        """
        if self._memory is None:
            raise ValueError("memory guard already released")
        return self._memory

    def release(self) -> None:
        """End the lease. Idempotent."""
        memory, self._memory = self._memory, None
        if memory is not None:
            memory._drop_lease()

    def __enter__(self) -> GuestMemory:
        return self.memory

    def __exit__(self, *exc: object) -> None:
        self.release()


@final
class MemoryLease:
    """A renewable lease, from :meth:`GuestMemoryAtomic.lease`: it holds the
    snapshot that was current at the last :meth:`current` call, and moves to
    a newer one when a writer has replaced it.

    For code that makes many short accesses in a row (a worker draining a
    ring): :meth:`current` costs one identity check while the table is
    unchanged, where a :class:`MemoryGuard` per access takes and drops a
    lease each time. Release it promptly when the burst ends: the snapshot
    it holds stays mapped until then. Not shared between threads.
    """

    __slots__ = ("_atomic", "_memory")

    def __init__(self, atomic: GuestMemoryAtomic) -> None:
        self._atomic = atomic
        self._memory: GuestMemory | None = None

    def current(self) -> GuestMemory:
        """The current snapshot, leased until the next call that finds it
        replaced, or :meth:`release`.

        Raises:
            InternalError: the current snapshot was closed by hand.
        """
        memory = self._memory
        if memory is not None and memory is self._atomic._current:
            return memory
        return self._renew()

    def _renew(self) -> GuestMemory:
        # Lease the new snapshot before dropping the old one, so that a
        # region shared by both is never unmapped in between.
        atomic = self._atomic
        fresh = atomic._current
        while not fresh._take_lease():
            # Retired between the load and the lease (as in memory()).
            newer = atomic._current
            if newer is fresh:
                raise InternalError("the current guest memory snapshot was closed")
            fresh = newer
        old, self._memory = self._memory, fresh
        if old is not None:
            old._drop_lease()
        return fresh

    def release(self) -> None:
        """Drop the lease, if any (the lease can be used again). Idempotent."""
        memory, self._memory = self._memory, None
        if memory is not None:
            memory._drop_lease()

    def release_if_stale(self) -> None:
        """Drop the lease if a writer has replaced its snapshot (keep it
        while it is current: the next :meth:`current` is then free)."""
        memory = self._memory
        if memory is not None and memory is not self._atomic._current:
            self._memory = None
            memory._drop_lease()


@final
class GuestMemoryAtomic:
    """The current guest memory of a session, replaceable while other threads
    read it.

    Readers call :meth:`memory`. The request handler changes the table with
    :meth:`set_mem_table`, :meth:`add_region`, :meth:`remove_region` (or
    :meth:`replace` with a snapshot it built) and the dirty log with
    :meth:`set_log`. Thread-safe.
    """

    __slots__ = ("_backend", "_current", "_log", "_write_lock")

    def __init__(
        self,
        memory: GuestMemory | None = None,
        *,
        backend: MemoryBackend | None = None,
    ) -> None:
        """Create the handle.

        Args:
            memory: the initial snapshot (taken over), or None for an empty
                table.
            backend: how regions are mapped; plain ``MmapBackend()`` by
                default.
        """
        self._backend: MemoryBackend = MmapBackend() if backend is None else backend
        self._current = GuestMemory() if memory is None else memory
        self._log = DirtyLogSlot()
        self._write_lock = threading.Lock()

    @property
    def backend(self) -> MemoryBackend:
        """The memory backend regions are mapped with."""
        return self._backend

    @property
    def log(self) -> DirtyLogSlot:
        """The dirty-log slot shared by every region mapped here."""
        return self._log

    # ------------------------------------------------------------ readers

    def memory(self) -> MemoryGuard:
        """Take a lease on the current snapshot.

        Returns:
            A guard holding it; release it (or leave its ``with`` block)
            promptly, since an old table stays mapped until then.

        Raises:
            InternalError: the current snapshot was closed by hand.
        """
        current = self._current
        while not current._take_lease():
            # Retired between our load and our lease: a newer one is current.
            newer = self._current
            if newer is current:
                raise InternalError("the current guest memory snapshot was closed")
            current = newer
        return MemoryGuard(current)

    def lease(self) -> MemoryLease:
        """A renewable lease that follows the current snapshot (see
        :class:`MemoryLease`); it holds nothing until its first ``current()``.
        """
        return MemoryLease(self)

    # ------------------------------------------------------------ writers

    def replace(self, memory: GuestMemory) -> None:
        """Make ``memory`` the current snapshot and retire the old one (it is
        unmapped once its readers are done).

        Args:
            memory: the new snapshot; this handle takes it over.
        """
        with self._write_lock:
            self._swap(memory)

    def _swap(self, memory: GuestMemory) -> None:
        old, self._current = self._current, memory
        if old is not memory:
            old.close()

    def set_mem_table(self, descriptors: Sequence[RegionDescriptor]) -> None:
        """Replace the whole table (``SET_MEM_TABLE``): map every region, then
        swap. On any error nothing changes and nothing stays mapped.

        Args:
            descriptors: the regions, in any order; their fds are borrowed.

        Raises:
            MappingError: the table is invalid or a region cannot be mapped.
        """
        with self._write_lock:
            self._swap(GuestMemory.map(descriptors, self._backend, log=self._log))

    def add_region(self, descriptor: RegionDescriptor) -> None:
        """Add one region (``ADD_MEM_REG``). On error nothing changes.

        Args:
            descriptor: the region; its fd is borrowed.

        Raises:
            MappingError: it overlaps a region, the table is full
                (``MAX_MEM_SLOTS``), or it cannot be mapped.
        """
        with self._write_lock:
            current = self._current
            if len(current) >= MAX_MEM_SLOTS:
                raise MappingError(
                    f"too many memory regions: already {len(current)} "
                    f"(at most {MAX_MEM_SLOTS})"
                )
            # Refuse an overlap before mapping anything.
            check_layout((*current.regions, descriptor))
            region = self._backend.map_region(descriptor, self._log)
            self._swap(current.with_region_added(region))

    def remove_region(
        self, gpa: GuestAddress, frontend_addr: FrontendAddress, size: int
    ) -> None:
        """Remove the region matching all three values (``REM_MEM_REG``).

        Args:
            gpa: its guest physical address.
            frontend_addr: its frontend virtual address.
            size: its size in bytes.

        Raises:
            UnmappedAddressError: no region matches; nothing changes.
        """
        with self._write_lock:
            self._swap(self._current.with_region_removed(gpa, frontend_addr, size))

    def set_log(self, log: DirtyLog | None, *, require_coverage: bool = True) -> None:
        """Install a new dirty log (``SET_LOG_BASE``) or stop logging (None).

        The previous log is closed; marks in flight on it finish first.

        Args:
            log: the new log; this handle takes it over (and closes it if it
                is refused).
            require_coverage: refuse a log that does not cover every mapped
                region (writes there would be dropped, and migration would
                silently lose them).

        Raises:
            MappingError: the log is too small for the current table.
        """
        with self._write_lock:
            end = self._current.end_gpa
            if log is not None and require_coverage and log.end_gpa < end:
                log.close()
                raise MappingError(
                    f"dirty log covers guest addresses up to {log.end_gpa:#x}, "
                    f"but memory is mapped up to {end:#x}"
                )
            self._log.replace(log)

    def close(self) -> None:
        """End the session's memory: stop logging and retire the table (an
        empty one becomes current). Old mappings go as readers finish."""
        with self._write_lock:
            self._log.close()
            self._swap(GuestMemory())

    def __repr__(self) -> str:
        return f"<GuestMemoryAtomic {self._current!r} log={self._log.current!r}>"
