# BackendChannel: the frontend's end of the backend request channel (the
# socketpair sent with SET_BACKEND_REQ_FD). A thread reads the backend's
# requests and answers them with sensible defaults or user hooks.
#
# Rules of this module:
# - One thread reads; it polls with a short timeout so close() stops it
#   within ~0.1 s whatever the backend does. It never blocks on the main
#   socket (vhost-user-protocol.md §2.2: that would deadlock with a backend
#   waiting for our ack while we wait for its reply).
# - Every request is recorded as a BackendEvent (tests look at them).
# - An answer is sent when the request set NEED_REPLY, and always for
#   SHARED_OBJECT_LOOKUP (the one request that always gets a reply).
# - Fds that come with a request are closed after its hook returns: a hook
#   that wants to keep one dups it.
# - Defaults: CONFIG_CHANGE_MSG counts and acks 0; VRING_CALL / VRING_ERR
#   signal the ring's call / err eventfd through a callback and ack 0;
#   SHARED_OBJECT_ADD/REMOVE keep a table of UUIDs; SHARED_OBJECT_LOOKUP
#   answers with an fd registered in that table, or 1 without fd; SHMEM_MAP
#   and SHMEM_UNMAP keep a table of mappings (nothing is mapped); IOTLB
#   MISS is refused (1: this frontend has no IOMMU), other IOTLB messages
#   and HOST_NOTIFIER are recorded and acked 0.
# - A malformed request is recorded in `errors`; if the message was consumed
#   whole the channel answers 1 (when asked) and goes on, else it stops.

from __future__ import annotations

import errno
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, final

from vubackend.errors import (
    PeerDisconnectedError,
    RemoteProtocolError,
    TransportError,
    VhostUserError,
)
from vubackend.protocol import (
    U64,
    BackendReq,
    Connection,
    IotlbMsg,
    IotlbType,
    Message,
    Payload,
    SharedObject,
    ShmemMap,
    VringState,
)

__all__ = ["BackendAnswer", "BackendChannel", "BackendEvent", "BackendHook"]

_POLL_SECONDS: Final = 0.1


@final
@dataclass(frozen=True, slots=True)
class BackendAnswer:
    """What the frontend answers to a backend request.

    Attributes:
        status: the u64 sent back; 0 means success.
        fd: an fd to attach (SHARED_OBJECT_LOOKUP only); borrowed, not closed.
    """

    status: int = 0
    fd: int | None = None


@final
@dataclass(frozen=True, slots=True)
class BackendEvent:
    """One request received on the backend channel.

    Attributes:
        request: which request.
        payload: its decoded payload.
        need_reply: whether the backend asked for an answer.
        answer: what the frontend answered (None: nothing was sent).
        fd_count: how many fds came with it.
    """

    request: BackendReq
    payload: Payload
    need_reply: bool
    answer: BackendAnswer | None
    fd_count: int = 0


BackendHook = Callable[[Message], BackendAnswer]
"""A user hook for one backend request: gets the message (its fds are closed
after the hook returns) and returns the answer."""


@dataclass
class _Tables:
    shared_objects: dict[uuid.UUID, int | None] = field(default_factory=dict)
    shmem_maps: list[ShmemMap] = field(default_factory=list)


@final
class BackendChannel:
    """Serves the backend request channel on a thread.

    Made by ``Frontend.set_backend_req_fd``; you rarely build one yourself.

    Args:
        connection: our end of the channel (owned from now on).
        hooks: per-request overrides of the default answers.
        on_vring_call: called with a queue index for VRING_CALL.
        on_vring_err: called with a queue index for VRING_ERR.
    """

    def __init__(
        self,
        connection: Connection,
        *,
        hooks: Mapping[BackendReq, BackendHook] | None = None,
        on_vring_call: Callable[[int], None] | None = None,
        on_vring_err: Callable[[int], None] | None = None,
    ) -> None:
        self._conn = connection
        self._conn.settimeout(_POLL_SECONDS)
        self._hooks = dict(hooks or {})
        self._on_call = on_vring_call
        self._on_err = on_vring_err
        self._tables = _Tables()
        self._events: list[BackendEvent] = []
        self._errors: list[VhostUserError] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._disconnected = False
        self._thread = threading.Thread(
            target=self._run, name="vubackend-backend-channel", daemon=True
        )
        self._thread.start()

    # ------------------------------------------------------------ results

    @property
    def events(self) -> list[BackendEvent]:
        """Every request received so far, in order (a copy)."""
        with self._cond:
            return list(self._events)

    @property
    def errors(self) -> list[VhostUserError]:
        """Malformed requests and transport failures seen (a copy)."""
        with self._cond:
            return list(self._errors)

    @property
    def disconnected(self) -> bool:
        """Whether the backend closed its end of the channel."""
        return self._disconnected

    @property
    def config_changes(self) -> int:
        """How many CONFIG_CHANGE_MSG requests arrived."""
        return self.count(BackendReq.CONFIG_CHANGE_MSG)

    @property
    def shared_objects(self) -> dict[uuid.UUID, int | None]:
        """The shared-object table: UUID -> dma-buf fd to answer lookups
        with (None: known but no fd). Add entries to answer lookups; fds
        stay owned by whoever put them there."""
        return self._tables.shared_objects

    @property
    def shmem_maps(self) -> list[ShmemMap]:
        """The SHMEM mappings the backend asked for and has not removed."""
        with self._cond:
            return list(self._tables.shmem_maps)

    def count(self, request: BackendReq) -> int:
        """How many requests of this kind arrived."""
        with self._cond:
            return sum(e.request is request for e in self._events)

    def wait_for(
        self, request: BackendReq, count: int = 1, timeout: float = 5.0
    ) -> bool:
        """Wait until ``count`` requests of this kind have arrived.

        Returns:
            True if they did within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while sum(e.request is request for e in self._events) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    # ------------------------------------------------------------ thread

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                message = self._conn.receive()
            except TransportError as exc:
                if exc.errno == errno.ETIMEDOUT:
                    continue
                self._fail(exc)
                return
            except PeerDisconnectedError:
                self._disconnected = True
                with self._cond:
                    self._cond.notify_all()
                return
            except RemoteProtocolError as exc:
                self._fail(exc)
                if not exc.recoverable:
                    return
                if exc.need_reply and exc.request is not None:
                    self._send_raw_nack(exc.request)
                continue
            except VhostUserError as exc:  # closed under us
                self._fail(exc)
                return
            self._serve(message)

    def _fail(self, exc: VhostUserError) -> None:
        with self._cond:
            self._errors.append(exc)
            self._cond.notify_all()

    def _send_raw_nack(self, request: int) -> None:
        try:
            self._conn.send(Message.ack(BackendReq(request), success=False))
        except (VhostUserError, ValueError) as exc:
            if isinstance(exc, VhostUserError):
                self._fail(exc)

    def _serve(self, message: Message) -> None:
        request = message.request
        assert isinstance(request, BackendReq)
        try:
            hook = self._hooks.get(request)
            answer = hook(message) if hook is not None else self._default(message)
        finally:
            message.close_fds()
        always = request is BackendReq.SHARED_OBJECT_LOOKUP
        sent: BackendAnswer | None = None
        if message.need_reply or always:
            fds = () if answer.fd is None else (answer.fd,)
            try:
                self._conn.send(Message.new_reply(request, U64(answer.status), fds=fds))
                sent = answer
            except VhostUserError as exc:
                self._fail(exc)
        with self._cond:
            self._events.append(
                BackendEvent(
                    request, message.payload, message.need_reply, sent, len(message.fds)
                )
            )
            self._cond.notify_all()

    def _default(self, message: Message) -> BackendAnswer:
        payload = message.payload
        tables = self._tables
        match message.request:
            case BackendReq.VRING_CALL if isinstance(payload, VringState):
                if self._on_call is not None:
                    self._on_call(payload.index)
            case BackendReq.VRING_ERR if isinstance(payload, VringState):
                if self._on_err is not None:
                    self._on_err(payload.index)
            case BackendReq.IOTLB_MSG if isinstance(payload, IotlbMsg):
                if payload.msg_type == IotlbType.MISS:
                    return BackendAnswer(1)
            case BackendReq.SHARED_OBJECT_ADD if isinstance(payload, SharedObject):
                tables.shared_objects.setdefault(payload.as_uuid, None)
            case BackendReq.SHARED_OBJECT_REMOVE if isinstance(payload, SharedObject):
                tables.shared_objects.pop(payload.as_uuid, None)
            case BackendReq.SHARED_OBJECT_LOOKUP if isinstance(payload, SharedObject):
                fd = tables.shared_objects.get(payload.as_uuid)
                return BackendAnswer(0, fd) if fd is not None else BackendAnswer(1)
            case BackendReq.SHMEM_MAP if isinstance(payload, ShmemMap):
                with self._cond:
                    tables.shmem_maps.append(payload)
            case BackendReq.SHMEM_UNMAP if isinstance(payload, ShmemMap):
                with self._cond:
                    match = [
                        m
                        for m in tables.shmem_maps
                        if (m.shmid, m.shm_offset, m.length)
                        == (payload.shmid, payload.shm_offset, payload.length)
                    ]
                    if not match:
                        return BackendAnswer(1)
                    tables.shmem_maps.remove(match[0])
            case _:
                pass
        return BackendAnswer(0)

    # ------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Stop the thread (within ~0.1 s) and close the channel. Idempotent."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._conn.close()

    def __repr__(self) -> str:
        return f"<BackendChannel events={len(self._events)}>"
