"""The daemon's other entry points: start_client (the front-end listens, as
QEMU with server=on or DPDK virtio-user with server=1) and start(listener)
with wait()."""

from __future__ import annotations

import threading
from pathlib import Path

from tests.fdutil import open_fds
from vubackend.daemon import VhostUserDaemon
from vubackend.frontend import Frontend
from vubackend.protocol import Listener

from ._device import SECTOR, RamDisk
from .test_daemon import start


def test_start_client_connects_to_a_listening_frontend(tmp_path: Path) -> None:
    before = open_fds()
    path = tmp_path / "frontend.sock"
    frontends: list[Frontend] = []
    listening = threading.Thread(
        target=lambda: frontends.append(Frontend.listen(path, accept_timeout=10.0))
    )
    listening.start()
    device = RamDisk()
    with VhostUserDaemon("client", device) as daemon:
        daemon.start_client(path, retry_for=5.0)
        listening.join(timeout=10)
        (fe,) = frontends
        with fe:
            q0, _ = start(fe)
            q0.write(9, b"c" * SECTOR)
            assert q0.read(9) == b"c" * SECTOR
        daemon.wait()  # a normal disconnect is success
    assert device.disk[9 * SECTOR : 10 * SECTOR] == b"c" * SECTOR
    assert open_fds() == before


def test_start_with_a_listener_then_wait(tmp_path: Path) -> None:
    before = open_fds()
    path = tmp_path / "daemon.sock"
    device = RamDisk()
    with Listener(path) as listener, VhostUserDaemon("server", device) as daemon:
        accepted = threading.Thread(target=daemon.start, args=(listener,))
        accepted.start()
        with Frontend.connect(path, retry_for=5.0, timeout=5.0) as fe:
            accepted.join(timeout=10)
            q0, _ = start(fe)
            q0.write(1, b"s" * SECTOR)
        daemon.wait()
    assert device.disk[SECTOR : 2 * SECTOR] == b"s" * SECTOR
    assert open_fds() == before
