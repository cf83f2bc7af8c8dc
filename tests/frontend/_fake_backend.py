"""A scripted vhost-user backend double for the frontend tests: it serves the
protocol on one end of a socketpair in a thread, records every request,
answers the ones with a reply body, acks NEED_REPLY (non-zero for requests
listed in ``refuse``), maps the memory table it is sent, and can send
requests on the backend channel."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from vubackend.errors import RemoteProtocolError, VhostUserError
from vubackend.memory import (
    FrontendAddress,
    GuestAddress,
    GuestMemory,
    RegionDescriptor,
)
from vubackend.protocol import (
    U64,
    BackendReq,
    Config,
    ConfigReply,
    Connection,
    DeviceStateTransfer,
    FrontendReq,
    Inbound,
    Inflight,
    Log,
    MemoryTable,
    Message,
    Payload,
    ProtocolFeatures,
    ShmemConfig,
    SingleMemoryRegion,
    VirtioFeatures,
    VringState,
)

F = FrontendReq


@dataclass
class FakeBackend:
    """The backend's behaviour and what it saw."""

    features: int = (
        int(VirtioFeatures.VERSION_1 | VirtioFeatures.PROTOCOL_FEATURES) | 0x3
    )
    protocol_features: int = int(
        ProtocolFeatures.MQ
        | ProtocolFeatures.REPLY_ACK
        | ProtocolFeatures.CONFIG
        | ProtocolFeatures.BACKEND_REQ
        | ProtocolFeatures.LOG_SHMFD
        | ProtocolFeatures.INFLIGHT_SHMFD
        | ProtocolFeatures.STATUS
        | ProtocolFeatures.CONFIGURE_MEM_SLOTS
        | ProtocolFeatures.DEVICE_STATE
        | ProtocolFeatures.RESET_DEVICE
        | ProtocolFeatures.SHMEM
    )
    queue_num: int = 4
    config: bytearray = field(default_factory=lambda: bytearray(range(64)))
    refuse: set[FrontendReq] = field(default_factory=set)
    silent: set[FrontendReq] = field(default_factory=set)
    device_state: bytes = b"state-of-the-device"
    received: list[Message] = field(default_factory=list)
    regions: list[RegionDescriptor] = field(default_factory=list)
    memory: GuestMemory | None = None
    bases: dict[int, int] = field(default_factory=dict)
    status: int = 0
    loaded_state: bytes = b""
    backend_channel: Connection | None = None
    log_size: int = 0
    rejected: list[str] = field(default_factory=list)

    def requests(self) -> list[FrontendReq]:
        """The request ids seen, in order."""
        return [FrontendReq(m.request) for m in self.received]

    # ------------------------------------------------------------ serving

    def serve(self, conn: Connection) -> None:
        try:
            self._serve(conn)
        finally:
            conn.close()  # a backend that gives up closes the connection

    def _serve(self, conn: Connection) -> None:
        while True:
            try:
                message = conn.receive()
            except RemoteProtocolError as exc:
                self.rejected.append(str(exc))
                if exc.recoverable:
                    continue
                return
            except VhostUserError:
                return
            self.received.append(message)
            try:
                self._handle(conn, message)
            except VhostUserError:
                return
            finally:
                message.close_fds()

    def _reply(
        self,
        conn: Connection,
        request: FrontendReq,
        payload: Payload,
        fds: tuple[int, ...] = (),
    ) -> None:
        conn.send(Message.new_reply(request, payload, fds=fds))

    def _handle(self, conn: Connection, message: Message) -> None:
        request = FrontendReq(message.request)
        payload = message.payload
        if request in self.silent:
            return
        if request is F.GET_FEATURES:
            self._reply(conn, request, U64(self.features))
        elif request is F.GET_PROTOCOL_FEATURES:
            self._reply(conn, request, U64(self.protocol_features))
        elif request is F.GET_QUEUE_NUM:
            self._reply(conn, request, U64(self.queue_num))
        elif request is F.GET_MAX_MEM_SLOTS:
            self._reply(conn, request, U64(32))
        elif request is F.GET_STATUS:
            self._reply(conn, request, U64(self.status))
        elif request is F.GET_VRING_BASE:
            assert isinstance(payload, VringState)
            self._reply(
                conn,
                request,
                VringState(payload.index, self.bases.get(payload.index, 0)),
            )
        elif request is F.GET_CONFIG:
            assert isinstance(payload, Config)
            data = bytes(self.config[payload.offset : payload.offset + payload.size])
            if request in self.refuse or len(data) != payload.size:
                self._reply(conn, request, ConfigReply(0, 0, 0, b""))
            else:
                self._reply(
                    conn,
                    request,
                    ConfigReply(payload.offset, payload.size, payload.flags, data),
                )
        elif request is F.SET_LOG_BASE:
            assert isinstance(payload, Log)
            self.log_size = payload.mmap_size
            self._mark_log(message.fds[0], payload)
            self._reply(conn, request, U64(0))
        elif request is F.GET_INFLIGHT_FD:
            assert isinstance(payload, Inflight)
            size = payload.num_queues * 64 * payload.queue_size
            fd = os.memfd_create("fake-inflight", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
            try:
                self._reply(
                    conn,
                    request,
                    Inflight(size, 0, payload.num_queues, payload.queue_size),
                    (fd,),
                )
            finally:
                os.close(fd)
        elif request is F.SET_DEVICE_STATE_FD:
            assert isinstance(payload, DeviceStateTransfer)
            fd = os.dup(message.fds[0])
            if payload.direction == 0:
                threading.Thread(target=self._save, args=(fd,), daemon=True).start()
            else:
                threading.Thread(target=self._load, args=(fd,), daemon=True).start()
            self._reply(conn, request, U64(0x100))
        elif request is F.CHECK_DEVICE_STATE:
            self._reply(conn, request, U64(0))
        elif request is F.GET_SHMEM_CONFIG:
            self._reply(conn, request, ShmemConfig(2, (4096, 8192)))
        else:
            self._apply(request, message)
            if message.need_reply:
                conn.send(Message.ack(request, success=request not in self.refuse))

    def _apply(self, request: FrontendReq, message: Message) -> None:
        payload = message.payload
        if request is F.SET_MEM_TABLE and isinstance(payload, MemoryTable):
            self.regions = [
                self._descriptor(r, fd)
                for r, fd in zip(payload.regions, message.fds, strict=True)
            ]
            self._remap()
        elif request is F.ADD_MEM_REG and isinstance(payload, SingleMemoryRegion):
            self.regions.append(self._descriptor(payload.region, message.fds[0]))
            self._remap()
        elif request is F.REM_MEM_REG and isinstance(payload, SingleMemoryRegion):
            gpa = payload.region.guest_phys_addr
            gone = [r for r in self.regions if r.gpa == gpa]
            for r in gone:
                os.close(r.fd)
                self.regions.remove(r)
            self._remap()
        elif request is F.SET_VRING_BASE and isinstance(payload, VringState):
            self.bases[payload.index] = payload.num
        elif request is F.SET_STATUS and isinstance(payload, U64):
            self.status = payload.value
        elif request is F.SET_CONFIG and isinstance(payload, Config):
            self.config[payload.offset : payload.offset + payload.size] = payload.data
        elif request is F.SET_BACKEND_REQ_FD:
            self.backend_channel = Connection.from_fd(
                os.dup(message.fds[0]), Inbound.BACKEND_REPLIES
            )

    def _descriptor(self, region: object, fd: int) -> RegionDescriptor:
        from vubackend.protocol import MemoryRegion

        assert isinstance(region, MemoryRegion)
        return RegionDescriptor(
            gpa=GuestAddress(region.guest_phys_addr),
            size=region.memory_size,
            frontend_addr=FrontendAddress(region.userspace_addr),
            mmap_offset=region.mmap_offset,
            fd=os.dup(fd),
        )

    def _remap(self) -> None:
        if self.memory is not None:
            self.memory.close()
        self.memory = GuestMemory.map(self.regions) if self.regions else None

    def _mark_log(self, fd: int, log: Log) -> None:
        import mmap

        with mmap.mmap(fd, log.mmap_size, flags=mmap.MAP_SHARED) as m:
            m[0] |= 0b101  # pages 0 and 2 dirty

    def _save(self, fd: int) -> None:
        with os.fdopen(fd, "wb") as f:
            f.write(self.device_state)

    def _load(self, fd: int) -> None:
        with os.fdopen(fd, "rb") as f:
            self.loaded_state = f.read()

    def close(self) -> None:
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        for r in self.regions:
            os.close(r.fd)
        self.regions.clear()
        if self.backend_channel is not None:
            self.backend_channel.close()

    # ------------------------------------------------------------ channel

    def backend_request(
        self,
        request: BackendReq,
        payload: Payload | None = None,
        *,
        need_reply: bool = True,
    ) -> Message | None:
        """Send a request on the backend channel; return the reply if one
        was asked for (or is always sent)."""
        conn = self.backend_channel
        assert conn is not None
        conn.settimeout(5)
        conn.send(Message.new_request(request, payload, need_reply=need_reply))
        if need_reply or request is BackendReq.SHARED_OBJECT_LOOKUP:
            return conn.receive()
        return None


@contextmanager
def running_backend(backend: FakeBackend) -> Iterator[socket.socket]:
    """Serve ``backend`` on a socketpair; yield the frontend's end."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    conn = Connection(theirs, Inbound.FRONTEND_REQUESTS)
    thread = threading.Thread(target=backend.serve, args=(conn,), daemon=True)
    thread.start()
    try:
        yield ours
    finally:
        ours.close()
        thread.join(timeout=5)
        conn.close()
        backend.close()
