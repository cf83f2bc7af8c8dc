# XenLibraries: ctypes bindings of Xen's own libraries (libxenforeignmemory,
# libxengnttab, libxenctrl), for users who run under a Xen toolstack and
# want the library route instead of the backend's direct ioctls.
#
# Rules of this module:
# - Names follow the C API one to one (xenforeignmemory_open,
#   xengnttab_map_domain_grant_refs, xc_interface_open, ...), as pyxenctrl-
#   style bindings do: a handle is the library's opaque pointer (an int), a
#   mapping is an address (an int). Nothing here is Pythonic on purpose.
# - Lazy: nothing is loaded at import. XenLibraries.load() loads the shared
#   libraries (sonames of Xen 4.x); a missing library, or an open call that
#   fails (no /dev/xen), raises XenUnavailableError with one line saying
#   what is missing. Failing calls raise OSError with the library's errno.
# - Prototypes are set on every function before its first call (ctypes would
#   otherwise truncate pointers to int).

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from typing import Final, final

from vubackend.errors import XenUnavailableError

__all__ = ["XenLibraries"]

# Library -> soname (Xen 4.x, Debian's libxen-dev).
_SONAMES: Final = {
    "xenforeignmemory": "libxenforeignmemory.so.1",
    "xengnttab": "libxengnttab.so.1",
    "xenctrl": "libxenctrl.so.4.17",
}
_P = ctypes.c_void_p
_U32 = ctypes.c_uint32
_INT = ctypes.c_int


def _load(name: str, soname: str) -> ctypes.CDLL:
    try:
        return ctypes.CDLL(soname, use_errno=True)
    except OSError as exc:
        # Other Xen versions ship other sonames of libxenctrl.
        if name == "xenctrl":
            for candidate in (
                "libxenctrl.so",
                "libxenctrl.so.4.16",
                "libxenctrl.so.4.18",
            ):
                try:
                    return ctypes.CDLL(candidate, use_errno=True)
                except OSError:
                    continue
        raise XenUnavailableError(
            f"Xen library {soname} is not installed (Debian: apt-get install "
            f"libxen-dev): {exc}"
        ) from exc


def _proto(lib: ctypes.CDLL, name: str, restype: object, *args: object) -> None:
    function = getattr(lib, name)
    function.restype = restype
    function.argtypes = list(args)


@final
class XenLibraries:
    """Xen's libraries, loaded with :meth:`load`.

    Methods carry the C names and arguments; handles and addresses are ints.
    """

    __slots__ = ("_ctrl", "_fmem", "_gnt")

    def __init__(self, fmem: ctypes.CDLL, gnt: ctypes.CDLL, ctrl: ctypes.CDLL) -> None:
        """Use :meth:`load`."""
        self._fmem = fmem
        self._gnt = gnt
        self._ctrl = ctrl
        _proto(fmem, "xenforeignmemory_open", _P, _P, ctypes.c_uint)
        _proto(fmem, "xenforeignmemory_close", _INT, _P)
        _proto(
            fmem,
            "xenforeignmemory_map",
            _P,
            _P,
            _U32,
            _INT,
            ctypes.c_size_t,
            _P,
            _P,
        )
        _proto(fmem, "xenforeignmemory_unmap", _INT, _P, _P, ctypes.c_size_t)
        _proto(gnt, "xengnttab_open", _P, _P, ctypes.c_uint)
        _proto(gnt, "xengnttab_close", _INT, _P)
        _proto(
            gnt,
            "xengnttab_map_domain_grant_refs",
            _P,
            _P,
            _U32,
            _U32,
            _P,
            _INT,
        )
        _proto(gnt, "xengnttab_unmap", _INT, _P, _P, _U32)
        _proto(ctrl, "xc_interface_open", _P, _P, _P, ctypes.c_uint)
        _proto(ctrl, "xc_interface_close", _INT, _P)

    @classmethod
    def load(cls) -> XenLibraries:
        """Load the libraries.

        Raises:
            XenUnavailableError: one is not installed (the message names it).
        """
        libs = {name: _load(name, soname) for name, soname in _SONAMES.items()}
        return cls(libs["xenforeignmemory"], libs["xengnttab"], libs["xenctrl"])

    @staticmethod
    def _opened(handle: int | None, call: str, device: str) -> int:
        if handle:
            return handle
        errno = ctypes.get_errno()
        raise XenUnavailableError(
            f"{call} failed: {os.strerror(errno)} ({device} cannot be opened: not "
            f"running under a Xen hypervisor?)"
        )

    @staticmethod
    def _check(result: int, call: str) -> None:
        if result < 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"{call}: {os.strerror(errno)}")

    # ------------------------------------------------------------ foreign memory

    def xenforeignmemory_open(self, flags: int = 0) -> int:
        """Open a foreign-memory handle (``/dev/xen/privcmd``)."""
        handle = self._fmem.xenforeignmemory_open(None, flags)
        return self._opened(handle, "xenforeignmemory_open", "/dev/xen/privcmd")

    def xenforeignmemory_close(self, handle: int) -> None:
        """Close a foreign-memory handle."""
        self._check(self._fmem.xenforeignmemory_close(handle), "xenforeignmemory_close")

    def xenforeignmemory_map(
        self, handle: int, domid: int, prot: int, frames: Sequence[int]
    ) -> int:
        """Map frames of domain ``domid``; returns the address.

        Raises:
            OSError: the mapping failed (a frame's error, or the call's).
        """
        count = len(frames)
        arr = (ctypes.c_uint64 * count)(*frames)
        err = (ctypes.c_int * count)()
        address = self._fmem.xenforeignmemory_map(
            handle, domid, prot, count, ctypes.addressof(arr), ctypes.addressof(err)
        )
        if not address:
            errno = ctypes.get_errno()
            raise OSError(errno, f"xenforeignmemory_map: {os.strerror(errno)}")
        bad = next((e for e in err if e), 0)
        if bad:
            self._fmem.xenforeignmemory_unmap(handle, address, count)
            raise OSError(-bad, f"xenforeignmemory_map: {os.strerror(-bad)}")
        return int(address)

    def xenforeignmemory_unmap(self, handle: int, address: int, pages: int) -> None:
        """Unmap what :meth:`xenforeignmemory_map` mapped."""
        result = self._fmem.xenforeignmemory_unmap(handle, address, pages)
        self._check(result, "xenforeignmemory_unmap")

    # ------------------------------------------------------------ grant tables

    def xengnttab_open(self, flags: int = 0) -> int:
        """Open a grant-table handle (``/dev/xen/gntdev``)."""
        handle = self._gnt.xengnttab_open(None, flags)
        return self._opened(handle, "xengnttab_open", "/dev/xen/gntdev")

    def xengnttab_close(self, handle: int) -> None:
        """Close a grant-table handle."""
        self._check(self._gnt.xengnttab_close(handle), "xengnttab_close")

    def xengnttab_map_domain_grant_refs(
        self, handle: int, domid: int, refs: Sequence[int], prot: int
    ) -> int:
        """Map grant references of domain ``domid``; returns the address."""
        arr = (ctypes.c_uint32 * len(refs))(*refs)
        address = self._gnt.xengnttab_map_domain_grant_refs(
            handle, len(refs), domid, ctypes.addressof(arr), prot
        )
        if not address:
            errno = ctypes.get_errno()
            raise OSError(
                errno, f"xengnttab_map_domain_grant_refs: {os.strerror(errno)}"
            )
        return int(address)

    def xengnttab_unmap(self, handle: int, address: int, count: int) -> None:
        """Unmap grants mapped at ``address``."""
        self._check(
            self._gnt.xengnttab_unmap(handle, address, count), "xengnttab_unmap"
        )

    # ------------------------------------------------------------ control

    def xc_interface_open(self) -> int:
        """Open the control interface (``/dev/xen/privcmd``, hypercalls)."""
        handle = self._ctrl.xc_interface_open(None, None, 0)
        return self._opened(handle, "xc_interface_open", "/dev/xen/privcmd")

    def xc_interface_close(self, handle: int) -> None:
        """Close the control interface."""
        self._check(self._ctrl.xc_interface_close(handle), "xc_interface_close")

    def __repr__(self) -> str:
        return "XenLibraries()"
