"""FakeXen: a fake hypervisor with fake privcmd and gntdev drivers, at the
lowest boundary of the Xen backend (a XenDevices: open, ioctl, mmap).

It reads every ioctl argument as the Linux drivers do (include/uapi/xen/
privcmd.h, gntdev.h; drivers/xen/privcmd.c, gntdev.c), from its own byte
offsets written from the kernel headers, not from the backend's structs:
sizes, counts, domids, grant refs, the frame array behind its pointer, and
writes back what the kernel writes (the per-frame error array, the grant
map index). Guest memory is memfds registered per domain: foreign frames by
gfn, grants by reference. Mappings are real: a privcmd VMA is populated by
MAP_FIXED mappings of the domain's memfd pages, a gntdev mmap maps the
granted pages, so everything above the ioctl runs for real.
"""

from __future__ import annotations

import ctypes
import errno
import mmap as mmapmod
import os
import threading
import weakref
from dataclasses import dataclass, field

PAGE = 4096
# The numbers as the kernel defines them: _IOC(_IOC_NONE, type, nr, size).
PRIVCMD_MMAPBATCH_V2 = (32 << 16) | (ord("P") << 8) | 4
GNTDEV_MAP_GRANT_REF = (24 << 16) | (ord("G") << 8) | 0
GNTDEV_UNMAP_GRANT_REF = (16 << 16) | (ord("G") << 8) | 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_MAP_FIXED = 0x10


def _u16(data: bytes | bytearray, at: int) -> int:
    return int.from_bytes(data[at : at + 2], "little")


def _u32(data: bytes | bytearray, at: int) -> int:
    return int.from_bytes(data[at : at + 4], "little")


def _u64(data: bytes | bytearray, at: int) -> int:
    return int.from_bytes(data[at : at + 8], "little")


def _fail(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def _address(mapping: mmapmod.mmap) -> int:
    probe = ctypes.c_char.from_buffer(mapping)
    try:
        return ctypes.addressof(probe)
    finally:
        del probe


@dataclass
class _Extent:
    # `count` pages numbered from `first` (gfn or grant ref) of a domain,
    # backed by `fd` from byte `offset`.
    first: int
    count: int
    fd: int
    offset: int


@dataclass
class _GrantMap:
    index: int  # in pages
    refs: list[tuple[int, int]]
    mapped: bool = False


@dataclass
class _File:
    kind: str  # "privcmd" or "gntdev"
    maps: dict[int, _GrantMap] = field(default_factory=dict)
    next_index: int = 0


@dataclass
class Call:
    """One ioctl as the driver received it."""

    device: str
    request: int
    arg: bytes
    frames: list[int] = field(default_factory=list)


class FakeXen:
    """Fake Xen: ``open()`` gives device handles to send as region fds; the
    object itself is the backend's ``devices``."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._files: dict[int, _File] = {}
        self._handles: list[int] = []
        self._memory: dict[int, list[_Extent]] = {}
        self._grants: dict[int, list[_Extent]] = {}
        self._owned: list[int] = []
        # privcmd VMAs: start address -> (length, populated)
        self._vmas: dict[int, list[int]] = {}
        self.calls: list[Call] = []
        self.live_mappings = 0

    # ------------------------------------------------------------ setup

    def open(self, path: str) -> int:
        """Open a fake device file; the caller owns the fd."""
        kind = {"/dev/xen/privcmd": "privcmd", "/dev/xen/gntdev": "gntdev"}.get(path)
        if kind is None:
            raise _fail(errno.ENOENT)
        fd = os.memfd_create(f"fake-{kind}", os.MFD_CLOEXEC)
        with self._lock:
            self._files[os.fstat(fd).st_ino] = _File(kind)
        return fd

    def add_memory(self, domid: int, gfn: int, fd: int, count: int) -> None:
        """Frames ``gfn..gfn+count`` of ``domid`` are pages of ``fd``."""
        dup = os.dup(fd)
        self._owned.append(dup)
        self._memory.setdefault(domid, []).append(_Extent(gfn, count, dup, 0))

    def add_grants(self, domid: int, ref: int, fd: int, count: int) -> None:
        """Grant refs ``ref..ref+count`` of ``domid`` are pages of ``fd``."""
        dup = os.dup(fd)
        self._owned.append(dup)
        self._grants.setdefault(domid, []).append(_Extent(ref, count, dup, 0))

    def grant_maps(self) -> int:
        """How many grant maps the drivers still hold (all files)."""
        with self._lock:
            return sum(len(f.maps) for f in self._files.values())

    def close(self) -> None:
        for fd in self._owned:
            os.close(fd)
        self._owned.clear()

    # ------------------------------------------------------------ XenDevices

    def missing(self) -> str | None:
        return None

    def _file(self, fd: int) -> _File:
        try:
            return self._files[os.fstat(fd).st_ino]
        except KeyError:
            raise _fail(errno.ENOTTY) from None

    def ioctl(self, fd: int, request: int, arg: bytearray) -> None:
        with self._lock:
            file = self._file(fd)
            if file.kind == "privcmd" and request == PRIVCMD_MMAPBATCH_V2:
                self._mmapbatch_v2(arg)
            elif file.kind == "gntdev" and request == GNTDEV_MAP_GRANT_REF:
                self._map_grant_ref(file, arg)
            elif file.kind == "gntdev" and request == GNTDEV_UNMAP_GRANT_REF:
                self._unmap_grant_ref(file, arg)
            else:
                raise _fail(errno.ENOTTY)

    def _lookup(
        self, table: dict[int, list[_Extent]], domid: int, page: int
    ) -> tuple[int, int] | None:
        for extent in table.get(domid, []):
            if extent.first <= page < extent.first + extent.count:
                return extent.fd, extent.offset + (page - extent.first) * PAGE
        return None

    def _mmapbatch_v2(self, arg: bytearray) -> None:
        # copy_from_user(&m, udata, sizeof(struct privcmd_mmapbatch_v2))
        if len(arg) < 32:
            raise _fail(errno.EFAULT)
        num, dom, addr = _u32(arg, 0), _u16(arg, 4), _u64(arg, 8)
        arr, err = _u64(arg, 16), _u64(arg, 24)
        if num <= 0 or num > (1 << 31):
            raise _fail(errno.EINVAL)
        vma = self._vmas.get(addr)
        # The first batch must cover the whole VMA exactly.
        if vma is None or vma[0] != num * PAGE or vma[1]:
            raise _fail(errno.EINVAL)
        frames = list(memoryview(ctypes.string_at(arr, 8 * num)).cast("Q"))
        self.calls.append(Call("privcmd", PRIVCMD_MMAPBATCH_V2, bytes(arg), frames))
        codes = (ctypes.c_int * num)()
        for i, gfn in enumerate(frames):
            where = self._lookup(self._memory, dom, gfn)
            if where is None:
                codes[i] = -errno.EINVAL
                continue
            backing, offset = where
            got = _libc.mmap(
                addr + i * PAGE,
                PAGE,
                mmapmod.PROT_READ | mmapmod.PROT_WRITE,
                mmapmod.MAP_SHARED | _MAP_FIXED,
                backing,
                offset,
            )
            if got != addr + i * PAGE:
                codes[i] = -ctypes.get_errno()
        ctypes.memmove(err, codes, 4 * num)
        vma[1] = 1

    def _map_grant_ref(self, file: _File, arg: bytearray) -> None:
        if len(arg) < 16:
            raise _fail(errno.EFAULT)
        count = _u32(arg, 0)
        if count == 0 or count > 1 << 20:
            raise _fail(errno.EINVAL)
        if len(arg) < 16 + 8 * count:
            raise _fail(errno.EFAULT)
        refs = [(_u32(arg, 16 + 8 * i), _u32(arg, 20 + 8 * i)) for i in range(count)]
        self.calls.append(Call("gntdev", GNTDEV_MAP_GRANT_REF, bytes(arg)))
        index = file.next_index
        file.next_index += count
        file.maps[index] = _GrantMap(index, refs)
        # copy_to_user(u, &op, sizeof(op)): index is the byte offset to mmap.
        arg[8:16] = (index * PAGE).to_bytes(8, "little")

    def _unmap_grant_ref(self, file: _File, arg: bytearray) -> None:
        if len(arg) < 16:
            raise _fail(errno.EFAULT)
        index, count = _u64(arg, 0), _u32(arg, 8)
        self.calls.append(Call("gntdev", GNTDEV_UNMAP_GRANT_REF, bytes(arg)))
        found = file.maps.get(index // PAGE)
        if index % PAGE or found is None or len(found.refs) != count:
            raise _fail(errno.ENOENT)
        del file.maps[index // PAGE]

    def mmap(self, fd: int, length: int, prot: int, offset: int) -> mmapmod.mmap:
        with self._lock:
            if length <= 0 or length % PAGE or offset % PAGE:
                raise _fail(errno.EINVAL)
            file = self._files.get(os.fstat(fd).st_ino)
            if file is None:
                # Not a Xen device: an ordinary file mapping, as the kernel
                # would make (the ioctls then fail with ENOTTY).
                mapping = mmapmod.mmap(
                    fd, length, flags=mmapmod.MAP_SHARED, prot=prot, offset=offset
                )
            elif file.kind == "privcmd":
                mapping = mmapmod.mmap(-1, length, flags=mmapmod.MAP_SHARED, prot=prot)
                start = _address(mapping)
                self._vmas[start] = [length, 0]
                weakref.finalize(mapping, self._vma_gone, start)
            else:
                mapping = self._grant_mmap(file, length, prot, offset // PAGE)
            self.live_mappings += 1
            weakref.finalize(mapping, self._mapping_gone)
            return mapping

    def _grant_mmap(
        self, file: _File, length: int, prot: int, index: int
    ) -> mmapmod.mmap:
        found = file.maps.get(index)
        if found is None or len(found.refs) * PAGE != length or found.mapped:
            raise _fail(errno.EINVAL)
        pages = [self._lookup(self._grants, domid, ref) for domid, ref in found.refs]
        if any(p is None for p in pages):
            raise _fail(errno.EFAULT)
        backing, first = pages[0]  # type: ignore[misc]
        contiguous = all(p == (backing, first + i * PAGE) for i, p in enumerate(pages))
        if not contiguous:
            raise _fail(errno.EINVAL)  # the fake maps one run of pages only
        found.mapped = True
        return mmapmod.mmap(
            backing, length, flags=mmapmod.MAP_SHARED, prot=prot, offset=first
        )

    def _vma_gone(self, start: int) -> None:
        with self._lock:
            self._vmas.pop(start, None)

    def _mapping_gone(self) -> None:
        with self._lock:
            self.live_mappings -= 1
