"""The ``vubackend`` command.

Subcommands:
    blk         serve virtio-blk over a raw image file or block device.
    net         serve virtio-net over a TAP device (--tap NAME), a loopback
                (--loopback: frames come back to the guest) or a sink
                (--sink: frames are counted and dropped).
    rng         serve virtio-rng from the kernel's random source.
    demo        serve a blk device on a temporary image and drive it with the
                built-in frontend: write, read back, verify, a throughput
                figure. No VM needed.
    protocol    print the protocol table (every request, its payload, fds,
                gate and reply).

Every device subcommand takes the common options: ``--socket PATH``,
``--client`` (connect to a frontend that listens, instead of listening),
``--no-reconnect`` (serve one session, then exit), the memory backend
(``--xen``, ``--postcopy``) and ``--log-level``. SIGINT and SIGTERM shut the
device down cleanly. Errors the user can fix (a missing image, a socket path
in use...) print one line and exit with status 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import TextIO

from vubackend.daemon import VhostUserBackend, VhostUserDaemon
from vubackend.devices import (
    BlkDevice,
    Link,
    LoopbackLink,
    NetDevice,
    RngDevice,
    SinkLink,
    TapLink,
)
from vubackend.errors import VhostUserError
from vubackend.frontend import BlkDriver, BlkRequestType, Frontend
from vubackend.memory import GuestMemoryAtomic, MemoryBackend, select_backend
from vubackend.protocol import (
    BACKEND_REQUEST_SPEC,
    FRONTEND_REQUEST_SPEC,
    Listener,
    RequestSpec,
    VirtioFeatures,
)
from vubackend.vring import VringMutex

__all__ = ["main"]

log = logging.getLogger("vubackend")

# Seconds a client keeps retrying to reach a frontend that is not listening
# (yet, or again after it restarted).
CLIENT_RETRY = 3600.0


class UsageError(Exception):
    """A problem with the command line or its environment, told to the user
    in one line."""


# ---------------------------------------------------------------- protocol


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


# ---------------------------------------------------------------- serving


def _memory(args: argparse.Namespace) -> GuestMemoryAtomic:
    if args.xen and args.postcopy:
        # select_backend refuses this too; say it in the command's words.
        raise UsageError(
            "--xen and --postcopy exclude each other: postcopy needs fixed "
            "mappings registered with userfaultfd, Xen maps guest pages on "
            "demand; choose one"
        )
    backend: MemoryBackend
    try:
        if args.postcopy:
            backend = select_backend(postcopy=True)
        else:
            backend = select_backend(xen=bool(args.xen))
    except VhostUserError as exc:
        raise UsageError(str(exc)) from None
    log.info("memory backend: %s", backend.name)
    return GuestMemoryAtomic(backend=backend)


def serve_device(
    name: str,
    device: VhostUserBackend,
    args: argparse.Namespace,
    stop: threading.Event,
    *,
    prepare: Callable[[VhostUserDaemon], None] | None = None,
) -> None:
    """Serve ``device`` as the options say until ``stop`` is set (by a
    signal) or, with ``--no-reconnect``, until the session ends.
    ``prepare(daemon)`` runs before anything is served (a device that
    registers fds on the daemon's workers does it there)."""
    # VringMutex: every ring is served by one worker, so the shared side of a
    # readers-writer lock buys nothing here, and a plain mutex is taken in C
    # (the data path takes the ring's lock on every kick).
    daemon = VhostUserDaemon(name, device, _memory(args), vring_type=VringMutex)
    if prepare is not None:
        try:
            prepare(daemon)
        except BaseException:
            daemon.close()
            raise
    socket_path = os.path.abspath(args.socket)
    errors: list[BaseException] = []
    listener: Listener | None = None
    if not args.client:
        try:
            listener = Listener(socket_path)
        except VhostUserError as exc:
            daemon.close()
            raise UsageError(str(exc)) from None
        log.info("%s: listening on %s", name, socket_path)

    def run() -> None:
        try:
            if listener is not None:
                daemon.serve(listener, reconnect=args.reconnect)
                return
            while not stop.is_set():
                log.info("%s: connecting to the frontend at %s", name, socket_path)
                daemon.start_client(socket_path, retry_for=CLIENT_RETRY)
                daemon.wait()
                if not args.reconnect:
                    return
                log.info("%s: frontend gone; reconnecting", name)
        except BaseException as exc:  # reported by the main thread
            if not stop.is_set():
                errors.append(exc)
        finally:
            stop.set()

    server = threading.Thread(target=run, name=f"{name}-serve", daemon=True)
    server.start()
    while not stop.wait(0.5):
        pass
    daemon.close()
    server.join(timeout=10)
    for index, vring in enumerate(daemon.vrings):
        with vring.get_ref() as state:
            if state.kicks or state.calls:
                log.info(
                    "%s: ring %d: %d kicks, %d calls",
                    name,
                    index,
                    state.kicks,
                    state.calls,
                )
    if errors:
        raise errors[0]


def _install_signals(stop: threading.Event) -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        log.info("%s received: shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def run_blk(args: argparse.Namespace, stop: threading.Event) -> int:
    """``vubackend blk``."""
    try:
        device = BlkDevice(
            args.image,
            read_only=args.read_only,
            queues=args.queues,
            queue_size=args.queue_size,
            direct=args.direct,
            block_size=args.block_size,
            serial=args.serial,
            discard=not args.no_discard,
            busy_poll=args.busy_poll_us / 1e6,
        )
    except VhostUserError as exc:
        raise UsageError(str(exc)) from None
    try:
        log.info(
            "serving virtio-blk: %s, %d MiB (%d sectors), %s, %d queue(s) of up "
            "to %d, block size %d%s",
            device.path,
            device.size >> 20,
            device.capacity,
            "read-only" if device.read_only else "read-write",
            device.queues,
            device.queue_size,
            device.block_size,
            ", O_DIRECT" if device.direct else "",
        )
        if device.busy_poll:
            log.info("busy-polling each ring for %.0f us", device.busy_poll * 1e6)
        serve_device("blk", device, args, stop)
    finally:
        s = device.stats
        log.info(
            "blk served %d reads (%d MiB), %d writes (%d MiB), %d flushes, "
            "%d discards, %d write-zeroes, %d errors, %d unsupported",
            s.reads,
            s.bytes_read >> 20,
            s.writes,
            s.bytes_written >> 20,
            s.flushes,
            s.discards,
            s.write_zeroes,
            s.errors,
            s.unsupported,
        )
        device.close()
    return 0


def _sink(generate: int | None) -> tuple[SinkLink, str]:
    what = "a sink (frames are counted and dropped)"
    if generate is None:
        return SinkLink(), what
    if not 14 <= generate <= 65535:
        raise UsageError(f"--generate {generate}: a frame is 14 to 65535 bytes")
    # Broadcast, from a local address, with the local experimental
    # EtherType (IEEE 802 0x88B5): nobody's real traffic.
    header = b"\xff" * 6 + bytes.fromhex("020000000001") + b"\x88\xb5"
    frame = header + bytes(generate - len(header))
    return SinkLink(generate=frame), f"{what}, sending {generate}-byte frames"


def run_net(args: argparse.Namespace, stop: threading.Event) -> int:
    """``vubackend net``."""
    link: Link
    if args.generate is not None and not args.sink:
        raise UsageError("--generate goes with --sink")
    try:
        if args.tap is not None:
            link, what = TapLink(args.tap), f"TAP device {args.tap}"
        elif args.sink:
            link, what = _sink(args.generate)
        else:
            link, what = LoopbackLink(), "a loopback (frames come back to the guest)"
        device = NetDevice(
            link,
            queue_pairs=args.queues,
            mac=args.mac,
            max_queue_size=args.queue_size,
            busy_poll=args.busy_poll_us / 1e6,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    except VhostUserError as exc:
        raise UsageError(str(exc)) from None
    try:
        log.info(
            "serving virtio-net over %s: MAC %s, %d queue pair(s) of up to %d",
            what,
            device.mac.hex(":"),
            device.queue_pairs,
            args.queue_size,
        )
        serve_device("net", device, args, stop, prepare=device.attach)
    finally:
        s = device.stats()
        log.info(
            "net served: tx %d frames (%d bytes), rx %d frames (%d bytes), "
            "%d rx dropped, %d errors, %d control commands",
            s.tx_frames,
            s.tx_bytes,
            s.rx_frames,
            s.rx_bytes,
            s.rx_dropped,
            s.errors,
            s.control_commands,
        )
        for pair in range(device.queue_pairs):
            p = device.stats(pair)
            log.info(
                "net pair %d: tx %d frames, rx %d frames",
                pair,
                p.tx_frames,
                p.rx_frames,
            )
        device.close()
    return 0


def run_rng(args: argparse.Namespace, stop: threading.Event) -> int:
    """``vubackend rng``."""
    device = RngDevice()
    log.info("serving virtio-rng from the kernel's random source")
    try:
        serve_device("rng", device, args, stop)
    finally:
        log.info("rng served %d bytes", device.bytes_served)
    return 0


# ---------------------------------------------------------------- demo


def _say(text: str) -> None:
    print(text, flush=True)


def run_demo(*, seconds: float = 1.0, image_mib: int = 64) -> int:
    """Serve a virtio-blk device on a temporary image with VhostUserDaemon,
    drive it with the Python frontend over a real Unix socket (split, then
    packed rings), verify what was written on the rings and on disk, and
    measure a short throughput figure."""
    with tempfile.TemporaryDirectory(prefix="vubackend-demo-") as tmp:
        image = os.path.join(tmp, "disk.img")
        with open(image, "wb") as f:
            f.truncate(image_mib << 20)
        path = os.path.join(tmp, "blk.sock")
        device = BlkDevice(image, queues=1, serial="vubackend-demo")
        daemon = VhostUserDaemon("demo-blk", device, vring_type=VringMutex)
        listener = Listener(path)
        server = threading.Thread(target=daemon.serve, args=(listener,), daemon=True)
        server.start()
        _say(f"demo: serving virtio-blk on {path} over a {image_mib} MiB image")
        try:
            verified = 0
            for packed in (False, True):
                verified += _drive(path, image, packed=packed, seconds=seconds)
        finally:
            daemon.close()
            server.join(timeout=10)
            device.close()
    _say(
        f"demo: verified {verified >> 10} KiB written, read back and found on "
        "disk, over split and packed rings"
    )
    return 0


def _drive(path: str, image: str, *, packed: bool, seconds: float) -> int:
    layout = "packed" if packed else "split"
    features = VirtioFeatures.VERSION_1 | VirtioFeatures.EVENT_IDX
    if packed:
        features |= VirtioFeatures.RING_PACKED
    with Frontend.connect(path, retry_for=5.0, timeout=10.0) as fe:
        fe.handshake(int(features) | _BLK_FLUSH)
        fe.create_memory([8 << 20])
        blk = BlkDriver(fe, fe.setup_queue(0, 128))
        fe.start_device()
        _say(f"demo ({layout} ring): device id {blk.get_id().rstrip(bytes(1))!r}")
        # Write a random pattern at scattered sectors, read it back, flush,
        # and compare with the image file on the host.
        pattern = os.urandom(256 << 10)
        sectors = [0, 8191, 40000, 100000]
        for sector in sectors:
            blk.write(sector, pattern)
        for sector in sectors:
            if blk.read(sector, len(pattern) // 512) != pattern:
                raise RuntimeError(f"sector {sector}: read back differs")
        blk.flush()
        with open(image, "rb") as f:
            for sector in sectors:
                f.seek(sector * 512)
                if f.read(len(pattern)) != pattern:
                    raise RuntimeError(f"sector {sector}: the image on disk differs")
        _say(
            f"demo ({layout} ring): {len(sectors)} x {len(pattern) >> 10} KiB "
            "written, read back and found in the image file: OK"
        )
        for size in (4096, 65536):
            ios, elapsed = _throughput(blk, size, seconds / 2)
            _say(
                f"demo ({layout} ring): {size >> 10} KiB reads at queue depth 16: "
                f"{ios / elapsed:,.0f} IOPS, {ios * size / elapsed / 1e6:.1f} MB/s"
            )
        return len(sectors) * len(pattern)


_BLK_FLUSH = 1 << 9


def _throughput(
    blk: BlkDriver, size: int, seconds: float, depth: int = 16
) -> tuple[int, float]:
    count = size // 512
    done = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        batch = [
            blk.submit(
                BlkRequestType.IN,
                (i * count) % 100000,
                read_len=size,
                kick=i == depth - 1,  # one kick for the whole batch
            )
            for i in range(depth)
        ]
        blk.wait(batch, timeout=10.0)
        done += len(batch)
    return done, time.perf_counter() - start


# ---------------------------------------------------------------- parsing


def _common(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("serving")
    group.add_argument(
        "--socket", required=True, metavar="PATH", help="the vhost-user socket"
    )
    group.add_argument(
        "--client",
        action="store_true",
        help="connect to a frontend listening on PATH instead of listening",
    )
    group.add_argument(
        "--no-reconnect",
        dest="reconnect",
        action="store_false",
        help="serve one session, then exit (default: serve the next frontend "
        "that connects, or reconnect in client mode)",
    )
    group.add_argument(
        "--xen",
        action="store_true",
        help="map guest memory with Xen foreign/grant mappings (vubackend[xen])",
    )
    group.add_argument(
        "--postcopy",
        action="store_true",
        help="support postcopy live migration with userfaultfd (vubackend[postcopy])",
    )


def _busy_poll(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--busy-poll-us",
        type=float,
        default=0.0,
        metavar="US",
        help="poll a ring this long for more work before sleeping on its "
        "kick (default 0: off)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vubackend", description="vhost-user device backends in Python"
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="what to log (default: info)",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="same as --log-level debug"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    blk = sub.add_parser("blk", help="serve virtio-blk over a raw image")
    blk.add_argument(
        "--image", required=True, metavar="FILE", help="raw image or block device"
    )
    blk.add_argument("--read-only", action="store_true", help="refuse writes")
    blk.add_argument(
        "--queues", type=int, default=1, metavar="N", help="request queues (default 1)"
    )
    blk.add_argument(
        "--queue-size",
        type=int,
        default=256,
        metavar="N",
        help="largest ring (default 256)",
    )
    blk.add_argument(
        "--direct", action="store_true", help="open the image with O_DIRECT"
    )
    blk.add_argument(
        "--block-size",
        type=int,
        default=512,
        metavar="BYTES",
        help="logical block size",
    )
    blk.add_argument("--serial", help="the device id the guest reads (<= 20 bytes)")
    blk.add_argument(
        "--no-discard",
        action="store_true",
        help="do not offer discard and write zeroes",
    )
    _busy_poll(blk)
    _common(blk)

    net = sub.add_parser(
        "net", help="serve virtio-net over a TAP device, a loopback or a sink"
    )
    link = net.add_mutually_exclusive_group(required=True)
    link.add_argument(
        "--tap", metavar="NAME", help="a TAP device (existing, or created)"
    )
    link.add_argument(
        "--loopback",
        action="store_true",
        help="every frame the guest sends comes back to it",
    )
    link.add_argument("--sink", action="store_true", help="count and drop every frame")
    net.add_argument(
        "--generate",
        type=int,
        metavar="BYTES",
        help="with --sink: also send the guest frames of BYTES bytes, as fast "
        "as it posts receive buffers (for benchmarks)",
    )
    net.add_argument(
        "--queues",
        type=int,
        default=1,
        metavar="N",
        help="queue pairs, one worker thread each (default 1)",
    )
    net.add_argument("--mac", help="the MAC address (default: a random local one)")
    net.add_argument(
        "--queue-size",
        type=int,
        default=1024,
        metavar="N",
        help="largest ring (default 1024)",
    )
    _busy_poll(net)
    _common(net)

    rng = sub.add_parser("rng", help="serve virtio-rng from the kernel's random source")
    _common(rng)

    demo = sub.add_parser(
        "demo", help="serve a blk device on a temporary image and drive it (no VM)"
    )
    demo.add_argument(
        "--seconds", type=float, default=1.0, help="length of the throughput runs"
    )
    sub.add_parser("protocol", help="print the protocol table")
    return parser


_RUNNERS: dict[str, Callable[[argparse.Namespace, threading.Event], int]] = {
    "blk": run_blk,
    "net": run_net,
    "rng": run_rng,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vubackend`` command."""
    args = build_parser().parse_args(argv)
    level = "debug" if args.verbose else args.log_level
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)-7s %(message)s",
        datefmt="%H:%M:%S",
    )
    prog = f"vubackend {args.command}"
    try:
        if args.command == "protocol":
            print_protocol_table()
            return 0
        if args.command == "demo":
            return run_demo(seconds=args.seconds)
        stop = threading.Event()
        _install_signals(stop)
        return _RUNNERS[args.command](args, stop)
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except VhostUserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
