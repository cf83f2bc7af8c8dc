# userfaultfd from Python: the kernel ABI (ioctl numbers, struct layouts),
# an owned userfaultfd, its fault events, and the peer's pid; used by the
# postcopy pager (_postcopy.py).
#
# Rules of this module:
# - Reached through ctypes (the frontend may not import vubackend._native):
#   userfaultfd(2) by syscall number (or /dev/userfaultfd), ioctl,
#   mmap/munmap and fallocate from the C library. ctypes releases the GIL
#   around every foreign call.
# - ioctl numbers are _IOWR/_IOR(0xAA, nr, sizeof(struct)) as in
#   linux/userfaultfd.h; struct layouts are struct.Struct formats. The unit
#   tests compare both with the header's values.

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, final

from vubackend.errors import DaemonClosedError, MappingError

__all__ = [
    "UFFDIO_API",
    "UFFDIO_COPY",
    "UFFDIO_REGISTER",
    "UFFDIO_UNREGISTER",
    "UFFDIO_WAKE",
    "UFFDIO_ZEROPAGE",
    "UFFD_EVENT_PAGEFAULT",
    "UffdEvent",
    "Userfaultfd",
    "peer_pid",
    "userfaultfd_unavailable",
]

# ---------------------------------------------------------------- ABI

# struct layouts (native order, no padding: every field is naturally aligned).
_API: Final = struct.Struct("=QQQ")  # uffdio_api {api, features, ioctls}
_RANGE: Final = struct.Struct("=QQ")  # uffdio_range {start, len}
_REGISTER: Final = struct.Struct("=QQQQ")  # uffdio_register {range, mode, ioctls}
_COPY: Final = struct.Struct("=QQQQq")  # uffdio_copy {dst, src, len, mode, copy}
_ZEROPAGE: Final = struct.Struct("=QQQq")  # uffdio_zeropage {range, mode, zeropage}
# uffd_msg: event u8, reserved u8/u16/u32, then the union; for a page fault
# {flags u64, address u64, ptid u32}, padded to 32 bytes.
_MSG: Final = struct.Struct("=BBHIQQI4x")
_UCRED: Final = struct.Struct("=iII")  # struct ucred {pid, uid, gid}

_UFFDIO: Final = 0xAA  # the ioctl type of userfaultfd
_IOC_WRITE: Final = 1
_IOC_READ: Final = 2


def _ioc(direction: int, nr: int, size: int) -> int:
    # asm-generic/ioctl.h: dir (2 bits) | size (14) | type (8) | nr (8).
    return (direction << 30) | (size << 16) | (_UFFDIO << 8) | nr


UFFD_API: Final = 0xAA
"""The API version UFFDIO_API asks for."""
UFFDIO_REGISTER: Final = _ioc(_IOC_READ | _IOC_WRITE, 0x00, _REGISTER.size)
"""``_IOWR(0xAA, 0x00, struct uffdio_register)`` = 0xc020aa00."""
UFFDIO_UNREGISTER: Final = _ioc(_IOC_READ, 0x01, _RANGE.size)
"""``_IOR(0xAA, 0x01, struct uffdio_range)`` = 0x8010aa01."""
UFFDIO_WAKE: Final = _ioc(_IOC_READ, 0x02, _RANGE.size)
"""``_IOR(0xAA, 0x02, struct uffdio_range)`` = 0x8010aa02."""
UFFDIO_COPY: Final = _ioc(_IOC_READ | _IOC_WRITE, 0x03, _COPY.size)
"""``_IOWR(0xAA, 0x03, struct uffdio_copy)`` = 0xc028aa03."""
UFFDIO_ZEROPAGE: Final = _ioc(_IOC_READ | _IOC_WRITE, 0x04, _ZEROPAGE.size)
"""``_IOWR(0xAA, 0x04, struct uffdio_zeropage)`` = 0xc020aa04."""
UFFDIO_API: Final = _ioc(_IOC_READ | _IOC_WRITE, 0x3F, _API.size)
"""``_IOWR(0xAA, 0x3F, struct uffdio_api)`` = 0xc018aa3f."""
USERFAULTFD_IOC_NEW: Final = 0xAA00
"""``_IO(0xAA, 0x00)`` on /dev/userfaultfd: a new userfaultfd."""

UFFD_EVENT_PAGEFAULT: Final = 0x12
"""uffd_msg.event of a page fault."""
UFFD_PAGEFAULT_FLAG_WRITE: Final = 1
UFFD_USER_MODE_ONLY: Final = 1
UFFDIO_REGISTER_MODE_MISSING: Final = 1
UFFDIO_COPY_MODE_DONTWAKE: Final = 1
# Bits of the `ioctls` answers (1 << _UFFDIO_x).
_IOCTL_WAKE_BIT: Final = 1 << 0x02
_IOCTL_COPY_BIT: Final = 1 << 0x03

# userfaultfd(2) by machine; elsewhere only /dev/userfaultfd is tried.
_SYSCALL_NUMBERS: Final[Mapping[str, int]] = {
    "x86_64": 323,
    "aarch64": 282,
    "riscv64": 282,
    "ppc64le": 364,
    "s390x": 355,
}
_FALLOC_FL_KEEP_SIZE: Final = 1
_FALLOC_FL_PUNCH_HOLE: Final = 2
_PAGE: Final = mmap.PAGESIZE
# How long the fault thread sleeps in poll() before it looks at its state.
_POLL_INTERVAL: Final = 0.05
# Events read per read() of a uffd.
_EVENTS_PER_READ: Final = 64
_COPY_RETRIES: Final = 100


def _load_libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
    libc.ioctl.restype = ctypes.c_int
    libc.mmap.argtypes = (
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    )
    libc.mmap.restype = ctypes.c_void_p
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    libc.munmap.restype = ctypes.c_int
    libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long)
    libc.fallocate.restype = ctypes.c_int
    return libc


_LIBC: Final = _load_libc()
_MAP_FAILED: Final = ctypes.c_void_p(-1).value


def _last_error() -> str:
    return os.strerror(ctypes.get_errno())


def _ioctl(
    fd: int, request: int, layout: struct.Struct, *values: int
) -> tuple[int, tuple[int, ...]]:
    """One ioctl with a struct argument: (errno or 0, the struct after it)."""
    buffer = ctypes.create_string_buffer(layout.pack(*values), layout.size)
    rc = int(_LIBC.ioctl(fd, request, buffer))
    code = ctypes.get_errno() if rc < 0 else 0
    return code, tuple(int(v) for v in layout.unpack(buffer.raw))


# ---------------------------------------------------------------- uffd


@final
@dataclass(frozen=True, slots=True)
class UffdEvent:
    """One ``struct uffd_msg`` read from a userfaultfd.

    Attributes:
        event: ``UFFD_EVENT_*`` (0x12 is a page fault).
        flags: for a page fault, ``UFFD_PAGEFAULT_FLAG_*`` (1 = write).
        address: for a page fault, the faulting address in the faulting
            process (page aligned unless UFFD_FEATURE_EXACT_ADDRESS).
        thread_id: the faulting thread with UFFD_FEATURE_THREAD_ID, else 0.
    """

    event: int
    flags: int = 0
    address: int = 0
    thread_id: int = 0

    @property
    def is_pagefault(self) -> bool:
        """Whether this is a UFFD_EVENT_PAGEFAULT."""
        return self.event == UFFD_EVENT_PAGEFAULT

    @property
    def is_write(self) -> bool:
        """Whether the faulting access was a write."""
        return bool(self.flags & UFFD_PAGEFAULT_FLAG_WRITE)

    @classmethod
    def unpack(cls, data: bytes) -> UffdEvent:
        """Decode one 32-byte ``uffd_msg``."""
        event, _, _, _, flags, address, ptid = _MSG.unpack(data)
        return cls(int(event), int(flags), int(address), int(ptid))


@final
class Userfaultfd:
    """An owned userfaultfd: create one, or wrap one received from a backend
    (POSTCOPY_ADVISE), and run its ioctls.

    Args:
        fd: the fd; the object owns it from now on.
    """

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    @classmethod
    def open(cls, *, nonblocking: bool = True) -> Userfaultfd:
        """Create a userfaultfd (``O_CLOEXEC``, ``O_NONBLOCK`` by default),
        not yet API-negotiated: call :meth:`api` next.

        The syscall is tried first, then with UFFD_USER_MODE_ONLY (what an
        unprivileged process may get), then /dev/userfaultfd.

        Raises:
            MappingError: no way worked (the message says why).
        """
        flags = os.O_CLOEXEC | (os.O_NONBLOCK if nonblocking else 0)
        reasons: list[str] = []
        number = _SYSCALL_NUMBERS.get(platform.machine())
        if number is None:
            reasons.append(f"no userfaultfd syscall number for {platform.machine()}")
        else:
            for extra in (0, UFFD_USER_MODE_ONLY):
                fd = int(
                    _LIBC.syscall(ctypes.c_long(number), ctypes.c_int(flags | extra))
                )
                if fd >= 0:
                    return cls(fd)
                code = ctypes.get_errno()
                reasons.append(f"userfaultfd({flags | extra:#x}): {os.strerror(code)}")
                if code != errno.EPERM:
                    break
        try:
            device = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            reasons.append(f"/dev/userfaultfd: {exc.strerror}")
        else:
            try:
                fd = int(_LIBC.ioctl(device, USERFAULTFD_IOC_NEW, flags))
                if fd >= 0:
                    return cls(fd)
                reasons.append(
                    f"USERFAULTFD_IOC_NEW: {os.strerror(ctypes.get_errno())}"
                )
            finally:
                os.close(device)
        raise MappingError("userfaultfd is unavailable: " + "; ".join(reasons))

    def fileno(self) -> int:
        """The fd (borrowed).

        Raises:
            DaemonClosedError: it was closed.
        """
        if self._fd is None:
            raise DaemonClosedError("the userfaultfd is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._fd is None

    def _call(
        self, name: str, request: int, layout: struct.Struct, *values: int
    ) -> tuple[int, ...]:
        code, out = _ioctl(self.fileno(), request, layout, *values)
        if code:
            raise MappingError(f"{name} failed: {os.strerror(code)}")
        return out

    def api(self, features: int = 0) -> tuple[int, int]:
        """UFFDIO_API: the handshake every userfaultfd needs once.

        Args:
            features: ``UFFD_FEATURE_*`` bits wanted.

        Returns:
            (features the kernel supports, ioctls available as a bit mask).
        """
        _, got, ioctls = self._call(
            "UFFDIO_API", UFFDIO_API, _API, UFFD_API, features, 0
        )
        return got, ioctls

    def register(
        self, start: int, length: int, mode: int = UFFDIO_REGISTER_MODE_MISSING
    ) -> int:
        """UFFDIO_REGISTER ``[start, start + length)`` (page aligned).

        Returns:
            The ioctls allowed on the range, as ``1 << _UFFDIO_*`` bits.
        """
        out = self._call(
            "UFFDIO_REGISTER", UFFDIO_REGISTER, _REGISTER, start, length, mode, 0
        )
        return out[3]

    def unregister(self, start: int, length: int) -> None:
        """UFFDIO_UNREGISTER ``[start, start + length)``."""
        self._call("UFFDIO_UNREGISTER", UFFDIO_UNREGISTER, _RANGE, start, length)

    def wake(self, start: int, length: int) -> None:
        """UFFDIO_WAKE: let the threads faulting in the range retry."""
        self._call("UFFDIO_WAKE", UFFDIO_WAKE, _RANGE, start, length)

    def copy(self, dst: int, src: int, length: int, *, wake: bool = True) -> bool:
        """UFFDIO_COPY ``length`` bytes from address ``src`` to the missing
        pages at ``dst`` (a range registered with this uffd), atomically.

        Args:
            dst: destination address (page aligned).
            src: source address (any readable memory of this process).
            length: bytes, whole pages.
            wake: wake this uffd's waiters on the range afterwards.

        Returns:
            True if the pages were placed, False if they were present
            already (EEXIST).

        Raises:
            MappingError: the copy failed otherwise.
        """
        mode = 0 if wake else UFFDIO_COPY_MODE_DONTWAKE
        done = 0
        for _ in range(_COPY_RETRIES):
            code, out = _ioctl(
                self.fileno(), UFFDIO_COPY, _COPY, dst + done, src + done,
                length - done, mode, 0,
            )  # fmt: skip
            copied = out[4]
            if code == 0:
                return True
            if code == errno.EEXIST and done == 0:
                return False
            if code == errno.EEXIST:
                return True  # the rest was placed by someone else
            if code != errno.EAGAIN:
                raise MappingError(
                    f"UFFDIO_COPY of {length:#x} bytes to {dst:#x} failed: "
                    f"{os.strerror(code)}"
                )
            done += max(copied, 0)  # partial copy, or the mappings changed
        raise MappingError(f"UFFDIO_COPY to {dst:#x}: still EAGAIN after retries")

    def read_events(self, limit: int = _EVENTS_PER_READ) -> list[UffdEvent]:
        """Read the pending events (at most ``limit``); [] when none."""
        try:
            data = os.read(self.fileno(), _MSG.size * limit)
        except BlockingIOError:
            return []
        return [
            UffdEvent.unpack(data[i : i + _MSG.size])
            for i in range(0, len(data) - _MSG.size + 1, _MSG.size)
        ]

    def close(self) -> None:
        """Close the fd. Idempotent."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> Userfaultfd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Userfaultfd(fd={self._fd})"


def peer_pid(sock_fd: int) -> int | None:
    """The pid of the process at the other end of a connected AF_UNIX
    socket (SO_PEERCRED), or None if the kernel does not say."""
    with socket.socket(fileno=os.dup(sock_fd)) as sock:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        except OSError:
            return None
    pid = int(_UCRED.unpack(raw)[0])
    return pid or None


def userfaultfd_unavailable() -> str | None:
    """Why this process cannot use userfaultfd (None when it can: a uffd was
    created and API-negotiated)."""
    try:
        with Userfaultfd.open() as uffd:
            uffd.api()
    except MappingError as exc:
        return str(exc)
    return None
