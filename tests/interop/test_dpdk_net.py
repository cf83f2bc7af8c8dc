"""``vubackend net --loopback`` (the command, as its own process), driven by
DPDK's virtio-user (dpdk-testpmd, package dpdk-dev): a C virtio-net driver
that negotiates MQ, REPLY_ACK and STATUS, and addresses its memory by its
own virtual addresses.

How "every frame comes back, none lost" is counted, deterministically:

1. ``set fwd io`` then ``start tx_first 2``: testpmd sends 2 bursts of 32
   frames per queue pair, then forwards whatever it receives straight back.
   With the loopback link every frame the device takes from TX is written
   into RX, so those frames circle for a second, many laps.
2. ``stop``, then ``set fwd rxonly`` and ``start``: nothing is sent any
   more and the frames still in flight (in the device or in the RX ring)
   are received, so the loop drains (``show port stats`` until RX catches
   up with TX, at most 5 s), then ``stop``.
3. ``show port stats 0``: with no frame lost, RX-packets equals TX-packets
   exactly (each frame sent came back once), RX-missed and the error
   counters are 0, and the device counted the same numbers (it logs them
   when it stops): frames it took from TX = testpmd's TX-packets, frames it
   wrote into RX = its RX-packets. Only 64 frames per pair circle in 256-entry rings, so
   testpmd itself never drops one for want of ring space.

Each case is a few seconds. The cases cover every value of ring layout,
queue pairs, mrg_rxbuf and in_order, and every pair of values of any two of
them (a covering array: 5 runs instead of 16; ``VUBACKEND_NET_FULL=1`` runs
all 16).
"""

from __future__ import annotations

import itertools
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.guest.rig import vubackend
from tests.interop.peers import NicStats, VirtioUser, require, virtio_user

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
DRAIN_TIMEOUT = 5.0


@dataclass
class Served:
    """What ``vubackend net`` logged when it stopped."""

    tx_frames: int
    rx_frames: int
    rx_dropped: int
    errors: int
    pairs: list[tuple[int, int]]


def served_counts(output: str) -> Served:
    total = re.search(
        r"net served: tx (\d+) frames .*?rx (\d+) frames .*?(\d+) rx dropped, "
        r"(\d+) errors",
        output,
    )
    assert total is not None, output
    pairs = re.findall(r"net pair \d+: tx (\d+) frames, rx (\d+) frames", output)
    tx, rx, dropped, errors = (int(g) for g in total.groups())
    return Served(tx, rx, dropped, errors, [(int(t), int(r)) for t, r in pairs])


def loop_and_drain(vu: VirtioUser, seconds: float = 1.0) -> NicStats:
    """Steps 1-3 of the module docstring; the port's counters."""
    vu.command("set fwd io")
    vu.command(f"start tx_first {BURSTS}")
    time.sleep(seconds)
    vu.command("stop")
    vu.command("set fwd rxonly")
    vu.command("start")
    # Drained when every frame sent came back; a lost frame shows as the
    # counts differing after the deadline.
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while True:
        stats = vu.port_stats()
        if stats.rx_packets >= stats.tx_packets or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    vu.command("stop")
    return vu.port_stats()


def check_lossless(stats: NicStats, pairs: int) -> None:
    injected = BURSTS * BURST * pairs
    assert stats.tx_packets > injected, "frames came back and were sent again"
    assert stats.rx_packets == stats.tx_packets, "every frame sent came back"
    assert (stats.rx_missed, stats.rx_errors, stats.tx_errors) == (0, 0, 0)


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
    sock = tmp_path / "net.sock"
    args = ["net", "--loopback", "--socket", str(sock), "--queues", str(pairs)]
    with vubackend(args, sock, tmp_path / "net.log") as net:
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
        assert net.stop() == 0, net.output()
    check_lossless(stats, pairs)
    ours = served_counts(net.output())
    assert (ours.tx_frames, ours.rx_frames) == (stats.tx_packets, stats.rx_packets)
    assert (ours.rx_dropped, ours.errors) == (0, 0)
    assert len(ours.pairs) == pairs
    assert all(tx > 0 for tx, _ in ours.pairs), "every queue pair carried frames"


def test_virtio_user_server_restarts_and_we_reconnect(tmp_path: Path) -> None:
    """virtio-user listens (server=1), ``vubackend net --client`` connects.
    testpmd quits (our session ends), a new testpmd listens on the same
    path, and vubackend connects again by itself: frames loop without loss
    both times, and its counters add up to both testpmd runs."""
    require("dpdk-testpmd", "dpdk-dev")
    sock = tmp_path / "vu-server.sock"
    args = ["net", "--loopback", "--client", "--socket", str(sock), "--queues", "2"]
    runs: list[NicStats] = []
    with vubackend(args, sock, tmp_path / "net.log", wait_socket=False) as net:
        for round_ in range(2):
            with virtio_user(
                tmp_path, sock, queues=2, server=True, name=f"vus{round_}"
            ) as vu:
                vu.wait_prompt(1, timeout=30.0)
                runs.append(loop_and_drain(vu))
                vu.quit()
            sock.unlink(missing_ok=True)
        assert net.stop() == 0, net.output()
    for stats in runs:
        check_lossless(stats, 2)
    ours = served_counts(net.output())
    assert ours.tx_frames == sum(s.tx_packets for s in runs)
    assert ours.rx_frames == sum(s.rx_packets for s in runs)
    assert net.output().count("connected to the front-end") == 2


def test_sink_counts_what_txonly_sends_and_feeds_rxonly(tmp_path: Path) -> None:
    """``vubackend net --sink --generate 64``: testpmd's txonly frames are all
    counted (and dropped); in rxonly testpmd receives the generated ones."""
    require("dpdk-testpmd", "dpdk-dev")
    sock = tmp_path / "sink.sock"
    args = ["net", "--sink", "--generate", "64", "--socket", str(sock)]
    with vubackend(args, sock, tmp_path / "net.log") as net:
        with virtio_user(tmp_path, sock) as vu:
            vu.wait_prompt(1)
            vu.command("set fwd txonly")
            vu.command("start")
            time.sleep(1.0)
            vu.command("stop")
            sent = vu.port_stats().tx_packets
            vu.command("set fwd rxonly")
            vu.command("start")
            time.sleep(1.0)
            vu.command("stop")
            stats = vu.port_stats()
            vu.quit()
        assert net.stop() == 0, net.output()
    ours = served_counts(net.output())
    assert sent > 1000
    assert stats.tx_packets == sent
    assert ours.tx_frames == sent, "every frame testpmd sent reached the sink"
    assert stats.rx_packets > 1000
    # Generated frames may still sit in the RX ring when testpmd stops.
    assert ours.rx_frames >= stats.rx_packets
    assert (stats.rx_errors, stats.rx_missed, ours.errors) == (0, 0, 0)


def test_busy_poll_window_loses_nothing(tmp_path: Path) -> None:
    # The optional busy-poll window (kicks stay off while frames keep
    # coming): the same lossless loop.
    require("dpdk-testpmd", "dpdk-dev")
    sock = tmp_path / "net.sock"
    args = ["net", "--loopback", "--socket", str(sock), "--busy-poll-us", "200"]
    with vubackend(args, sock, tmp_path / "net.log") as net:
        with virtio_user(tmp_path, sock, queues=1) as vu:
            vu.wait_prompt(1)
            stats = loop_and_drain(vu)
            vu.quit()
        assert net.stop() == 0, net.output()
    check_lossless(stats, 1)
    ours = served_counts(net.output())
    assert (ours.tx_frames, ours.rx_frames) == (stats.tx_packets, stats.rx_packets)
