"""The ``vubackend`` command.

Subcommands:
    demo        serve a virtio-rng device with VhostUserDaemon and drive it
                with the Python frontend over a real Unix socket (split and
                packed rings), logging what was negotiated and served.
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

from vubackend.daemon import VhostUserDaemon
from vubackend.devices import RngDevice
from vubackend.frontend import Frontend, RngDriver
from vubackend.protocol import (
    BACKEND_REQUEST_SPEC,
    FRONTEND_REQUEST_SPEC,
    RequestSpec,
    VirtioFeatures,
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


def run_demo(*, requests: int = 8, size: int = 32) -> int:
    """Serve a virtio-rng device with VhostUserDaemon on a temporary socket
    and drive it with the Python frontend: handshake, memory, a ring, and
    ``requests`` reads of ``size`` random bytes, over both ring layouts."""
    print("vubackend speaks vhost-user with these requests:")
    print_protocol_table()
    print()
    with tempfile.TemporaryDirectory(prefix="vubackend-demo-") as tmp:
        path = os.path.join(tmp, "rng.sock")
        device = RngDevice()
        daemon = VhostUserDaemon("demo-rng", device)
        server = threading.Thread(target=daemon.serve, args=(path,), daemon=True)
        server.start()
        try:
            for packed in (False, True):
                _drive(path, packed=packed, requests=requests, size=size)
        finally:
            daemon.close()
            server.join(timeout=10)
    print(
        f"\ndemo finished: the daemon served {device.bytes_served} random bytes "
        "over split and packed rings"
    )
    return 0


def _drive(path: str, *, packed: bool, requests: int, size: int) -> None:
    layout = "packed" if packed else "split"
    features = VirtioFeatures.VERSION_1 | VirtioFeatures.EVENT_IDX
    if packed:
        features |= VirtioFeatures.RING_PACKED
    with Frontend.connect(path, retry_for=5.0, timeout=10.0) as fe:
        fe.handshake(int(features))
        log.info(
            "frontend: negotiated %s",
            "|".join(f.name or "?" for f in VirtioFeatures(fe.acked_features)),
        )
        fe.create_memory([1 << 20])
        rng = RngDriver(fe, fe.setup_queue(0, 64))
        fe.start_device()
        for i in range(requests):
            data = rng.read(size)
            log.info("frontend (%s ring): request %d -> %s", layout, i, data.hex())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vubackend", description="vhost-user device backends in Python"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "demo", help="serve a virtio-rng device and drive it with the frontend"
    )
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
