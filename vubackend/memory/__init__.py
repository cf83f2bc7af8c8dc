"""vubackend.memory: guest memory.

* :class:`RegionDescriptor`: a region to map, as the frontend describes it.
* :class:`MappedRegion`: one region mapped into this process.
* :class:`GuestMemory`: an immutable snapshot of the memory table: GPA lookup,
  ``translate(gpa, length)`` across regions, frontend-address (ring address)
  translation, read/write helpers that mark the dirty bitmap.
* :class:`GuestMemoryAtomic`: the session's current snapshot; readers lease
  one with ``memory()``, the request handler swaps in new ones.
* :class:`MemoryBackend`, :class:`MmapBackend`, :func:`select_backend`: how
  regions are mapped, and what the backend lets the daemon advertise.
* :class:`PostcopyBackend`, :class:`PostcopyFaults`: the postcopy backend
  (PAGEFAULT, GIL-free copies) and a session's userfaultfd with the regions
  registered on it.
"""

from vubackend.memory._addresses import MAX_MEM_SLOTS, FrontendAddress, GuestAddress
from vubackend.memory._atomic import GuestMemoryAtomic, MemoryGuard
from vubackend.memory._backend import (
    BACKEND_PROTOCOL_FEATURES,
    PROTOCOL_FEATURE_PAGEFAULT,
    PROTOCOL_FEATURE_XEN_MMAP,
    MemoryBackend,
    select_backend,
)
from vubackend.memory._descriptor import RegionDescriptor, check_layout
from vubackend.memory._guest_memory import GuestMemory
from vubackend.memory._mmap_backend import MmapBackend
from vubackend.memory._postcopy import PostcopyBackend, PostcopyFaults
from vubackend.memory._region import HostMapping, MappedRegion

__all__ = [
    "BACKEND_PROTOCOL_FEATURES",
    "MAX_MEM_SLOTS",
    "PROTOCOL_FEATURE_PAGEFAULT",
    "PROTOCOL_FEATURE_XEN_MMAP",
    "FrontendAddress",
    "GuestAddress",
    "GuestMemory",
    "GuestMemoryAtomic",
    "HostMapping",
    "MappedRegion",
    "MemoryBackend",
    "MemoryGuard",
    "MmapBackend",
    "PostcopyBackend",
    "PostcopyFaults",
    "RegionDescriptor",
    "check_layout",
    "select_backend",
]
