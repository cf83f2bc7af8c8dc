# XenBackend: guest memory of a Xen domain, mapped through the Xen device
# files (the `xen` extra; rust-vmm-vhost-user-backend.md §3.5, the model is
# vm-memory's mmap/xen.rs).
#
# Rules of this module:
# - The region's fd is what the frontend sent: an open /dev/xen/privcmd for
#   a foreign region, /dev/xen/gntdev for a grant region, as vm-memory
#   expects; the mmap offset must then be 0 and the GPA page-aligned. Flags 0
#   is a plain shared mapping of the fd, as with MmapBackend.
# - Flag rules are vm-memory's MmapXenFlags::is_valid(): exactly one of
#   FOREIGN and GRANT; NO_ADVANCE_MAP only with GRANT. Flag values in the
#   memory layer are vm-memory's (NO_ADVANCE_MAP = 0x8); the vhost-user
#   message carries bit 8 (0x100), converted by xen_flags_from_wire().
# - Foreign: the whole region (rounded up to pages) is mmapped from privcmd,
#   then populated with IOCTL_PRIVCMD_MMAPBATCH_V2 for frames gpa/page + i of
#   domain `xen_data`; every per-frame error is checked.
# - Grant: refs are derived from the GPA (bit 63 marks grant addresses and is
#   masked off): ref = (gpa & ~(1 << 63)) / page. IOCTL_GNTDEV_MAP_GRANT_REF
#   returns an index to mmap at; when the mapping dies, the matching
#   IOCTL_GNTDEV_UNMAP_GRANT_REF is issued (a weakref finalizer on the mmap,
#   so that a mapping kept alive by a memoryview is unmapped after it, never
#   under it). The gntdev fd is duplicated once per region; the duplicate
#   closes when the region and all its transient mappings are gone.
# - Grant with NO_ADVANCE_MAP: nothing is mapped up front. The region's
#   fixed view is an untouched private placeholder (for bounds only); every
#   access maps the pages it covers, copies, and unmaps (MappedRegion's
#   on-demand path), and a slice of the region's window is a transient
#   mapping that lives as long as the memoryview does. Ring structures must
#   not lie in such a region (the ring layer refuses them).
# - Every mapping made is undone on any failure; the descriptor's fd is
#   borrowed (never closed).

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import threading
import weakref
from collections.abc import Callable
from typing import Final, final

from vubackend.bitmap import DirtyLogSlot, SharedMapping
from vubackend.errors import MappingError, XenUnavailableError
from vubackend.memory._descriptor import RegionDescriptor
from vubackend.memory._region import MappedRegion
from vubackend.memory._xen_devices import (
    GNTDEV_GRANT_REF,
    GNTDEV_MAP_HEADER,
    GNTDEV_UNMAP,
    IOCTL_GNTDEV_MAP_GRANT_REF,
    IOCTL_GNTDEV_UNMAP_GRANT_REF,
    IOCTL_PRIVCMD_MMAPBATCH_V2,
    MAP_NORESERVE,
    PRIVCMD_MMAPBATCH_V2,
    XEN_PAGE_SIZE,
    HostXenDevices,
    XenDevices,
    buffer_address,
)

__all__ = [
    "XEN_FOREIGN",
    "XEN_GRANT",
    "XEN_GRANT_ADDR_OFF",
    "XEN_NO_ADVANCE_MAP",
    "XenBackend",
    "xen_flags_from_wire",
]

# Region flags in the memory layer (vm-memory's MmapXenFlags values).
XEN_FOREIGN: Final = 0x1
XEN_GRANT: Final = 0x2
XEN_NO_ADVANCE_MAP: Final = 0x8
# Bit 63 of a GPA marks a grant address (Xen's grant DMA).
XEN_GRANT_ADDR_OFF: Final = 1 << 63
# NO_ADVANCE_MAP as the vhost-user message carries it (bit 8).
_WIRE_NO_ADVANCE_MAP: Final = 0x100
# ... or vm-memory's value, which rust-vmm frontends send.
_WIRE_ON_DEMAND: Final = _WIRE_NO_ADVANCE_MAP | XEN_NO_ADVANCE_MAP
_WIRE_KNOWN: Final = XEN_FOREIGN | XEN_GRANT | _WIRE_ON_DEMAND
# VHOST_USER_PROTOCOL_F_XEN_MMAP (the same mask as _backend.py's, which
# imports this module).
_XEN_MMAP: Final = 1 << 17
_RW: Final = mmap.PROT_READ | mmap.PROT_WRITE
_PAGE: Final = XEN_PAGE_SIZE


def xen_flags_from_wire(flags: int) -> int:
    """Convert ``xen_mmap_flags`` of a vhost-user memory region (bit 8, or
    vm-memory's 0x8 = no advance mapping) to the memory layer's flags
    (vm-memory's values).

    Args:
        flags: the u32 from the message.

    Returns:
        The flags for :class:`~vubackend.memory.RegionDescriptor`.

    Raises:
        MappingError: unknown bits are set.
    """
    if flags & ~_WIRE_KNOWN:
        raise MappingError(f"unknown xen mmap flags {flags & ~_WIRE_KNOWN:#x}")
    advance = XEN_NO_ADVANCE_MAP if flags & _WIRE_ON_DEMAND else 0
    return flags & (XEN_FOREIGN | XEN_GRANT) | advance


def _pages(length: int) -> int:
    return -(-length // _PAGE)


def _check(descriptor: RegionDescriptor) -> str:
    # The problem with the descriptor's flags and layout, or "" if none.
    flags = descriptor.xen_flags
    if flags & XEN_FOREIGN and flags & XEN_GRANT:
        return "xen flags name both foreign and grant mapping"
    if not flags & XEN_GRANT and flags & XEN_NO_ADVANCE_MAP:
        return "only a grant region may be mapped on demand (NO_ADVANCE_MAP)"
    if descriptor.mmap_offset:
        return f"mmap offset {descriptor.mmap_offset:#x} must be 0 for a xen mapping"
    if descriptor.gpa % _PAGE:
        return f"a xen region must start on a {_PAGE:#x}-byte page"
    if flags & XEN_FOREIGN and descriptor.xen_data > 0xFFFF:
        return f"domain id {descriptor.xen_data:#x} does not fit in a u16"
    return ""


@final
class _Mapped:
    # A HostMapping over an mmap of whole pages: the view is the region's
    # exact size. Unmapping is the mmap's own (plus any finalizer on it);
    # `done` runs after it (the grant device's close).

    __slots__ = ("_done", "_mmap", "_view")

    def __init__(
        self, mapping: mmap.mmap, size: int, done: Callable[[], None] | None = None
    ) -> None:
        self._mmap: mmap.mmap | None = mapping
        self._view: memoryview | None = memoryview(mapping)[:size]
        self._done = done

    @property
    def view(self) -> memoryview:
        assert self._view is not None
        return self._view

    def close(self) -> bool:
        view, mapping = self._view, self._mmap
        self._view = self._mmap = None
        if view is None or mapping is None:
            return True
        unmapped = True
        try:
            view.release()
            mapping.close()
        except BufferError:
            # A translate() view is alive: the mmap is unmapped (and its
            # finalizer run) when the last view dies.
            unmapped = False
        del view, mapping
        if self._done is not None:
            self._done()
        return unmapped


@final
class _GrantDevice:
    # One region's gntdev fd (a duplicate) and the map/unmap ioctls on it.
    # The fd closes once the region is closed and no grant mapping of it is
    # left (a transient one may outlive the region in a memoryview).

    __slots__ = (
        "__weakref__",
        "_close_fd",
        "_closing",
        "_devices",
        "_domid",
        "_fd",
        "_live",
        "_lock",
    )

    def __init__(self, devices: XenDevices, fd: int, domid: int) -> None:
        self._devices = devices
        self._fd = os.dup(fd)
        self._domid = domid
        self._lock = threading.Lock()
        self._live = 0
        self._closing = False
        # Closes the fd exactly once: when called, or when the device dies.
        self._close_fd = weakref.finalize(self, os.close, self._fd)

    def map(self, gpa: int, count: int, prot: int, what: str) -> mmap.mmap:
        # Map `count` grant pages starting at guest (grant) address `gpa`.
        first = ((gpa & ~XEN_GRANT_ADDR_OFF) // _PAGE) & 0xFFFF_FFFF
        if first + count > 1 << 32:
            raise MappingError(f"{what}: grant references run past 2**32")
        arg = bytearray(GNTDEV_MAP_HEADER.size + GNTDEV_GRANT_REF.size * count)
        GNTDEV_MAP_HEADER.pack_into(arg, 0, count, 0, 0)
        for i in range(count):
            GNTDEV_GRANT_REF.pack_into(
                arg, GNTDEV_MAP_HEADER.size + i * 8, self._domid, first + i
            )
        try:
            self._devices.ioctl(self._fd, IOCTL_GNTDEV_MAP_GRANT_REF, arg)
        except OSError as exc:
            raise MappingError(
                f"{what}: gntdev refused to map grants {first:#x}+{count} of domain "
                f"{self._domid}: {exc.strerror}"
            ) from exc
        index = GNTDEV_MAP_HEADER.unpack_from(arg)[2]
        try:
            mapping = self._devices.mmap(self._fd, count * _PAGE, prot, index)
        except OSError as exc:
            self._unmap(index, count)
            raise MappingError(
                f"{what}: cannot mmap grants {first:#x}+{count} of domain "
                f"{self._domid}: {exc.strerror}"
            ) from exc
        with self._lock:
            self._live += 1
        weakref.finalize(mapping, self._unmapped, index, count)
        return mapping

    def _unmap(self, index: int, count: int) -> None:
        arg = bytearray(GNTDEV_UNMAP.pack(index, count, 0))
        # On failure there is nothing more to do: the kernel frees the
        # grants with the fd.
        with contextlib.suppress(OSError):
            self._devices.ioctl(self._fd, IOCTL_GNTDEV_UNMAP_GRANT_REF, arg)

    def _unmapped(self, index: int, count: int) -> None:
        # A grant mapping died (after its munmap): release its grants.
        self._unmap(index, count)
        with self._lock:
            self._live -= 1
            last = self._closing and not self._live
        if last:
            self._close_fd()

    def close(self) -> None:
        with self._lock:
            self._closing = True
            last = not self._live
        if last:
            self._close_fd()


@final
class _GrantWindow:
    # On-demand access to a NO_ADVANCE_MAP grant region (the region's
    # `window`): each map() or slice maps exactly the pages it covers.

    __slots__ = ("_device", "_gpa", "_size", "_what")

    def __init__(self, device: _GrantDevice, gpa: int, size: int, what: str) -> None:
        self._device = device
        self._gpa = gpa
        self._size = size
        self._what = what

    def map(self, offset: int, length: int, writable: bool) -> memoryview:
        if length <= 0:
            return memoryview(bytearray())
        start = offset - offset % _PAGE
        count = _pages(offset + length - start)
        prot = _RW if writable else mmap.PROT_READ
        mapping = self._device.map(self._gpa + start, count, prot, self._what)
        inner = offset - start
        return memoryview(mapping)[inner : inner + length]

    def __getitem__(self, key: slice, /) -> memoryview:
        start, stop, step = key.indices(self._size)
        if step != 1:
            raise ValueError("an on-demand region is sliced with step 1 only")
        return self.map(start, max(0, stop - start), True)


def _placeholder(size: int, done: Callable[[], None]) -> _Mapped:
    # Address space for bounds only: private, never touched, no swap.
    rounded = _pages(size) * _PAGE
    flags = mmap.MAP_PRIVATE | MAP_NORESERVE
    return _Mapped(mmap.mmap(-1, rounded, flags=flags), size, done)


@final
class XenBackend:
    """Maps regions of a Xen domain's memory: foreign mappings through
    ``/dev/xen/privcmd``, grant mappings through ``/dev/xen/gntdev``, on
    demand per access when the region asks for it (the ``vubackend[xen]``
    extra). Regions with no Xen flag are mapped plainly.

    Satisfies :class:`~vubackend.memory.MemoryBackend`; advertises
    XEN_MMAP, which the daemon then also requires.
    """

    __slots__ = ("_devices",)

    def __init__(self, *, devices: XenDevices | None = None) -> None:
        """Create the backend.

        Args:
            devices: the device-file operations; the host's own by default.

        Raises:
            XenUnavailableError: the host has no Xen device files (the message
                says which are missing).
        """
        self._devices: XenDevices = HostXenDevices() if devices is None else devices
        missing = self._devices.missing()
        if missing is not None:
            raise XenUnavailableError(f"the xen memory backend cannot run: {missing}")

    @property
    def name(self) -> str:
        """``"xen"``."""
        return "xen"

    @property
    def protocol_features(self) -> int:
        """XEN_MMAP."""
        return _XEN_MMAP

    @property
    def needs_native_copies(self) -> bool:
        """False."""
        return False

    def map_region(
        self, descriptor: RegionDescriptor, log: DirtyLogSlot | None = None
    ) -> MappedRegion:
        """Map one region as its Xen flags say.

        Args:
            descriptor: the region; its fd (privcmd, gntdev, or a plain file
                for flags 0) is borrowed.
            log: the session's dirty-log slot, or None for no logging.

        Returns:
            The mapped region, owned by the caller.

        Raises:
            MappingError: invalid flags or layout, or the driver refused.
        """
        where = f"memory region at GPA {descriptor.gpa:#x}"
        flags = descriptor.xen_flags
        if not flags:
            shared = SharedMapping.map(
                descriptor.fd,
                offset=descriptor.mmap_offset,
                size=descriptor.size,
                what=where,
            )
            return self._wrap(descriptor, shared, log)
        problem = _check(descriptor)
        if problem:
            raise MappingError(f"{where}: {problem}")
        if flags & XEN_FOREIGN:
            return self._wrap(descriptor, self._foreign(descriptor, where), log)
        device = _GrantDevice(self._devices, descriptor.fd, descriptor.xen_data)
        try:
            if flags & XEN_NO_ADVANCE_MAP:
                window = _GrantWindow(device, descriptor.gpa, descriptor.size, where)
                placeholder = _placeholder(descriptor.size, device.close)
                return self._wrap(descriptor, placeholder, log, window)
            count = _pages(descriptor.size)
            mapping = device.map(descriptor.gpa, count, _RW, where)
            mapped = _Mapped(mapping, descriptor.size, device.close)
            del mapping
            return self._wrap(descriptor, mapped, log)
        except BaseException:
            device.close()
            raise

    def _foreign(self, descriptor: RegionDescriptor, where: str) -> _Mapped:
        count = _pages(descriptor.size)
        domid = descriptor.xen_data
        try:
            mapping = self._devices.mmap(descriptor.fd, count * _PAGE, _RW, 0)
        except OSError as exc:
            raise MappingError(f"{where}: cannot mmap privcmd: {exc.strerror}") from exc
        try:
            first = descriptor.gpa // _PAGE
            frames = (ctypes.c_uint64 * count)(*range(first, first + count))
            errors = (ctypes.c_int * count)()
            arg = bytearray(
                PRIVCMD_MMAPBATCH_V2.pack(
                    count,
                    domid,
                    buffer_address(mapping),
                    ctypes.addressof(frames),
                    ctypes.addressof(errors),
                )
            )
            try:
                self._devices.ioctl(descriptor.fd, IOCTL_PRIVCMD_MMAPBATCH_V2, arg)
            except OSError as exc:
                raise MappingError(
                    f"{where}: privcmd refused to map frames {first:#x}+{count} of "
                    f"domain {domid}: {exc.strerror}"
                ) from exc
            bad = next((i for i in range(count) if errors[i]), None)
            if bad is not None:
                raise MappingError(
                    f"{where}: frame {first + bad:#x} of domain {domid} could not be "
                    f"mapped: {os.strerror(-errors[bad])}"
                )
            return _Mapped(mapping, descriptor.size)
        except BaseException:
            mapping.close()
            raise

    @staticmethod
    def _wrap(
        descriptor: RegionDescriptor,
        mapping: _Mapped | SharedMapping,
        log: DirtyLogSlot | None,
        window: _GrantWindow | None = None,
    ) -> MappedRegion:
        try:
            return MappedRegion(descriptor, mapping, log=log, on_demand=window)
        except BaseException:
            mapping.close()
            raise

    def __repr__(self) -> str:
        return f"XenBackend(devices={self._devices!r})"
