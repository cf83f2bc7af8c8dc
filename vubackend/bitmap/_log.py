# DirtyLog: the frontend's dirty-page log (SET_LOG_BASE), shared memory in
# which the backend sets one bit per 4 KiB guest physical page it writes.
#
# Rules of this module (vhost-user-protocol.md §4.7, §5.4 rule 7, §7.4 item 10):
# - Layout: page = gpa >> 12; byte page >> 3; bit page & 7. The log covers
#   guest physical addresses [0, size * 8 * 4096).
# - Bits are set with the native atomic fetch-or (the frontend clears bits at
#   the same time), after a release fence, so that the frontend never sees a
#   bit before the data it describes. Reads of bits use the acquire load.
# - Marks beyond the end of the log are dropped and counted (dropped_pages),
#   never raised: the write they describe has already happened, and libvhost-
#   user's assert shows what crashing on it costs.
# - Lifetime: every mark and read holds a lease (a count under a lock) for
#   the duration of the call. close() retires the log; it is unmapped when the
#   last lease ends, never under a thread that is still using it (the native
#   view must not be released while a GIL-free call runs on it). A retired
#   log refuses new leases, and try_mark_dirty() says so, so that a
#   DirtyLogSlot can send the mark to the log that replaced it.
#   Why a lease and not Python's own reference counting: the daemon needs to
#   know when the shared memory is really gone (session reset, replacement),
#   independently of where stray references end up (tracebacks, caches).

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, final

from vubackend._native import AtomicView, fence_release, log_chains
from vubackend.bitmap._base import LOG_PAGE_SHIFT
from vubackend.bitmap._mapping import SharedMapping

if TYPE_CHECKING:
    from array import array

    from cffi import FFI
    from typing_extensions import Buffer

    from vubackend._native import RegionTable

__all__ = ["DirtyLog"]


@final
class DirtyLog:
    """The dirty-page log a frontend hands over with ``SET_LOG_BASE``.

    One bit per 4 KiB page of guest *physical* memory, set atomically. It is
    a :class:`~vubackend.bitmap.Bitmap` whose offsets are guest physical
    addresses. Build it with :meth:`map` from the message's fd, or over any
    writable buffer (tests, benchmarks) with the constructor. All methods are
    thread-safe.
    """

    __slots__ = (
        "_atomic",
        "_closed",
        "_dropped_pages",
        "_lock",
        "_mapping",
        "_pages",
        "_size",
        "_unmapped",
        "_users",
    )

    def __init__(self, buffer: Buffer, *, mapping: SharedMapping | None = None):
        """Use ``buffer`` as the log.

        Args:
            buffer: a writable, C-contiguous buffer of at least one byte (a
                ``bytearray``, an mmap, a memoryview of one). It stays pinned
                until the log is unmapped.
            mapping: the mapping ``buffer`` views, if the log owns one; it is
                closed when the log is unmapped.

        Raises:
            TypeError: ``buffer`` is read-only or not C-contiguous.
            ValueError: ``buffer`` is empty.
        """
        self._atomic = AtomicView(buffer)
        self._size = self._atomic.size
        if self._size == 0:
            self._atomic.release()
            raise ValueError("a dirty log needs at least one byte")
        self._pages = self._size * 8
        self._mapping = mapping
        self._lock = threading.Lock()
        self._users = 0
        self._closed = False
        self._unmapped = False
        self._dropped_pages = 0

    @classmethod
    def map(cls, fd: int, *, size: int, offset: int) -> DirtyLog:
        """Map the log described by a ``SET_LOG_BASE`` message.

        The fd is borrowed: the log does not close it; the caller closes it
        once this returns (the mapping keeps its own duplicate until the log
        is unmapped).

        Args:
            fd: the log's file descriptor (usually a memfd).
            size: ``mmap_size`` from the message, in bytes, > 0.
            offset: ``mmap_offset`` from the message; need not be aligned.

        Returns:
            The log, covering guest physical addresses
            ``[0, size * 8 * 4096)``.

        Raises:
            MappingError: the size is 0, a number overflows u64, the range
                runs past the end of the file, or ``mmap`` failed.
        """
        mapping = SharedMapping.map(fd, offset=offset, size=size, what="dirty log")
        try:
            return cls(mapping.view, mapping=mapping)
        except BaseException:
            mapping.close()
            raise

    # ------------------------------------------------------------ geometry

    @property
    def size(self) -> int:
        """Size of the log in bytes."""
        return self._size

    @property
    def pages(self) -> int:
        """Number of 4 KiB guest pages the log covers (8 per byte)."""
        return self._pages

    @property
    def end_gpa(self) -> int:
        """One past the last guest physical address the log covers."""
        return self._pages << LOG_PAGE_SHIFT

    @property
    def dropped_pages(self) -> int:
        """How many page marks fell beyond the end of the log and were
        dropped (or arrived after :meth:`close`)."""
        return self._dropped_pages

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (the memory may still be mapped
        while a mark is in progress)."""
        return self._closed

    @property
    def unmapped(self) -> bool:
        """Whether the log's memory has been released."""
        return self._unmapped

    # ------------------------------------------------------------ marking

    def mark_dirty(self, offset: int, length: int) -> None:
        """Set the bits of every 4 KiB page that ``[offset, offset + length)``
        touches. Call it after writing the data.

        Pages beyond the end of the log are dropped and counted in
        :attr:`dropped_pages`, as are all pages of a mark on a closed log.

        Args:
            offset: guest physical address of the first byte written.
            length: number of bytes written; 0 marks nothing.

        Raises:
            ValueError: ``offset`` or ``length`` is negative.
        """
        self.try_mark_dirty(offset, length)

    def try_mark_dirty(self, offset: int, length: int) -> bool:
        """Like :meth:`mark_dirty`, but say whether the log was still open.

        Args:
            offset: guest physical address of the first byte written.
            length: number of bytes written; 0 marks nothing.

        Returns:
            False if the log was closed, so nothing was marked (the pages are
            counted as dropped); True otherwise, even if some pages lay
            beyond the log.

        Raises:
            ValueError: ``offset`` or ``length`` is negative.
        """
        if offset < 0 or length <= 0:
            if length == 0 and offset >= 0:
                return not self._closed
            raise ValueError(f"cannot mark [{offset}, {offset} + {length}): negative")
        first = offset >> LOG_PAGE_SHIFT
        last = (offset + length - 1) >> LOG_PAGE_SHIFT
        # The lease, inlined (this is the hot path of every logged write).
        lock = self._lock
        lock.acquire()
        if self._closed:
            lock.release()
            self._count_dropped(last - first + 1)
            return False
        self._users += 1
        lock.release()
        try:
            if last >= self._pages:
                pages = self._pages
                self._count_dropped(last - max(first, pages) + 1)
                if first >= pages:
                    return True
                last = pages - 1
            # The frontend must never see a bit before the data it describes
            # (vhost-user-protocol.md §4.7: "barrier (release) after the data
            # write and before setting log bits"; DPDK __vhost_log_write).
            # ORDERING: release fence, caller's data write -> log bits (§5.4 r7)
            fence_release()
            if first >> 3 == last >> 3:
                # The common case: every page in one byte of the log.
                mask = ((1 << (last - first + 1)) - 1) << (first & 7)
                self._atomic.or_u8(first >> 3, mask)
                return True
            or_u8 = self._atomic.or_u8
            page = first
            while page <= last:
                # All pages of this byte in [page, last] with one fetch-or.
                top = min(last, page | 7)
                or_u8(page >> 3, ((1 << (top - page + 1)) - 1) << (page & 7))
                page = top + 1
            return True
        finally:
            self._exit()

    def try_mark_chains(
        self,
        table: RegionTable,
        segs: FFI.CData,
        nsegs: int,
        records: FFI.CData,
        first: int,
        count: int,
        used: array[int],
    ) -> bool:
        """Mark what a batch of chains got, in one native call: the first
        ``used[k]`` bytes of the writable part of chain ``first + k`` of a
        pop (its pinned ``records`` and ``segs``, walked against ``table``).
        Same rules as :meth:`try_mark_dirty` (call it after writing the
        data; pages past the log are dropped and counted).

        Returns:
            False if the log was closed (nothing marked); True otherwise.

        Raises:
            As ``vubackend._native.log_chains``; nothing is marked then.
        """
        if not self._enter():
            return False
        try:
            dropped = log_chains(
                self._atomic, table, segs, nsegs, records, first, count, used
            )
        finally:
            self._exit()
        if dropped:
            self._count_dropped(dropped)
        return True

    def dirty_at(self, offset: int) -> bool:
        """Whether the page holding guest physical address ``offset`` is
        marked in the log (by us or by anyone else sharing it).

        Args:
            offset: a guest physical address.

        Returns:
            True if its bit is set; False if it is clear, beyond the log, or
            the log is closed.
        """
        page = offset >> LOG_PAGE_SHIFT
        if offset < 0 or page >= self._pages or not self._enter():
            return False
        try:
            return bool(self._atomic.load_u8(page >> 3) & (1 << (page & 7)))
        finally:
            self._exit()

    # ------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Retire the log: refuse new marks, and unmap it as soon as no mark
        is in progress (now, if none is). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._users:
                return  # the last _exit() unmaps
        self._unmap()

    def __enter__(self) -> DirtyLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _enter(self) -> bool:
        with self._lock:
            if self._closed:
                return False
            self._users += 1
            return True

    def _exit(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users or not self._closed:
                return
        self._unmap()

    def _unmap(self) -> None:
        # Reached once users == 0 and closed; both only ever move one way,
        # but close() and the last _exit() may both get here.
        with self._lock:
            if self._unmapped:
                return
            self._unmapped = True
        self._atomic.release()
        if self._mapping is not None:
            self._mapping.close()

    def _count_dropped(self, pages: int) -> None:
        with self._lock:
            self._dropped_pages += pages

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"<DirtyLog {state} size={self._size:#x} covers GPA "
            f"[0, {self.end_gpa:#x}) dropped_pages={self._dropped_pages}>"
        )
