# BlkDriver: a virtio-blk driver on a frontend queue (virtio 1.x §5.2): read,
# write, flush, get id, discard and write zeroes, several requests in flight.
#
# Rules of this module:
# - A request is one chain: the 16-byte header {type u32, reserved u32,
#   sector u64} (device-readable), then the data (readable for writes,
#   writable for reads and GET_ID), then one status byte (writable).
#   DISCARD and WRITE_ZEROES carry 16-byte segments {sector u64, num_sectors
#   u32, flags u32} as their data.
# - Request memory is allocated from the frontend's GuestRam when submitted
#   and freed when the request completes; a request that never completes
#   keeps its memory (the backend may still write there).
# - Sectors are 512 bytes, whatever the device's logical block size.
# - submit() does not wait; wait() collects completions with a timeout and
#   raises TransportError for requests still pending. The helpers (read,
#   write, ...) raise RemoteProtocolError when the status is not OK.

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from typing import Final, final

from vubackend.errors import RemoteProtocolError, TransportError
from vubackend.frontend._driver_ring import DriverRing, make_driver_ring
from vubackend.frontend._frontend import Frontend
from vubackend.frontend._queue import FrontendQueue

__all__ = ["SECTOR_SIZE", "BlkDriver", "BlkRequest", "BlkRequestType", "BlkStatus"]

# virtio-blk addresses the disk in 512-byte sectors (virtio 1.x §5.2.6).
SECTOR_SIZE: Final = 512
# VIRTIO_BLK_ID_BYTES: the serial number GET_ID returns.
_ID_BYTES: Final = 20
_HEADER: Final = struct.Struct("<IIQ")
_SEGMENT: Final = struct.Struct("<QII")
_UNMAP: Final = 1  # VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP


class BlkRequestType(enum.IntEnum):
    """virtio-blk request types."""

    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    DISCARD = 11
    WRITE_ZEROES = 13


class BlkStatus(enum.IntEnum):
    """virtio-blk status byte."""

    OK = 0
    IOERR = 1
    UNSUPP = 2


@final
class BlkRequest:
    """One virtio-blk request in flight or done.

    Attributes:
        kind: the request type.
        sector: the first sector.
        status: the status byte once done, else None.
        data: the bytes read (IN, GET_ID) once done.
        written: the used length the device reported.
    """

    def __init__(self, kind: BlkRequestType, sector: int) -> None:
        self.kind = kind
        self.sector = sector
        self.status: int | None = None
        self.data = b""
        self.written = 0
        self._blocks: list[tuple[int, int]] = []
        self._read: tuple[int, int] | None = None
        self._status_gpa = 0

    @property
    def done(self) -> bool:
        """Whether the device completed it."""
        return self.status is not None

    def __repr__(self) -> str:
        return (
            f"<BlkRequest {self.kind.name} sector={self.sector} status={self.status}>"
        )


@final
class BlkDriver:
    """Speaks virtio-blk through one queue of a :class:`Frontend`.

    Args:
        frontend: a frontend whose memory is shared.
        queue: a started queue of that frontend.
        timeout: seconds the helpers wait for completions.
    """

    def __init__(
        self, frontend: Frontend, queue: FrontendQueue, *, timeout: float = 5.0
    ) -> None:
        self._fe = frontend
        self._queue = queue
        self._ring: DriverRing[BlkRequest] = make_driver_ring(
            frontend.ram, queue, features=frontend.acked_features
        )
        self._timeout = timeout
        self._pending: list[BlkRequest] = []

    @property
    def queue(self) -> FrontendQueue:
        """The queue this driver uses."""
        return self._queue

    @property
    def in_flight(self) -> int:
        """Requests submitted and not yet completed."""
        return len(self._pending)

    # ------------------------------------------------------------ submit

    def _alloc(self, request: BlkRequest, size: int) -> int:
        gpa = self._fe.ram.alloc(size, 16)
        request._blocks.append((gpa, size))
        return gpa

    def submit(
        self,
        kind: BlkRequestType,
        sector: int = 0,
        *,
        data: bytes = b"",
        read_len: int = 0,
        kick: bool = True,
    ) -> BlkRequest:
        """Place one request in the ring (and kick), without waiting.

        Args:
            kind: the request type.
            sector: the first sector.
            data: device-readable data (OUT, DISCARD, WRITE_ZEROES).
            read_len: bytes the device writes back (IN, GET_ID).
            kick: kick the queue now (False to batch several submits).

        Returns:
            The request; see :meth:`wait`.
        """
        ram = self._fe.ram
        request = BlkRequest(kind, sector)
        header = self._alloc(request, _HEADER.size)
        ram.write(header, _HEADER.pack(int(kind), 0, sector))
        readable = [(header, _HEADER.size)]
        writable: list[tuple[int, int]] = []
        if data:
            gpa = self._alloc(request, len(data))
            ram.write(gpa, data)
            readable.append((gpa, len(data)))
        if read_len:
            gpa = self._alloc(request, read_len)
            ram.write(gpa, bytes(read_len))
            request._read = (gpa, read_len)
            writable.append((gpa, read_len))
        status = self._alloc(request, 1)
        ram.write(status, b"\xff")
        request._status_gpa = status
        writable.append((status, 1))
        self._ring.add(readable, writable, request)
        self._pending.append(request)
        if kick:
            self._ring.kick()
        return request

    # ------------------------------------------------------------ complete

    def _finish(self, request: BlkRequest, written: int) -> None:
        ram = self._fe.ram
        if request._read is not None:
            gpa, length = request._read
            request.data = ram.read(gpa, length)
        request.written = written
        request.status = ram.read(request._status_gpa, 1)[0]
        for gpa, size in request._blocks:
            ram.free(gpa, size)
        request._blocks.clear()
        self._pending.remove(request)

    def poll(self) -> list[BlkRequest]:
        """Collect the requests completed so far (no waiting)."""
        done: list[BlkRequest] = []
        for request, written in self._ring.collect():
            self._finish(request, written)
            done.append(request)
        return done

    def wait(
        self, requests: Sequence[BlkRequest] | None = None, timeout: float | None = None
    ) -> None:
        """Wait until ``requests`` (default: all in flight) are done.

        Raises:
            TransportError: some are still pending after ``timeout`` seconds.
        """
        targets = list(self._pending if requests is None else requests)
        limit = self._timeout if timeout is None else timeout
        while any(not r.done for r in targets):
            used = self._ring.wait(timeout=limit)
            if not used:
                missing = [r for r in targets if not r.done]
                raise TransportError(
                    f"virtio-blk: {len(missing)} request(s) not completed within "
                    f"{limit} s (first: {missing[0]!r})"
                )
            for request, written in used:
                self._finish(request, written)

    def _run(
        self,
        kind: BlkRequestType,
        sector: int = 0,
        *,
        data: bytes = b"",
        read_len: int = 0,
    ) -> BlkRequest:
        request = self.submit(kind, sector, data=data, read_len=read_len)
        self.wait([request])
        if request.status != BlkStatus.OK:
            try:
                name = (
                    BlkStatus(request.status).name
                    if request.status is not None
                    else "?"
                )
            except ValueError:
                name = str(request.status)
            raise RemoteProtocolError(
                f"virtio-blk {kind.name} at sector {sector} failed: status {name}"
            )
        return request

    # ------------------------------------------------------------ helpers

    def read(self, sector: int, count: int = 1) -> bytes:
        """Read ``count`` sectors from ``sector``.

        Raises:
            RemoteProtocolError: the device answered a status other than OK.
            TransportError: no completion within the timeout.
        """
        return self._run(BlkRequestType.IN, sector, read_len=count * SECTOR_SIZE).data

    def write(self, sector: int, data: bytes) -> None:
        """Write ``data`` (whole sectors) at ``sector``."""
        if not data or len(data) % SECTOR_SIZE:
            raise ValueError(f"write of {len(data)} bytes is not whole sectors")
        self._run(BlkRequestType.OUT, sector, data=data)

    def flush(self) -> None:
        """Flush the device's write cache."""
        self._run(BlkRequestType.FLUSH)

    def get_id(self) -> bytes:
        """The device's serial number (up to 20 bytes, NUL-padded)."""
        return self._run(BlkRequestType.GET_ID, read_len=_ID_BYTES).data

    def discard(self, sector: int, count: int) -> None:
        """Discard ``count`` sectors from ``sector``."""
        self._run(BlkRequestType.DISCARD, sector, data=_SEGMENT.pack(sector, count, 0))

    def write_zeroes(self, sector: int, count: int, *, unmap: bool = False) -> None:
        """Zero ``count`` sectors from ``sector`` (optionally unmapping)."""
        flags = _UNMAP if unmap else 0
        self._run(
            BlkRequestType.WRITE_ZEROES,
            sector,
            data=_SEGMENT.pack(sector, count, flags),
        )
