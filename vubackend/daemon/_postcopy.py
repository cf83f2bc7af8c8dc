# PostcopySession: the postcopy requests of one session (PAGEFAULT,
# vhost-user-protocol.md §4.8), for the request handler.
#
# Rules of this module:
# - POSTCOPY_ADVISE opens a userfaultfd (PostcopyFaults) and hands the
#   frontend a duplicate; a second ADVISE replaces the first.
#   POSTCOPY_LISTEN needs an ADVISE before it and no region mapped (the
#   frontend could not resolve faults on a region whose address it never
#   received); from then on SET_MEM_TABLE and ADD_MEM_REG are answered with
#   our address of each region. POSTCOPY_END (and the end of the session)
#   unregisters every region, waking any thread blocked on a fault, and
#   closes the userfaultfd.
# - The frontend answers our postcopy memory reply with a message of its own
#   (the same request id, a u64, 0 = OK; QEMU sends it once after the last
#   ADD_MEM_REG of a batch). Only after it are the regions registered
#   (after_reply). It is read here, from the socket, because it is no
#   request: its header is peeked first, and anything else is left in the
#   socket for the request loop.
# - A region that cannot be registered ends the session: left
#   unregistered, a page that has not arrived would read as zeros.
# - Nothing here touches guest memory: the threads that fault are the
#   workers, and they copy with the GIL released (the postcopy backend).

from __future__ import annotations

import dataclasses
import logging
import os
import select
import socket
import time
from typing import Final, final

from vubackend.errors import LocalProtocolError, MappingError, SessionEndedError
from vubackend.memory import GuestAddress, GuestMemoryAtomic, PostcopyFaults
from vubackend.protocol import (
    HEADER_SIZE,
    U64,
    Connection,
    FrontendReq,
    Header,
    HeaderFlags,
    MemoryRegion,
    MemoryTable,
    Message,
    OwnedFds,
    Payload,
    SingleMemoryRegion,
)

__all__ = ["PostcopySession"]

log = logging.getLogger("vubackend.daemon")

# How long to wait for the frontend's answer to a postcopy memory reply
# (QEMU sends it at once); then the request loop takes over.
ANSWER_TIMEOUT: Final = 30.0
_ANSWER_SIZE: Final = HEADER_SIZE + 8


@final
class PostcopySession:
    """One session's postcopy state: its userfaultfd, whether it listens,
    and the memory reply whose answer is due.

    Args:
        memory: the session's guest memory.
    """

    def __init__(self, memory: GuestMemoryAtomic) -> None:
        self._memory = memory
        self.faults: PostcopyFaults | None = None
        self.listening = False
        # The memory request whose postcopy reply awaits the frontend's answer.
        self._awaiting: FrontendReq | None = None

    # ------------------------------------------------------------ requests

    def advise(self) -> int:
        """POSTCOPY_ADVISE: a new userfaultfd.

        Returns:
            A duplicate of it for the reply (the caller sends and closes it).

        Raises:
            MappingError: userfaultfd is unavailable here.
        """
        faults = PostcopyFaults.open()
        if self.faults is not None:
            self.faults.close()
        self.faults = faults
        log.info("postcopy: userfaultfd %d created", faults.fileno())
        return faults.share_fd()

    def listen(self, message: Message, fds: OwnedFds) -> Payload:
        """POSTCOPY_LISTEN.

        Raises:
            LocalProtocolError: no ADVISE came first, or regions are mapped.
        """
        if self.faults is None:
            raise LocalProtocolError("POSTCOPY_LISTEN before POSTCOPY_ADVISE")
        with self._memory.memory() as mem:
            if mem.regions:
                raise LocalProtocolError(
                    f"POSTCOPY_LISTEN with {len(mem.regions)} region(s) already "
                    f"mapped; the frontend must send the memory table after it"
                )
        self.listening = True
        log.info("postcopy: listening")
        return U64(0)

    def end(self, message: Message, fds: OwnedFds) -> Payload:
        """POSTCOPY_END: unregister everything and close the userfaultfd."""
        registered = 0 if self.faults is None else len(self.faults.registered)
        self.close()
        log.info("postcopy: ended (%d region(s) were registered)", registered)
        return U64(0)

    def memory_reply(self, request: FrontendReq, payload: Payload) -> Payload | None:
        """The postcopy reply to SET_MEM_TABLE or ADD_MEM_REG, just applied:
        the same regions with our address of each; None when not listening.
        The regions are registered once the frontend answers it
        (:meth:`after_reply`)."""
        if not self.listening:
            return None
        with self._memory.memory() as mem:

            def ours(region: MemoryRegion) -> MemoryRegion:
                mapped = mem.find_region(GuestAddress(region.guest_phys_addr))
                assert mapped is not None  # it was just mapped
                address = PostcopyFaults.address_of(mapped)
                return dataclasses.replace(region, userspace_addr=address)

            self._awaiting = request
            if isinstance(payload, MemoryTable):
                return MemoryTable(tuple(ours(r) for r in payload.regions))
            assert isinstance(payload, SingleMemoryRegion)
            return SingleMemoryRegion(ours(payload.region))

    def after_reply(self, connection: Connection) -> None:
        """After a reply was sent: if it was a postcopy memory reply, wait
        for the frontend's answer and register the regions it covers.

        Raises:
            SessionEndedError: a region cannot be registered.
        """
        request, self._awaiting = self._awaiting, None
        if request is None:
            return
        answer = _read_answer(connection, request)
        if answer is None:
            # Another request came first (QEMU answers after the last
            # ADD_MEM_REG): wait again after the next memory reply.
            self._awaiting = request
            return
        if answer != 0:
            log.warning(
                "postcopy: the frontend answered %s with %d; regions stay unregistered",
                request.name,
                answer,
            )
            return
        faults = self.faults
        if faults is None:
            return
        with self._memory.memory() as mem:
            try:
                for region in mem.regions:
                    faults.register(region)
            except MappingError as exc:
                raise SessionEndedError(f"postcopy: {exc}") from exc
        log.info("postcopy: %d region(s) registered", len(faults.registered))

    def close(self) -> None:
        """Leave postcopy: unregister, close the userfaultfd. Idempotent."""
        faults, self.faults = self.faults, None
        self.listening = False
        self._awaiting = None
        if faults is not None:
            faults.close()


def _read_answer(connection: Connection, request: FrontendReq) -> int | None:
    """The u64 of the frontend's answer to the postcopy reply to
    ``request``, read from the socket; None (nothing consumed) when the next
    message is something else, the peer hung up, or nothing came in time."""
    sock = socket.socket(fileno=os.dup(connection.fileno()))
    try:
        deadline = time.monotonic() + ANSWER_TIMEOUT
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([sock], [], [], left)[0]:
                log.warning("postcopy: no answer to the %s reply", request.name)
                return None
            head = sock.recv(_ANSWER_SIZE, socket.MSG_PEEK)
            if len(head) >= HEADER_SIZE:
                header = Header.unpack(head[:HEADER_SIZE])
                if (
                    header.request != request
                    or header.size != 8
                    or header.flags & (HeaderFlags.REPLY | HeaderFlags.NEED_REPLY)
                ):
                    return None
                if len(head) == _ANSWER_SIZE:
                    data = sock.recv(_ANSWER_SIZE, socket.MSG_WAITALL)
                    return int.from_bytes(data[HEADER_SIZE:], "little")
            elif not head:
                return None  # the request loop sees the hang-up
            time.sleep(0.001)  # part of it is here; the rest is on its way
    except OSError as exc:
        log.warning("postcopy: reading the answer to %s: %s", request.name, exc)
        return None
    finally:
        sock.close()
