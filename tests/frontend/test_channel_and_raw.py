"""The backend request channel (defaults and hooks) and raw mode."""

from __future__ import annotations

import os
import uuid

from vubackend.frontend import (
    BackendAnswer,
    Frontend,
    RawOutcome,
    frame,
)
from vubackend.protocol import (
    U64,
    BackendReq,
    FrontendReq,
    Message,
    SharedObject,
    ShmemMap,
    VirtioFeatures,
    VringState,
)

from ._fake_backend import FakeBackend, running_backend

WANTED = int(VirtioFeatures.VERSION_1)


def _ack(reply: Message | None) -> int:
    assert reply is not None
    assert isinstance(reply.payload, U64)
    return reply.payload.value


def test_config_change_is_acked_and_counted(
    frontend: Frontend, backend: FakeBackend
) -> None:
    frontend.handshake(WANTED)
    channel = frontend.backend_channel
    assert channel is not None
    assert _ack(backend.backend_request(BackendReq.CONFIG_CHANGE_MSG)) == 0
    backend.backend_request(BackendReq.CONFIG_CHANGE_MSG, need_reply=False)
    assert channel.wait_for(BackendReq.CONFIG_CHANGE_MSG, 2, timeout=2)
    assert channel.config_changes == 2
    events = channel.events
    assert events[0].answer == BackendAnswer(0)
    assert events[1].answer is None  # no NEED_REPLY: nothing sent


def test_vring_call_signals_the_queue_call_eventfd(
    frontend: Frontend, backend: FakeBackend
) -> None:
    frontend.handshake(WANTED)
    frontend.create_memory([1 << 20])
    queue = frontend.setup_queue(0, 16)
    queue.call.drain()
    assert _ack(backend.backend_request(BackendReq.VRING_CALL, VringState(0, 0))) == 0
    assert queue.call.wait(2) == 1


def test_shared_objects_and_shmem_tables(
    frontend: Frontend, backend: FakeBackend
) -> None:
    frontend.handshake(WANTED)
    channel = frontend.backend_channel
    assert channel is not None
    known = uuid.uuid4()
    lookup = backend.backend_request(
        BackendReq.SHARED_OBJECT_LOOKUP, SharedObject(known.bytes), need_reply=False
    )
    assert _ack(lookup) == 1  # unknown: refused, no fd
    assert backend.backend_request(
        BackendReq.SHARED_OBJECT_ADD, SharedObject(known.bytes)
    )
    assert known in channel.shared_objects
    read_end, write_end = os.pipe()
    try:
        channel.shared_objects[known] = read_end
        reply = backend.backend_request(
            BackendReq.SHARED_OBJECT_LOOKUP, SharedObject(known.bytes)
        )
        assert _ack(reply) == 0
        assert reply is not None
        assert len(reply.fds) == 1
        reply.close_fds()
    finally:
        os.close(read_end)
        os.close(write_end)
    mapping = ShmemMap(0, 0, 4096, 4096, 1)
    assert _ack(backend.backend_request(BackendReq.SHMEM_UNMAP, mapping)) == 1
    memfd = os.memfd_create("shm", os.MFD_CLOEXEC)
    try:
        conn = backend.backend_channel
        assert conn is not None
        conn.send(
            Message.new_request(
                BackendReq.SHMEM_MAP, mapping, need_reply=True, fds=[memfd]
            )
        )
        assert _ack(conn.receive()) == 0
    finally:
        os.close(memfd)
    assert channel.shmem_maps == [mapping]
    assert _ack(backend.backend_request(BackendReq.SHMEM_UNMAP, mapping)) == 0
    assert channel.shmem_maps == []


def test_hooks_replace_the_defaults(backend: FakeBackend) -> None:
    seen: list[int] = []

    def refuse_calls(message: Message) -> BackendAnswer:
        assert isinstance(message.payload, VringState)
        seen.append(message.payload.index)
        return BackendAnswer(7)

    with running_backend(backend) as sock, Frontend.from_socket(sock, timeout=2) as fe:
        fe.handshake(WANTED, hooks={BackendReq.VRING_CALL: refuse_calls})
        assert (
            _ack(backend.backend_request(BackendReq.VRING_CALL, VringState(3, 0))) == 7
        )
    assert seen == [3]


def test_malformed_backend_request_is_recorded_and_nacked(
    frontend: Frontend, backend: FakeBackend
) -> None:
    frontend.handshake(WANTED)
    channel = frontend.backend_channel
    conn = backend.backend_channel
    assert channel is not None
    assert conn is not None
    # VRING_CALL with a 4-byte payload instead of 8, asking for a reply.
    conn.send_raw(frame(int(BackendReq.VRING_CALL), b"\0" * 4, flags=0x9))
    conn.settimeout(2)
    assert _ack(conn.receive()) == 1
    assert len(channel.errors) == 1
    assert _ack(backend.backend_request(BackendReq.CONFIG_CHANGE_MSG)) == 0  # goes on


def test_raw_frames_reach_the_backend_as_sent(
    frontend: Frontend, backend: FakeBackend
) -> None:
    reply = frontend.exchange_raw(frame(int(FrontendReq.GET_FEATURES)), timeout=2)
    assert reply.outcome is RawOutcome.ANSWERED
    assert reply.headers() == [(int(FrontendReq.GET_FEATURES), 0x5, 8)]
    assert int.from_bytes(reply.data[12:20], "little") == backend.features
    assert frontend.broken is not None  # raw reads put the typed engine out of step


def test_raw_mode_reports_silence_and_disconnect(frontend: Frontend) -> None:
    # A header announcing 100 bytes that never come: the backend waits.
    silent = frontend.exchange_raw(
        frame(int(FrontendReq.SET_OWNER), size=100), timeout=0.3
    )
    assert silent.outcome is RawOutcome.SILENT
    # Bad version: the fake gives up on the stream and closes it.
    gone = frontend.exchange_raw(b"\0" * 100 + frame(1, flags=0), timeout=2)
    assert gone.outcome is RawOutcome.DISCONNECTED


def test_raw_mode_sends_fds(frontend: Frontend, backend: FakeBackend) -> None:
    fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(2)]
    try:
        # SET_VRING_KICK with two fds: the fake's decoder rejects it whole,
        # closes the fds, and (no NEED_REPLY) stays silent and usable.
        frontend.send_raw(frame(int(FrontendReq.SET_VRING_KICK), bytes(8)), fds)
        assert frontend.is_alive(2)
        assert backend.rejected == ["SET_VRING_KICK: expected 1 fd, got 2"]
    finally:
        for fd in fds:
            os.close(fd)
