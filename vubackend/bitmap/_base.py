# The Bitmap role and the no-op bitmap.
#
# Rules of this module:
# - A Bitmap records which bytes of some address range were written. Offsets
#   are relative to whatever the bitmap covers: a region's start for a
#   per-region view, guest physical address 0 for the log itself.
# - mark_dirty is called *after* the data it describes has been written; an
#   implementation that publishes bits to another process must order the data
#   before the bits (vhost-user-protocol.md §4.7, §5.4 rule 7).
# - A length of 0 marks nothing. A negative offset or length is a caller bug
#   (ValueError) in the implementations that check; the no-op bitmap checks
#   nothing, so that it costs nothing when logging is off.

from __future__ import annotations

from typing import Final, Protocol, final

__all__ = ["LOG_PAGE_SHIFT", "LOG_PAGE_SIZE", "Bitmap", "NoopBitmap"]

# One bit of the vhost-user dirty log covers this many bytes of guest physical
# memory, whatever the host page size (VHOST_LOG_PAGE = 0x1000 in QEMU, DPDK,
# libvhost-user; LOG_PAGE_SIZE in rust-vmm bitmap.rs).
LOG_PAGE_SIZE: Final = 0x1000
LOG_PAGE_SHIFT: Final = 12


class Bitmap(Protocol):
    """Something that records writes to a range of memory.

    Implemented by :class:`NoopBitmap`, :class:`~vubackend.bitmap.DirtyLog`
    (offsets are guest physical addresses), :class:`DirtyLogSlot` (likewise)
    and :class:`RegionBitmap` (offsets are relative to a region's start).
    """

    def mark_dirty(self, offset: int, length: int) -> None:
        """Record that ``[offset, offset + length)`` was written.

        Call it after the write. A length of 0 records nothing.

        Args:
            offset: first byte written, relative to what the bitmap covers.
            length: number of bytes written.

        Raises:
            ValueError: ``offset`` or ``length`` is negative (implementations
                may skip this check).
        """
        ...

    def dirty_at(self, offset: int) -> bool:
        """Whether the byte at ``offset`` lies in a page marked dirty.

        Args:
            offset: the byte, relative to what the bitmap covers.

        Returns:
            True if its page is marked; False if not, or if the bitmap does
            not cover it.
        """
        ...


@final
class NoopBitmap:
    """A bitmap that records nothing: the bitmap of memory that is not logged."""

    __slots__ = ()

    def mark_dirty(self, offset: int, length: int) -> None:
        """Do nothing.

        Args:
            offset: ignored.
            length: ignored.
        """

    def dirty_at(self, offset: int) -> bool:
        """Always False: nothing is recorded.

        Args:
            offset: ignored.

        Returns:
            False.
        """
        return False

    def __repr__(self) -> str:
        return "NoopBitmap()"
