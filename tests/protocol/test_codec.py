"""The sans-IO codec: round trips of every message type in both directions
(whole, byte by byte, followed by another message), fd attribution, and a
clear typed error for each kind of bad input."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

from tests.fdutil import is_open, make_fds
from vubackend.errors import LocalProtocolError, RemoteProtocolError
from vubackend.protocol import (
    NEED_DATA,
    U64,
    BackendReq,
    Decoder,
    Empty,
    FrontendReq,
    HeaderFlags,
    Inbound,
    MemoryRegion,
    MemoryTable,
    Message,
    OwnedFds,
    VringFile,
    VringState,
    XenMemoryRegion,
    XenMemoryTable,
    close_fds,
    encode,
)

from .cases import CASES, Case


@pytest.fixture
def fds() -> Iterator[list[int]]:
    """A list to put test fds in; whatever is still open at the end is
    closed (the tests check themselves which ones must have been closed)."""
    created: list[int] = []
    yield created
    close_fds(fd for fd in created if is_open(fd))


def frame(request: int, flags: int, payload: bytes, size: int | None = None) -> bytes:
    return (
        struct.pack("=III", request, flags, len(payload) if size is None else size)
        + payload
    )


def decode_all(decoder: Decoder) -> list[Message]:
    out = []
    while (message := decoder.next_message()) is not NEED_DATA:
        out.append(message)
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_round_trip_whole(case: Case, fds: list[int]) -> None:
    fds.extend(make_fds(case.nfds))
    message = case.message(tuple(fds))
    decoder = Decoder(case.inbound)
    decoder.receive_data(encode(message), fds)
    assert decode_all(decoder) == [message]
    assert not decoder.in_message


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_round_trip_byte_by_byte_then_trailing(case: Case, fds: list[int]) -> None:
    fds.extend(make_fds(case.nfds))
    message = case.message(tuple(fds))
    data = encode(message)
    follower = Message.new_reply(FrontendReq.GET_FEATURES, U64(1))
    if not case.inbound.is_reply:
        follower = Message.new_request(FrontendReq.SET_OWNER)
    if case.inbound.is_backend_channel:
        follower = case.message(()) if case.nfds == 0 else follower
    decoder = Decoder(case.inbound)
    # fds ride with the first byte, as SCM_RIGHTS does.
    decoder.receive_data(data[:1], fds)
    for i in range(1, len(data)):
        assert decoder.next_message() is NEED_DATA
        decoder.receive_data(data[i : i + 1])
    assert decoder.next_message() == message
    if not case.inbound.is_backend_channel:
        decoder.receive_data(encode(follower))
        assert decoder.next_message() == follower
    assert decoder.next_message() is NEED_DATA


def test_fds_go_to_the_message_they_arrived_with(fds: list[int]) -> None:
    fds.extend(make_fds(2))
    kick = Message.new_request(FrontendReq.SET_VRING_KICK, VringFile(0), fds=[fds[0]])
    call = Message.new_request(FrontendReq.SET_VRING_CALL, VringFile(0), fds=[fds[1]])
    owner = Message.new_request(FrontendReq.SET_OWNER)
    decoder = Decoder(Inbound.FRONTEND_REQUESTS)
    decoder.receive_data(encode(kick), [fds[0]])
    decoder.receive_data(encode(owner) + encode(call)[:5])
    decoder.receive_data(encode(call)[5:], [fds[1]])
    assert decode_all(decoder) == [kick, owner, call]


def test_decoder_tells_how_many_bytes_it_needs() -> None:
    decoder = Decoder(Inbound.FRONTEND_REQUESTS)
    assert decoder.bytes_needed == 12
    data = encode(Message.new_request(FrontendReq.SET_FEATURES, U64(1)))
    decoder.receive_data(data[:5])
    assert decoder.bytes_needed == 7
    decoder.receive_data(data[5:12])
    assert decoder.bytes_needed == 8
    decoder.receive_data(data[12:])
    assert decoder.bytes_needed == 0
    assert isinstance(decoder.next_message(), Message)
    assert decoder.bytes_needed == 12


def test_xen_memory_table_needs_the_xen_flag(fds: list[int]) -> None:
    fds.extend(make_fds(1))
    region = XenMemoryRegion(0, 0x1000, 0, 0, 0x1, 3)
    message = Message.new_request(
        FrontendReq.SET_MEM_TABLE, XenMemoryTable((region,)), fds=fds
    )
    data = encode(message, xen_mmap=True)
    decoder = Decoder(Inbound.FRONTEND_REQUESTS, xen_mmap=True)
    decoder.receive_data(data, fds)
    assert decoder.next_message() == message
    with pytest.raises(LocalProtocolError, match="not one of MemoryTable"):
        encode(message)


# ------------------------------------------------------------------ bad input


def expect_error(
    data: bytes,
    match: str,
    *,
    fds: tuple[int, ...] = (),
    inbound: Inbound = Inbound.FRONTEND_REQUESTS,
    recoverable: bool = True,
    truncated: bool = False,
) -> RemoteProtocolError:
    decoder = Decoder(inbound)
    decoder.receive_data(data, fds, fds_truncated=truncated)
    with pytest.raises(RemoteProtocolError, match=match) as info:
        decode_all(decoder)
    assert info.value.recoverable is recoverable
    for fd in fds:
        assert not is_open(fd), "the fds of a rejected message must be closed"
    if recoverable:
        # The stream is still in step: the next message decodes.
        follower = Message.new_request(
            BackendReq.CONFIG_CHANGE_MSG
            if inbound.is_backend_channel
            else FrontendReq.SET_OWNER
        )
        decoder.receive_data(encode(follower))
        assert decoder.next_message() == follower
    else:
        with pytest.raises(
            RemoteProtocolError, match="unusable after an earlier error"
        ):
            decoder.next_message()
    return info.value


def test_truncated_payload_is_rejected() -> None:
    error = expect_error(
        frame(FrontendReq.SET_VRING_NUM, 1, b"\0" * 6),
        r"SET_VRING_NUM: expected a 8-byte payload, got 6 bytes",
    )
    assert error.request == FrontendReq.SET_VRING_NUM


def test_payload_too_long_for_its_type_is_rejected() -> None:
    expect_error(
        frame(FrontendReq.GET_FEATURES, 1, b"\0" * 8),
        r"GET_FEATURES: expected a 0-byte payload, got 8 bytes",
    )


def test_oversized_size_field_breaks_the_stream(fds: list[int]) -> None:
    fds.extend(make_fds(1))
    error = expect_error(
        frame(FrontendReq.SET_MEM_TABLE, 1, b"", size=4097),
        r"SET_MEM_TABLE: payload size 4097 exceeds the 4096-byte limit",
        fds=tuple(fds),
        recoverable=False,
    )
    assert error.request == FrontendReq.SET_MEM_TABLE


def test_wrong_version_breaks_the_stream() -> None:
    expect_error(
        frame(FrontendReq.SET_OWNER, 2, b""),
        "unsupported protocol version 2",
        recoverable=False,
    )


def test_unknown_request_id_is_rejected() -> None:
    error = expect_error(frame(99, 1, b"abc"), "unknown request id 99")
    assert error.request == 99
    expect_error(frame(0, 1, b""), "unknown request id 0")
    expect_error(
        frame(11, 1, b""), "unknown request id 11", inbound=Inbound.BACKEND_REQUESTS
    )


def test_reserved_flag_bits_are_rejected() -> None:
    expect_error(
        frame(FrontendReq.SET_OWNER, 1 | 0x10, b""),
        r"SET_OWNER: reserved header flag bits set \(0x10\)",
    )
    expect_error(frame(FrontendReq.SET_OWNER, 1 | 0x8000_0000, b""), "reserved")


def test_reply_bit_on_a_request_is_rejected() -> None:
    error = expect_error(
        frame(FrontendReq.GET_FEATURES, 0x5 | 0x8, b""),
        "GET_FEATURES: a request must not have the REPLY flag",
    )
    assert error.need_reply


def test_reply_without_reply_bit_or_with_need_reply_is_rejected() -> None:
    inbound = Inbound.FRONTEND_REPLIES
    payload = struct.pack("=Q", 1)
    decoder = Decoder(inbound)
    decoder.receive_data(frame(FrontendReq.GET_FEATURES, 0x1, payload))
    with pytest.raises(RemoteProtocolError, match="a reply must have the REPLY flag"):
        decoder.next_message()
    decoder.receive_data(frame(FrontendReq.GET_FEATURES, 0xD, payload))
    with pytest.raises(RemoteProtocolError, match="must not have the NEED_REPLY"):
        decoder.next_message()


@pytest.mark.parametrize(
    ("req", "payload", "nfds", "match"),
    [
        (
            FrontendReq.SET_VRING_KICK,
            VringFile(0),
            2,
            "SET_VRING_KICK: expected 1 fd, got 2",
        ),
        (
            FrontendReq.SET_VRING_KICK,
            VringFile(0),
            0,
            "SET_VRING_KICK: expected 1 fd, got 0",
        ),
        (
            FrontendReq.SET_VRING_CALL,
            VringFile(0, nofd=True),
            1,
            "SET_VRING_CALL: expected 0 fds, got 1",
        ),
        (FrontendReq.GET_FEATURES, Empty(), 1, "GET_FEATURES: expected 0 fds, got 1"),
        (FrontendReq.SET_LOG_FD, Empty(), 0, "SET_LOG_FD: expected 1 fd, got 0"),
        (FrontendReq.SET_FEATURES, U64(0), 3, "SET_FEATURES: expected 0 fds, got 3"),
        (
            FrontendReq.SET_MEM_TABLE,
            MemoryTable((MemoryRegion(0, 0x1000, 0, 0),) * 2),
            1,
            "SET_MEM_TABLE: expected 2 fds, got 1",
        ),
        (
            FrontendReq.SET_MEM_TABLE,
            MemoryTable((MemoryRegion(0, 0x1000, 0, 0),)),
            2,
            "SET_MEM_TABLE: expected 1 fd, got 2",
        ),
    ],
)
def test_wrong_fd_count_is_rejected_and_fds_closed(
    req: FrontendReq,
    payload: VringFile | Empty | U64 | MemoryTable,
    nfds: int,
    match: str,
) -> None:
    data = frame(req, 1, payload.pack())
    fds = make_fds(nfds)
    expect_error(data, match, fds=fds)


def test_more_than_eight_fds_are_rejected() -> None:
    fds = make_fds(9)
    expect_error(
        frame(FrontendReq.SET_OWNER, 1, b""),
        "9 fds attached, at most 8 allowed",
        fds=fds,
    )


def test_truncated_control_data_is_rejected() -> None:
    fds = make_fds(8)
    region = MemoryRegion(0, 0x1000, 0, 0)
    table = MemoryTable((region,) * 8).pack()
    expect_error(
        frame(FrontendReq.SET_MEM_TABLE, 1, table),
        r"SET_MEM_TABLE: more than 8 fds attached \(control data truncated, "
        r"MSG_CTRUNC\)",
        fds=fds,
        truncated=True,
    )


def test_invalid_field_values_are_rejected() -> None:
    bad_region = struct.pack("=QQQQ", 0, 0, 0, 0)
    fds = make_fds(1)
    expect_error(
        frame(FrontendReq.SET_MEM_TABLE, 1, struct.pack("=II", 1, 0) + bad_region),
        "SET_MEM_TABLE: memory region at gpa 0x0 has size 0",
        fds=fds,
    )
    expect_error(
        frame(FrontendReq.SET_VRING_KICK, 1, struct.pack("=Q", 0x1_0000_0000)),
        "SET_VRING_KICK: reserved bits set in vring file word",
    )


def test_closing_the_decoder_closes_pending_fds() -> None:
    fds = make_fds(2)
    decoder = Decoder(Inbound.FRONTEND_REQUESTS)
    decoder.receive_data(frame(FrontendReq.SET_VRING_KICK, 1, b"")[:4], fds)
    assert decoder.in_message
    decoder.close()
    assert not any(is_open(fd) for fd in fds)
    more = make_fds(1)
    with pytest.raises(RemoteProtocolError, match="closed"):
        decoder.receive_data(b"x", more)
    assert not is_open(more[0])


# ------------------------------------------------------------------ encoder


def test_encoder_refuses_what_the_table_forbids() -> None:
    with pytest.raises(LocalProtocolError, match="payload U64 is not one of Empty"):
        encode(Message.new_request(FrontendReq.GET_FEATURES, U64(1)))
    with pytest.raises(
        LocalProtocolError, match="SET_VRING_KICK: expected 1 fd, got 0"
    ):
        encode(Message.new_request(FrontendReq.SET_VRING_KICK, VringFile(0)))
    with pytest.raises(LocalProtocolError, match="has size 0"):
        encode(
            Message.new_request(
                FrontendReq.SET_MEM_TABLE,
                MemoryTable((MemoryRegion(0, 0, 0, 0),)),
                fds=[0],
            )
        )
    good = Message.new_reply(FrontendReq.GET_FEATURES, U64(1))
    bad = Message(good.request, good.payload, good.flags | HeaderFlags.NEED_REPLY)
    with pytest.raises(LocalProtocolError, match="must not have NEED_REPLY"):
        encode(bad)
    with pytest.raises(LocalProtocolError, match="at most 8 allowed"):
        encode(Message.new_request(FrontendReq.SET_OWNER, fds=list(range(9))))


def test_replies_have_exactly_flags_0x5() -> None:
    data = encode(Message.new_reply(FrontendReq.GET_VRING_BASE, VringState(0, 9)))
    assert struct.unpack_from("=III", data) == (11, 0x5, 8)
    ack = encode(Message.ack(FrontendReq.SET_MEM_TABLE, success=False))
    assert ack == struct.pack("=IIIQ", 5, 0x5, 8, 1)


def test_owned_fds_take_borrow_and_close() -> None:
    fds = make_fds(3)
    with OwnedFds(fds) as owned:
        assert len(owned) == 3
        assert owned.borrow(1) == fds[1]
        kept = owned.take(0)
        assert len(owned) == 2
        with pytest.raises(IndexError, match="already taken"):
            owned.take(0)
        with pytest.raises(IndexError, match="already taken"):
            owned.borrow(0)
    assert is_open(kept)
    assert not is_open(fds[1])
    assert not is_open(fds[2])
    close_fds([kept])
