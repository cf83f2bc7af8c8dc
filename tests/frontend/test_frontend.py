"""The Frontend against a scripted backend: negotiation, REPLY_ACK, gates,
timeouts, memory, queues, config, inflight, dirty log, device state."""

from __future__ import annotations

import errno
import os
import socket
import threading
import time

import pytest

from vubackend.errors import (
    LocalProtocolError,
    PeerDisconnectedError,
    RemoteProtocolError,
    TransportError,
)
from vubackend.frontend import (
    DEFAULT_PROTOCOL_FEATURES,
    FADDR_BASE,
    Frontend,
    GuestRam,
    QueueState,
    frame,
)
from vubackend.memory import FrontendAddress, GuestAddress
from vubackend.protocol import (
    U64,
    FrontendReq,
    HeaderFlags,
    Inbound,
    MemoryTable,
    ProtocolFeatures,
    VirtioFeatures,
    VringAddr,
    VringFile,
    VringState,
    connect,
)

from ..fdutil import open_fds
from ._fake_backend import FakeBackend, running_backend

F = FrontendReq
WANTED = int(VirtioFeatures.VERSION_1) | 0x1


def test_handshake_follows_qemu_order_and_masks_features(
    frontend: Frontend, backend: FakeBackend
) -> None:
    frontend.handshake(WANTED)
    assert backend.requests() == [
        F.GET_FEATURES,
        F.GET_PROTOCOL_FEATURES,
        F.SET_PROTOCOL_FEATURES,
        F.GET_QUEUE_NUM,
        F.GET_MAX_MEM_SLOTS,
        F.SET_BACKEND_REQ_FD,
        F.SET_OWNER,
        F.SET_FEATURES,
    ]
    # Device bit 1 is offered but not wanted; bit 30 is added.
    assert frontend.acked_features == WANTED | VirtioFeatures.PROTOCOL_FEATURES
    assert frontend.acked_protocol_features == (
        backend.protocol_features & DEFAULT_PROTOCOL_FEATURES
    )
    assert not frontend.has_protocol_feature(ProtocolFeatures.SHMEM)  # not wanted
    assert frontend.max_queues == 4
    assert frontend.max_mem_slots == 32
    set_features = backend.received[-1].payload
    assert isinstance(set_features, U64)
    assert set_features.value == frontend.acked_features


def test_need_reply_is_set_only_once_reply_ack_is_negotiated(
    frontend: Frontend, backend: FakeBackend
) -> None:
    frontend.get_features()
    frontend.set_owner()  # before SET_PROTOCOL_FEATURES: no REPLY_ACK yet
    frontend.negotiate_protocol_features(ProtocolFeatures.REPLY_ACK)
    with pytest.raises(LocalProtocolError, match="STATUS"):
        frontend.set_status(1)  # STATUS not negotiated: refused locally
    frontend.check_gates = False
    frontend.set_status(1)
    flags = {FrontendReq(m.request): m.flags for m in backend.received}
    assert not flags[F.SET_OWNER] & HeaderFlags.NEED_REPLY
    assert flags[F.SET_STATUS] & HeaderFlags.NEED_REPLY
    # Requests with a reply body never ask for an ack.
    assert not flags[F.GET_FEATURES] & HeaderFlags.NEED_REPLY


def test_no_need_reply_without_reply_ack(backend: FakeBackend) -> None:
    backend.protocol_features &= ~int(ProtocolFeatures.REPLY_ACK)
    backend.refuse.add(F.SET_VRING_NUM)  # would fail, but no ack is asked
    with running_backend(backend) as sock, Frontend.from_socket(sock, timeout=2) as fe:
        fe.handshake(WANTED)
        assert not fe.reply_ack
        fe.set_vring_num(0, 64)
        fe.get_features()  # still in step
    assert all(not m.need_reply for m in backend.received)


def test_non_zero_ack_raises_a_typed_error_and_keeps_the_session(
    frontend: Frontend, backend: FakeBackend
) -> None:
    backend.refuse.add(F.SET_VRING_NUM)
    frontend.handshake(WANTED)
    with pytest.raises(
        RemoteProtocolError, match="SET_VRING_NUM: the backend refused"
    ) as info:
        frontend.set_vring_num(0, 64)
    assert info.value.request == F.SET_VRING_NUM
    assert frontend.broken is None
    assert frontend.get_status() == 0


def test_request_outside_negotiated_features_is_refused_before_sending(
    frontend: Frontend, backend: FakeBackend
) -> None:
    frontend.handshake(WANTED)
    sent = len(backend.received)
    with pytest.raises(
        LocalProtocolError, match="SEND_RARP: needs protocol feature RARP"
    ):
        frontend.send_rarp(b"\x02\0\0\0\0\x01")
    assert len(backend.received) == sent


def test_hung_backend_times_out_and_marks_the_session_broken(
    frontend: Frontend, backend: FakeBackend
) -> None:
    backend.silent.add(F.GET_STATUS)
    frontend.handshake(WANTED)
    start = time.monotonic()
    with pytest.raises(TransportError, match="GET_STATUS: no reply within") as info:
        frontend.get_status()
    assert info.value.errno == errno.ETIMEDOUT
    assert time.monotonic() - start < 4
    assert frontend.broken is not None
    with pytest.raises(PeerDisconnectedError, match="unusable"):
        frontend.get_features()


def test_a_stray_message_instead_of_the_reply_marks_the_session_broken() -> None:
    """A whole message for another request where the reply should be (the
    ack libvhost-user sends for a request it does not know): a typed error,
    and the session is out of step (the reply may still come), so the next
    request refuses."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with theirs, Frontend.from_socket(ours, timeout=2.0) as fe:
        theirs.sendall(frame(999, bytes(8), flags=0x5))  # a reply to 999
        with pytest.raises(RemoteProtocolError, match="GET_FEATURES: "):
            fe.get_features()
        assert fe.broken is not None
        with pytest.raises(PeerDisconnectedError, match="unusable"):
            fe.get_status()


def test_backend_that_hangs_up_is_reported_as_disconnected(
    frontend: Frontend, backend: FakeBackend
) -> None:
    frontend.get_features()
    # A version-0 header breaks the fake's framing: it closes the socket.
    frontend.send_raw(frame(int(F.GET_FEATURES), flags=0))
    with pytest.raises(PeerDisconnectedError, match="GET_FEATURES"):
        frontend.get_features()
    assert frontend.broken is not None
    assert not frontend.is_alive()


def test_memory_table_is_visible_to_the_backend_by_gpa(
    frontend: Frontend, backend: FakeBackend
) -> None:
    backend.protocol_features &= ~int(ProtocolFeatures.CONFIGURE_MEM_SLOTS)
    frontend.handshake(WANTED)
    ram = frontend.create_memory([1 << 20, 2 << 20], gap=1 << 20)
    table = backend.received[-1].payload
    assert isinstance(table, MemoryTable)
    assert [
        (r.guest_phys_addr, r.memory_size, r.userspace_addr) for r in table.regions
    ] == [
        (0, 1 << 20, FADDR_BASE),
        (2 << 20, 2 << 20, FADDR_BASE + (2 << 20)),
    ]
    ram.write(0xFFFF0, b"A" * 16)
    ram.write((2 << 20) + 123, b"across the gap")
    assert backend.memory is not None
    assert backend.memory.read(GuestAddress(0xFFFF0), 16) == b"A" * 16
    assert backend.memory.read(GuestAddress((2 << 20) + 123), 14) == b"across the gap"


def test_configure_mem_slots_uses_add_and_remove_mem_reg(
    frontend: Frontend, backend: FakeBackend
) -> None:
    frontend.handshake(WANTED)
    ram = frontend.create_memory([1 << 20, 1 << 20])
    assert backend.requests()[-2:] == [F.ADD_MEM_REG, F.ADD_MEM_REG]
    extra = ram.add_region(1 << 20)
    frontend.add_mem_region(extra)
    ram.write(extra.gpa + 5, b"hotplug")
    assert backend.memory is not None
    assert backend.memory.read(GuestAddress(extra.gpa + 5), 7) == b"hotplug"
    frontend.remove_mem_region(extra)
    ram.remove_region(extra)
    assert backend.memory is not None
    assert len(backend.memory) == 2


def test_queue_start_stop_restart_sequence(
    frontend: Frontend, backend: FakeBackend
) -> None:
    frontend.handshake(WANTED)
    frontend.create_memory([1 << 20])
    del backend.received[:]
    queue = frontend.setup_queue(1, 64, err=True)
    assert backend.requests() == [
        F.SET_VRING_NUM,
        F.SET_VRING_BASE,
        F.SET_VRING_ADDR,
        F.SET_VRING_KICK,
        F.SET_VRING_CALL,
        F.SET_VRING_ERR,
        F.SET_VRING_ENABLE,
    ]
    addr = backend.received[2].payload
    assert isinstance(addr, VringAddr)
    assert backend.memory is not None
    assert (
        backend.memory.faddr_to_gpa(FrontendAddress(addr.desc), 16 * 64) == queue.desc
    )
    assert (
        backend.memory.faddr_to_gpa(FrontendAddress(addr.avail), 6 + 2 * 64)
        == queue.avail
    )
    assert (
        backend.memory.faddr_to_gpa(FrontendAddress(addr.used), 6 + 8 * 64)
        == queue.used
    )
    kick = backend.received[3]
    assert isinstance(kick.payload, VringFile)
    assert kick.payload.index == 1
    assert len(kick.fds) == 1
    backend.bases[1] = 17  # what the backend will report at GET_VRING_BASE
    del backend.received[:]
    assert frontend.stop_queue(queue) == 17
    assert queue.state is QueueState.STOPPED
    assert backend.requests() == [F.SET_VRING_ENABLE, F.GET_VRING_BASE]
    enable = backend.received[0].payload
    assert isinstance(enable, VringState)
    assert enable.num == 0
    del backend.received[:]
    frontend.start_queue(queue)
    base = backend.received[1].payload
    assert isinstance(base, VringState)
    assert (base.index, base.num) == (1, 17)
    assert queue.starts == 2


def test_config_space_read_write_and_failure(
    frontend: Frontend, backend: FakeBackend
) -> None:
    frontend.handshake(WANTED)
    assert frontend.get_config(4, 8) == bytes(range(4, 12))
    frontend.set_config(4, b"\xaa\xbb")
    assert frontend.get_config(4, 3) == b"\xaa\xbb\x06"
    with pytest.raises(RemoteProtocolError, match="GET_CONFIG: the backend could not"):
        frontend.get_config(60, 8)  # runs past the fake's 64 bytes


def test_inflight_buffer_round_trip(frontend: Frontend, backend: FakeBackend) -> None:
    frontend.handshake(WANTED)
    got = frontend.get_inflight_fd(2, 128)
    assert got is not None
    with got as buffer:
        assert buffer.mmap_size == 2 * 64 * 128
        assert buffer.read() == bytes(buffer.mmap_size)
        frontend.set_inflight_fd(buffer)
    last = backend.received[-1]
    assert FrontendReq(last.request) is F.SET_INFLIGHT_FD
    assert len(last.fds) == 1


def test_dirty_log_is_shared_and_read_back(
    frontend: Frontend, backend: FakeBackend
) -> None:
    frontend.handshake(WANTED)
    frontend.create_memory([1 << 20])
    frontend.setup_queue(0, 16)
    del backend.received[:]
    log = frontend.start_dirty_log()
    assert backend.requests() == [F.SET_LOG_BASE, F.SET_FEATURES, F.SET_VRING_ADDR]
    assert backend.log_size == log.size == (1 << 20) // 4096 // 8
    assert frontend.has_feature(VirtioFeatures.LOG_ALL)
    addr = backend.received[-1].payload
    assert isinstance(addr, VringAddr)
    assert addr.flags == 1
    assert log.dirty_pages() == [0, 2]  # the fake marks pages 0 and 2
    assert log.is_dirty(0x2FFF)
    assert not log.is_dirty(0x1000)
    assert log.take_dirty() == [0, 2]
    assert log.dirty_pages() == []
    frontend.stop_dirty_log()
    assert not frontend.has_feature(VirtioFeatures.LOG_ALL)


def test_device_state_save_and_load(frontend: Frontend, backend: FakeBackend) -> None:
    frontend.handshake(WANTED)
    assert frontend.save_device_state() == b"state-of-the-device"
    frontend.load_device_state(b"new state" * 1000)
    deadline = time.monotonic() + 2
    while backend.loaded_state != b"new state" * 1000 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert backend.loaded_state == b"new state" * 1000
    assert backend.requests()[-1] is F.CHECK_DEVICE_STATE


def test_status_and_shmem_config(frontend: Frontend, backend: FakeBackend) -> None:
    frontend.handshake(WANTED, DEFAULT_PROTOCOL_FEATURES | ProtocolFeatures.SHMEM)
    frontend.start_device()
    assert frontend.get_status() == 0xF
    config = frontend.get_shmem_config()
    assert config.nregions == 2
    assert config.memory_sizes[:3] == (4096, 8192, 0)
    frontend.reset_device()
    assert backend.requests()[-1] is F.RESET_DEVICE


def test_closing_a_frontend_leaks_no_fd(backend: FakeBackend) -> None:
    before = open_fds()
    with running_backend(backend) as sock:
        fe = Frontend.from_socket(sock, timeout=2)
        fe.handshake(WANTED)
        fe.create_memory([1 << 20, 1 << 20])
        fe.setup_queue(0, 32, err=True)
        fe.setup_queue(1, 32, packed=True)
        fe.start_dirty_log()
        fe.close()
        fe.close()
    assert open_fds() == before


def test_listen_role_waits_for_a_backend(
    tmp_path: os.PathLike[str], backend: FakeBackend
) -> None:
    path = os.path.join(os.fspath(tmp_path), "fe.sock")
    result: list[Frontend] = []
    thread = threading.Thread(
        target=lambda: result.append(Frontend.listen(path, accept_timeout=5))
    )
    thread.start()
    conn = connect(path, Inbound.FRONTEND_REQUESTS, retry_for=5)
    serve = threading.Thread(target=backend.serve, args=(conn,), daemon=True)
    serve.start()
    thread.join(5)
    with result[0] as fe:
        assert fe.get_features() == backend.features
        assert not os.path.exists(path)
    serve.join(5)
    conn.close()


def test_listen_times_out_without_a_backend(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(os.fspath(tmp_path), "fe.sock")
    with pytest.raises(TransportError):
        Frontend.listen(path, accept_timeout=0.2)
    assert not os.path.exists(path)


def test_connect_gives_up_after_retry_for(tmp_path: os.PathLike[str]) -> None:
    start = time.monotonic()
    with pytest.raises(TransportError, match="cannot connect"):
        Frontend.connect(os.path.join(os.fspath(tmp_path), "none.sock"), retry_for=0.3)
    assert time.monotonic() - start < 2


def test_guest_ram_allocator_stays_inside_regions() -> None:
    with GuestRam([8192, 8192]) as ram:
        a = ram.alloc(6000, 16)
        b = ram.alloc(6000, 16)  # does not fit after a: goes to region 2
        assert a == 0
        assert b == 8192
        with pytest.raises(Exception, match="full"):
            ram.alloc(9000)
        ram.free(a, 6000)
        assert ram.alloc(8192, 4096) == 0
        assert ram.faddr(b + 1) == FADDR_BASE + 8193
