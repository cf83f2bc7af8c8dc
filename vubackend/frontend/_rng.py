# RngDriver: a virtio-rng (entropy) driver on a frontend queue (virtio 1.x
# §5.4): post one device-writable buffer, get back the bytes written.
#
# Rules of this module:
# - One request is one writable buffer; the used length says how many bytes
#   the device filled (it may be fewer than asked, even 0).
# - The buffer is zeroed before it is posted and freed when used.

from __future__ import annotations

from typing import final

from vubackend.errors import TransportError
from vubackend.frontend._driver_ring import DriverRing, make_driver_ring
from vubackend.frontend._frontend import Frontend
from vubackend.frontend._queue import FrontendQueue

__all__ = ["RngDriver"]


@final
class RngDriver:
    """Asks a virtio-rng device for random bytes through one queue.

    Args:
        frontend: a frontend whose memory is shared.
        queue: the started request queue (index 0).
    """

    def __init__(self, frontend: Frontend, queue: FrontendQueue) -> None:
        self._fe = frontend
        self._queue = queue
        self._ring: DriverRing[int] = make_driver_ring(
            frontend.ram, queue, features=frontend.acked_features
        )

    def read(self, length: int, *, timeout: float = 5.0) -> bytes:
        """Ask for ``length`` bytes.

        Returns:
            The bytes the device wrote (possibly fewer than ``length``).

        Raises:
            TransportError: the device did not answer within ``timeout``.
        """
        ram = self._fe.ram
        gpa = ram.alloc(length, 16)
        ram.write(gpa, bytes(length))
        self._ring.add([], [(gpa, length)], gpa)
        self._ring.kick()
        used = self._ring.wait(timeout=timeout)
        if not used:
            raise TransportError(f"virtio-rng: no answer within {timeout} s")
        _, written = used[0]
        data = ram.read(gpa, min(written, length))
        ram.free(gpa, length)
        return data
