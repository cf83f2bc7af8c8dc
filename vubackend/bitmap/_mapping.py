# SharedMapping: a MAP_SHARED read-write mapping of a byte range of a file
# descriptor that a frontend sent (the dirty log here, guest memory regions in
# vubackend.memory, which reuses this class).
#
# Rules of this module:
# - The frontend is untrusted. Every number it sent is checked before mmap
#   with Python integers against the u64 range, so nothing can wrap: the
#   offset and size must be u64s, the size > 0, and offset + size must fit in
#   u64 and lie inside the file (os.fstat) when the fd is a regular file.
# - The fd is BORROWED. Nothing here closes it: the caller (the object that
#   received it over the socket) closes it after mapping, success or not.
#   Python's mmap keeps its own duplicate of the fd for the life of the
#   mapping, so a live SharedMapping costs one fd, closed by close().
# - An offset that is not aligned to the fd's page size is aligned down and
#   the mapping is sliced (as newest libvhost-user does); the page size is the
#   huge page size on hugetlbfs (os.fstatvfs().f_bsize), which also needs the
#   length rounded up to whole huge pages (munmap refuses a partial one).
# - No MAP_NORESERVE: on hugetlbfs it would turn a shortage of huge pages
#   into a SIGBUS at the first touch instead of a clean ENOMEM here. (Python
#   3.11's mmap module does not even export the flag.)
# - close() never unmaps under a Python view: CPython refuses mmap.close()
#   while a memoryview of it is alive (BufferError). Then the mapping is left
#   to the garbage collector, which unmaps it when the last view goes.

from __future__ import annotations

import contextlib
import mmap
import os
import stat
import sys
from typing import Final, final

from vubackend.errors import MappingError

__all__ = ["U64_LIMIT", "SharedMapping", "fd_page_size"]

# One past the largest u64: every address, size and offset from the wire is a
# u64, and a range [start, start + size) must end at or below this.
U64_LIMIT: Final = 1 << 64

# Largest page size we believe fstatvfs about (1 GiB huge pages); a larger or
# odd f_bsize (some network filesystems report their I/O size there) is not a
# page size, and the host page size is used instead.
_MAX_PAGE_SIZE: Final = 1 << 30


def fd_page_size(fd: int) -> int:
    """The page size that mmap offsets of ``fd`` must be aligned to.

    Args:
        fd: an open file descriptor (borrowed).

    Returns:
        The huge page size for a hugetlbfs file (including a
        ``memfd_create(MFD_HUGETLB)`` fd), else the host page size.
    """
    try:
        bsize = os.fstatvfs(fd).f_bsize
    except OSError:
        return mmap.PAGESIZE
    if (
        mmap.PAGESIZE < bsize <= _MAX_PAGE_SIZE
        and bsize & (bsize - 1) == 0
        and bsize % mmap.PAGESIZE == 0
    ):
        return bsize
    return mmap.PAGESIZE


@final
class SharedMapping:
    """A read-write ``MAP_SHARED`` mapping of ``[offset, offset + size)`` of
    a file descriptor.

    Create it with :meth:`map`. :attr:`view` is exactly the requested range,
    whatever alignment the mapping itself needed.
    """

    __slots__ = ("_mmap", "_page_size", "_view")

    def __init__(self, mapping: mmap.mmap, start: int, size: int, page_size: int):
        # Private: use SharedMapping.map(). `start` is the offset of the
        # requested range inside `mapping`.
        self._mmap: mmap.mmap | None = mapping
        with memoryview(mapping) as whole:
            # The slice shares the mmap's export, not `whole`'s, so `whole`
            # can be released at once.
            self._view: memoryview | None = whole[start : start + size]
        self._page_size = page_size

    @classmethod
    def map(cls, fd: int, *, offset: int, size: int, what: str) -> SharedMapping:
        """Map ``[offset, offset + size)`` of ``fd`` shared and read-write.

        The fd is borrowed: it is not closed, and may be closed by the caller
        as soon as this returns (the mapping keeps a duplicate).

        Args:
            fd: the file descriptor the frontend sent.
            offset: byte offset in the file (any alignment).
            size: number of bytes, > 0.
            what: what is being mapped, for error messages ("dirty log",
                "memory region at GPA 0x...").

        Returns:
            The mapping; its :attr:`view` has exactly ``size`` bytes.

        Raises:
            MappingError: a number is out of the u64 range, the size is 0,
                ``offset + size`` overflows u64 or runs past the end of the
                file, the range is too large for this process, or ``fstat`` or
                ``mmap`` failed (raised from the ``OSError``).
        """
        if not 0 < size < U64_LIMIT:
            raise MappingError(f"{what}: size {size:#x} must be > 0 and fit in a u64")
        if not 0 <= offset < U64_LIMIT:
            raise MappingError(f"{what}: offset {offset:#x} must fit in a u64")
        if offset + size > U64_LIMIT:
            raise MappingError(
                f"{what}: offset {offset:#x} + size {size:#x} overflows a u64"
            )
        try:
            st = os.fstat(fd)
        except OSError as exc:
            raise MappingError(f"{what}: cannot fstat fd {fd}: {exc}") from exc
        regular = stat.S_ISREG(st.st_mode)
        if regular and offset + size > st.st_size:
            raise MappingError(
                f"{what}: range [{offset:#x}, {offset + size:#x}) runs past the "
                f"end of its file ({st.st_size:#x} bytes)"
            )
        page_size = fd_page_size(fd)
        aligned = offset - offset % page_size
        start = offset - aligned
        length = start + size
        if length > sys.maxsize:
            raise MappingError(f"{what}: {length:#x} bytes is too large to map")
        if page_size > mmap.PAGESIZE:
            # Huge pages: map whole pages, if the file has them (hugetlbfs
            # file sizes are whole pages, so it does).
            rounded = -(-length // page_size) * page_size
            if rounded <= sys.maxsize and (
                not regular or aligned + rounded <= st.st_size
            ):
                length = rounded
        try:
            mapping = mmap.mmap(
                fd,
                length,
                flags=mmap.MAP_SHARED,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
                offset=aligned,
            )
        except (OSError, ValueError, OverflowError) as exc:
            raise MappingError(
                f"{what}: cannot map {length:#x} bytes of fd {fd} at file offset "
                f"{aligned:#x}: {exc}"
            ) from exc
        # Keep guest memory out of core dumps (libvhost-user and DPDK do the
        # same). Best effort: a kernel without it changes nothing we rely on.
        with contextlib.suppress(OSError):
            mapping.madvise(mmap.MADV_DONTDUMP)
        return cls(mapping, start, size, page_size)

    @property
    def view(self) -> memoryview:
        """The mapped range: a writable ``memoryview`` of exactly ``size``
        bytes (format ``B``).

        Raises:
            ValueError: the mapping was closed.
        """
        if self._view is None:
            raise ValueError("mapping closed")
        return self._view

    @property
    def size(self) -> int:
        """The size of the mapped range in bytes (0 once closed)."""
        return 0 if self._view is None else self._view.nbytes

    @property
    def page_size(self) -> int:
        """The page size the mapping was aligned to (huge on hugetlbfs)."""
        return self._page_size

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._view is None

    def close(self) -> bool:
        """Unmap, unless Python views of the mapping are still alive.

        Pinned views (``AtomicView``) must have been released first. Idempotent.

        Returns:
            True if the memory was unmapped now; False if memoryviews handed
            out earlier are still alive, in which case it is unmapped (and its
            duplicate fd closed) when the last of them is garbage collected.
        """
        view, mapping = self._view, self._mmap
        if view is None or mapping is None:
            return True
        self._view = self._mmap = None
        try:
            view.release()
            mapping.close()
        except BufferError:
            # A view is still exported (see the module rules): dropping our
            # references lets the last view's deallocation unmap it.
            return False
        return True

    def __repr__(self) -> str:
        state = "closed" if self._view is None else f"size={self._view.nbytes:#x}"
        return f"<SharedMapping {state} page_size={self._page_size:#x}>"
