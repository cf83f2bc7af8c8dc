# EventFd: an owned, non-blocking eventfd used as a ring's kick, call or err
# notifier, or as the frontend's end of SET_LOG_FD.
#
# Rules of this module:
# - One object owns one fd; close() closes it once (idempotent). The fd is
#   lent to the protocol (sent with SET_VRING_KICK/CALL/ERR): sending does not
#   transfer ownership, the backend receives its own duplicate.
# - The fd is O_NONBLOCK and O_CLOEXEC: wait() polls with a timeout, so no
#   caller can hang on a backend that never signals.
# - drain() reads the counter (0 when nothing was signalled); signal() adds 1.

from __future__ import annotations

import os
import select
import time
from typing import final

from vubackend.errors import DaemonClosedError

__all__ = ["EventFd"]


@final
class EventFd:
    """An eventfd owned by the frontend (a ring's kick, call or err notifier).

    Args:
        initial: the counter's initial value.
    """

    __slots__ = ("_fd",)

    def __init__(self, initial: int = 0) -> None:
        self._fd: int | None = os.eventfd(initial, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def fileno(self) -> int:
        """The fd (borrowed: it stays owned by this object).

        Raises:
            DaemonClosedError: the eventfd was closed.
        """
        if self._fd is None:
            raise DaemonClosedError("the eventfd is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._fd is None

    def signal(self, value: int = 1) -> None:
        """Add ``value`` to the counter (a kick, seen from the backend)."""
        os.eventfd_write(self.fileno(), value)

    def drain(self) -> int:
        """Read and reset the counter; 0 when nothing was signalled."""
        try:
            return os.eventfd_read(self.fileno())
        except BlockingIOError:
            return 0

    def wait(self, timeout: float) -> int:
        """Wait up to ``timeout`` seconds for a signal, then drain it.

        Args:
            timeout: seconds; 0 only checks.

        Returns:
            The counter value read (0 on timeout).
        """
        fd = self.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        deadline = time.monotonic() + timeout
        while True:
            value = self.drain()
            if value:
                return value
            left = deadline - time.monotonic()
            if left <= 0:
                return 0
            poller.poll(max(1, int(left * 1000)))

    def close(self) -> None:
        """Close the fd. Idempotent."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> EventFd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EventFd(fd={self._fd})"
