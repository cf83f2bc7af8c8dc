"""vubackend.bitmap: dirty-page bitmaps for live migration.

* :class:`Bitmap`: the role (``mark_dirty(offset, length)``, ``dirty_at``).
* :class:`NoopBitmap`: records nothing (memory that is not logged).
* :class:`DirtyLog`: the frontend's shared log from ``SET_LOG_BASE``, one bit
  per 4 KiB guest physical page, set with an atomic OR.
* :class:`DirtyLogSlot`: the session's current log, replaceable while other
  threads mark; :class:`RegionBitmap`: a region's view onto it.
* :class:`SharedMapping`: the checked ``MAP_SHARED`` mapping of a byte range
  of a frontend's fd, used for the log and for guest memory.
"""

from vubackend.bitmap._base import LOG_PAGE_SHIFT, LOG_PAGE_SIZE, Bitmap, NoopBitmap
from vubackend.bitmap._log import DirtyLog
from vubackend.bitmap._mapping import U64_LIMIT, SharedMapping, fd_page_size
from vubackend.bitmap._slot import DirtyLogSlot, RegionBitmap

__all__ = [
    "LOG_PAGE_SHIFT",
    "LOG_PAGE_SIZE",
    "U64_LIMIT",
    "Bitmap",
    "DirtyLog",
    "DirtyLogSlot",
    "NoopBitmap",
    "RegionBitmap",
    "SharedMapping",
    "fd_page_size",
]
