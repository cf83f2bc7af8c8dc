# The memory-backend interface and the one place a backend is chosen.
#
# Rules of this module:
# - A backend decides three things (docs/design.md, "Memory backends"): how
#   a region is mapped (map_region), which backend-specific vhost-user
#   protocol features the daemon may advertise (protocol_features), and
#   whether guest data must be copied by GIL-free native calls
#   (needs_native_copies: postcopy, where a touch may block on a fault).
# - The memory layer sits below vubackend.protocol, so protocol features are
#   plain int masks here, with the spec's bit numbers. The daemon advertises
#   (device bits & ~BACKEND_PROTOCOL_FEATURES) | backend.protocol_features.
# - Xen and postcopy exclude each other, as the Rust crate's cargo features
#   do: postcopy registers each region's local mapping with userfaultfd,
#   which needs fixed mappings for the whole session, while Xen grant memory
#   may be mapped only transiently per access. Asking for both is refused at
#   run time (MappingError) and, through the overloads of select_backend, is
#   a type error for literal arguments and for unnarrowed bools.

from __future__ import annotations

from typing import Final, Literal, Protocol, overload

from vubackend.bitmap import DirtyLogSlot
from vubackend.errors import MappingError
from vubackend.memory._descriptor import RegionDescriptor
from vubackend.memory._mmap_backend import MmapBackend
from vubackend.memory._region import MappedRegion
from vubackend.memory._xen import XenBackend

__all__ = [
    "BACKEND_PROTOCOL_FEATURES",
    "PROTOCOL_FEATURE_PAGEFAULT",
    "PROTOCOL_FEATURE_XEN_MMAP",
    "MemoryBackend",
    "select_backend",
]

# vhost-user protocol feature bits (VHOST_USER_PROTOCOL_F_*), as masks.
PROTOCOL_FEATURE_PAGEFAULT: Final = 1 << 8  # postcopy (vhost-user-protocol.md §4.8)
PROTOCOL_FEATURE_XEN_MMAP: Final = 1 << 17  # Xen mapping flags (§4.13)
# The bits that only the memory backend may turn on.
BACKEND_PROTOCOL_FEATURES: Final = (
    PROTOCOL_FEATURE_PAGEFAULT | PROTOCOL_FEATURE_XEN_MMAP
)


class MemoryBackend(Protocol):
    """How guest memory regions are mapped.

    Implemented by :class:`~vubackend.memory.MmapBackend`,
    :class:`~vubackend.memory.XenBackend` (foreign and grant mapping) and
    :class:`~vubackend.memory.PostcopyBackend` (userfaultfd).
    """

    @property
    def name(self) -> str:
        """A short name for messages and logs (``"mmap"``, ``"xen"``...)."""
        ...

    @property
    def protocol_features(self) -> int:
        """The vhost-user protocol feature bits, among
        :data:`BACKEND_PROTOCOL_FEATURES`, that this backend lets the daemon
        advertise: :data:`PROTOCOL_FEATURE_XEN_MMAP` for Xen,
        :data:`PROTOCOL_FEATURE_PAGEFAULT` for postcopy, 0 for plain mmap."""
        ...

    @property
    def needs_native_copies(self) -> bool:
        """Whether guest data must be copied by GIL-free native calls (a
        thread touching postcopy memory with the GIL held can deadlock the
        process)."""
        ...

    def map_region(
        self, descriptor: RegionDescriptor, log: DirtyLogSlot | None = None
    ) -> MappedRegion:
        """Map one region.

        Args:
            descriptor: the region; its fd is borrowed (not closed, not kept).
            log: the session's dirty-log slot, or None for no logging.

        Returns:
            The mapped region, owned by the caller.

        Raises:
            MappingError: the region cannot be mapped by this backend.
        """
        ...


@overload
def select_backend(
    *, xen: Literal[False] = False, postcopy: Literal[False] = False
) -> MmapBackend: ...
@overload
def select_backend(*, xen: bool, postcopy: Literal[False] = False) -> MemoryBackend: ...
@overload
def select_backend(*, xen: Literal[False] = False, postcopy: bool) -> MemoryBackend: ...
def select_backend(*, xen: bool = False, postcopy: bool = False) -> MemoryBackend:
    """Choose the memory backend of a daemon (the ``vubackend[xen]`` and
    ``vubackend[postcopy]`` extras).

    Xen together with postcopy matches no overload, so mypy rejects
    ``select_backend(xen=True, postcopy=True)``, and also two plain ``bool``
    arguments that could both be True: narrow one to ``False`` first (one
    ``bool`` with the other left out or ``False`` is fine).

    Args:
        xen: map regions with Xen foreign or grant mappings (XEN_MMAP).
        postcopy: support postcopy live migration (PAGEFAULT).

    Returns:
        The backend: :class:`MmapBackend` when neither is asked for.

    Raises:
        MappingError: both were asked for (they exclude each other), or the
            requested backend is not available in this version.
        XenUnavailableError: xen was asked for and this host has no Xen
            device files (a MappingError; the message says what is missing).

    ``postcopy=True`` gives a :class:`~vubackend.memory.PostcopyBackend`.
    """
    if xen and postcopy:
        raise MappingError(
            "the xen and postcopy memory backends exclude each other: postcopy "
            "registers fixed mappings with userfaultfd, xen maps grant memory "
            "on demand; choose one"
        )
    if xen:
        return XenBackend()
    if postcopy:
        from vubackend.memory._postcopy import PostcopyBackend

        return PostcopyBackend()
    return MmapBackend()
