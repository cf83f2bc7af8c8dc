# MmapBackend: the plain memory backend. Each region is a MAP_SHARED mapping
# of the frontend's fd (memfd, tmpfs, hugetlbfs, any regular file).
#
# Rules of this module:
# - The descriptor's fd is borrowed (see RegionDescriptor): mapping neither
#   closes it nor keeps it; the mapping holds its own duplicate.
# - All the checks on the range (u64 overflow, inside the file, alignment of
#   the offset to the fd's page size, huge pages) are SharedMapping's, in
#   vubackend.bitmap; this module adds what is specific to plain mapping:
#   Xen mapping flags are refused (they need the Xen backend).
# - Advertises no backend-specific protocol feature (neither XEN_MMAP nor
#   PAGEFAULT).

from __future__ import annotations

from typing import final

from vubackend.bitmap import DirtyLogSlot, SharedMapping
from vubackend.errors import MappingError
from vubackend.memory._descriptor import RegionDescriptor
from vubackend.memory._region import MappedRegion

__all__ = ["MmapBackend"]


@final
class MmapBackend:
    """Maps each region with a plain shared ``mmap`` of its fd.

    Satisfies :class:`~vubackend.memory.MemoryBackend`. Stateless apart from
    its options: one instance can serve any number of sessions.
    """

    __slots__ = ("_native",)

    def __init__(self, *, native_copies: bool = False) -> None:
        """Create the backend.

        Args:
            native_copies: copy guest data with the GIL-free native helper
                instead of memoryview slicing (what postcopy requires; useful
                on its own when copies are large and threads many).
        """
        self._native = native_copies

    @property
    def name(self) -> str:
        """``"mmap"``."""
        return "mmap"

    @property
    def protocol_features(self) -> int:
        """0: a plain mapping enables neither XEN_MMAP nor PAGEFAULT."""
        return 0

    @property
    def needs_native_copies(self) -> bool:
        """Whether regions copy data with the GIL-free native helper."""
        return self._native

    def map_region(
        self, descriptor: RegionDescriptor, log: DirtyLogSlot | None = None
    ) -> MappedRegion:
        """Map one region shared and read-write.

        Args:
            descriptor: the region; its fd is borrowed.
            log: the session's dirty-log slot, or None for no logging.

        Returns:
            The mapped region, owned by the caller.

        Raises:
            MappingError: the descriptor has Xen flags, its range runs past
                the end of the file, or ``mmap`` failed.
        """
        where = f"memory region at GPA {descriptor.gpa:#x}"
        if descriptor.xen_flags:
            raise MappingError(
                f"{where}: xen mapping flags {descriptor.xen_flags:#x} need the xen "
                f"memory backend"
            )
        mapping = SharedMapping.map(
            descriptor.fd,
            offset=descriptor.mmap_offset,
            size=descriptor.size,
            what=where,
        )
        try:
            return MappedRegion(
                descriptor, mapping, log=log, native_copies=self._native
            )
        except BaseException:
            mapping.close()
            raise

    def __repr__(self) -> str:
        return f"MmapBackend(native_copies={self._native})"
