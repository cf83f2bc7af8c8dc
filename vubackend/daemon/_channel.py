# The backend channel: requests the back-end sends to the front-end over the
# socket passed with SET_BACKEND_REQ_FD (docs/reference/vhost-user-protocol.md
# §2.2).
#
# Rules:
# * Device threads send on it, so sends are serialised (the Connection's send
#   lock) and a request that waits for its ack holds the channel's own lock
#   until the ack arrives, so acks are never mixed up between threads.
# * Never call it from the request thread while the front-end waits for a
#   reply from us on the main socket: both sides would wait for each other.
# * Each request checks the feature that gates it, from the negotiated
#   protocol features, before anything is sent.

from __future__ import annotations

import threading
from typing import final

from vubackend.errors import LocalProtocolError, RemoteProtocolError
from vubackend.protocol import (
    U64,
    BackendReq,
    Connection,
    Empty,
    IotlbMsg,
    Message,
    OwnedFds,
    ProtocolFeatures,
    SharedObject,
    ShmemMap,
    VringArea,
    VringState,
    gate_problem,
    spec_for,
)
from vubackend.protocol import VirtioFeatures as _VirtioFeatures

__all__ = ["BackendChannel"]


@final
class BackendChannel:
    """Sends back-end requests to the front-end and waits for acks.

    Given to devices through ``VhostUserBackend.set_backend_req_fd``.

    Args:
        connection: the channel's connection (reads ``BACKEND_REPLIES``).
        protocol_features: the protocol features the front-end acked.
        virtio_features: the virtio features the front-end acked.
    """

    def __init__(
        self,
        connection: Connection,
        protocol_features: ProtocolFeatures,
        virtio_features: _VirtioFeatures | None = None,
    ) -> None:
        self._connection = connection
        self._protocol = protocol_features
        self._virtio = (
            virtio_features if virtio_features is not None else _VirtioFeatures(0)
        )
        self._lock = threading.Lock()

    @property
    def reply_ack(self) -> bool:
        """Whether requests wait for the front-end's ack (REPLY_ACK)."""
        return bool(self._protocol & ProtocolFeatures.REPLY_ACK)

    def close(self) -> None:
        self._connection.close()

    def _send(
        self,
        request: BackendReq,
        payload: Empty | VringState | SharedObject | ShmemMap | VringArea | IotlbMsg,
        fds: tuple[int, ...] = (),
        *,
        always_reply: bool = False,
    ) -> Message | None:
        problem = gate_problem(
            spec_for(request),
            protocol_features=self._protocol,
            virtio_features=self._virtio,
        )
        if problem is not None:
            raise LocalProtocolError(f"{request.name}: {problem}")
        wait = always_reply or self.reply_ack
        with self._lock:
            self._connection.send(
                Message.new_request(request, payload, need_reply=wait, fds=fds)
            )
            if not wait:
                return None
            reply = self._connection.receive()
        if reply.request is not request:
            reply.close_fds()
            raise RemoteProtocolError(
                f"{request.name}: the front-end answered {reply.request.name}",
                request=int(reply.request),
            )
        if not always_reply:
            reply.close_fds()
            assert isinstance(reply.payload, U64)
            if reply.payload.value != 0:
                raise RemoteProtocolError(
                    f"{request.name}: the front-end refused it "
                    f"(ack {reply.payload.value:#x})",
                    request=int(request),
                )
        return reply

    def config_change(self) -> None:
        """Tell the front-end the config space changed (it re-reads it)."""
        self._send(BackendReq.CONFIG_CHANGE_MSG, Empty())

    def vring_call(self, index: int) -> None:
        """In-band interrupt for ring ``index`` (INBAND_NOTIFICATIONS)."""
        self._send(BackendReq.VRING_CALL, VringState(index, 0))

    def vring_err(self, index: int) -> None:
        """In-band error notification for ring ``index``."""
        self._send(BackendReq.VRING_ERR, VringState(index, 0))

    def iotlb_miss(self, iova: int, perm: int) -> None:
        """Ask the front-end for an IOTLB entry (ACCESS_PLATFORM)."""
        self._send(BackendReq.IOTLB_MSG, IotlbMsg(iova, 0, 0, perm, 1))

    def host_notifier(self, index: int, fd: int | None, size: int, offset: int) -> None:
        """Offer (``fd``) or withdraw (None) a host notifier page for a ring."""
        word = index | (0 if fd is not None else 0x100)
        fds = (fd,) if fd is not None else ()
        self._send(
            BackendReq.VRING_HOST_NOTIFIER_MSG, VringArea(word, size, offset), fds
        )

    def shared_object_add(self, uuid: bytes) -> None:
        """Register this back-end as the exporter of shared object ``uuid``."""
        self._send(BackendReq.SHARED_OBJECT_ADD, SharedObject(uuid))

    def shared_object_remove(self, uuid: bytes) -> None:
        """Withdraw shared object ``uuid``."""
        self._send(BackendReq.SHARED_OBJECT_REMOVE, SharedObject(uuid))

    def shared_object_lookup(self, uuid: bytes) -> int | None:
        """Look up shared object ``uuid``; returns its dma-buf fd (owned by
        the caller) or None when the front-end does not know it."""
        reply = self._send(
            BackendReq.SHARED_OBJECT_LOOKUP, SharedObject(uuid), always_reply=True
        )
        assert reply is not None
        with OwnedFds(reply.fds) as fds:
            failed = isinstance(reply.payload, U64) and reply.payload.value != 0
            if failed or len(fds) == 0:
                return None
            return fds.take()

    def shmem_map(self, mapping: ShmemMap, fd: int) -> None:
        """Ask the front-end to map ``fd`` into shared memory region
        ``mapping.shmid`` (the fd is borrowed)."""
        self._send(BackendReq.SHMEM_MAP, mapping, (fd,))

    def shmem_unmap(self, mapping: ShmemMap) -> None:
        """Ask the front-end to remove a mapping made with shmem_map."""
        self._send(BackendReq.SHMEM_UNMAP, mapping)
