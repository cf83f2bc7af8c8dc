"""Start the real peers from Debian's packages for the interop tests:
qemu-storage-daemon (package qemu-system-common; qemu-img from qemu-utils)
with a vhost-user-blk export, and dpdk-testpmd (package dpdk-dev) with the
vhost PMD. ``scripts/setup.sh`` installs the packages; without a binary the
fixtures skip with the reason.

Every process started here is killed in a ``finally`` and its temporary
files live under pytest's ``tmp_path``."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

QSD = "qemu-storage-daemon"
QEMU_IMG = "qemu-img"
TESTPMD = "dpdk-testpmd"
START_TIMEOUT = 10.0


def require(binary: str, package: str) -> str:
    """The path of ``binary``, or skip the test naming the Debian package."""
    path = shutil.which(binary)
    if path is None:
        pytest.skip(
            f"{binary} is not installed "
            f"(Debian package {package}; run scripts/setup.sh)"
        )
    return path


def wait_for_socket(path: Path, process: subprocess.Popen[bytes], log: Path) -> None:
    """Wait until ``process`` listens on ``path``; fail with its log if it
    dies or takes longer than START_TIMEOUT."""
    deadline = time.monotonic() + START_TIMEOUT
    while not path.is_socket():
        if process.poll() is not None:
            raise RuntimeError(
                f"{process.args!r} exited with {process.returncode}:\n{log.read_text()}"
            )
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{path} did not appear within {START_TIMEOUT} s:\n{log.read_text()}"
            )
        time.sleep(0.02)


def _stop(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@dataclass
class StorageDaemon:
    """A running qemu-storage-daemon exporting ``image`` on ``socket``."""

    socket: Path
    image: Path
    log: Path
    process: subprocess.Popen[bytes]

    def read_image(self, offset: int, length: int) -> bytes:
        """Bytes of the image file on the host."""
        with self.image.open("rb") as f:
            f.seek(offset)
            return f.read(length)

    @property
    def running(self) -> bool:
        return self.process.poll() is None


@contextlib.contextmanager
def storage_daemon(
    workdir: Path,
    *,
    size_mb: int = 16,
    num_queues: int = 2,
    name: str = "vub",
    image: Path | None = None,
    wrapper: Sequence[str] = (),
) -> Iterator[StorageDaemon]:
    """Start qemu-storage-daemon with a writable vhost-user-blk export of
    ``image`` (by default a fresh raw image of ``size_mb``), under
    ``wrapper`` if given (``["taskset", "-c", "0"]``); kill it afterwards."""
    qsd = require(QSD, "qemu-system-common")
    sock = workdir / f"{name}.sock"
    log = workdir / f"{name}.log"
    if image is None:
        qemu_img = require(QEMU_IMG, "qemu-utils")
        image = workdir / f"{name}.img"
        subprocess.run(
            [qemu_img, "create", "-q", "-f", "raw", str(image), f"{size_mb}M"],
            check=True,
            timeout=30,
        )
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                *wrapper,
                qsd,
                "--blockdev", f"driver=file,node-name=disk0,filename={image}",
                "--export",
                f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
                f"addr.path={sock},writable=on,num-queues={num_queues}",
            ],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_for_socket(sock, process, log)
        yield StorageDaemon(sock, image, log, process)
    finally:
        _stop(process)


@dataclass
class PortStats:
    """Counters testpmd printed for its vhost port."""

    rx_packets: int
    tx_packets: int
    rx_dropped: int


_STATS = re.compile(
    r"RX-packets:\s*(\d+)\s+RX-dropped:\s*(\d+).*?TX-packets:\s*(\d+)", re.S
)


@dataclass
class TestPmd:
    """A running dpdk-testpmd with a vhost PMD port listening on ``socket``."""

    __test__ = False  # not a test class, despite its name

    socket: Path
    log: Path
    process: subprocess.Popen[bytes]

    def stop(self) -> PortStats:
        """Stop testpmd (SIGINT: it prints its final statistics) and parse
        the per-port totals."""
        _stop(self.process, signal.SIGINT)
        text = self.log.read_text(errors="replace")
        blocks = text.split("Forward statistics for port 0")
        if len(blocks) < 2:
            raise RuntimeError(
                f"no final statistics in testpmd's output:\n{text[-3000:]}"
            )
        match = _STATS.search(blocks[-1])
        if match is None:
            raise RuntimeError(
                f"cannot parse testpmd's statistics:\n{blocks[-1][:2000]}"
            )
        rx, dropped, tx = (int(g) for g in match.groups())
        return PortStats(rx_packets=rx, tx_packets=tx, rx_dropped=dropped)


@contextlib.contextmanager
def run_testpmd(
    workdir: Path, *, mode: str = "rxonly", name: str = "vh"
) -> Iterator[TestPmd]:
    """Start dpdk-testpmd without hugepages, its vhost PMD listening on a
    socket (the frontend is the client), forwarding in ``mode``
    (``rxonly`` or ``io``); kill it afterwards."""
    binary = require(TESTPMD, "dpdk-dev")
    sock = workdir / f"{name}.sock"
    log = workdir / f"{name}-testpmd.log"
    prefix = f"vubt{os.getpid()}{name}"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                binary, "-l", "0-1", "--no-pci", "--no-huge", "-m", "512",
                f"--file-prefix={prefix}", "--log-level=lib.eal:error",
                "--vdev", f"net_vhost0,iface={sock},queues=1,client=0",
                "--", "--nb-cores=1", f"--forward-mode={mode}",
                "--total-num-mbufs=16384", "--stats-period", "1",
            ],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_for_socket(sock, process, log)
        # The socket exists before forwarding starts; frames the vhost port
        # takes in between are counted nowhere (seen: rxonly counting 0).
        deadline = time.monotonic() + START_TIMEOUT
        while b"packet forwarding - ports=" not in log.read_bytes():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"testpmd did not start forwarding:\n{log.read_text()}"
                )
            time.sleep(0.02)
        yield TestPmd(sock, log, process)
    finally:
        _stop(process, signal.SIGINT)
        # EAL's runtime directory (its config and sockets) is left behind.
        shutil.rmtree(Path("/var/run/dpdk") / prefix, ignore_errors=True)


# ---------------------------------------------------------------- virtio-user

_PROMPT = b"testpmd> "
_NIC_STATS = re.compile(
    r"NIC statistics for port (\d+).*?RX-packets:\s*(\d+)\s+RX-missed:\s*(\d+)"
    r".*?RX-errors:\s*(\d+).*?TX-packets:\s*(\d+)\s+TX-errors:\s*(\d+)",
    re.S,
)


@dataclass
class NicStats:
    """A port's counters from testpmd's ``show port stats``."""

    rx_packets: int
    rx_missed: int
    rx_errors: int
    tx_packets: int
    tx_errors: int


class VirtioUser:
    """dpdk-testpmd in interactive mode with one virtio-user port, driven
    through its stdin; what it prints goes to ``log`` (read by a thread, so
    that its pipe never fills)."""

    def __init__(self, process: subprocess.Popen[bytes], log: Path) -> None:
        self.process = process
        self.log = log
        self._out = bytearray()
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        stdout = self.process.stdout
        assert stdout is not None
        fd = stdout.fileno()
        with self.log.open("wb") as log:
            while chunk := os.read(fd, 65536):
                log.write(chunk)
                log.flush()
                with self._lock:
                    self._out += chunk

    def output(self) -> str:
        with self._lock:
            return self._out.decode(errors="replace")

    def _prompts(self) -> int:
        with self._lock:
            return self._out.count(_PROMPT)

    def wait_prompt(self, count: int, timeout: float = START_TIMEOUT) -> None:
        """Wait until testpmd printed its prompt ``count`` times in all."""
        deadline = time.monotonic() + timeout
        while self._prompts() < count:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"testpmd exited with {self.process.returncode}:\n"
                    f"{self.output()[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"testpmd gave no prompt within {timeout} s:\n"
                    f"{self.output()[-3000:]}"
                )
            time.sleep(0.02)

    def command(self, line: str, timeout: float = START_TIMEOUT) -> str:
        """Run one command and wait for the next prompt; returns what it
        printed."""
        stdin = self.process.stdin
        assert stdin is not None
        before = self._prompts()
        start = len(self.output())
        stdin.write(line.encode() + b"\n")
        stdin.flush()
        self.wait_prompt(before + 1, timeout)
        return self.output()[start:]

    def port_stats(self) -> NicStats:
        """Port 0's counters since testpmd started."""
        text = self.command("show port stats 0")
        match = _NIC_STATS.search(text)
        if match is None:
            raise RuntimeError(f"cannot parse testpmd's port statistics:\n{text}")
        _, rx, missed, rx_err, tx, tx_err = (int(g) for g in match.groups())
        return NicStats(rx, missed, rx_err, tx, tx_err)

    def quit(self) -> None:
        """Quit testpmd (it closes its port: the backend sees a disconnect)."""
        stdin = self.process.stdin
        if self.process.poll() is None and stdin is not None:
            with contextlib.suppress(OSError):
                stdin.write(b"quit\n")
                stdin.flush()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _stop(self.process, signal.SIGKILL)
        self._reader.join(timeout=5)


@contextlib.contextmanager
def virtio_user(
    workdir: Path,
    socket: Path,
    *,
    queues: int = 1,
    packed: bool = False,
    mrg_rxbuf: bool = True,
    in_order: bool = True,
    server: bool = False,
    queue_size: int = 256,
    cpu: int = 1,
    name: str = "vu",
) -> Iterator[VirtioUser]:
    """Start dpdk-testpmd (interactive, no hugepages) with a virtio-user
    port on ``socket``; both its lcores are pinned to ``cpu``. With
    ``server`` virtio-user listens and testpmd waits for the backend to
    connect before it gives its prompt. Killed afterwards."""
    binary = require(TESTPMD, "dpdk-dev")
    log = workdir / f"{name}-testpmd.log"
    prefix = f"vubt{os.getpid()}{name}"
    devargs = (
        f"net_virtio_user0,path={socket},queues={queues},queue_size={queue_size},"
        f"packed_vq={int(packed)},mrg_rxbuf={int(mrg_rxbuf)},"
        f"in_order={int(in_order)},server={int(server)}"
    )
    # stdbuf: testpmd prints with stdio, which a pipe would buffer past the
    # prompt (cmdline writes that directly).
    process = subprocess.Popen(
        [
            "stdbuf", "-o0", binary, "--lcores", f"0@{cpu},1@{cpu}",
            "--no-pci", "--no-huge",
            "-m", "512", f"--file-prefix={prefix}", "--log-level=lib.eal:error",
            "--vdev", devargs,
            "--", "-i", f"--rxq={queues}", f"--txq={queues}", "--nb-cores=1",
            "--total-num-mbufs=16384",
        ],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    peer = VirtioUser(process, log)
    try:
        yield peer
    finally:
        _stop(process, signal.SIGKILL)
        peer._reader.join(timeout=5)
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                stream.close()
        shutil.rmtree(Path("/var/run/dpdk") / prefix, ignore_errors=True)
