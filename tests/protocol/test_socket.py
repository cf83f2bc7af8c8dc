"""The socket transport, over real AF_UNIX sockets: fds cross with their
message and arrive close-on-exec, short reads are joined, MSG_CTRUNC and
disconnects give clear errors, nothing leaks; the listener and connect."""

from __future__ import annotations

import array
import errno
import fcntl
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fdutil import make_fds, open_fds
from vubackend.errors import (
    DaemonClosedError,
    PeerDisconnectedError,
    RemoteProtocolError,
    TransportError,
)
from vubackend.protocol import (
    U64,
    BackendReq,
    Connection,
    FrontendReq,
    Inbound,
    Listener,
    MemoryRegion,
    MemoryTable,
    Message,
    VringFile,
    close_fds,
    connect,
    encode,
)

from .cases import CASES, Case


@pytest.fixture(autouse=True)
def no_fd_leaks() -> Iterator[None]:
    before = open_fds()
    yield
    assert open_fds() == before, "the test leaked file descriptors"


def socket_pair(inbound: Inbound) -> tuple[Connection, Connection]:
    """(sender, receiver): the receiver reads ``inbound`` messages."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return Connection(a, Inbound.FRONTEND_REQUESTS, timeout=5), Connection(
        b, inbound, timeout=5
    )


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_every_message_crosses_a_socket_with_its_fds(case: Case) -> None:
    sender, receiver = socket_pair(case.inbound)
    fds = make_fds(case.nfds)
    try:
        sender.send(case.message(fds))
        received = receiver.receive()
        assert received.request == case.request
        assert received.payload == case.payload
        assert len(received.fds) == case.nfds
        for ours, theirs in zip(fds, received.fds, strict=True):
            assert os.fstat(ours).st_ino == os.fstat(theirs).st_ino
            assert fcntl.fcntl(theirs, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        received.close_fds()
    finally:
        close_fds(fds)
        sender.close()
        receiver.close()


def test_short_reads_are_joined() -> None:
    a, b = socket.socketpair()
    receiver = Connection(b, Inbound.FRONTEND_REQUESTS, timeout=5)
    table = MemoryTable((MemoryRegion(0, 0x1000, 0, 0),))
    (fd,) = make_fds(1)
    data = encode(Message.new_request(FrontendReq.SET_MEM_TABLE, table, fds=[fd]))

    def dribble() -> None:
        rights = [
            (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())
        ]
        a.sendmsg([data[:1]], rights)
        for i in range(1, len(data)):
            time.sleep(0.001)
            a.send(data[i : i + 1])

    writer = threading.Thread(target=dribble)
    writer.start()
    try:
        message = receiver.receive()
        assert message.payload == table
        assert len(message.fds) == 1
        message.close_fds()
    finally:
        writer.join()
        os.close(fd)
        a.close()
        receiver.close()


def test_more_fds_than_the_protocol_allows_give_msg_ctrunc() -> None:
    sender, receiver = socket_pair(Inbound.FRONTEND_REQUESTS)
    fds = make_fds(9)
    try:
        table = MemoryTable((MemoryRegion(0, 0x1000, 0, 0),) * 8)
        data = encode(
            Message.new_request(FrontendReq.SET_MEM_TABLE, table, fds=fds[:8])
        )
        sender.send_raw(data, fds)
        with pytest.raises(RemoteProtocolError, match="MSG_CTRUNC") as info:
            receiver.receive()
        assert info.value.recoverable
        # The stream is still in step.
        sender.send(Message.new_request(FrontendReq.SET_OWNER))
        assert receiver.receive().request is FrontendReq.SET_OWNER
    finally:
        close_fds(fds)
        sender.close()
        receiver.close()


@pytest.mark.parametrize(
    "cut", [0, 5, 12, 15], ids=["clean", "mid-header", "after-header", "mid-payload"]
)
def test_peer_disconnecting(cut: int) -> None:
    a, b = socket.socketpair()
    receiver = Connection(b, Inbound.FRONTEND_REQUESTS, timeout=5)
    (fd,) = make_fds(1)
    data = encode(
        Message.new_request(FrontendReq.SET_VRING_KICK, VringFile(0), fds=[fd])
    )
    if cut:
        rights = [
            (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())
        ]
        a.sendmsg([data[:cut]], rights)
    os.close(fd)
    a.close()
    with pytest.raises(PeerDisconnectedError) as info:
        receiver.receive()
    assert info.value.mid_message is (cut > 0)
    if cut:
        assert "middle of a message" in str(info.value)
    receiver.close()


def test_concurrent_senders_never_interleave() -> None:
    sender, receiver = socket_pair(Inbound.FRONTEND_REQUESTS)
    per_thread = 200

    def send_many(base: int) -> None:
        for i in range(per_thread):
            sender.send(Message.new_request(FrontendReq.SET_FEATURES, U64(base + i)))

    threads = [threading.Thread(target=send_many, args=(k << 32,)) for k in range(4)]
    for thread in threads:
        thread.start()
    seen = []
    for _ in range(4 * per_thread):
        message = receiver.receive()
        assert isinstance(message.payload, U64)
        seen.append(message.payload.value)
    for thread in threads:
        thread.join()
    assert sorted(seen) == sorted(
        (k << 32) + i for k in range(4) for i in range(per_thread)
    )
    sender.close()
    receiver.close()


def test_receive_timeout_keeps_partial_input() -> None:
    a, b = socket.socketpair()
    receiver = Connection(b, Inbound.FRONTEND_REQUESTS, timeout=0.05)
    data = encode(Message.new_request(FrontendReq.SET_FEATURES, U64(7)))
    a.send(data[:7])
    with pytest.raises(TransportError, match="timed out") as info:
        receiver.receive()
    assert info.value.errno == errno.ETIMEDOUT
    a.send(data[7:])
    assert receiver.receive().payload == U64(7)
    a.close()
    receiver.close()


def test_closed_connection_refuses_use() -> None:
    sender, receiver = socket_pair(Inbound.FRONTEND_REQUESTS)
    sender.close()
    with pytest.raises(DaemonClosedError):
        sender.send(Message.new_request(FrontendReq.SET_OWNER))
    with pytest.raises(PeerDisconnectedError):
        receiver.receive()
    receiver.close()


def test_sending_to_a_closed_peer_is_a_disconnect() -> None:
    sender, receiver = socket_pair(Inbound.FRONTEND_REQUESTS)
    receiver.close()
    owner = Message.new_request(FrontendReq.SET_OWNER)
    with pytest.raises(PeerDisconnectedError, match="went away"):
        sender.send(owner)
    sender.close()


def test_from_fd_rejects_what_is_not_a_stream_socket() -> None:
    (fd,) = make_fds(1)
    with pytest.raises(TransportError, match="not a usable socket"):
        Connection.from_fd(fd, Inbound.BACKEND_REQUESTS)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    b.close()
    with pytest.raises(TransportError, match="SOCK_STREAM"):
        Connection.from_fd(a.detach(), Inbound.BACKEND_REQUESTS)


def test_backend_channel_pair() -> None:
    frontend_side, peer = Connection.pair(Inbound.BACKEND_REQUESTS)
    backend_side = Connection.from_fd(peer.detach(), Inbound.BACKEND_REPLIES)
    backend_side.send(
        Message.new_request(BackendReq.CONFIG_CHANGE_MSG, need_reply=True)
    )
    request = frontend_side.receive()
    assert request.request is BackendReq.CONFIG_CHANGE_MSG
    assert request.need_reply
    frontend_side.send(Message.ack(BackendReq.CONFIG_CHANGE_MSG))
    assert backend_side.receive().payload == U64(0)
    frontend_side.close()
    backend_side.close()


# ------------------------------------------------------------------ listener


def test_listener_accepts_sets_mode_and_cleans_up(tmp_path: Path) -> None:
    path = tmp_path / "vu.sock"
    with Listener(path, mode=0o660) as listener:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
        client = connect(path, Inbound.FRONTEND_REPLIES)
        server = listener.accept(Inbound.FRONTEND_REQUESTS, timeout=5)
        client.send(Message.new_request(FrontendReq.GET_FEATURES))
        assert server.receive().request is FrontendReq.GET_FEATURES
        server.send(Message.new_reply(FrontendReq.GET_FEATURES, U64(3)))
        assert client.receive().payload == U64(3)
        client.close()
        server.close()
    assert not path.exists()


def test_listener_removes_a_stale_socket(tmp_path: Path) -> None:
    path = tmp_path / "vu.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # bound, never listening: what a killed process leaves
    with Listener(path) as listener:
        client = connect(path, Inbound.FRONTEND_REPLIES)
        listener.accept(Inbound.FRONTEND_REQUESTS, timeout=5).close()
        client.close()


def test_listener_refuses_a_live_socket_and_other_files(tmp_path: Path) -> None:
    path = tmp_path / "vu.sock"
    with (
        Listener(path),
        pytest.raises(TransportError, match="in use by a running process"),
    ):
        Listener(path)
    regular = tmp_path / "file"
    regular.write_text("keep me")
    with pytest.raises(TransportError, match="not a socket; not removing it"):
        Listener(regular)
    assert regular.read_text() == "keep me"


def test_accept_times_out(tmp_path: Path) -> None:
    with Listener(tmp_path / "vu.sock") as listener:
        with pytest.raises(TransportError, match="timed out") as info:
            listener.accept(Inbound.FRONTEND_REQUESTS, timeout=0.05)
        assert info.value.errno == errno.ETIMEDOUT
    with pytest.raises(DaemonClosedError):
        listener.accept(Inbound.FRONTEND_REQUESTS)


def test_connect_retries_until_the_peer_listens(tmp_path: Path) -> None:
    path = tmp_path / "late.sock"
    listeners: list[Listener] = []

    def start_late() -> None:
        time.sleep(0.3)
        listeners.append(Listener(path))

    starter = threading.Thread(target=start_late)
    starter.start()
    client = connect(path, Inbound.FRONTEND_REPLIES, retry_for=5.0, interval=0.02)
    starter.join()
    listeners[0].accept(Inbound.FRONTEND_REQUESTS, timeout=5).close()
    client.close()
    listeners[0].close()


def test_connect_without_retry_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(
        TransportError, match=r"cannot connect to .*missing\.sock"
    ) as info:
        connect(tmp_path / "missing.sock", Inbound.FRONTEND_REPLIES)
    assert info.value.errno == errno.ENOENT


def test_payload_and_header_layout_on_the_wire() -> None:
    a, b = socket.socketpair()
    sender = Connection(a, Inbound.FRONTEND_REPLIES)
    sender.send(
        Message.new_request(
            FrontendReq.SET_FEATURES, U64(0x1_0000_0000), need_reply=True
        )
    )
    assert b.recv(100) == struct.pack("=IIIQ", 2, 0x9, 8, 0x1_0000_0000)
    b.close()
    sender.close()


def test_closing_the_listener_wakes_a_blocked_accept(tmp_path: Path) -> None:
    listener = Listener(tmp_path / "vu.sock")
    outcome: list[BaseException] = []

    def wait() -> None:
        try:
            listener.accept(Inbound.FRONTEND_REQUESTS)
        except BaseException as exc:
            outcome.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.1)
    listener.close()
    waiter.join(timeout=5)
    assert not waiter.is_alive()
    assert len(outcome) == 1
    assert isinstance(outcome[0], DaemonClosedError | TransportError)
