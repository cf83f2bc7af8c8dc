"""Fuzz: random and mutated frames with random fds, fed to the Decoder and
through real sockets to a Connection. The invariant (as h11's fuzz states on
its line 1): any bytes and fds yield messages, NEED_DATA, a typed
RemoteProtocolError or PeerDisconnectedError, nothing else; no hang; and
every fd is closed afterwards."""

from __future__ import annotations

import array
import socket
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fdutil import make_fds, open_fds
from vubackend.errors import PeerDisconnectedError, RemoteProtocolError
from vubackend.protocol import (
    NEED_DATA,
    Connection,
    Decoder,
    Inbound,
    Message,
    close_fds,
    encode,
)

from .cases import CASES

FUZZ = settings(
    max_examples=10_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
VALID_FRAMES = [
    (case.inbound, encode(case.message(tuple(range(100, 100 + case.nfds)))))
    for case in CASES
]
U32 = st.integers(0, 2**32 - 1)


@st.composite
def mutated_frame(draw: st.DrawFn) -> bytes:
    _, frame = draw(st.sampled_from(VALID_FRAMES))
    data = bytearray(frame)
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["flip", "truncate", "extend", "header", "size"]))
        if op == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= draw(st.integers(1, 255))
        elif op == "truncate":
            del data[draw(st.integers(0, len(data))) :]
        elif op == "extend":
            data += draw(st.binary(max_size=64))
        elif op == "header" and len(data) >= 8:
            field = draw(st.sampled_from([0, 4]))
            value = draw(st.one_of(st.integers(0, 50), U32))
            struct.pack_into("=I", data, field, value)
        elif op == "size" and len(data) >= 12:
            size = draw(st.one_of(st.integers(0, 64), st.integers(4090, 4200), U32))
            struct.pack_into("=I", data, 8, size)
    return bytes(data)


frames = st.lists(
    st.one_of(mutated_frame(), st.binary(max_size=120)), min_size=1, max_size=4
)
inbounds = st.sampled_from(list(Inbound))


@st.composite
def chunked(draw: st.DrawFn) -> list[tuple[bytes, int]]:
    """The stream cut into chunks, each with a number of fds to attach."""
    stream = b"".join(draw(frames))
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    pieces = [
        stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)
    ]
    return [(piece, draw(st.integers(0, 10))) for piece in pieces if piece]


def drain(decoder: Decoder) -> bool:
    """Decode what is there; False once the stream is broken."""
    while True:
        try:
            message = decoder.next_message()
        except RemoteProtocolError as exc:
            if not exc.recoverable:
                return False
            continue
        if message is NEED_DATA:
            return True
        assert isinstance(message, Message)
        message.close_fds()


@FUZZ
@given(inbound=inbounds, chunks=chunked(), truncated=st.booleans())
def test_decoder_survives_anything(
    inbound: Inbound, chunks: list[tuple[bytes, int]], truncated: bool
) -> None:
    before = open_fds()
    decoder = Decoder(inbound)
    for piece, nfds in chunks:
        fds = make_fds(nfds)
        try:
            decoder.receive_data(piece, fds, fds_truncated=truncated and nfds > 8)
        except RemoteProtocolError as exc:
            # Input after a framing error is refused, never half-taken.
            if exc.recoverable:
                raise
            break
        if not drain(decoder):
            break
    decoder.close()
    assert open_fds() == before


@FUZZ
@given(inbound=inbounds, chunks=chunked())
def test_transport_survives_anything(
    inbound: Inbound, chunks: list[tuple[bytes, int]]
) -> None:
    before = open_fds()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    receiver = Connection(b, inbound, timeout=5)
    try:
        for piece, nfds in chunks:
            fds = make_fds(nfds)
            rights = array.array("i", fds).tobytes()
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)] if fds else []
            a.sendmsg([piece], ancillary)
            close_fds(fds)
        a.shutdown(socket.SHUT_WR)
        while True:
            try:
                message = receiver.receive()
            except RemoteProtocolError as exc:
                if exc.recoverable:
                    continue
                break
            except PeerDisconnectedError:
                break
            message.close_fds()
    finally:
        a.close()
        receiver.close()
    assert open_fds() == before
