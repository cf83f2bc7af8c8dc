"""blk scenarios of ``python -m benchmarks``: ``vubackend blk`` against
qemu-storage-daemon on the same raw image.

* guest: one QEMU guest (software emulation) with two disks, ours and the
  reference, each on its own image, doing 4 KiB O_DIRECT reads and writes
  at queue depth 1 and 32, each phase cut into slices run on one disk and
  then on the other (tests/guest/rootfs/tests/blkpair.sh): the two sides of
  a round sample the same host periods, a few hundred milliseconds apart,
  which the host's slow and fast periods cannot skew the way back-to-back
  guest runs can. IOPS from the guest's clock.
* frontend: our Python frontend driving each backend directly, 4 KiB reads
  at queue depth 1 and 32 and 64 KiB writes at depth 8.

The backend runs on CPU 0, QEMU or the frontend on CPU 1."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from benchmarks._harness import Metrics, Scenario
from tests.guest.rig import (
    blk_device,
    guest_image,
    run_guest,
    vubackend,
)
from tests.interop.peers import storage_daemon
from vubackend.frontend import BlkDriver, BlkRequestType, Frontend
from vubackend.protocol import VirtioFeatures

BACKEND_CPU = ["taskset", "-c", "0"]
CLIENT_CPU = 1
IMAGE_MIB = 256


def _image(workdir: Path, name: str = "bench.img") -> Path:
    image = workdir / name
    if not image.exists():
        with image.open("wb") as f:
            f.truncate(IMAGE_MIB << 20)
    return image


@contextlib.contextmanager
def _ours(
    workdir: Path, image: Path, busy_poll_us: float = 0, serial: str | None = None
) -> Iterator[Path]:
    sock = workdir / "ours.sock"
    args = ["blk", "--socket", str(sock), "--image", str(image)]
    args += ["--busy-poll-us", str(busy_poll_us)]
    if serial is not None:
        args += ["--serial", serial]
    with vubackend(args, sock, workdir / "ours.log", wrapper=BACKEND_CPU) as backend:
        yield sock
        backend.stop()


@contextlib.contextmanager
def _storage_daemon(workdir: Path, image: Path) -> Iterator[Path]:
    with storage_daemon(
        workdir, image=image, num_queues=1, name="qsd", wrapper=BACKEND_CPU
    ) as qsd:
        yield qsd.socket


SERIAL: Final = "vubackend-bench"


def guest_scenario(
    workdir: Path,
    *,
    ios: int = 8192,
    ios_qd: int = 8192,
    qd: int = 32,
    busy_poll_us: float = 0,
) -> Scenario:
    """One guest, two disks: ``vubackend blk`` and qemu-storage-daemon, each
    on its own image made the same way, measured in alternation (each phase
    cut into slices, each slice on one disk, then at once on the other, the
    order swapped every slice; tests/guest/rootfs/tests/blkpair.sh)."""
    ours_image = _image(workdir)
    theirs_image = _image(workdir, "reference.img")
    guest = guest_image()
    phases = ["read_qd1", "write_qd1", f"read_qd{qd}", f"write_qd{qd}"]

    def paired(rounds: int) -> tuple[list[Metrics], list[Metrics]]:
        with (
            _ours(workdir, ours_image, busy_poll_us, SERIAL) as ours_sock,
            _storage_daemon(workdir, theirs_image) as theirs_sock,
        ):
            run = run_guest(
                guest,
                "blkpair",
                blk_device(ours_sock, chardev="blk0")
                + blk_device(theirs_sock, chardev="blk1"),
                params={
                    "rounds": rounds,
                    "ios": ios,
                    "ios_qd": ios_qd,
                    "qd": qd,
                    "a": SERIAL,
                },
                log=workdir / "bench.serial",
                timeout=60.0 + 60.0 * rounds,
                wrapper=["taskset", "-c", str(CLIENT_CPU)],
            )
        sides: tuple[list[Metrics], list[Metrics]] = ([], [])
        for r in range(1, rounds + 1):
            for side, out in zip("ab", sides, strict=True):
                metrics: Metrics = {}
                for phase in phases:
                    count, seconds = run.results[f"r{r}_{side}_{phase}"].split()
                    metrics[phase] = int(count) / max(float(seconds), 0.01)
                out.append(metrics)
        return sides

    def unused() -> Metrics:
        raise AssertionError("a paired scenario")

    polling = f", busy-poll {busy_poll_us:.0f} us" if busy_poll_us else ""
    return Scenario(
        f"blk guest 4k O_DIRECT{polling}",
        unused,
        unused,
        phases,
        "qemu-storage-daemon",
        {p: " IOPS" for p in phases},
        paired=paired,
    )


def _drive(sock: Path, seconds: float) -> Metrics:
    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {CLIENT_CPU})
    try:
        with Frontend.connect(sock, retry_for=5.0, timeout=10.0) as fe:
            # FLUSH (bit 9) as Linux negotiates it: write-back caching.
            fe.handshake(
                int(VirtioFeatures.VERSION_1 | VirtioFeatures.EVENT_IDX) | 1 << 9
            )
            fe.create_memory([16 << 20])
            blk = BlkDriver(fe, fe.setup_queue(0, 128))
            fe.start_device()
            return {
                "read4k_qd1": _rate(blk, BlkRequestType.IN, 4096, 1, seconds),
                "read4k_qd32": _rate(blk, BlkRequestType.IN, 4096, 32, seconds),
                "write64k_qd8": _rate(blk, BlkRequestType.OUT, 65536, 8, seconds),
            }
    finally:
        os.sched_setaffinity(0, previous)


def _rate(
    blk: BlkDriver, kind: BlkRequestType, size: int, depth: int, seconds: float
) -> float:
    data = os.urandom(size) if kind == BlkRequestType.OUT else b""
    stripe = (IMAGE_MIB << 20) // 512 // depth
    done = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        batch = [
            blk.submit(
                kind,
                i * stripe + (done % 1024) * (size // 512),
                data=data,
                read_len=size if not data else 0,
                kick=i == depth - 1,
            )
            for i in range(depth)
        ]
        blk.wait(batch, timeout=10.0)
        done += depth
    return done / (time.perf_counter() - start)


def frontend_scenario(workdir: Path, *, seconds: float = 1.0) -> Scenario:
    image = _image(workdir)

    def ours() -> Metrics:
        with _ours(workdir, image) as sock:
            return _drive(sock, seconds)

    def reference() -> Metrics:
        with _storage_daemon(workdir, image) as sock:
            return _drive(sock, seconds)

    metrics = ["read4k_qd1", "read4k_qd32", "write64k_qd8"]
    return Scenario(
        "blk python frontend",
        ours,
        reference,
        metrics,
        "qemu-storage-daemon",
        {m: " req/s" for m in metrics},
    )
