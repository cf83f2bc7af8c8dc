# virtio-blk (virtio 1.x §5.2) over a raw image file or block device.
#
# Rules of this module:
# - Built only on the public daemon and vring APIs.
# - Data moves between the image and guest memory with positioned vectored
#   I/O straight into and out of the chain's guest buffers, one GIL-free
#   native call per request (DescriptorChain.write_from_file /
#   read_to_file), or through an aligned bounce buffer when the image is
#   opened with O_DIRECT. Nothing here holds the GIL while it touches guest
#   memory, so postcopy memory needs no special case.
# - Ordering: virtio orders nothing between requests in flight, but a FLUSH
#   covers every write completed before it. Each worker completes a write
#   only after pwritev returned, and FLUSH runs fdatasync, so a completed
#   flush means the data is on stable storage. Without a negotiated FLUSH
#   feature (or with the writeback byte of the config cleared) the device is
#   write-through: every write is followed by fdatasync before it completes.
# - The guest is untrusted: every request is bounds-checked against the
#   capacity, every length checked, and a malformed request gets IOERR or
#   UNSUPP, never an exception out of the worker.

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import logging
import mmap
import os
import stat
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, final

from vubackend.daemon import VhostUserBackend
from vubackend.errors import DeviceError
from vubackend.protocol import ProtocolFeatures, VirtioFeatures
from vubackend.vring import DescriptorChain, VringT

__all__ = ["BlkDevice", "BlkFeatures", "BlkStats"]

log = logging.getLogger("vubackend.devices.blk")

SECTOR: Final = 512
HEADER: Final = struct.Struct("<IIQ")  # type, ioprio (reserved), sector
HEADER_SIZE: Final = HEADER.size
_unpack_header: Final = HEADER.unpack
SEGMENT: Final = struct.Struct("<QII")  # discard/write-zeroes: sector, count, flags
ID_BYTES: Final = 20
CONFIG_SIZE: Final = 60
WRITEBACK_OFFSET: Final = 32

# Request types and statuses (§5.2.6).
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
_STATUS_OK: Final = bytes((S_OK,))
WRITE_ZEROES_UNMAP: Final = 1

# Largest discard / write-zeroes request and segment count we advertise.
MAX_DISCARD_SECTORS: Final = 1 << 22  # 2 GiB
MAX_SEGMENTS: Final = 32

# fallocate(2) modes and block-device ioctls (linux/falloc.h, linux/fs.h).
_FALLOC_FL_KEEP_SIZE: Final = 0x01
_FALLOC_FL_PUNCH_HOLE: Final = 0x02
_FALLOC_FL_ZERO_RANGE: Final = 0x10
_PUNCH_HOLE: Final = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
_ZERO_RANGE: Final = _FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE
_BLKGETSIZE64: Final = 0x80081272
_BLKDISCARD: Final = 0x1277
_BLKZEROOUT: Final = 0x127F


class BlkFeatures:
    """The virtio-blk feature bits (``VIRTIO_BLK_F_*``) as masks."""

    SIZE_MAX: Final = 1 << 1
    SEG_MAX: Final = 1 << 2
    RO: Final = 1 << 5
    BLK_SIZE: Final = 1 << 6
    FLUSH: Final = 1 << 9
    CONFIG_WCE: Final = 1 << 11
    MQ: Final = 1 << 12
    DISCARD: Final = 1 << 13
    WRITE_ZEROES: Final = 1 << 14

    NAMES: Final = {
        SIZE_MAX: "SIZE_MAX",
        SEG_MAX: "SEG_MAX",
        RO: "RO",
        BLK_SIZE: "BLK_SIZE",
        FLUSH: "FLUSH",
        CONFIG_WCE: "CONFIG_WCE",
        MQ: "MQ",
        DISCARD: "DISCARD",
        WRITE_ZEROES: "WRITE_ZEROES",
    }


@dataclass
class BlkStats:
    """What the device has served (counters only grow; shared by workers)."""

    reads: int = 0
    writes: int = 0
    flushes: int = 0
    discards: int = 0
    write_zeroes: int = 0
    get_ids: int = 0
    errors: int = 0
    unsupported: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


_libc: ctypes.CDLL | None = None


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    # The stdlib has posix_fallocate only (no modes); libc's fallocate has them.
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    result = _libc.fallocate(
        ctypes.c_int(fd),
        ctypes.c_int(mode),
        ctypes.c_longlong(offset),
        ctypes.c_longlong(length),
    )
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@final
class BlkDevice(VhostUserBackend):
    """virtio-blk over a raw image file or a block device.

    Serves read, write, flush, get id, discard and write zeroes; offers
    multi-queue, a read-only mode and optional direct I/O (O_DIRECT with an
    aligned bounce buffer). The capacity is the image size rounded down to a
    whole number of blocks.

    Args:
        image: path of the raw image file or block device.
        read_only: open the image read-only and offer VIRTIO_BLK_F_RO; writes,
            discards and write zeroes then fail with IOERR.
        queues: request queues (VIRTIO_BLK_F_MQ when above 1), each served by
            its own worker thread.
        queue_size: largest ring the frontend may set up (a power of two).
        direct: open the image with O_DIRECT (bypasses the host page cache).
        block_size: logical block size advertised to the guest (512..65536,
            a power of two); requests stay in 512-byte sectors.
        serial: the GET_ID answer (at most 20 bytes); by default the
            image's file name.
        discard: offer DISCARD and WRITE_ZEROES (not for read-only images).
        busy_poll: seconds a worker keeps polling its ring for the next
            request after the last one, before it re-enables kicks and
            sleeps (0, the default, never polls). Lowers latency at low
            queue depth at the cost of a busy CPU.

    Raises:
        DeviceError: the image cannot be opened, is not a regular file or a
            block device, is smaller than one block, or an argument is out of
            range.
    """

    def __init__(
        self,
        image: str | os.PathLike[str],
        *,
        read_only: bool = False,
        queues: int = 1,
        queue_size: int = 256,
        direct: bool = False,
        block_size: int = SECTOR,
        serial: str | None = None,
        discard: bool = True,
        busy_poll: float = 0.0,
    ) -> None:
        path = os.fspath(image)
        if not 1 <= queues <= 64:
            raise DeviceError(f"queues must be in 1..64, not {queues}")
        if not 2 <= queue_size <= 32768 or queue_size & (queue_size - 1):
            raise DeviceError(
                f"queue size {queue_size} is not a power of two in 2..32768"
            )
        if not SECTOR <= block_size <= 65536 or block_size & (block_size - 1):
            raise DeviceError(
                f"block size {block_size} is not a power of two in 512..65536"
            )
        name = os.path.basename(path).encode("utf-8", "replace")
        ident = serial.encode("utf-8", "replace") if serial is not None else name
        if len(ident) > ID_BYTES:
            if serial is not None:
                raise DeviceError(f"serial {serial!r} is longer than {ID_BYTES} bytes")
            ident = ident[:ID_BYTES]
        if not 0.0 <= busy_poll <= 1.0:
            raise DeviceError(f"busy-poll window {busy_poll} s is not in 0..1 s")
        self.busy_poll = busy_poll
        self.path = path
        self.read_only = read_only
        self.queues = queues
        self.queue_size = queue_size
        self.direct = direct
        self.block_size = block_size
        self.stats = BlkStats()
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        if direct:
            flags |= os.O_DIRECT
        try:
            self._fd = os.open(path, flags)
        except OSError as exc:
            raise DeviceError(f"cannot open the image {path}: {exc.strerror}") from None
        try:
            mode = os.fstat(self._fd).st_mode
            self.is_block_device = stat.S_ISBLK(mode)
            if not (stat.S_ISREG(mode) or self.is_block_device):
                raise DeviceError(
                    f"{path} is neither a regular file nor a block device"
                )
            size = self._image_size()
            if size < block_size:
                raise DeviceError(
                    f"the image {path} holds {size} bytes, less than one "
                    f"{block_size}-byte block"
                )
        except BaseException:
            os.close(self._fd)
            raise
        self.size = size - size % block_size
        self.capacity = self.size // SECTOR
        self.serial = ident
        self.discard = discard and not read_only
        self._writeback = True
        self._flush_negotiated = False
        self._local = threading.local()

    # ------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Close the image (after the daemon has stopped)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _image_size(self) -> int:
        if self.is_block_device:
            buf = bytearray(8)
            fcntl.ioctl(self._fd, _BLKGETSIZE64, buf)
            return int(struct.unpack("<Q", buf)[0])
        return os.fstat(self._fd).st_size

    # ------------------------------------------------------------ negotiation

    def num_queues(self) -> int:
        return self.queues

    def max_queue_size(self) -> int:
        return self.queue_size

    def features(self) -> int:
        blk = BlkFeatures.SEG_MAX | BlkFeatures.BLK_SIZE | BlkFeatures.FLUSH
        blk |= BlkFeatures.CONFIG_WCE
        if self.queues > 1:
            blk |= BlkFeatures.MQ
        if self.read_only:
            blk |= BlkFeatures.RO
        if self.discard:
            blk |= BlkFeatures.DISCARD | BlkFeatures.WRITE_ZEROES
        return blk | int(
            VirtioFeatures.VERSION_1
            | VirtioFeatures.PROTOCOL_FEATURES
            | VirtioFeatures.EVENT_IDX
            | VirtioFeatures.INDIRECT_DESC
            | VirtioFeatures.RING_PACKED
            | VirtioFeatures.LOG_ALL
        )

    def protocol_features(self) -> ProtocolFeatures:
        return ProtocolFeatures.CONFIG | ProtocolFeatures.MQ

    def queues_per_thread(self) -> Sequence[int]:
        return [1 << q for q in range(self.queues)]

    def acked_features(self, features: int) -> None:
        self._flush_negotiated = bool(features & BlkFeatures.FLUSH)
        names = [n for bit, n in BlkFeatures.NAMES.items() if features & bit]
        log.info("virtio-blk features negotiated: %s", "|".join(names) or "none")

    def reset_device(self) -> None:
        self._writeback = True

    def config(self) -> bytes:
        """The 60-byte ``struct virtio_blk_config``."""
        cfg = bytearray(CONFIG_SIZE)
        struct.pack_into("<Q", cfg, 0, self.capacity)
        struct.pack_into("<I", cfg, 12, self.queue_size - 2)  # seg_max
        struct.pack_into("<I", cfg, 20, self.block_size)
        cfg[WRITEBACK_OFFSET] = 1 if self._writeback else 0
        struct.pack_into("<H", cfg, 34, self.queues)
        if self.discard:
            per_block = self.block_size // SECTOR
            struct.pack_into(
                "<IIIIIB",
                cfg,
                36,
                MAX_DISCARD_SECTORS,
                MAX_SEGMENTS,
                per_block,
                MAX_DISCARD_SECTORS,
                MAX_SEGMENTS,
                1,  # write_zeroes_may_unmap
            )
        return bytes(cfg)

    def get_config(self, offset: int, size: int) -> bytes:
        return self.config()[offset : offset + size]

    def set_config(self, offset: int, data: bytes) -> None:
        # Only the writeback byte is writable (VIRTIO_BLK_F_CONFIG_WCE).
        if offset != WRITEBACK_OFFSET or len(data) != 1:
            raise DeviceError(
                f"config bytes {offset}..{offset + len(data)} are read-only "
                "(only the writeback byte at 32 is writable)"
            )
        self._writeback = bool(data[0])
        log.info("write cache %s", "on (write-back)" if self._writeback else "off")

    @property
    def write_through(self) -> bool:
        """Whether each write is synced before it completes."""
        return not (self._flush_negotiated and self._writeback)

    # ------------------------------------------------------------ data path

    def handle_event(
        self, device_event: int, evset: int, vrings: Sequence[VringT], thread_id: int
    ) -> None:
        # The ring's drain: pop, serve, complete and signal per batch until
        # empty, with one lock and one memory lease (VringState.drain).
        vrings[device_event].drain(self._serve, busy_poll=self.busy_poll)

    def _serve(self, chain: DescriptorChain) -> int:
        """Serve one request; returns the used length (bytes written)."""
        wlen = chain.writable_len
        if wlen < 1:
            # No room for the status byte: nothing can be reported.
            self._count(errors=1)
            log.warning("request %d has no status byte; dropped", chain.head)
            return 0
        header = chain.read(HEADER_SIZE)
        if len(header) != HEADER_SIZE:
            return self._status(chain, S_IOERR, errors=1)
        kind, _ioprio, sector = _unpack_header(header)
        if not self.direct:
            if kind == T_IN:
                # The usual read, inline: whole sectors inside the image,
                # from the file straight into the guest's buffers, then the
                # status byte. Anything else takes the general path below.
                length = wlen - 1
                offset = sector * SECTOR
                if not length % SECTOR and offset + length <= self.size:
                    try:
                        got = chain.write_from_file(self._fd, length, offset)
                    except OSError as exc:
                        return self._failed(chain, T_IN, sector, exc)
                    if got == length:
                        chain.write(_STATUS_OK)
                        stats = self.stats
                        with stats.lock:
                            stats.reads += 1
                            stats.bytes_read += length
                        return wlen
            elif kind == T_OUT and not self.read_only:
                # The usual write, likewise.
                length = chain.readable_len - HEADER_SIZE
                offset = sector * SECTOR
                if not length % SECTOR and offset + length <= self.size:
                    try:
                        put = chain.read_to_file(self._fd, length, offset)
                        if put == length and self.write_through:
                            os.fdatasync(self._fd)
                    except OSError as exc:
                        return self._failed(chain, T_OUT, sector, exc)
                    if put == length:
                        chain.mark_written(wlen - 1)
                        chain.write(_STATUS_OK)
                        stats = self.stats
                        with stats.lock:
                            stats.writes += 1
                            stats.bytes_written += length
                        return wlen
                    return self._write_rest(chain, sector, length, offset, put)
        if kind == T_IN:
            return self._read(chain, sector)
        if kind == T_OUT:
            return self._write(chain, sector)
        return self._other(chain, kind, sector)

    def _other(self, chain: DescriptorChain, kind: int, sector: int) -> int:
        """Every request but read and write."""
        try:
            if kind == T_FLUSH:
                if not self.read_only:
                    os.fdatasync(self._fd)
                return self._status(chain, S_OK, flushes=1)
            if kind == T_GET_ID:
                ident = self.serial.ljust(ID_BYTES, b"\0")
                chain.write(ident[: chain.writable_len - 1])
                return self._status(chain, S_OK, get_ids=1)
            if kind in (T_DISCARD, T_WRITE_ZEROES) and self.discard:
                if not chain.bytes_read:  # the segments follow the header
                    chain.read(HEADER.size)
                return self._segments(chain, kind)
        except OSError as exc:
            return self._failed(chain, kind, sector, exc)
        return self._status(chain, S_UNSUPP, unsupported=1)

    def _failed(
        self, chain: DescriptorChain, kind: int, sector: int, exc: OSError
    ) -> int:
        log.warning("request type %d at sector %d failed: %s", kind, sector, exc)
        return self._status(chain, S_IOERR, errors=1)

    def _status(self, chain: DescriptorChain, status: int, **counts: int) -> int:
        self._count(**counts)
        # The status byte is the last writable byte.
        chain.mark_written(chain.writable_len - 1)
        chain.write(bytes((status,)))
        return chain.bytes_written

    def _ok(self, chain: DescriptorChain) -> int:
        # The data filled the writable part up to the status byte: this one
        # fills it whole.
        chain.write(_STATUS_OK)
        return chain.writable_len

    def _count(self, **counts: int) -> None:
        with self.stats.lock:
            for name, value in counts.items():
                setattr(self.stats, name, getattr(self.stats, name) + value)

    def _range(self, sector: int, length: int) -> int | None:
        """The byte offset of a request, or None when out of range."""
        if length % SECTOR or sector > self.capacity:
            return None
        offset = sector * SECTOR
        if offset + length > self.size:
            return None
        return offset

    def _read(self, chain: DescriptorChain, sector: int) -> int:
        length = chain.writable_len - 1
        offset = self._range(sector, length)
        if offset is None:
            return self._status(chain, S_IOERR, errors=1)
        try:
            if self.direct:
                bounce = memoryview(self._bounce(length))[:length]
                self._full_pread(bounce, offset)
                chain.write(bounce)
            elif chain.write_from_file(self._fd, length, offset) != length:
                raise OSError(errno.EIO, "unexpected end of the image")
        except OSError as exc:
            return self._failed(chain, T_IN, sector, exc)
        stats = self.stats
        with stats.lock:
            stats.reads += 1
            stats.bytes_read += length
        return self._ok(chain)

    def _write(self, chain: DescriptorChain, sector: int) -> int:
        length = chain.readable_len - HEADER.size
        offset = self._range(sector, length)
        if self.read_only or offset is None:
            return self._status(chain, S_IOERR, errors=1)
        try:
            if self.direct:
                bounce = memoryview(self._bounce(length))[:length]
                chain.readinto(bounce)
                self._full_pwrite(bounce, offset)
            else:
                self._write_all(chain, length, offset, 0)
            if self.write_through:
                os.fdatasync(self._fd)
        except OSError as exc:
            return self._failed(chain, T_OUT, sector, exc)
        stats = self.stats
        with stats.lock:
            stats.writes += 1
            stats.bytes_written += length
        chain.mark_written(chain.writable_len - 1)
        return self._ok(chain)

    def _write_all(
        self, chain: DescriptorChain, length: int, offset: int, done: int
    ) -> None:
        # The rest of a write the image took only part of.
        while done < length:
            put = chain.read_to_file(self._fd, length - done, offset + done)
            if put == 0:
                raise OSError(errno.EIO, "the image accepted no data")
            done += put

    def _write_rest(
        self, chain: DescriptorChain, sector: int, length: int, offset: int, done: int
    ) -> int:
        # The fast path's short write: finish it like the general path.
        try:
            self._write_all(chain, length, offset, done)
            if self.write_through:
                os.fdatasync(self._fd)
        except OSError as exc:
            return self._failed(chain, T_OUT, sector, exc)
        stats = self.stats
        with stats.lock:
            stats.writes += 1
            stats.bytes_written += length
        chain.mark_written(chain.writable_len - 1)
        return self._ok(chain)

    def _segments(self, chain: DescriptorChain, kind: int) -> int:
        data = chain.read()
        if self.read_only or not data or len(data) % SEGMENT.size:
            return self._status(chain, S_IOERR, errors=1)
        if len(data) // SEGMENT.size > MAX_SEGMENTS:
            return self._status(chain, S_IOERR, errors=1)
        for sector, count, flags in SEGMENT.iter_unpack(data):
            offset = self._range(sector, count * SECTOR)
            if offset is None or count > MAX_DISCARD_SECTORS:
                return self._status(chain, S_IOERR, errors=1)
            if kind == T_DISCARD:
                if flags:
                    return self._status(chain, S_UNSUPP, unsupported=1)
                self._discard(offset, count * SECTOR)
            else:
                if flags & ~WRITE_ZEROES_UNMAP:
                    return self._status(chain, S_UNSUPP, unsupported=1)
                self._zero(offset, count * SECTOR)
        if self.write_through:
            os.fdatasync(self._fd)
        if kind == T_DISCARD:
            return self._status(chain, S_OK, discards=1)
        return self._status(chain, S_OK, write_zeroes=1)

    def _discard(self, offset: int, length: int) -> None:
        if self.is_block_device:
            fcntl.ioctl(self._fd, _BLKDISCARD, struct.pack("<QQ", offset, length))
            return
        try:
            _fallocate(self._fd, _PUNCH_HOLE, offset, length)
        except OSError as exc:
            # Discard is a hint: a file system without hole punching keeps
            # the data, which the spec allows.
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise

    def _zero(self, offset: int, length: int) -> None:
        if self.is_block_device:
            fcntl.ioctl(self._fd, _BLKZEROOUT, struct.pack("<QQ", offset, length))
            return
        try:
            _fallocate(self._fd, _ZERO_RANGE, offset, length)
            return
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
        chunk = self._bounce(min(length, 1 << 20))
        memoryview(chunk)[:] = bytes(len(chunk))
        done = 0
        while done < length:
            n = min(len(chunk), length - done)
            self._full_pwrite(memoryview(chunk)[:n], offset + done)
            done += n

    def _bounce(self, length: int) -> mmap.mmap:
        # Page-aligned (anonymous mmap), so O_DIRECT accepts it; one per
        # worker thread, grown on demand.
        buf: mmap.mmap | None = getattr(self._local, "bounce", None)
        if buf is None or len(buf) < length:
            if buf is not None:
                buf.close()
            page = mmap.PAGESIZE
            size = max(length + page - 1, 1 << 16) // page * page
            buf = mmap.mmap(-1, size)
            self._local.bounce = buf
        return buf

    def _full_pread(self, buffer: memoryview, offset: int) -> None:
        done = 0
        while done < len(buffer):
            got = os.preadv(self._fd, [buffer[done:]], offset + done)
            if got == 0:
                raise OSError(errno.EIO, "unexpected end of the image")
            done += got

    def _full_pwrite(self, buffer: memoryview, offset: int) -> None:
        done = 0
        while done < len(buffer):
            put = os.pwritev(self._fd, [buffer[done:]], offset + done)
            if put == 0:
                raise OSError(errno.EIO, "the image accepted no data")
            done += put
