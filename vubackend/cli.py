"""The ``vubackend`` command.

Subcommands:
    demo        show what vubackend speaks, then run a short vhost-user
                exchange over a real Unix socket and log every message.
    protocol    print the protocol table (every request, its payload, fds,
                gate and reply).

Device subcommands (blk, net, rng) arrive with the devices layer.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Sequence
from typing import TextIO

from vubackend.errors import PeerDisconnectedError
from vubackend.protocol import (
    BACKEND_REQUEST_SPEC,
    FRONTEND_REQUEST_SPEC,
    U64,
    Connection,
    Empty,
    FrontendReq,
    Inbound,
    Listener,
    MemoryRegion,
    MemoryTable,
    Message,
    OwnedFds,
    ProtocolFeatures,
    RequestSpec,
    VirtioFeatures,
    VringState,
    connect,
)

__all__ = ["main"]

log = logging.getLogger("vubackend")


def _describe(spec: RequestSpec) -> str:
    payload = spec.payload.__name__
    size = spec.payload.SIZE
    sized = f"{payload}({size} B)" if size is not None else f"{payload}(variable)"
    gate = spec.gate.name if spec.gate is not None else "-"
    if spec.virtio_gate is not None:
        gate = f"virtio {spec.virtio_gate.name}"
    reply = "/".join(t.__name__ for t in spec.reply) if spec.reply else "ack"
    if spec.reply_fds.name != "NONE":
        reply += f" + {spec.reply_fds.value}"
    return (
        f"{spec.request.value:>3} {spec.request.name:<24} {sized:<28} "
        f"{spec.fds.value:<24} {gate:<28} {reply}"
    )


def print_protocol_table(out: TextIO | None = None) -> None:
    """Print both request tables."""
    stream = sys.stdout if out is None else out
    header = f"{'id':>3} {'request':<24} {'payload':<28} {'fds':<24} {'gate':<28} reply"
    for title, table in (
        ("front-end requests (main socket)", FRONTEND_REQUEST_SPEC),
        ("back-end requests (backend channel)", BACKEND_REQUEST_SPEC),
    ):
        print(f"\n{title}\n{header}", file=stream)
        for spec in table.values():
            print(_describe(spec), file=stream)


def _demo_backend(listener: Listener, offered: int) -> None:
    """A tiny back-end: answers queries, takes the memory table's fds."""
    with listener.accept(Inbound.FRONTEND_REQUESTS) as conn:
        while True:
            try:
                message = conn.receive()
            except PeerDisconnectedError:
                log.info("backend: the frontend closed the connection")
                return
            with OwnedFds(message.fds) as fds:
                log.info(
                    "backend: received %s %s with %d fd(s)",
                    message.request.name,
                    message.payload,
                    len(fds),
                )
                if message.request is FrontendReq.GET_FEATURES:
                    conn.send(Message.new_reply(message.request, U64(offered)))
                elif message.request is FrontendReq.GET_PROTOCOL_FEATURES:
                    features = ProtocolFeatures.MQ | ProtocolFeatures.REPLY_ACK
                    conn.send(Message.new_reply(message.request, U64(features)))
                elif message.request is FrontendReq.GET_VRING_BASE:
                    assert isinstance(message.payload, VringState)
                    reply = VringState(message.payload.index, 0)
                    conn.send(Message.new_reply(message.request, reply))
                elif message.need_reply:
                    conn.send(Message.ack(message.request))


def run_demo() -> int:
    """Serve a toy back-end on a temporary socket and drive it."""
    print("vubackend speaks vhost-user with these requests:")
    print_protocol_table()
    offered = int(
        VirtioFeatures.VERSION_1
        | VirtioFeatures.PROTOCOL_FEATURES
        | VirtioFeatures.EVENT_IDX
    )
    with tempfile.TemporaryDirectory(prefix="vubackend-demo-") as tmp:
        path = os.path.join(tmp, "demo.sock")
        listener = Listener(path)
        log.info("backend: listening on %s", path)
        server = threading.Thread(target=_demo_backend, args=(listener, offered))
        server.start()
        try:
            with connect(
                path, Inbound.FRONTEND_REPLIES, retry_for=5.0, timeout=10.0
            ) as conn:
                _drive(conn)
        finally:
            server.join(timeout=10)
            listener.close()
    print(
        "\ndemo finished: every request was framed, sent with its fds, "
        "decoded and answered"
    )
    return 0


def _drive(conn: Connection) -> None:
    def ask(message: Message) -> Message:
        conn.send(message)
        reply = conn.receive()
        log.info("frontend: reply to %s: %s", message.request.name, reply.payload)
        return reply

    features = ask(Message.new_request(FrontendReq.GET_FEATURES))
    assert isinstance(features.payload, U64)
    offered = VirtioFeatures(features.payload.value)
    log.info("frontend: backend offers %s", "|".join(f.name or "?" for f in offered))
    ask(Message.new_request(FrontendReq.GET_PROTOCOL_FEATURES))
    acked = ProtocolFeatures.MQ | ProtocolFeatures.REPLY_ACK
    ack_payload = U64(int(acked))
    conn.send(Message.new_request(FrontendReq.SET_PROTOCOL_FEATURES, ack_payload))
    conn.send(Message.new_request(FrontendReq.SET_OWNER, Empty()))
    memfd = os.memfd_create("vubackend-demo-ram", os.MFD_CLOEXEC)
    try:
        os.ftruncate(memfd, 1 << 20)
        table = MemoryTable((MemoryRegion(0, 1 << 20, 0x7F00_0000_0000, 0),))
        ask(
            Message.new_request(
                FrontendReq.SET_MEM_TABLE, table, need_reply=True, fds=[memfd]
            )
        )
    finally:
        os.close(memfd)
    ask(Message.new_request(FrontendReq.GET_VRING_BASE, VringState(0, 0)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vubackend", description="vhost-user device backends in Python"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="serve a toy backend and drive it; no VM needed")
    sub.add_parser("protocol", help="print the protocol table")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vubackend`` command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
    )
    if args.command == "protocol":
        print_protocol_table()
        return 0
    return run_demo()


if __name__ == "__main__":
    sys.exit(main())
