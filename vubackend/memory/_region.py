# MappedRegion: one guest memory region mapped into this process, with its
# guest physical and frontend addresses, its pinned native view and its
# dirty-bitmap view.
#
# Rules of this module:
# - A region is immutable after construction. Several GuestMemory snapshots
#   may share one region (ADD_MEM_REG builds a new snapshot from the old
#   regions plus one), so a region counts its holders: the creator holds one
#   reference, each snapshot one more; close() drops one, and the last one
#   unmaps. The count lives under the region's lock.
# - Unmapping releases the native view first (a pinned mmap cannot be
#   closed), then closes the host mapping. Memoryviews handed out by
#   translate() are protected by CPython itself: while one is alive the
#   mapping is not unmapped (see vubackend.bitmap.SharedMapping).
# - Offsets passed to the access methods are region offsets, checked here
#   (a negative index would silently wrap in a memoryview slice). Out of
#   range is an UnmappedAddressError naming the guest address.
# - Every write marks the region's bitmap for exactly the bytes written,
#   after writing them.
# - With native_copies (postcopy), data is copied by the GIL-free native
#   helper; otherwise by memoryview slicing, which is faster for small copies.
# - An on-demand region (Xen grants with NO_ADVANCE_MAP) has no fixed mapping
#   of its bytes: its view is a placeholder for bounds, and every access maps
#   what it touches through its OnDemandMapping. It takes the slow branch of
#   the access methods (the one native copies take), so plain regions pay
#   nothing for it; `direct` says whether the view may be used directly and
#   `window` is what to slice for host memory (the view itself, or the
#   on-demand mapping whose slices are transient mappings).

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Final, Protocol, final

from vubackend._native import AtomicView
from vubackend.bitmap import Bitmap, DirtyLogSlot, NoopBitmap, RegionBitmap
from vubackend.errors import InternalError, MappingError, UnmappedAddressError
from vubackend.memory._addresses import FrontendAddress, GuestAddress
from vubackend.memory._descriptor import RegionDescriptor

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["HostMapping", "MappedRegion", "OnDemandMapping", "Window"]

_NOOP_BITMAP = NoopBitmap()
# Buffers whose len() is their byte size and that slice-assign into a
# memoryview as they are: no memoryview needed on the fast path.
_BYTES_TYPES = (bytes, bytearray)


class HostMapping(Protocol):
    """What a memory backend maps a region into: a writable view of exactly
    the region's bytes, and a way to unmap it.
    :class:`~vubackend.bitmap.SharedMapping` is one."""

    @property
    def view(self) -> memoryview:
        """Writable, C-contiguous, format ``B``, exactly the region's size."""
        ...

    def close(self) -> bool:
        """Unmap (called once, after the native view was released).

        Returns:
            True if unmapped now, False if deferred until Python views die.
        """
        ...


class Window(Protocol):
    """What a region's host memory is sliced through: a memoryview, or an
    :class:`OnDemandMapping`."""

    def __getitem__(self, key: slice, /) -> memoryview: ...


class OnDemandMapping(Protocol):
    """Per-access mapping of a region that cannot be mapped in advance."""

    def map(self, offset: int, length: int, writable: bool) -> memoryview:
        """Map the pages covering ``[offset, offset + length)`` of the region.

        Returns:
            A view of exactly those bytes (writable if asked); the pages stay
            mapped while it, or a slice of it, is alive.

        Raises:
            MappingError: the mapping failed.
        """
        ...

    def __getitem__(self, key: slice, /) -> memoryview:
        """``map(start, stop - start, writable=True)`` for a slice."""
        ...


def _as_bytes_view(data: Buffer) -> memoryview:
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


@final
class MappedRegion:
    """One guest memory region, mapped.

    Made by a :class:`~vubackend.memory.MemoryBackend`; usually used through
    :class:`~vubackend.memory.GuestMemory`. The creator owns one reference
    and gives it to a ``GuestMemory`` (or calls :meth:`close`).

    Attributes:
        gpa: guest physical address of the first byte.
        size: length in bytes.
        end: ``gpa + size``, one past the last guest physical address.
        frontend_addr: the frontend's virtual address of the first byte.
        mmap_offset: offset of the first byte in the frontend's fd.
        xen_flags: Xen mapping flags (0 for a plain mapping).
        xen_data: Xen mapping data (domain id).
    """

    __slots__ = (
        "_atomic",
        "_bitmap",
        "_demand",
        "_lock",
        "_mapping",
        "_native",
        "_refs",
        "_view",
        "direct",
        "end",
        "frontend_addr",
        "gpa",
        "mmap_offset",
        "size",
        "window",
        "xen_data",
        "xen_flags",
    )

    def __init__(
        self,
        descriptor: RegionDescriptor,
        mapping: HostMapping,
        *,
        log: DirtyLogSlot | None = None,
        native_copies: bool = False,
        on_demand: OnDemandMapping | None = None,
    ) -> None:
        """Wrap a mapping made for ``descriptor``.

        On success the region owns ``mapping``; on failure the caller still
        does.

        Args:
            descriptor: what was mapped. Its fd is not kept.
            mapping: the host mapping of exactly ``descriptor.size`` bytes.
            log: the session's dirty-log slot; writes are marked there. None
                means the region is never logged.
            native_copies: copy data with the GIL-free native helper (needed
                when touching the memory may block, as with postcopy).
            on_demand: for a region that is mapped per access: how; then
                ``mapping`` is only a placeholder of the right size.

        Raises:
            MappingError: the mapping's size differs from the descriptor's,
                or it cannot be pinned.
        """
        view = mapping.view
        if view.nbytes != descriptor.size:
            raise MappingError(
                f"memory region at GPA {descriptor.gpa:#x}: mapping has "
                f"{view.nbytes:#x} bytes, expected {descriptor.size:#x}"
            )
        try:
            self._atomic = AtomicView(view)
        except TypeError as exc:
            raise MappingError(
                f"memory region at GPA {descriptor.gpa:#x}: cannot pin its mapping: "
                f"{exc}"
            ) from exc
        self._view = view
        self._mapping = mapping
        # Read-only for mypy (Final); the region is immutable.
        self.gpa: Final[GuestAddress] = descriptor.gpa
        self.size: Final[int] = descriptor.size
        self.end: Final[int] = descriptor.gpa + descriptor.size
        self.frontend_addr: Final[FrontendAddress] = descriptor.frontend_addr
        self.mmap_offset: Final[int] = descriptor.mmap_offset
        self.xen_flags: Final[int] = descriptor.xen_flags
        self.xen_data: Final[int] = descriptor.xen_data
        self._bitmap: Bitmap = (
            _NOOP_BITMAP if log is None else RegionBitmap(log, descriptor.gpa)
        )
        self._native = native_copies or on_demand is not None
        self._demand = on_demand
        # Whether the view holds the bytes and plain slicing may copy them.
        self.direct: Final[bool] = not self._native
        self.window: Final[Window] = view if on_demand is None else on_demand
        self._lock = threading.Lock()
        self._refs = 1

    # ------------------------------------------------------------ views

    @property
    def view(self) -> memoryview:
        """The region's bytes as a writable memoryview (offset 0 is
        :attr:`gpa`). Writes through it are not logged: call
        ``bitmap.mark_dirty`` yourself, or use :meth:`write`. Slice it; never
        ``release()`` it (it is the region's own)."""
        return self._view

    @property
    def atomic(self) -> AtomicView:
        """The region's pinned native view, for atomic ring accesses
        (offsets are region offsets). Valid while the region is mapped: use it
        only under a lease on a snapshot holding the region (it is released
        when the region is unmapped, and a call racing that release would
        touch freed memory)."""
        return self._atomic

    @property
    def bitmap(self) -> Bitmap:
        """The region's dirty bitmap (offsets are region offsets)."""
        return self._bitmap

    @property
    def native_copies(self) -> bool:
        """Whether data is copied by the GIL-free native helper."""
        return self._native and self._demand is None

    @property
    def on_demand(self) -> bool:
        """Whether the region is mapped per access (no fixed mapping: its
        :attr:`view` and :attr:`atomic` are placeholders; slice
        :attr:`window` instead)."""
        return self._demand is not None

    @property
    def mapped(self) -> bool:
        """Whether the region is still mapped (some holder is left)."""
        return self._refs > 0

    def contains(self, gpa: int) -> bool:
        """Whether guest physical address ``gpa`` lies in the region.

        Args:
            gpa: a guest physical address.

        Returns:
            True if ``gpa <= address < end``.
        """
        return self.gpa <= gpa < self.end

    # ------------------------------------------------------------ access

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise UnmappedAddressError(
                f"range [{self.gpa + offset:#x}, +{length:#x}) is outside the memory "
                f"region [{self.gpa:#x}, {self.end:#x})",
                address=self.gpa + offset,
                length=length,
            )

    def read(self, offset: int, length: int) -> bytes:
        """Copy ``length`` bytes out of the region.

        Args:
            offset: region offset of the first byte.
            length: number of bytes.

        Returns:
            The bytes.

        Raises:
            UnmappedAddressError: the range is not inside the region.
        """
        self._check(offset, length)
        if self._native:
            if self._demand is not None:
                return self._demand.map(offset, length, False).tobytes()
            return self._atomic.read(offset, length)
        return self._view[offset : offset + length].tobytes()

    def read_into(self, offset: int, out: Buffer) -> int:
        """Fill the writable buffer ``out`` from the region.

        Args:
            offset: region offset of the first byte.
            out: a writable buffer; all of it is filled.

        Returns:
            The number of bytes copied (the byte size of ``out``).

        Raises:
            UnmappedAddressError: the range is not inside the region.
            TypeError: ``out`` is read-only.
        """
        dst = _as_bytes_view(out)
        length = dst.nbytes
        self._check(offset, length)
        if self._native:
            if self._demand is not None:
                dst[:] = self._demand.map(offset, length, False)
                return length
            return self._atomic.read_into(offset, dst)
        dst[:] = self._view[offset : offset + length]
        return length

    def write(self, offset: int, data: Buffer) -> None:
        """Copy ``data`` into the region, then mark the bytes dirty.

        Args:
            offset: region offset of the first byte.
            data: any buffer; all of it is written.

        Raises:
            UnmappedAddressError: the range is not inside the region.
        """
        src = data if isinstance(data, _BYTES_TYPES) else _as_bytes_view(data)
        length = len(src)
        self._check(offset, length)
        if self._native:
            if self._demand is not None:
                self._demand.map(offset, length, True)[:] = src
            else:
                self._atomic.write(offset, src)
        else:
            self._view[offset : offset + length] = src
        self._bitmap.mark_dirty(offset, length)

    # ------------------------------------------------------------ lifetime

    def incref(self) -> None:
        """Take one more reference (a new holder; ``GuestMemory`` does this
        for regions it shares with another snapshot).

        Raises:
            InternalError: the region was already unmapped.
        """
        with self._lock:
            if self._refs <= 0:
                raise InternalError(
                    f"memory region at GPA {self.gpa:#x} used after it was unmapped"
                )
            self._refs += 1

    def close(self) -> None:
        """Drop one reference; the last one unmaps the region. Extra calls
        after it is unmapped do nothing."""
        with self._lock:
            if self._refs <= 0:
                return
            self._refs -= 1
            if self._refs:
                return
        self._atomic.release()
        self._mapping.close()

    def __repr__(self) -> str:
        state = "" if self._refs > 0 else " unmapped"
        return (
            f"<MappedRegion{state} GPA [{self.gpa:#x}, {self.end:#x}) "
            f"frontend {self.frontend_addr:#x} offset {self.mmap_offset:#x}>"
        )
