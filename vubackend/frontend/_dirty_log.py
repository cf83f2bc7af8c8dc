# DirtyLogBuffer: the frontend's side of the dirty-page log (SET_LOG_BASE,
# vhost-user-protocol.md §4.7): a memfd the backend maps and sets bits in,
# one bit per 4 KiB guest physical page, which the frontend reads back.
#
# Rules of this module:
# - The buffer covers guest physical addresses 0 up to end_gpa, rounded up
#   to whole u64 words (QEMU sends log_chunks * 8 bytes, offset 0).
# - The memfd is owned here and lent to SET_LOG_BASE.
# - Reading is a snapshot; take_dirty() reads and clears. The backend sets
#   bits with an atomic OR, so a clear can race with a new mark: clearing is
#   done a byte at a time with an exchange-like read-then-zero that may lose
#   a bit set in between. That is acceptable for tests (QEMU clears with
#   atomic exchanges because it migrates for real).

from __future__ import annotations

import mmap
import os
from typing import Final, final

from vubackend.errors import DaemonClosedError, MappingError

__all__ = ["LOG_PAGE_SIZE", "DirtyLogBuffer"]

# VHOST_LOG_PAGE: one bit of the log covers 4 KiB of guest physical memory.
LOG_PAGE_SIZE: Final = 0x1000


@final
class DirtyLogBuffer:
    """A dirty-page log to hand to a backend with ``Frontend.set_log_base``.

    Args:
        end_gpa: the log covers guest physical addresses ``[0, end_gpa)``.

    Raises:
        MappingError: the memfd could not be created or mapped.
    """

    def __init__(self, end_gpa: int) -> None:
        if end_gpa <= 0:
            raise MappingError(f"a dirty log must cover some memory, not {end_gpa}")
        pages = -(-end_gpa // LOG_PAGE_SIZE)
        size = -(-pages // 64) * 8
        self._size = size
        try:
            fd = os.memfd_create("vubackend-frontend-log", os.MFD_CLOEXEC)
        except OSError as exc:
            raise MappingError(f"memfd_create failed: {exc.strerror}") from exc
        try:
            os.ftruncate(fd, size)
            self._map: mmap.mmap | None = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        except OSError as exc:
            os.close(fd)
            raise MappingError(f"cannot create a {size}-byte dirty log: {exc}") from exc
        self._fd: int | None = fd

    @property
    def size(self) -> int:
        """The log's size in bytes (``mmap_size`` of SET_LOG_BASE)."""
        return self._size

    def fileno(self) -> int:
        """The memfd (borrowed)."""
        if self._fd is None:
            raise DaemonClosedError("the dirty log is closed")
        return self._fd

    def _mapping(self) -> mmap.mmap:
        if self._map is None:
            raise DaemonClosedError("the dirty log is closed")
        return self._map

    def dirty_pages(self) -> list[int]:
        """The guest page numbers (gpa // 4096) whose bit is set, ascending."""
        data = self._mapping()[:]
        pages: list[int] = []
        for index, byte in enumerate(data):
            if byte:
                pages.extend(index * 8 + bit for bit in range(8) if byte >> bit & 1)
        return pages

    def is_dirty(self, gpa: int) -> bool:
        """Whether the page holding guest physical address ``gpa`` is marked."""
        page = gpa // LOG_PAGE_SIZE
        if not 0 <= page < self._size * 8:
            return False
        return bool(self._mapping()[page // 8] >> (page % 8) & 1)

    def take_dirty(self) -> list[int]:
        """Like :meth:`dirty_pages`, then clear the bits read (see the module
        comment on races)."""
        mapping = self._mapping()
        pages = self.dirty_pages()
        for byte_index in {page // 8 for page in pages}:
            mapping[byte_index] = 0
        return pages

    def close(self) -> None:
        """Unmap and close the memfd. Idempotent."""
        mapping, self._map = self._map, None
        if mapping is not None:
            mapping.close()
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> DirtyLogBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
