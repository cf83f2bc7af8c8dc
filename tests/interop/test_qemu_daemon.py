"""QEMU 7.2 (software emulation) against a VhostUserDaemon serving a test
RAM disk, with no guest kernel: QEMU's own handshake (GET_FEATURES ...
GET_CONFIG), then SeaBIOS, which has a virtio-blk driver, starts the device
(SET_FEATURES, inflight buffer, memory, rings, DRIVER_OK) and reads the disk
to look for a boot sector."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.daemon._device import SECTOR, RamDisk
from tests.fdutil import open_fds
from vubackend.daemon import VhostUserDaemon
from vubackend.vring import VringT

QEMU = shutil.which("qemu-system-x86_64")
pytestmark = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86 is not installed")


class RecordingDisk(RamDisk):
    """A RAM disk whose first sector is an MBR, recording what it serves."""

    def __init__(self) -> None:
        super().__init__(queues=1)
        self.disk[510:512] = b"\x55\xaa"
        self.config_reads = 0
        self.acked: int | None = None
        self.served = threading.Event()

    def get_config(self, offset: int, size: int) -> bytes:
        self.config_reads += 1
        return super().get_config(offset, size)

    def acked_features(self, features: int) -> None:
        self.acked = features

    def handle_event(
        self, device_event: int, evset: int, vrings: Sequence[VringT], thread_id: int
    ) -> None:
        super().handle_event(device_event, evset, vrings, thread_id)
        if self.requests:
            self.served.set()


def test_qemu_handshake_and_seabios_reads_the_disk(tmp_path: Path) -> None:
    assert QEMU is not None
    before = open_fds()
    device = RecordingDisk()
    daemon = VhostUserDaemon("qemu-blk", device)
    path = tmp_path / "blk.sock"
    server = threading.Thread(target=daemon.serve, args=(path,), daemon=True)
    server.start()
    deadline = time.monotonic() + 10
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    qemu = subprocess.Popen(
        [
            QEMU, "-accel", "tcg", "-m", "64M", "-nodefaults", "-no-user-config",
            "-nographic", "-serial", "none", "-monitor", "none",
            "-object", "memory-backend-memfd,id=mem,size=64M,share=on",
            "-numa", "node,memdev=mem",
            "-chardev", f"socket,id=c0,path={path}",
            "-device", "vhost-user-blk-pci,chardev=c0,num-queues=1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        served = device.served.wait(timeout=60)
    finally:
        qemu.kill()
        output = qemu.communicate(timeout=10)[0].decode(errors="replace")
        daemon.close()
        server.join(timeout=10)
    assert served, f"SeaBIOS never read the disk; QEMU said:\n{output}"
    assert device.config_reads >= 1
    assert device.acked is not None
    assert device.acked & (1 << 32), "VERSION_1 not negotiated"
    assert device.requests >= 1
    assert device.disk[510:512] == b"\x55\xaa"
    assert len(device.disk) == 2048 * SECTOR
    assert open_fds() == before
