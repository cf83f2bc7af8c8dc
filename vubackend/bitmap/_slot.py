# DirtyLogSlot: "the current dirty log" of a session, replaceable at any
# time; RegionBitmap: a region's view onto it.
#
# Rules of this module:
# - Readers (threads marking writes) never take the slot's lock: they load
#   the slot's single reference, then take a lease on that log for the one
#   mark (DirtyLog's rules). A replacement is one reference swap under the
#   writer lock, followed by closing the old log, which is unmapped when its
#   last lease ends. So a SET_LOG_BASE can arrive while rings run.
# - A mark that loaded the old reference just before the swap finds the old
#   log closed and is redone on the new one: a write is never left unlogged
#   because of a replacement (an extra bit is harmless, a missing one is
#   silent data loss after migration).
# - The slot owns the log it holds: replace() and close() close the previous
#   one. With no log (logging off), a mark costs one attribute load (`current`).

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, final

from vubackend.bitmap._log import DirtyLog

if TYPE_CHECKING:
    from array import array

    from cffi import FFI

    from vubackend._native import RegionTable

__all__ = ["DirtyLogSlot", "RegionBitmap"]


@final
class DirtyLogSlot:
    """The current dirty log of a session, or none, replaceable at any time.

    It is a :class:`~vubackend.bitmap.Bitmap` over guest physical addresses
    that forwards to whichever log is current. Region views
    (:class:`RegionBitmap`) share one slot, so replacing the log here
    replaces it for every region at once. Thread-safe.
    """

    __slots__ = ("_swap_lock", "current")

    current: DirtyLog | None
    """The log marks go to now, or None (read it; do not assign it or close
    it: use :meth:`replace`). A plain attribute, so that a writer can check
    "is anyone logging?" for the price of one load."""

    def __init__(self, log: DirtyLog | None = None) -> None:
        """Create a slot.

        Args:
            log: the initial log, or None for "not logging". The slot takes
                ownership of it.
        """
        self.current = log
        self._swap_lock = threading.Lock()

    def replace(self, log: DirtyLog | None) -> None:
        """Make ``log`` the current log and close the previous one.

        Marks already running on the previous log finish there; it is
        unmapped when the last of them ends. Every mark that starts after
        this returns goes to ``log``.

        Args:
            log: the new log (the slot takes ownership of it), or None to
                stop logging.
        """
        with self._swap_lock:
            old, self.current = self.current, log
        if old is not None and old is not log:
            old.close()

    def close(self) -> None:
        """Stop logging and close the current log (same as ``replace(None)``)."""
        self.replace(None)

    def mark_dirty(self, offset: int, length: int) -> None:
        """Mark ``[offset, offset + length)`` (guest physical addresses) in the
        current log, if there is one. See :meth:`DirtyLog.mark_dirty`.

        Args:
            offset: guest physical address of the first byte written.
            length: number of bytes written.

        Raises:
            ValueError: ``offset`` or ``length`` is negative (only checked
                while a log is set).
        """
        log = self.current
        while log is not None and not log.try_mark_dirty(offset, length):
            # Closed between our load and our lease: it has been replaced
            # (or closed by hand, in which case stop rather than spin).
            newer = self.current
            if newer is log:
                return
            log = newer

    def mark_chains(
        self,
        table: RegionTable,
        segs: FFI.CData,
        nsegs: int,
        records: FFI.CData,
        first: int,
        count: int,
        used: array[int],
    ) -> None:
        """:meth:`DirtyLog.try_mark_chains` on the current log, if there is
        one, redone on its replacement if it was replaced meanwhile (as
        :meth:`mark_dirty`)."""
        log = self.current
        while log is not None and not log.try_mark_chains(
            table, segs, nsegs, records, first, count, used
        ):
            newer = self.current
            if newer is log:
                return
            log = newer

    def dirty_at(self, offset: int) -> bool:
        """Whether guest physical address ``offset`` is marked in the current log.

        Args:
            offset: a guest physical address.

        Returns:
            False when no log is set; otherwise :meth:`DirtyLog.dirty_at`.
        """
        log = self.current
        return log is not None and log.dirty_at(offset)

    def __repr__(self) -> str:
        return f"<DirtyLogSlot {self.current!r}>"


@final
class RegionBitmap:
    """A memory region's view onto a :class:`DirtyLogSlot`.

    Offsets are relative to the region's first byte, whose guest physical
    address is ``base_gpa``; the log is whatever the slot holds at the time
    of each mark.
    """

    __slots__ = ("_base", "_slot")

    def __init__(self, slot: DirtyLogSlot, base_gpa: int) -> None:
        """Create the view.

        Args:
            slot: the session's log slot.
            base_gpa: guest physical address of the region's first byte.

        Raises:
            ValueError: ``base_gpa`` is negative.
        """
        if base_gpa < 0:
            raise ValueError(f"base guest address {base_gpa} is negative")
        self._slot = slot
        self._base = base_gpa

    @property
    def slot(self) -> DirtyLogSlot:
        """The slot this view marks."""
        return self._slot

    @property
    def base_gpa(self) -> int:
        """Guest physical address of offset 0."""
        return self._base

    def mark_dirty(self, offset: int, length: int) -> None:
        """Mark ``[offset, offset + length)`` of the region in the current log.

        Args:
            offset: offset of the first byte written, from the region start.
            length: number of bytes written.

        Raises:
            ValueError: ``offset`` or ``length`` is negative (only checked
                while a log is set).
        """
        # Without a log (the usual case) this is all a guest write pays.
        log = self._slot.current
        if log is None:
            return
        if offset < 0:
            raise ValueError(f"region offset {offset} is negative")
        self._slot.mark_dirty(self._base + offset, length)

    def dirty_at(self, offset: int) -> bool:
        """Whether the region byte at ``offset`` is marked in the current log.

        Args:
            offset: offset from the region start.

        Returns:
            True if its page is marked.
        """
        return offset >= 0 and self._slot.dirty_at(self._base + offset)

    def __repr__(self) -> str:
        return f"<RegionBitmap base_gpa={self._base:#x}>"
