"""Our virtio-net device with a loopback link, driven by DPDK's virtio-user
(dpdk-testpmd, package dpdk-dev): a C virtio-net driver that negotiates MQ,
REPLY_ACK and STATUS, and addresses its memory by its own virtual addresses.

How "every frame comes back, none lost" is counted, deterministically:

1. ``set fwd io`` then ``start tx_first 2``: testpmd sends 2 bursts of 32
   frames per queue pair, then forwards whatever it receives straight back.
   With the loopback link every frame the device takes from TX is written
   into RX, so those frames circle for a second, many laps.
2. ``stop``, then ``set fwd rxonly`` and ``start``/``stop`` again: nothing
   is sent any more and the frames still in flight (in the device or in the
   RX ring) are received, so the loop drains.
3. ``show port stats 0``: with no frame lost, RX-packets equals TX-packets
   exactly (each frame sent came back once), RX-missed and the error
   counters are 0, and the device counted the same numbers: frames it took
   from TX = testpmd's TX-packets, frames it wrote into RX = its
   RX-packets. Only 64 frames per pair circle in 256-entry rings, so
   testpmd itself never drops one for want of ring space.

Each case is a few seconds. The cases cover every value of ring layout,
queue pairs, mrg_rxbuf and in_order, and every pair of values of any two of
them (a covering array: 5 runs instead of 16; ``VUBACKEND_NET_FULL=1`` runs
all 16).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fdutil import open_fds
from tests.interop.peers import NicStats, VirtioUser, require, virtio_user
from vubackend.daemon import VhostUserDaemon
from vubackend.devices import LoopbackLink, NetDevice, NetStats

# (packed, queue pairs, mrg_rxbuf, in_order): all pairs of values covered.
COVERING = [
    (False, 1, False, False),
    (False, 2, True, True),
    (True, 1, True, True),
    (True, 2, False, True),
    (True, 2, True, False),
]
FULL = list(itertools.product([False, True], [1, 2], [False, True], [False, True]))
CASES = FULL if os.environ.get("VUBACKEND_NET_FULL") == "1" else COVERING
BURSTS = 2
BURST = 32


@contextlib.contextmanager
def loopback_daemon(pairs: int) -> Iterator[tuple[NetDevice, VhostUserDaemon]]:
    device = NetDevice(LoopbackLink(), queue_pairs=pairs, mac="52:54:00:00:00:01")
    daemon = VhostUserDaemon("net", device)
    try:
        device.attach(daemon)
        yield device, daemon
    finally:
        daemon.close()
        device.close()


def loop_and_drain(vu: VirtioUser, seconds: float = 1.0) -> NicStats:
    """Steps 1-3 of the module docstring; the port's counters."""
    vu.command("set fwd io")
    vu.command(f"start tx_first {BURSTS}")
    time.sleep(seconds)
    vu.command("stop")
    vu.command("set fwd rxonly")
    vu.command("start")
    time.sleep(0.3)
    vu.command("stop")
    return vu.port_stats()


def check_lossless(
    stats: NicStats, before: NetStats, after: NetStats, pairs: int
) -> None:
    injected = BURSTS * BURST * pairs
    assert stats.tx_packets > injected, "frames came back and were sent again"
    assert stats.rx_packets == stats.tx_packets, "every frame sent came back"
    assert (stats.rx_missed, stats.rx_errors, stats.tx_errors) == (0, 0, 0)
    assert after.tx_frames - before.tx_frames == stats.tx_packets
    assert after.rx_frames - before.rx_frames == stats.rx_packets
    assert after.rx_dropped == before.rx_dropped
    assert after.errors == before.errors


@pytest.mark.parametrize(
    ("packed", "pairs", "mrg_rxbuf", "in_order"),
    CASES,
    ids=[
        f"{'packed' if p else 'split'}-q{q}-mrg{int(m)}-inorder{int(i)}"
        for p, q, m, i in CASES
    ],
)
def test_every_frame_comes_back(
    tmp_path: Path, packed: bool, pairs: int, mrg_rxbuf: bool, in_order: bool
) -> None:
    require("dpdk-testpmd", "dpdk-dev")
    before_fds = open_fds()
    sock = tmp_path / "net.sock"
    with loopback_daemon(pairs) as (device, daemon):
        server = threading.Thread(target=daemon.serve, args=(sock,), daemon=True)
        server.start()
        while not sock.is_socket():
            time.sleep(0.01)
        start = device.stats()
        with virtio_user(
            tmp_path,
            sock,
            queues=pairs,
            packed=packed,
            mrg_rxbuf=mrg_rxbuf,
            in_order=in_order,
        ) as vu:
            vu.wait_prompt(1)
            stats = loop_and_drain(vu)
            vu.quit()
        check_lossless(stats, start, device.stats(), pairs)
        for k in range(pairs):
            assert device.stats(k).tx_frames > 0, f"queue pair {k} carried frames"
        daemon.shutdown()
        server.join(timeout=10)
    assert not daemon.worker_errors
    assert open_fds() == before_fds


def test_virtio_user_server_restarts_and_we_reconnect(tmp_path: Path) -> None:
    """virtio-user listens (server=1), our daemon connects as the client.
    testpmd quits (our session ends), a new testpmd listens on the same
    path, and we connect again: frames loop without loss both times."""
    require("dpdk-testpmd", "dpdk-dev")
    before_fds = open_fds()
    sock = tmp_path / "vu-server.sock"
    with loopback_daemon(2) as (device, daemon):
        for round_ in range(2):
            start = device.stats()
            with virtio_user(
                tmp_path, sock, queues=2, server=True, name=f"vus{round_}"
            ) as vu:
                daemon.start_client(sock, retry_for=15.0)
                vu.wait_prompt(1, timeout=20.0)
                stats = loop_and_drain(vu)
                vu.quit()
            daemon.wait()  # the session ended when testpmd closed its port
            check_lossless(stats, start, device.stats(), 2)
            sock.unlink(missing_ok=True)
    assert not daemon.worker_errors
    assert open_fds() == before_fds
