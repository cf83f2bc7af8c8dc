# SessionDirtyLog: the dirty log of one session (pre-copy live migration,
# vhost-user-protocol.md §4.7), for the request handler.
#
# Rules of this module:
# - SET_LOG_BASE's fd is kept (ours from then on): the log is mapped from it
#   whenever logging starts. It is also mapped once at once, so that a bad
#   size or offset is refused by SET_LOG_BASE itself.
# - Guest writes are logged while LOG_ALL is acked and a log was given; a
#   ring's own writes (used ring, event areas) only when its SET_VRING_ADDR
#   asked too (VHOST_VRING_F_LOG), at its log_guest_addr (ring_log()).
# - Clearing LOG_ALL (the migration ended, or was cancelled) stops all
#   logging and forgets the log: unmapped, fd closed, nothing left behind. A
#   new migration starts with a new SET_LOG_BASE (QEMU always sends one);
#   LOG_ALL without one logs nothing, and says so.
# - Every change goes through the memory's DirtyLogSlot, which the workers
#   mark through: once a method returns, no worker marks the old log.

from __future__ import annotations

import logging
import os
from typing import final

from vubackend.bitmap import DirtyLog
from vubackend.memory import GuestAddress, GuestMemoryAtomic
from vubackend.protocol import VringAddr, VringAddrFlags

__all__ = ["SessionDirtyLog"]

log = logging.getLogger("vubackend.daemon")


@final
class SessionDirtyLog:
    """Whether and where one session logs its writes to guest memory.

    Args:
        memory: the session's guest memory (its log slot is set here).
    """

    def __init__(self, memory: GuestMemoryAtomic) -> None:
        self._memory = memory
        self.logging_all = False
        # SET_LOG_BASE's fd (ours), size and offset.
        self._source: tuple[int, int, int] | None = None

    def set_base(self, fd: int, size: int, offset: int) -> None:
        """SET_LOG_BASE: keep the new log (``fd`` is taken over, also on
        failure) and log there if LOG_ALL is on.

        Raises:
            MappingError: the log cannot be mapped, or does not cover the
                guest memory mapped now.
        """
        try:
            DirtyLog.map(fd, size=size, offset=offset).close()
        except BaseException:
            os.close(fd)
            raise
        self._forget()
        self._source = (fd, size, offset)
        self._apply()

    def set_logging_all(self, on: bool) -> bool:
        """LOG_ALL acked (True) or cleared (False) by SET_FEATURES.

        Returns:
            Whether it changed (the rings' logging must then be applied
            again, see :meth:`ring_log`).

        Raises:
            MappingError: the log does not cover the guest memory mapped now.
        """
        if on == self.logging_all:
            return False
        self.logging_all = on
        if on and self._source is None:
            log.warning("LOG_ALL without a log (SET_LOG_BASE): nothing is logged")
        self._apply()
        if not on:
            self._forget()
        return True

    def ring_log(self, addr: VringAddr | None) -> tuple[bool, GuestAddress | None]:
        """Whether a ring with the addresses ``addr`` logs its own writes,
        and where its used ring is logged (``VringState.set_log_used``)."""
        if not self.logging_all or addr is None or not addr.flags & VringAddrFlags.LOG:
            return False, None
        return True, GuestAddress(addr.log)

    def _apply(self) -> None:
        if self.logging_all and self._source is not None:
            fd, size, offset = self._source
            self._memory.set_log(DirtyLog.map(fd, size=size, offset=offset))
        else:
            self._memory.set_log(None)

    def _forget(self) -> None:
        source, self._source = self._source, None
        if source is not None:
            os.close(source[0])

    def close(self) -> None:
        """Stop logging and close the log (the session ends). Idempotent."""
        self.logging_all = False
        self._memory.set_log(None)
        self._forget()
