# The Xen device files as the Xen memory backend uses them: the ioctl numbers
# and argument layouts of /dev/xen/privcmd and /dev/xen/gntdev (Linux
# include/uapi/xen/privcmd.h and gntdev.h), and XenDevices, the boundary
# through which every open-file operation on them goes.
#
# Rules of this module:
# - Layouts are struct formats with explicit padding, packed and unpacked
#   here only, so that tests can pin them byte for byte against the kernel's
#   (x86-64: pointers and xen_pfn_t are 8 bytes).
# - XenDevices is the lowest boundary: ioctl on an fd with a mutable
#   argument buffer (the kernel writes results back into it), mmap of an fd,
#   and what is missing on this host. HostXenDevices is the real one
#   (fcntl.ioctl, mmap.mmap); tests substitute a fake that checks the bytes
#   as the kernel reads them. Nothing above knows which one it talks to.
# - Pointers inside an argument (the frame and error arrays of
#   MMAPBATCH_V2) are addresses of ctypes arrays that the caller keeps alive
#   across the call.

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import struct
from typing import Final, Protocol, final

__all__ = [
    "GNTDEV_GRANT_REF",
    "GNTDEV_MAP_HEADER",
    "GNTDEV_UNMAP",
    "IOCTL_GNTDEV_MAP_GRANT_REF",
    "IOCTL_GNTDEV_UNMAP_GRANT_REF",
    "IOCTL_PRIVCMD_MMAPBATCH_V2",
    "MAP_NORESERVE",
    "PRIVCMD_MMAPBATCH_V2",
    "XEN_PAGE_SIZE",
    "HostXenDevices",
    "XenDevices",
    "buffer_address",
    "ioc",
]

# Xen's page size (XC_PAGE_SIZE): frames and grants are 4 KiB on x86.
XEN_PAGE_SIZE: Final = 4096

_IOC_NRSHIFT: Final = 0
_IOC_TYPESHIFT: Final = 8
_IOC_SIZESHIFT: Final = 16
_IOC_DIRSHIFT: Final = 30
_IOC_NONE: Final = 0


def ioc(direction: int, kind: str, number: int, size: int) -> int:
    """Linux's ``_IOC(dir, type, nr, size)``.

    Args:
        direction: ``_IOC_NONE`` (0), write (1), read (2) or both (3).
        kind: the one-character ioctl type (``'P'``, ``'G'``).
        number: the command number.
        size: the argument size in bytes (14 bits).

    Returns:
        The ioctl request number.
    """
    return (
        direction << _IOC_DIRSHIFT
        | size << _IOC_SIZESHIFT
        | ord(kind) << _IOC_TYPESHIFT
        | number << _IOC_NRSHIFT
    )


# struct privcmd_mmapbatch_v2 { unsigned int num; domid_t dom; (2 pad)
#   __u64 addr; const xen_pfn_t *arr; int *err; }  = 32 bytes.
PRIVCMD_MMAPBATCH_V2: Final = struct.Struct("=IH2xQQQ")
IOCTL_PRIVCMD_MMAPBATCH_V2: Final = ioc(_IOC_NONE, "P", 4, PRIVCMD_MMAPBATCH_V2.size)

# struct ioctl_gntdev_map_grant_ref { __u32 count; __u32 pad; __u64 index;
#   struct ioctl_gntdev_grant_ref refs[1]; }: a 16-byte header, then `count`
# refs of { __u32 domid; __u32 ref; }. The ioctl number carries the size of
# the header plus one ref (the UAPI's refs[1]).
GNTDEV_MAP_HEADER: Final = struct.Struct("=IIQ")
GNTDEV_GRANT_REF: Final = struct.Struct("=II")
IOCTL_GNTDEV_MAP_GRANT_REF: Final = ioc(
    _IOC_NONE, "G", 0, GNTDEV_MAP_HEADER.size + GNTDEV_GRANT_REF.size
)
# struct ioctl_gntdev_unmap_grant_ref { __u64 index; __u32 count; __u32 pad; }
GNTDEV_UNMAP: Final = struct.Struct("=QII")
IOCTL_GNTDEV_UNMAP_GRANT_REF: Final = ioc(_IOC_NONE, "G", 1, GNTDEV_UNMAP.size)

# Linux's MAP_NORESERVE (the mmap module of Python 3.11 lacks the name).
MAP_NORESERVE: Final = 0x4000
_XEN_DIR: Final = "/dev/xen"
_DEVICE_FILES: Final = ("privcmd", "gntdev")


def buffer_address(mapping: mmap.mmap) -> int:
    """The address of a writable mapping's first byte (for an ioctl
    argument). The mapping must stay open while the address is used.

    Args:
        mapping: a writable mmap.

    Returns:
        Its start address.
    """
    probe = ctypes.c_char.from_buffer(mapping)
    try:
        return ctypes.addressof(probe)
    finally:
        # Drop the buffer export at once, or the mapping could not close.
        del probe


class XenDevices(Protocol):
    """The operations the Xen backend performs on the Xen device files.

    The fds are the ones the frontend sent for the region (an open
    ``/dev/xen/privcmd`` or ``/dev/xen/gntdev``, as vm-memory expects).
    """

    def missing(self) -> str | None:
        """What this host lacks for Xen mappings, in a few words, or None
        when the devices are there."""
        ...

    def ioctl(self, fd: int, request: int, arg: bytearray) -> None:
        """Issue one ioctl with ``arg`` as its argument buffer; what the
        driver writes back lands in ``arg``.

        Raises:
            OSError: the driver refused it.
        """
        ...

    def mmap(self, fd: int, length: int, prot: int, offset: int) -> mmap.mmap:
        """Map ``length`` bytes of the device at ``offset``, shared.

        Raises:
            OSError: the driver refused the mapping.
        """
        ...


@final
class HostXenDevices:
    """The real Xen device files of this host."""

    __slots__ = ()

    def missing(self) -> str | None:
        """None if ``/dev/xen/privcmd`` and ``/dev/xen/gntdev`` exist;
        otherwise which is missing."""
        if not os.path.isdir(_XEN_DIR):
            return f"{_XEN_DIR} does not exist (not running under a Xen hypervisor)"
        absent = [
            name
            for name in _DEVICE_FILES
            if not os.path.exists(os.path.join(_XEN_DIR, name))
        ]
        if absent:
            paths = ", ".join(os.path.join(_XEN_DIR, name) for name in absent)
            return f"{paths} missing (load the xen-privcmd / xen-gntdev modules)"
        return None

    def ioctl(self, fd: int, request: int, arg: bytearray) -> None:
        """``fcntl.ioctl`` with a mutable buffer."""
        fcntl.ioctl(fd, request, arg, True)

    def mmap(self, fd: int, length: int, prot: int, offset: int) -> mmap.mmap:
        """``mmap.mmap`` shared, without reserving swap."""
        return mmap.mmap(
            fd,
            length,
            flags=mmap.MAP_SHARED | MAP_NORESERVE,
            prot=prot,
            offset=offset,
        )

    def __repr__(self) -> str:
        return "HostXenDevices()"
