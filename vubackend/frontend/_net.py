# NetDriver: a virtio-net driver on a frontend's queue pair (virtio 1.x
# §5.1): send frames on the TX queue, post buffers on the RX queue and
# receive frames from it.
#
# Rules of this module:
# - Every frame is preceded by the virtio-net header: 12 bytes with
#   VERSION_1 (or MRG_RXBUF), all zero on TX (no offloads); on RX the header
#   is stripped. With MRG_RXBUF a frame may span several RX buffers: the
#   first one's header says how many (num_buffers), the others carry frame
#   bytes only; a frame is returned once all of its buffers arrived.
# - Queue 2k is RX (the device writes), 2k+1 is TX (the device reads).
# - TX memory is freed when the device uses the chain; RX buffers are
#   reposted after each received frame, so the RX ring stays full.
# - Every wait has a timeout.

from __future__ import annotations

import struct
import time
from collections.abc import Iterable
from typing import Final, final

from vubackend.errors import TransportError
from vubackend.frontend._driver_ring import DriverRing, make_driver_ring
from vubackend.frontend._frontend import Frontend
from vubackend.frontend._queue import FrontendQueue

__all__ = ["NET_HEADER_SIZE", "NetDriver"]

# struct virtio_net_hdr_v1 (with num_buffers): 12 bytes under VERSION_1.
NET_HEADER_SIZE: Final = 12
_HEADER: Final = struct.Struct("<BBHHHHH")
_RX_BUFFER: Final = 2048
_MRG_RXBUF: Final = 1 << 15


@final
class NetDriver:
    """Speaks virtio-net through a queue pair of a :class:`Frontend`.

    Args:
        frontend: a frontend whose memory is shared.
        rx: the started RX queue (index 0 of the pair).
        tx: the started TX queue (index 1 of the pair).
        rx_buffer_size: bytes of each posted RX buffer (header included).
    """

    def __init__(
        self,
        frontend: Frontend,
        rx: FrontendQueue,
        tx: FrontendQueue,
        *,
        rx_buffer_size: int = _RX_BUFFER,
    ) -> None:
        self._fe = frontend
        features = frontend.acked_features
        self._rx: DriverRing[int] = make_driver_ring(
            frontend.ram, rx, features=features
        )
        self._tx: DriverRing[tuple[int, int]] = make_driver_ring(
            frontend.ram, tx, features=features
        )
        self._rx_size = rx_buffer_size
        self._mrg = bool(features & _MRG_RXBUF)
        # A merged frame being assembled: its pieces and the buffers missing.
        self._partial: list[bytes] = []
        self._missing = 0
        # Frames collected beyond what receive() was asked for.
        self._backlog: list[bytes] = []
        self.num_buffers: list[int] = []
        """num_buffers of each frame received (MRG_RXBUF), in order."""
        self._tx_pending = 0
        self.sent = 0
        """Frames the device has consumed from TX."""
        self.received = 0
        """Frames taken from RX."""

    @property
    def tx_pending(self) -> int:
        """Frames placed on TX that the device has not used yet."""
        return self._tx_pending

    # ------------------------------------------------------------ TX

    def _reap_tx(self) -> None:
        for (gpa, size), _ in self._tx.collect():
            self._fe.ram.free(gpa, size)
            self._tx_pending -= 1
            self.sent += 1

    def send(self, frames: Iterable[bytes], *, timeout: float = 5.0) -> int:
        """Place frames on TX (header + frame, one chain each) and kick,
        waiting for room when the ring is full.

        Returns:
            How many frames were placed.

        Raises:
            TransportError: no room came free within ``timeout`` seconds.
        """
        ram = self._fe.ram
        placed = 0
        header = bytes(NET_HEADER_SIZE)
        for frame in frames:
            deadline = time.monotonic() + timeout
            self._reap_tx()
            while self._tx.num_free < 1:
                self._tx.kick()
                if time.monotonic() > deadline:
                    raise TransportError(
                        f"virtio-net: TX ring full for {timeout} s "
                        f"({self._tx_pending} frames pending)"
                    )
                self._tx.sleep(0.01)
                self._reap_tx()
            size = NET_HEADER_SIZE + len(frame)
            gpa = ram.alloc(size, 16)
            ram.write(gpa, header + frame)
            self._tx.add([(gpa, size)], [], (gpa, size))
            self._tx_pending += 1
            placed += 1
            if placed % 32 == 0:
                self._tx.kick()
        self._tx.kick()
        return placed

    def wait_sent(self, timeout: float = 5.0) -> None:
        """Wait until the device has used every TX chain.

        Raises:
            TransportError: some are still pending after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        self._reap_tx()
        while self._tx_pending:
            if time.monotonic() > deadline:
                raise TransportError(
                    f"virtio-net: {self._tx_pending} TX frames not used in {timeout} s"
                )
            self._tx.sleep(0.02)
            self._reap_tx()

    # ------------------------------------------------------------ RX

    def post_rx_buffers(self, count: int | None = None) -> int:
        """Post writable buffers on RX (default: fill the ring) and kick.

        Returns:
            How many were posted.
        """
        ram = self._fe.ram
        want = self._rx.num_free if count is None else min(count, self._rx.num_free)
        for _ in range(want):
            gpa = ram.alloc(self._rx_size, 16)
            self._rx.add([], [(gpa, self._rx_size)], gpa)
        if want:
            self._rx.kick()
        return want

    def receive(self, count: int = 1, *, timeout: float = 5.0) -> list[bytes]:
        """Receive up to ``count`` frames (header stripped), reposting their
        buffers; waits at most ``timeout`` seconds for them.

        Returns:
            The frames received, in order (fewer than ``count`` on timeout).
            Frames that came in the same collection beyond ``count`` are
            kept for the next call.
        """
        ram = self._fe.ram
        frames, self._backlog = self._backlog, []
        deadline = time.monotonic() + timeout
        while len(frames) < count:
            used = self._rx.collect()
            before = len(frames)
            for gpa, written in used:
                data = ram.read(gpa, min(written, self._rx_size))
                self._rx.add([], [(gpa, self._rx_size)], gpa)
                if not self._mrg:
                    frames.append(data[NET_HEADER_SIZE:])
                    continue
                frame = self._merge(data)
                if frame is not None:
                    frames.append(frame)
            if used:
                self.received += len(frames) - before
                self._rx.kick()
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._rx.sleep(left)
        self._backlog = frames[count:]
        return frames[:count]

    def _merge(self, data: bytes) -> bytes | None:
        # One used RX buffer under MRG_RXBUF; the frame when it is complete.
        if self._missing == 0:
            if len(data) < NET_HEADER_SIZE:
                raise TransportError(
                    f"virtio-net: RX buffer of {len(data)} bytes has no header"
                )
            count = _HEADER.unpack_from(data)[6]
            if count < 1:
                raise TransportError("virtio-net: num_buffers is 0")
            self.num_buffers.append(count)
            self._partial = [data[NET_HEADER_SIZE:]]
            self._missing = count - 1
        else:
            self._partial.append(data)
            self._missing -= 1
        if self._missing:
            return None
        frame = b"".join(self._partial)
        self._partial = []
        return frame
