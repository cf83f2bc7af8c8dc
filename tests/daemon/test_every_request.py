"""Every front-end request of the protocol table, sent to a live daemon with
NEED_REPLY: each gets an answer of the kind the table says (a reply body, or
a REPLY_ACK of 0 or non-zero), never a hang or a disconnect, and the session
keeps answering afterwards."""

from __future__ import annotations

import pytest

from tests.fdutil import make_fds
from tests.protocol.cases import CASES, Case
from vubackend.protocol import (
    U64,
    Connection,
    FrontendReq,
    HeaderFlags,
    Inbound,
    Message,
    ProtocolFeatures,
    close_fds,
    connect,
)

from .conftest import ServeFactory

REQUESTS = [case for case in CASES if case.inbound is Inbound.FRONTEND_REQUESTS]
WANTED = (
    ProtocolFeatures.MQ
    | ProtocolFeatures.REPLY_ACK
    | ProtocolFeatures.CONFIG
    | ProtocolFeatures.LOG_SHMFD
    | ProtocolFeatures.INFLIGHT_SHMFD
    | ProtocolFeatures.CONFIGURE_MEM_SLOTS
    | ProtocolFeatures.STATUS
    | ProtocolFeatures.RESET_DEVICE
    | ProtocolFeatures.BACKEND_REQ
)


def ask(conn: Connection, message: Message) -> Message:
    conn.send(message)
    reply = conn.receive()
    assert reply.request is message.request
    assert reply.flags == HeaderFlags.VERSION_1 | HeaderFlags.REPLY
    return reply


def negotiate(conn: Connection) -> None:
    ask(conn, Message.new_request(FrontendReq.GET_FEATURES))
    offered = ask(conn, Message.new_request(FrontendReq.GET_PROTOCOL_FEATURES))
    assert isinstance(offered.payload, U64)
    acked = U64(offered.payload.value & int(WANTED))
    conn.send(Message.new_request(FrontendReq.SET_PROTOCOL_FEATURES, acked))


@pytest.mark.parametrize("case", REQUESTS, ids=[c.id for c in REQUESTS])
def test_every_request_gets_a_clear_answer(serve: ServeFactory, case: Case) -> None:
    served = serve()
    served.connect().close()  # waits until the daemon listens
    conn = connect(served.path, Inbound.FRONTEND_REPLIES, retry_for=5.0, timeout=5.0)
    try:
        negotiate(conn)
        fds = make_fds(case.nfds)
        message = case.message(fds)
        message = Message(
            message.request,
            message.payload,
            message.flags | HeaderFlags.NEED_REPLY,
            message.fds,
        )
        try:
            reply = ask(conn, message)
        finally:
            close_fds(fds)
        reply.close_fds()
        spec = message.spec
        if spec.has_reply_body:
            assert type(reply.payload) in spec.reply
        else:
            assert isinstance(reply.payload, U64)
            assert reply.payload.value in (0, 1)
        # The session goes on.
        features = ask(conn, Message.new_request(FrontendReq.GET_FEATURES))
        assert isinstance(features.payload, U64)
    finally:
        conn.close()
