"""The frontend drives DPDK's vhost PMD (dpdk-testpmd --vdev net_vhost0,
no hugepages): frames sent on TX are counted by testpmd, and in io mode they
come back on RX unchanged."""

from __future__ import annotations

import struct
from pathlib import Path

from vubackend.frontend import Frontend, NetDriver
from vubackend.protocol import ProtocolFeatures, VirtioFeatures

from ..fdutil import open_fds
from .peers import run_testpmd

FRAMES = 300


def _frames(count: int) -> list[bytes]:
    # Broadcast Ethernet frames with a sequence number, 64 bytes each.
    head = bytes.fromhex("ffffffffffff02000000000188b5")
    return [head + struct.pack("<I", i) + bytes(46) for i in range(count)]


def test_rxonly_count_is_exact(tmp_path: Path) -> None:
    fds_before = open_fds()
    with run_testpmd(tmp_path, mode="rxonly") as pmd:
        with Frontend.connect(pmd.socket, timeout=5) as fe:
            fe.handshake(int(VirtioFeatures.VERSION_1))
            fe.create_memory([8 << 20])
            rx = fe.setup_queue(0, 256)
            tx = fe.setup_queue(1, 256)
            assert fe.has_protocol_feature(ProtocolFeatures.STATUS)
            fe.start_device()
            driver = NetDriver(fe, rx, tx)
            assert driver.send(_frames(FRAMES)) == FRAMES
            driver.wait_sent()
            stats = pmd.stop()
        assert stats.rx_packets == FRAMES
        assert stats.tx_packets == 0
    assert open_fds() == fds_before


def test_io_mode_sends_frames_back(tmp_path: Path) -> None:
    frames = _frames(FRAMES)
    with run_testpmd(tmp_path, mode="io") as pmd:
        with Frontend.connect(pmd.socket, timeout=5) as fe:
            fe.handshake(int(VirtioFeatures.VERSION_1))
            fe.create_memory([8 << 20])
            rx = fe.setup_queue(0, 256)
            tx = fe.setup_queue(1, 256)
            fe.start_device()
            driver = NetDriver(fe, rx, tx)
            driver.post_rx_buffers()
            # testpmd turns the port on a moment after DRIVER_OK; frames it
            # forwards before that are dropped. Wait until one comes back.
            warmups = 0
            while warmups < 20:
                warmups += 1
                driver.send([b"\xff" * 6 + b"\x02" + bytes(57)])
                if driver.receive(1, timeout=0.5):
                    break
            got: list[bytes] = []
            for start in range(0, FRAMES, 100):  # stay within the 256 RX buffers
                driver.send(frames[start : start + 100])
                got += driver.receive(100, timeout=5)
            driver.wait_sent()
            stats = pmd.stop()
        assert got == frames  # every frame back, unchanged, in order
        assert FRAMES < stats.rx_packets <= FRAMES + warmups
        assert FRAMES < stats.tx_packets <= FRAMES + warmups
