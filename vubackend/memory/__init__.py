"""vubackend.memory: guest memory.

* :class:`RegionDescriptor`: a region to map, as the frontend describes it.
* :class:`MappedRegion`: one region mapped into this process.
* :class:`GuestMemory`: an immutable snapshot of the memory table: GPA lookup,
  ``translate(gpa, length)`` across regions, frontend-address (ring address)
  translation, read/write helpers that mark the dirty bitmap.
* :class:`GuestMemoryAtomic`: the session's current snapshot; readers lease
  one with ``memory()`` (a :class:`MemoryGuard`), or follow it over a burst
  of accesses with ``lease()`` (a :class:`MemoryLease`); the request handler
  swaps in new ones.
* :class:`MemoryBackend`, :class:`MmapBackend`, :func:`select_backend`: how
  regions are mapped, and what the backend lets the daemon advertise.
* :class:`PostcopyBackend`, :class:`PostcopyFaults`: the postcopy backend
  (PAGEFAULT, GIL-free copies) and a session's userfaultfd with the regions
  registered on it.
* :class:`XenBackend` (the ``xen`` extra): Xen foreign and grant mappings
  through ``/dev/xen/privcmd`` and ``/dev/xen/gntdev``, per access for
  regions that cannot be mapped in advance. :class:`XenDevices` is its
  boundary to the device files (:class:`HostXenDevices` the real one);
  :func:`xen_flags_from_wire` converts a message's ``xen_mmap_flags``;
  ``XEN_FOREIGN``, ``XEN_GRANT``, ``XEN_NO_ADVANCE_MAP`` are the region
  flags and ``XEN_GRANT_ADDR_OFF`` the bit that marks grant addresses.
* :class:`XenLibraries`: ctypes bindings of libxenforeignmemory,
  libxengnttab and libxenctrl, with the C names, loaded lazily.
* :class:`OnDemandMapping`, :class:`Window`: how a region mapped per access
  is reached (``MappedRegion.window``).
"""

from vubackend.memory._addresses import MAX_MEM_SLOTS, FrontendAddress, GuestAddress
from vubackend.memory._atomic import GuestMemoryAtomic, MemoryGuard, MemoryLease
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
from vubackend.memory._region import (
    HostMapping,
    MappedRegion,
    OnDemandMapping,
    Window,
)
from vubackend.memory._xen import (
    XEN_FOREIGN,
    XEN_GRANT,
    XEN_GRANT_ADDR_OFF,
    XEN_NO_ADVANCE_MAP,
    XenBackend,
    xen_flags_from_wire,
)
from vubackend.memory._xen_devices import HostXenDevices, XenDevices
from vubackend.memory._xen_libs import XenLibraries

__all__ = [
    "BACKEND_PROTOCOL_FEATURES",
    "MAX_MEM_SLOTS",
    "PROTOCOL_FEATURE_PAGEFAULT",
    "PROTOCOL_FEATURE_XEN_MMAP",
    "XEN_FOREIGN",
    "XEN_GRANT",
    "XEN_GRANT_ADDR_OFF",
    "XEN_NO_ADVANCE_MAP",
    "FrontendAddress",
    "GuestAddress",
    "GuestMemory",
    "GuestMemoryAtomic",
    "HostMapping",
    "HostXenDevices",
    "MappedRegion",
    "MemoryBackend",
    "MemoryGuard",
    "MemoryLease",
    "MmapBackend",
    "OnDemandMapping",
    "PostcopyBackend",
    "PostcopyFaults",
    "RegionDescriptor",
    "Window",
    "XenBackend",
    "XenDevices",
    "XenLibraries",
    "check_layout",
    "select_backend",
    "xen_flags_from_wire",
]
