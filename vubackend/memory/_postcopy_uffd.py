# The userfaultfd kernel ABI as the postcopy backend needs it: create a
# userfaultfd, negotiate its API, register and unregister ranges, drop the
# pages of a range from this process (madvise), and find the page size and
# host address of a mapping.
#
# Rules of this module:
# - Reached through ctypes (libc's syscall, ioctl, madvise). ctypes releases
#   the GIL around every foreign call; none of these calls blocks on a fault.
# - ioctl numbers are _IOWR/_IOR(0xAA, nr, sizeof(struct)) from
#   linux/userfaultfd.h (real-peers.md §5 lists the values); the struct
#   layouts are struct.Struct formats.
# - Failures raise MappingError naming the call and the errno text.

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import struct
from collections.abc import Mapping
from typing import Final

from vubackend.errors import MappingError

__all__ = [
    "IOCTL_COPY",
    "UFFDIO_API",
    "UFFDIO_REGISTER",
    "UFFDIO_UNREGISTER",
    "drop_pages",
    "host_address",
    "mapping_page_size",
    "open_userfaultfd",
    "register_missing",
    "unregister",
]

_API: Final = struct.Struct("=QQQ")  # uffdio_api {api, features, ioctls}
_RANGE: Final = struct.Struct("=QQ")  # uffdio_range {start, len}
_REGISTER: Final = struct.Struct("=QQQQ")  # uffdio_register {range, mode, ioctls}

UFFDIO_API: Final = 0xC018AA3F
UFFDIO_REGISTER: Final = 0xC020AA00
UFFDIO_UNREGISTER: Final = 0x8010AA01
_USERFAULTFD_IOC_NEW: Final = 0xAA00
_UFFD_API: Final = 0xAA
_MODE_MISSING: Final = 1
_USER_MODE_ONLY: Final = 1
IOCTL_COPY: Final = 1 << 0x03
"""The UFFDIO_COPY bit of the ``ioctls`` a registration allows (the
frontend places pages with it)."""
_MADV_DONTNEED: Final = 4

_SYSCALL_NUMBERS: Final[Mapping[str, int]] = {
    "x86_64": 323,
    "aarch64": 282,
    "riscv64": 282,
    "ppc64le": 364,
    "s390x": 355,
}


def _load_libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
    libc.ioctl.restype = ctypes.c_int
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    libc.madvise.restype = ctypes.c_int
    return libc


_LIBC: Final = _load_libc()


def _ioctl(
    fd: int, request: int, layout: struct.Struct, *values: int
) -> tuple[int, ...]:
    buffer = ctypes.create_string_buffer(layout.pack(*values), layout.size)
    if _LIBC.ioctl(fd, request, buffer) < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return tuple(int(v) for v in layout.unpack(buffer.raw))


def open_userfaultfd() -> int:
    """Create a userfaultfd (``O_CLOEXEC | O_NONBLOCK``) and negotiate its API
    with no features, as vhost-user-protocol.md §4.8 asks.

    Tried in order: the syscall, /dev/userfaultfd, then the syscall with
    UFFD_USER_MODE_ONLY (what an unprivileged process may get; then a system
    call such as ``preadv`` into a missing page fails with EFAULT instead of
    waiting for it, so it comes last).

    Returns:
        The fd, owned by the caller.

    Raises:
        MappingError: no way worked, or UFFDIO_API failed.
    """
    flags = os.O_CLOEXEC | os.O_NONBLOCK
    reasons: list[str] = []
    number = _SYSCALL_NUMBERS.get(platform.machine())
    if number is None:
        reasons.append(f"no userfaultfd syscall number for {platform.machine()}")
    fd = _by_syscall(number, flags, reasons)
    if fd < 0:
        fd = _by_device(flags, reasons)
    if fd < 0:
        fd = _by_syscall(number, flags | _USER_MODE_ONLY, reasons)
    if fd < 0:
        raise MappingError("userfaultfd is unavailable: " + "; ".join(reasons))
    try:
        _ioctl(fd, UFFDIO_API, _API, _UFFD_API, 0, 0)
    except OSError as exc:
        os.close(fd)
        raise MappingError(f"UFFDIO_API failed: {exc.strerror}") from exc
    return fd


def _by_syscall(number: int | None, flags: int, reasons: list[str]) -> int:
    if number is None:
        return -1
    fd = int(_LIBC.syscall(ctypes.c_long(number), ctypes.c_int(flags)))
    if fd < 0:
        reasons.append(f"userfaultfd({flags:#x}): {os.strerror(ctypes.get_errno())}")
    return fd


def _by_device(flags: int, reasons: list[str]) -> int:
    try:
        device = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        reasons.append(f"/dev/userfaultfd: {exc.strerror}")
        return -1
    try:
        fd = int(_LIBC.ioctl(device, _USERFAULTFD_IOC_NEW, flags))
        if fd < 0:
            reasons.append(f"USERFAULTFD_IOC_NEW: {os.strerror(ctypes.get_errno())}")
        return fd
    finally:
        os.close(device)


def register_missing(fd: int, start: int, length: int) -> int:
    """UFFDIO_REGISTER ``[start, start + length)`` in MISSING mode.

    Returns:
        The ioctls allowed on the range (``1 << _UFFDIO_*`` bits).

    Raises:
        MappingError: the kernel refused.
    """
    try:
        out = _ioctl(fd, UFFDIO_REGISTER, _REGISTER, start, length, _MODE_MISSING, 0)
    except OSError as exc:
        raise MappingError(
            f"UFFDIO_REGISTER of [{start:#x}, +{length:#x}) failed: {exc.strerror}"
        ) from exc
    return out[3]


def unregister(fd: int, start: int, length: int) -> None:
    """UFFDIO_UNREGISTER ``[start, start + length)``; the kernel wakes the
    threads waiting on a fault there (they then see the page as it is).

    Raises:
        MappingError: the kernel refused.
    """
    try:
        _ioctl(fd, UFFDIO_UNREGISTER, _RANGE, start, length)
    except OSError as exc:
        raise MappingError(
            f"UFFDIO_UNREGISTER of [{start:#x}, +{length:#x}) failed: {exc.strerror}"
        ) from exc


def drop_pages(start: int, length: int) -> None:
    """``madvise(MADV_DONTNEED)``: forget this process's page-table entries
    of the range (a shared file keeps its content), so that a page missing
    from the file faults on the next touch.

    Raises:
        MappingError: the kernel refused.
    """
    if _LIBC.madvise(start, length, _MADV_DONTNEED) < 0:
        code = ctypes.get_errno()
        raise MappingError(
            f"madvise(DONTNEED) of [{start:#x}, +{length:#x}) failed: "
            f"{os.strerror(code)}"
        )


def host_address(view: memoryview) -> int:
    """The address of the first byte of a writable buffer in this process."""
    anchor = ctypes.c_char.from_buffer(view)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor


def mapping_page_size(address: int) -> int:
    """The page size of the mapping that holds ``address`` (huge on
    hugetlbfs), from /proc/self/smaps; the host page size if not found."""
    try:
        with open("/proc/self/smaps", encoding="ascii", errors="replace") as smaps:
            inside = False
            for line in smaps:
                head = line.split(maxsplit=1)[0] if line.strip() else ""
                if "-" in head and not head.endswith(":"):
                    low, _, high = head.partition("-")
                    inside = int(low, 16) <= address < int(high, 16)
                elif inside and head == "KernelPageSize:":
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return mmap.PAGESIZE
