"""One table of valid messages, shared by the codec, transport and fuzz
tests: for every request of both channels, a request and (where it has one)
a reply, with the number of fds each carries."""

from __future__ import annotations

from dataclasses import dataclass

from vubackend.protocol import (
    U64,
    BackendReq,
    Config,
    ConfigReply,
    DeviceStateTransfer,
    Empty,
    FrontendReq,
    Inbound,
    Inflight,
    IotlbMsg,
    Log,
    MemoryRegion,
    MemoryTable,
    Message,
    Opaque,
    Payload,
    SharedObject,
    ShmemConfig,
    ShmemMap,
    SingleMemoryRegion,
    VringAddr,
    VringArea,
    VringFile,
    VringState,
)

REGION = MemoryRegion(0x0, 0x10_0000, 0x7F00_0000_0000, 0)
REGION2 = MemoryRegion(0x10_0000, 0x20_0000, 0x7F00_0010_0000, 0x1000)
UUID = bytes(range(1, 17))


@dataclass(frozen=True)
class Case:
    """A message the reader ``inbound`` must accept, carrying ``nfds`` fds."""

    inbound: Inbound
    request: FrontendReq | BackendReq
    payload: Payload
    nfds: int = 0
    need_reply: bool = False

    def message(self, fds: tuple[int, ...]) -> Message:
        if self.inbound.is_reply:
            return Message.new_reply(self.request, self.payload, fds=fds)
        return Message.new_request(
            self.request, self.payload, need_reply=self.need_reply, fds=fds
        )

    @property
    def id(self) -> str:
        kind = "reply" if self.inbound.is_reply else "request"
        return f"{self.request.name}-{kind}-{self.nfds}fd"


F = FrontendReq
B = BackendReq
REQ = Inbound.FRONTEND_REQUESTS
REP = Inbound.FRONTEND_REPLIES
BREQ = Inbound.BACKEND_REQUESTS
BREP = Inbound.BACKEND_REPLIES

CASES: tuple[Case, ...] = (
    Case(REQ, F.GET_FEATURES, Empty()),
    Case(REP, F.GET_FEATURES, U64(1 << 32 | 1 << 30)),
    Case(REQ, F.SET_FEATURES, U64(1 << 32), need_reply=True),
    Case(REP, F.SET_FEATURES, U64(0)),
    Case(REQ, F.SET_OWNER, Empty()),
    Case(REQ, F.RESET_OWNER, Empty()),
    Case(REQ, F.SET_MEM_TABLE, MemoryTable((REGION,)), nfds=1),
    Case(REQ, F.SET_MEM_TABLE, MemoryTable((REGION, REGION2)), nfds=2),
    Case(REQ, F.SET_MEM_TABLE, MemoryTable((REGION,) * 8), nfds=8),
    Case(REP, F.SET_MEM_TABLE, U64(1)),
    Case(REQ, F.SET_LOG_BASE, Log(0x1000, 0), nfds=1),
    Case(REP, F.SET_LOG_BASE, U64(0)),
    Case(REP, F.SET_LOG_BASE, Log(0x1000, 0)),
    Case(REQ, F.SET_LOG_FD, Empty(), nfds=1),
    Case(REQ, F.SET_VRING_NUM, VringState(0, 256)),
    Case(REQ, F.SET_VRING_ADDR, VringAddr(1, 1, 0x1000, 0x3000, 0x2000, 0x3000)),
    Case(REQ, F.SET_VRING_BASE, VringState(0, 1 << 15)),
    Case(REQ, F.GET_VRING_BASE, VringState(1, 0)),
    Case(REP, F.GET_VRING_BASE, VringState(1, 77)),
    Case(REQ, F.SET_VRING_KICK, VringFile(0), nfds=1),
    Case(REQ, F.SET_VRING_KICK, VringFile(3, nofd=True)),
    Case(REQ, F.SET_VRING_CALL, VringFile(255), nfds=1),
    Case(REQ, F.SET_VRING_ERR, VringFile(2), nfds=1),
    Case(REQ, F.GET_PROTOCOL_FEATURES, Empty()),
    Case(REP, F.GET_PROTOCOL_FEATURES, U64(0x1F)),
    Case(REQ, F.SET_PROTOCOL_FEATURES, U64(0x1F)),
    Case(REQ, F.GET_QUEUE_NUM, Empty()),
    Case(REP, F.GET_QUEUE_NUM, U64(2)),
    Case(REQ, F.SET_VRING_ENABLE, VringState(0, 1), need_reply=True),
    Case(REQ, F.SEND_RARP, U64(0x0000_5254_0012_3456)),
    Case(REQ, F.NET_SET_MTU, U64(1500)),
    Case(REQ, F.SET_BACKEND_REQ_FD, Empty(), nfds=1, need_reply=True),
    Case(REQ, F.IOTLB_MSG, IotlbMsg(0x1000, 0x1000, 0x7F00_0000_0000, 3, 2)),
    Case(REP, F.IOTLB_MSG, U64(0)),
    Case(REQ, F.SET_VRING_ENDIAN, VringState(0, 0)),
    Case(REQ, F.GET_CONFIG, Config(0, 8, 0, bytes(8))),
    Case(REP, F.GET_CONFIG, ConfigReply(0, 8, 0, bytes(range(8)))),
    Case(REP, F.GET_CONFIG, ConfigReply(0, 0, 0, b"")),
    Case(REQ, F.SET_CONFIG, Config(4, 4, 1, b"\x01\x02\x03\x04")),
    Case(REQ, F.CREATE_CRYPTO_SESSION, Opaque(bytes(100))),
    Case(REP, F.CREATE_CRYPTO_SESSION, Opaque(bytes(100))),
    Case(REQ, F.CLOSE_CRYPTO_SESSION, U64(7)),
    Case(REQ, F.POSTCOPY_ADVISE, Empty()),
    Case(REP, F.POSTCOPY_ADVISE, Empty(), nfds=1),
    Case(REQ, F.POSTCOPY_LISTEN, Empty(), need_reply=True),
    Case(REP, F.POSTCOPY_LISTEN, U64(0)),
    Case(REQ, F.POSTCOPY_END, Empty()),
    Case(REP, F.POSTCOPY_END, U64(0)),
    Case(REQ, F.GET_INFLIGHT_FD, Inflight(0, 0, 2, 256)),
    Case(REP, F.GET_INFLIGHT_FD, Inflight(0x2000, 0, 2, 256), nfds=1),
    Case(REP, F.GET_INFLIGHT_FD, Inflight(0, 0, 2, 256)),
    Case(REQ, F.SET_INFLIGHT_FD, Inflight(0x2000, 0, 2, 256), nfds=1),
    Case(REQ, F.GPU_SET_SOCKET, Empty(), nfds=1),
    Case(REQ, F.RESET_DEVICE, Empty()),
    Case(REQ, F.VRING_KICK, VringState(1, 0)),
    Case(REQ, F.GET_MAX_MEM_SLOTS, Empty()),
    Case(REP, F.GET_MAX_MEM_SLOTS, U64(509)),
    Case(REQ, F.ADD_MEM_REG, SingleMemoryRegion(REGION2), nfds=1),
    Case(REQ, F.REM_MEM_REG, SingleMemoryRegion(REGION2)),
    Case(REQ, F.REM_MEM_REG, SingleMemoryRegion(REGION2), nfds=1),
    Case(REQ, F.SET_STATUS, U64(0xF)),
    Case(REQ, F.GET_STATUS, Empty()),
    Case(REP, F.GET_STATUS, U64(0xF)),
    Case(REQ, F.GET_SHARED_OBJECT, SharedObject(UUID)),
    Case(REP, F.GET_SHARED_OBJECT, U64(0), nfds=1),
    Case(REP, F.GET_SHARED_OBJECT, Empty()),
    Case(REQ, F.SET_DEVICE_STATE_FD, DeviceStateTransfer(0, 0), nfds=1),
    Case(REP, F.SET_DEVICE_STATE_FD, U64(0x100)),
    Case(REP, F.SET_DEVICE_STATE_FD, U64(0), nfds=1),
    Case(REQ, F.CHECK_DEVICE_STATE, Empty()),
    Case(REP, F.CHECK_DEVICE_STATE, U64(0)),
    Case(REQ, F.GET_SHMEM_CONFIG, Empty()),
    Case(REP, F.GET_SHMEM_CONFIG, ShmemConfig(2, (0x1000, 0x2000) + (0,) * 254)),
    # The backend channel.
    Case(BREQ, B.IOTLB_MSG, IotlbMsg(0x1000, 0, 0, 1, 1), need_reply=True),
    Case(BREP, B.IOTLB_MSG, U64(0)),
    Case(BREQ, B.CONFIG_CHANGE_MSG, Empty(), need_reply=True),
    Case(BREP, B.CONFIG_CHANGE_MSG, U64(0)),
    Case(BREQ, B.VRING_HOST_NOTIFIER_MSG, VringArea(1, 0x1000, 0), nfds=1),
    Case(BREQ, B.VRING_HOST_NOTIFIER_MSG, VringArea(1 | 0x100, 0x1000, 0)),
    Case(BREQ, B.VRING_CALL, VringState(0, 0), need_reply=True),
    Case(BREQ, B.VRING_ERR, VringState(0, 0)),
    Case(BREQ, B.SHARED_OBJECT_ADD, SharedObject(UUID)),
    Case(BREQ, B.SHARED_OBJECT_REMOVE, SharedObject(UUID)),
    Case(BREQ, B.SHARED_OBJECT_LOOKUP, SharedObject(UUID)),
    Case(BREP, B.SHARED_OBJECT_LOOKUP, U64(0), nfds=1),
    Case(BREQ, B.SHMEM_MAP, ShmemMap(0, 0, 0x1000, 0x1000, 1), nfds=1),
    Case(BREQ, B.SHMEM_UNMAP, ShmemMap(0, 0, 0x1000, 0x1000, 0)),
)
