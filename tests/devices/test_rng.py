"""virtio-rng served by the daemon, driven by the frontend's RngDriver."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path

import pytest

from tests.fdutil import open_fds
from vubackend.daemon import VhostUserDaemon
from vubackend.devices import RngDevice
from vubackend.devices._rng import MAX_REQUEST
from vubackend.frontend import Frontend, RngDriver
from vubackend.protocol import VirtioFeatures


def counting_source() -> tuple[RngDevice, list[int]]:
    counter = itertools.count()
    sizes: list[int] = []

    def source(n: int) -> bytes:
        sizes.append(n)
        return bytes(next(counter) & 0xFF for _ in range(n))

    return RngDevice(source), sizes


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_rng_fills_each_request(tmp_path: Path, packed: bool) -> None:
    before = open_fds()
    device, sizes = counting_source()
    daemon = VhostUserDaemon("rng", device)
    path = tmp_path / "rng.sock"
    server = threading.Thread(target=daemon.serve, args=(path,), daemon=True)
    server.start()
    try:
        with Frontend.connect(path, retry_for=5.0, timeout=5.0) as fe:
            features = VirtioFeatures.VERSION_1 | VirtioFeatures.EVENT_IDX
            if packed:
                features |= VirtioFeatures.RING_PACKED
            fe.handshake(int(features))
            fe.create_memory([1 << 20])
            rng = RngDriver(fe, fe.setup_queue(0, 16))
            fe.start_device()
            first = rng.read(16)
            second = rng.read(100)
            big = rng.read(MAX_REQUEST + 4096)
    finally:
        daemon.close()
        server.join(timeout=10)
    assert first == bytes(range(16))
    assert second == bytes(range(16, 116))
    assert len(big) == MAX_REQUEST, "one request is capped"
    assert sizes == [16, 100, MAX_REQUEST]
    assert device.bytes_served == 16 + 100 + MAX_REQUEST
    assert open_fds() == before
