# Result types of frontend requests that carry more than a number: the
# inflight buffer (GET_INFLIGHT_FD) and the device-state reply
# (SET_DEVICE_STATE_FD).
#
# Rules of this module:
# - A result that carries an fd owns it; close() closes it once, and the
#   object is a context manager. take_fd() hands the fd over to the caller.

from __future__ import annotations

import mmap
import os
from typing import final

from vubackend.errors import DaemonClosedError, MappingError

__all__ = ["DeviceStateReply", "InflightBuffer"]


@final
class InflightBuffer:
    """The inflight-tracking buffer a backend allocated (GET_INFLIGHT_FD).

    The frontend keeps it across backend restarts and gives it back with
    SET_INFLIGHT_FD (vhost-user-protocol.md §4.9).

    Attributes:
        mmap_size: its size in bytes.
        mmap_offset: its offset in the fd.
        num_queues: the queue count it was made for.
        queue_size: the queue size it was made for.
    """

    def __init__(
        self,
        fd: int,
        *,
        mmap_size: int,
        mmap_offset: int,
        num_queues: int,
        queue_size: int,
    ) -> None:
        self._fd: int | None = fd
        self.mmap_size = mmap_size
        self.mmap_offset = mmap_offset
        self.num_queues = num_queues
        self.queue_size = queue_size

    def fileno(self) -> int:
        """The buffer's fd (borrowed)."""
        if self._fd is None:
            raise DaemonClosedError("the inflight buffer is closed")
        return self._fd

    def read(self) -> bytes:
        """A copy of the whole buffer (to look at what the backend tracks).

        Raises:
            MappingError: the fd cannot be mapped.
        """
        try:
            with mmap.mmap(
                self.fileno(),
                self.mmap_offset + self.mmap_size,
                flags=mmap.MAP_SHARED,
                prot=mmap.PROT_READ,
            ) as mapping:
                return mapping[self.mmap_offset :]
        except (OSError, ValueError) as exc:
            raise MappingError(f"cannot map the inflight buffer: {exc}") from exc

    def close(self) -> None:
        """Close the fd. Idempotent."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> InflightBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"InflightBuffer(size={self.mmap_size:#x}, queues={self.num_queues}, "
            f"queue_size={self.queue_size})"
        )


@final
class DeviceStateReply:
    """The backend's answer to SET_DEVICE_STATE_FD.

    Attributes:
        error: bits 0-7 of the reply (0 = accepted).
        fd: the fd the backend gave back to use instead of ours, or None
            (bit 8 set). Owned by this object until :meth:`take_fd`.
    """

    def __init__(self, error: int, fd: int | None) -> None:
        self.error = error
        self.fd = fd

    def take_fd(self) -> int | None:
        """Hand the backend's fd (if any) to the caller."""
        fd, self.fd = self.fd, None
        return fd

    def close(self) -> None:
        """Close the backend's fd if it was not taken. Idempotent."""
        fd = self.take_fd()
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> DeviceStateReply:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"DeviceStateReply(error={self.error}, fd={self.fd})"
