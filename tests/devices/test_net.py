"""virtio-net served by the daemon, driven by the Python frontend: the
header, MRG_RXBUF, multi-queue, config space, the control queue, links, and
hostile buffers."""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import struct
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.fdutil import open_fds
from vubackend.daemon import VhostUserDaemon
from vubackend.devices import (
    Link,
    LoopbackLink,
    NetDevice,
    NetFeatures,
    SinkLink,
    TapLink,
)
from vubackend.devices._net_links import Deliver
from vubackend.errors import DeviceError
from vubackend.frontend import (
    DriverRing,
    Frontend,
    NetDriver,
    frame,
    make_driver_ring,
)
from vubackend.protocol import FrontendReq, VirtioFeatures
from vubackend.vring import ChainBatch, DescriptorChain

V1 = int(VirtioFeatures.VERSION_1 | VirtioFeatures.EVENT_IDX)
MRG = int(NetFeatures.MRG_RXBUF)
CTRL = int(
    NetFeatures.CTRL_VQ
    | NetFeatures.CTRL_RX
    | NetFeatures.CTRL_VLAN
    | NetFeatures.CTRL_MAC_ADDR
)
HEADER = struct.Struct("<BBHHHHH")
SET_VRING_ENABLE = int(FrontendReq.SET_VRING_ENABLE)


def settled_fds() -> set[int]:
    """The open fds, once objects of earlier tests waiting for the cyclic
    garbage collector (frontends and their memfds) are gone."""
    gc.collect()
    return open_fds()


@contextlib.contextmanager
def served(device: NetDevice, tmp_path: Path) -> Iterator[Path]:
    """Serve ``device`` on a socket; afterwards no worker failed and the
    device and daemon released everything."""
    daemon = VhostUserDaemon("net", device)
    device.attach(daemon)
    path = tmp_path / "net.sock"
    server = threading.Thread(target=daemon.serve, args=(path,), daemon=True)
    server.start()
    try:
        yield path
    finally:
        daemon.close()
        server.join(timeout=10)
        device.close()
    assert not daemon.worker_errors


def connect(path: Path, features: int, *, packed: bool = False) -> Frontend:
    fe = Frontend.connect(path, retry_for=5.0, timeout=5.0)
    if packed:
        features |= VirtioFeatures.RING_PACKED
    fe.handshake(features)
    fe.create_memory([4 << 20])
    return fe


def frames(count: int, size: int = 100) -> list[bytes]:
    return [
        bytes([k & 0xFF]) * 12 + k.to_bytes(2, "big") * (size // 2)
        for k in range(count)
    ]


@pytest.mark.parametrize("in_order", [False, True], ids=["any-order", "in-order"])
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("mrg", [False, True], ids=["plain", "mrg"])
def test_loopback_returns_every_frame(
    tmp_path: Path, packed: bool, mrg: bool, in_order: bool
) -> None:
    before = settled_fds()
    device = NetDevice(LoopbackLink())
    sent = frames(200, 300)
    features = V1 | (MRG if mrg else 0)
    if in_order:
        features |= VirtioFeatures.IN_ORDER
    with (
        served(device, tmp_path) as path,
        connect(path, features, packed=packed) as fe,
    ):
        assert bool(fe.acked_features & VirtioFeatures.IN_ORDER) == in_order
        net = NetDriver(fe, fe.setup_queue(0, 64), fe.setup_queue(1, 64))
        fe.start_device()
        net.post_rx_buffers()
        got: list[bytes] = []
        for k in range(0, len(sent), 40):
            net.send(sent[k : k + 40])
            got += net.receive(40)
        stats = device.stats()
    assert got == sent
    assert (stats.tx_frames, stats.rx_frames) == (200, 200)
    assert stats.tx_bytes == stats.rx_bytes == sum(map(len, sent))
    assert (stats.rx_dropped, stats.errors) == (0, 0)
    if mrg:
        assert net.num_buffers == [1] * 200
    assert settled_fds() == before


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_mrg_rxbuf_spreads_a_frame_over_buffers(tmp_path: Path, packed: bool) -> None:
    device = NetDevice(LoopbackLink())
    sizes = [1000, 40, 244, 245, 1500, 3000]
    sent = [bytes(range(256)) * (n // 256) + bytes(n % 256) for n in sizes]
    with served(device, tmp_path) as path, connect(path, V1 | MRG, packed=packed) as fe:
        net = NetDriver(
            fe, fe.setup_queue(0, 64), fe.setup_queue(1, 64), rx_buffer_size=256
        )
        fe.start_device()
        net.post_rx_buffers()
        net.send(sent)
        got = net.receive(len(sent))
    assert got == sent
    # 12 header bytes, then the frame, in 256-byte buffers.
    assert net.num_buffers == [-(-(12 + n) // 256) for n in sizes]
    assert device.stats().rx_frames == len(sizes)


def test_frames_wait_for_rx_buffers_without_loss(tmp_path: Path) -> None:
    """TX frames the loopback cannot place stay in the device until the
    guest posts RX buffers; MRG frames that need more buffers than there
    are wait too."""
    device = NetDevice(LoopbackLink())
    sent = frames(30, 600)
    with served(device, tmp_path) as path, connect(path, V1 | MRG) as fe:
        net = NetDriver(
            fe, fe.setup_queue(0, 64), fe.setup_queue(1, 64), rx_buffer_size=256
        )
        fe.start_device()
        net.send(sent)
        time.sleep(0.2)
        assert device.stats().rx_frames == 0, "no RX buffer yet"
        got: list[bytes] = []
        for _ in range(40):  # a few buffers at a time: 3 per frame needed
            net.post_rx_buffers(5)
            got += net.receive(30, timeout=0.05)
            if len(got) == 30:
                break
    assert got == sent
    assert device.stats().rx_dropped == 0


def test_driver_receive_returns_at_most_count_in_order(tmp_path: Path) -> None:
    """Frames collected together beyond what receive() asked for are kept
    for the next call, not lost."""
    device = NetDevice(LoopbackLink())
    sent = frames(10, 100)
    with served(device, tmp_path) as path, connect(path, V1) as fe:
        net = NetDriver(fe, fe.setup_queue(0, 64), fe.setup_queue(1, 64))
        fe.start_device()
        net.post_rx_buffers()
        net.send(sent)
        for _ in range(500):  # all ten in the used ring before the first call
            if device.stats().rx_frames == len(sent):
                break
            time.sleep(0.01)
        got = [net.receive(1) for _ in range(3)]
        assert got == [[sent[0]], [sent[1]], [sent[2]]]
        assert net.receive(20, timeout=0.1) == sent[3:]


class CountingLoopback(Link):
    """The loopback, noting the device's counters as soon as the frames it
    passed on may be in the guest's hands."""

    def __init__(self) -> None:
        self.inner = LoopbackLink()
        self.device: NetDevice | None = None
        self.seen: list[tuple[int, int, int]] = []

    def attach(self, queue_pairs: int, deliver: Deliver) -> None:
        self.inner.attach(queue_pairs, deliver)

    def transmit(
        self, pair: int, frames: Sequence[DescriptorChain], header_size: int
    ) -> int:
        return self._note(self.inner.transmit(pair, frames, header_size))

    def transmit_batch(self, pair: int, batch: ChainBatch, header_size: int) -> int:
        return self._note(self.inner.transmit_batch(pair, batch, header_size))

    def _note(self, taken: int) -> int:
        assert self.device is not None
        stats = self.device.stats()
        self.seen.append((taken, stats.tx_frames, stats.rx_frames))
        return taken


def test_counters_include_what_the_guest_may_already_see(tmp_path: Path) -> None:
    """Frames the loopback hands to RX can reach the guest before the TX
    batch is returned: both counters already include them then."""
    link = CountingLoopback()
    device = link.device = NetDevice(link)
    sent = frames(50, 80)
    with served(device, tmp_path) as path, connect(path, V1) as fe:
        net = NetDriver(fe, fe.setup_queue(0, 64), fe.setup_queue(1, 64))
        fe.start_device()
        net.post_rx_buffers()
        net.send(sent)
        assert net.receive(50) == sent
    total = 0
    for taken, tx_frames, rx_frames in link.seen:
        total += taken
        assert tx_frames >= total
        assert rx_frames >= total
    assert total == 50


def test_two_queue_pairs_each_loop_back(tmp_path: Path) -> None:
    device = NetDevice(LoopbackLink(), queue_pairs=2)
    with (
        served(device, tmp_path) as path,
        connect(path, V1 | MRG | int(NetFeatures.MQ)) as fe,
    ):
        pairs = [
            NetDriver(fe, fe.setup_queue(2 * k, 32), fe.setup_queue(2 * k + 1, 32))
            for k in range(2)
        ]
        fe.start_device()
        for k, net in enumerate(pairs):
            net.post_rx_buffers()
            net.send(frames(10, 64 + k))
        got = [net.receive(10) for net in pairs]
    assert got == [frames(10, 64), frames(10, 65)]
    assert [device.stats(k).rx_frames for k in range(2)] == [10, 10]


def test_config_space_has_mac_status_and_pairs(tmp_path: Path) -> None:
    device = NetDevice(LoopbackLink(), queue_pairs=3, mac="52:54:00:ab:cd:ef")
    with served(device, tmp_path) as path, connect(path, V1) as fe:
        offered = fe.get_features()
        config = fe.get_config(0, 10)
        with pytest.raises(Exception, match="GET_CONFIG"):
            fe.get_config(0, 64)
    assert config == bytes.fromhex("525400abcdef") + struct.pack("<HH", 1, 3)
    for bit in (
        NetFeatures.MAC,
        NetFeatures.STATUS,
        NetFeatures.MRG_RXBUF,
        NetFeatures.MQ,
    ):
        assert offered & bit
    assert offered & VirtioFeatures.IN_ORDER
    assert offered & VirtioFeatures.RING_PACKED


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="queue_pairs"):
        NetDevice(LoopbackLink(), queue_pairs=0)
    with pytest.raises(ValueError, match="MAC"):
        NetDevice(LoopbackLink(), mac="52:54:00:zz:00:01")
    with pytest.raises(ValueError, match="multicast"):
        NetDevice(LoopbackLink(), mac="01:00:5e:00:00:01")
    with pytest.raises(ValueError, match="interface name"):
        TapLink("x" * 16)
    with pytest.raises(ValueError, match="empty"):
        SinkLink(generate=b"")


def test_attach_checks_the_daemon() -> None:
    before = settled_fds()
    device = NetDevice(LoopbackLink(), queue_pairs=2)
    single = NetDevice(LoopbackLink())
    other = VhostUserDaemon("other", single)
    with pytest.raises(DeviceError, match="one per queue pair"):
        device.attach(other)
    other.close()
    single.close()
    daemon = VhostUserDaemon("net", device)
    device.attach(daemon)
    with pytest.raises(DeviceError, match="already attached"):
        device.attach(daemon)
    daemon.close()
    device.close()
    assert settled_fds() == before


# ---------------------------------------------------------------- raw rings


class Raw:
    """Driver rings without NetDriver's manners, for hostile buffers."""

    def __init__(self, fe: Frontend, *, size: int = 16, queues: int = 2) -> None:
        self.fe = fe
        self.rings: list[DriverRing[int]] = [
            make_driver_ring(
                fe.ram, fe.setup_queue(i, size), features=fe.acked_features
            )
            for i in range(queues)
        ]

    def buffer(self, data: bytes | int) -> tuple[int, int]:
        size = data if isinstance(data, int) else len(data)
        gpa = self.fe.ram.alloc(max(size, 1), 16)
        if isinstance(data, bytes):
            self.fe.ram.write(gpa, data)
        return gpa, size

    def add(self, queue: int, readable: list[bytes], writable: list[int]) -> int:
        r = [self.buffer(b) for b in readable]
        w = [self.buffer(n) for n in writable]
        self.writable = w
        token = w[0][0] if w else r[0][0]
        self.rings[queue].add(r, w, token)
        self.rings[queue].kick()
        return token

    def used(self, queue: int, count: int) -> list[tuple[int, int]]:
        got = self.rings[queue].wait(timeout=5.0, until=count)
        assert len(got) == count, f"queue {queue}: {len(got)} of {count} used"
        return got


def test_header_is_written_in_place(tmp_path: Path) -> None:
    """The RX header: zero flags and GSO, num_buffers 1; a header split over
    two guest buffers is written across them."""
    device = NetDevice(SinkLink(generate=b"\xaa" * 60, count=2))
    with served(device, tmp_path) as path, connect(path, V1) as fe:
        raw = Raw(fe)
        fe.start_device()
        one = raw.add(0, [], [2048])
        two = raw.add(0, [], [5, 2048])
        rest = raw.writable[1][0]
        used = raw.used(0, 2)
        ram = fe.ram
        header = HEADER.pack(0, 0, 0, 0, 0, 0, 1)
        assert used == [(one, 72), (two, 72)]
        assert ram.read(one, 72) == header + b"\xaa" * 60
        assert ram.read(two, 5) + ram.read(rest, 67) == header + b"\xaa" * 60


def test_legacy_header_without_version_1(tmp_path: Path) -> None:
    device = NetDevice(LoopbackLink())
    with served(device, tmp_path) as path, connect(path, 0) as fe:
        assert not fe.acked_features & VirtioFeatures.VERSION_1
        raw = Raw(fe)
        fe.start_device()
        rx = raw.add(0, [], [200])
        raw.add(1, [bytes(10) + b"legacy frame"], [])
        assert raw.used(1, 1)[0][1] == 0
        assert raw.used(0, 1) == [(rx, 22)]
        assert fe.ram.read(rx, 22) == bytes(10) + b"legacy frame"


def test_hostile_buffers_are_refused_cleanly(tmp_path: Path) -> None:
    """A TX chain shorter than the header, RX chains with no or too little
    room: used with length 0 and counted; the next good frame goes through."""
    before = settled_fds()
    device = NetDevice(LoopbackLink())
    with served(device, tmp_path) as path, connect(path, V1 | MRG) as fe:
        raw = Raw(fe)
        fe.start_device()
        short_tx = raw.add(1, [b"tiny"], [])
        assert raw.used(1, 1) == [(short_tx, 0)]
        no_room = raw.add(0, [b"readable only"], [])
        too_small = raw.add(0, [], [8])  # less than the 12-byte header
        good = raw.add(0, [], [2048])
        raw.add(1, [bytes(12) + b"hello"], [])
        assert raw.used(0, 3) == [(no_room, 0), (too_small, 0), (good, 17)]
        assert fe.ram.read(good + 12, 5) == b"hello"
        stats = device.stats()
    assert stats.errors == 3
    assert (stats.tx_frames, stats.rx_frames) == (2, 1)
    assert settled_fds() == before


def test_frame_too_big_without_mrg_is_dropped(tmp_path: Path) -> None:
    device = NetDevice(LoopbackLink())
    with served(device, tmp_path) as path, connect(path, V1) as fe:
        raw = Raw(fe)
        fe.start_device()
        small = raw.add(0, [], [64])
        big = raw.add(0, [], [2048])
        raw.add(1, [bytes(12) + b"x" * 100], [])
        raw.add(1, [bytes(12) + b"y" * 100], [])
        assert raw.used(0, 2) == [(small, 0), (big, 112)]
        assert fe.ram.read(big + 12, 100) == b"y" * 100
    assert device.stats().rx_dropped == 1


def test_sink_counts_and_generates(tmp_path: Path) -> None:
    sink = SinkLink(generate=b"\x01" * 64, count=5)
    device = NetDevice(sink)
    with served(device, tmp_path) as path, connect(path, V1 | MRG) as fe:
        net = NetDriver(fe, fe.setup_queue(0, 16), fe.setup_queue(1, 16))
        fe.start_device()
        net.post_rx_buffers()
        net.send(frames(7, 80))
        net.wait_sent()
        got = net.receive(5)
        extra = net.receive(1, timeout=0.2)
    assert got == [b"\x01" * 64] * 5
    assert extra == []
    assert (sink.frames_dropped, sink.bytes_dropped) == (
        7,
        sum(map(len, frames(7, 80))),
    )
    assert sink.frames_generated == 5


# ---------------------------------------------------------------- control queue


def command(raw: Raw, cls: int, cmd: int, body: bytes = b"") -> int:
    token = raw.add(2, [bytes([cls, cmd]) + body], [1])
    [(got, written)] = raw.used(2, 1)
    assert (got, written) == (token, 1)
    return raw.fe.ram.read(token, 1)[0]


def test_control_queue_commands(tmp_path: Path) -> None:
    device = NetDevice(LoopbackLink(), queue_pairs=2, mac="52:54:00:00:00:01")
    with (
        served(device, tmp_path) as path,
        connect(path, V1 | CTRL | int(NetFeatures.MQ)) as fe,
    ):
        raw = Raw(fe, queues=5)  # two pairs, then the control queue (4)
        raw.rings[2] = raw.rings[4]
        fe.start_device()
        assert command(raw, 0, 0, b"\x01") == 0  # RX PROMISC on
        assert command(raw, 0, 1, b"\x00") == 0  # RX ALLMULTI off
        new_mac = bytes.fromhex("020000000042")
        assert command(raw, 1, 1, new_mac) == 0  # MAC ADDR_SET
        table = struct.pack("<I", 1) + bytes(6) + struct.pack("<I", 0)
        assert command(raw, 1, 0, table) == 0  # MAC TABLE_SET
        assert command(raw, 1, 0, table[:-1]) == 1  # truncated table
        assert command(raw, 2, 0, struct.pack("<H", 7)) == 0  # VLAN ADD 7
        assert command(raw, 2, 0, struct.pack("<H", 9)) == 0
        assert command(raw, 2, 1, struct.pack("<H", 9)) == 0  # VLAN DEL 9
        assert command(raw, 2, 0, struct.pack("<H", 5000)) == 1  # no such VLAN id
        assert command(raw, 4, 0, struct.pack("<H", 2)) == 0  # MQ 2 pairs
        assert command(raw, 4, 0, struct.pack("<H", 3)) == 1  # more than offered
        assert command(raw, 3, 0) == 0  # ANNOUNCE ACK
        assert command(raw, 9, 0) == 1  # unknown class
        short = raw.add(2, [b"\x00"], [1])  # no command byte
        assert raw.used(2, 1) == [(short, 0)]
        mac = fe.get_config(0, 6)
    assert mac == new_mac == device.mac
    assert device.rx_mode == {0: True, 1: False}
    assert device.vlans == {7}
    assert device.mac_table == ([bytes(6)], [])
    assert device.active_pairs == 2
    stats = device.stats()
    assert (stats.control_commands, stats.errors) == (9, 5)


def test_control_queue_is_queue_2_without_mq(tmp_path: Path) -> None:
    device = NetDevice(LoopbackLink(), queue_pairs=2)
    with served(device, tmp_path) as path, connect(path, V1 | CTRL) as fe:
        raw = Raw(fe, queues=3)
        fe.start_device()
        assert command(raw, 0, 0, b"\x01") == 0
        assert command(raw, 4, 0, struct.pack("<H", 1)) == 1  # MQ not acked


def test_a_new_session_forgets_what_the_last_one_left(tmp_path: Path) -> None:
    """Frames waiting for RX buffers when the frontend goes away are not
    written into the next session's buffers."""
    device = NetDevice(LoopbackLink())
    with served(device, tmp_path) as path:
        with connect(path, V1) as fe:
            net = NetDriver(fe, fe.setup_queue(0, 16), fe.setup_queue(1, 16))
            fe.start_device()
            net.send(frames(5))
            time.sleep(0.2)
            assert device.stats().tx_frames == 0, "waiting for RX buffers"
        with connect(path, V1) as fe:
            net = NetDriver(fe, fe.setup_queue(0, 16), fe.setup_queue(1, 16))
            fe.start_device()
            net.post_rx_buffers()
            assert net.receive(1, timeout=0.3) == []
            net.send(frames(3, 50))
            assert net.receive(3) == frames(3, 50)


# ---------------------------------------------------------------- TAP


def test_tap_link_missing_control_device_is_a_clear_error(tmp_path: Path) -> None:
    before = settled_fds()
    with pytest.raises(DeviceError, match="cannot open TAP device"):
        NetDevice(TapLink("vubt0", path=str(tmp_path / "no-tun")))
    assert settled_fds() == before


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


GUEST_MAC = bytes.fromhex("525400000002")
GUEST_IP = bytes([169, 254, 77, 2])
HOST_IP = bytes([169, 254, 77, 1])


def arp_request() -> bytes:
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + GUEST_MAC + GUEST_IP
    arp += bytes(6) + HOST_IP
    return b"\xff" * 6 + GUEST_MAC + b"\x08\x06" + arp


def echo_request(dst_mac: bytes, seq: int) -> bytes:
    payload = b"vubackend ping %05d" % seq
    icmp = struct.pack("!BBHHH", 8, 0, 0, 0x7562, seq) + payload
    icmp = icmp[:2] + struct.pack("!H", _checksum(icmp)) + icmp[4:]
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), seq, 0, 64, 1, 0, GUEST_IP, HOST_IP
    )
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    return dst_mac + GUEST_MAC + b"\x08\x00" + ip + icmp


def ip_cmd(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to make a network namespace")
    name = f"vubt{os.getpid()}"
    ip_cmd("netns", "add", name)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=10)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_tap_link_pings_a_kernel_in_a_namespace(
    tmp_path: Path, netns: str, packed: bool
) -> None:
    """A new TAP device, moved into a namespace with a link-local address:
    the guest (our frontend) resolves it with ARP and pings it; the kernel
    answers every echo request through the TAP device."""
    before = settled_fds()
    tap = f"vubt{os.getpid() % 100000}"
    device = NetDevice(TapLink(tap), mac=GUEST_MAC)
    ip_cmd("link", "set", tap, "netns", netns)
    ip_cmd("-n", netns, "addr", "add", "169.254.77.1/24", "dev", tap)
    ip_cmd("-n", netns, "link", "set", tap, "up")
    replies = 0
    with served(device, tmp_path) as path, connect(path, V1 | MRG, packed=packed) as fe:
        net = NetDriver(fe, fe.setup_queue(0, 64), fe.setup_queue(1, 64))
        fe.start_device()
        net.post_rx_buffers()
        host_mac = None
        for _ in range(50):
            net.send([arp_request()])
            for frame in net.receive(4, timeout=0.2):
                if frame[12:14] == b"\x08\x06" and frame[20:22] == b"\x00\x02":
                    host_mac = frame[22:28]
            if host_mac is not None:
                break
        assert host_mac is not None, "no ARP reply from the namespace"
        for seq in range(100):
            net.send([echo_request(host_mac, seq)])
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                got = net.receive(1, timeout=0.2)
                if got and got[0][12:14] == b"\x08\x00" and got[0][34] == 0:
                    assert got[0][40:42] == struct.pack("!H", seq)
                    replies += 1
                    break
    assert replies == 100
    assert settled_fds() == before


def test_rings_enabled_before_set_features_as_qemu_does(tmp_path: Path) -> None:
    """QEMU's net device sends SET_VRING_ENABLE 1 right after the protocol
    features, before SET_FEATURES, and not again once the rings start."""
    device = NetDevice(LoopbackLink())
    with (
        served(device, tmp_path) as path,
        Frontend.connect(path, retry_for=5.0, timeout=5.0) as fe,
    ):
        offered = fe.get_features()
        fe.negotiate_protocol_features(fe.get_protocol_features())
        fe.set_owner()
        # Raw: our frontend would not send it before SET_FEATURES.
        for index in (0, 1):
            fe.send_raw(frame(SET_VRING_ENABLE, struct.pack("=II", index, 1)))
        fe.set_features(offered & (V1 | VirtioFeatures.PROTOCOL_FEATURES))
        fe.create_memory([4 << 20])
        queues = [fe.setup_queue(i, 32, start=False) for i in (0, 1)]
        for queue in queues:
            fe.start_queue(queue, enable=False)
        net = NetDriver(fe, *queues)
        fe.start_device()
        net.post_rx_buffers()
        net.send(frames(5))
        assert net.receive(5) == frames(5)


def test_multi_queue_tap_link(tmp_path: Path, netns: str) -> None:
    """Two queue pairs on a TAP device opened with IFF_MULTI_QUEUE: the
    kernel's replies come back on whichever queue it picks, all of them."""
    tap = f"vubq{os.getpid() % 100000}"
    device = NetDevice(TapLink(tap), queue_pairs=2, mac=GUEST_MAC)
    ip_cmd("link", "set", tap, "netns", netns)
    ip_cmd("-n", netns, "addr", "add", "169.254.77.1/24", "dev", tap)
    ip_cmd("-n", netns, "link", "set", tap, "up")
    with (
        served(device, tmp_path) as path,
        connect(path, V1 | MRG | int(NetFeatures.MQ)) as fe,
    ):
        pairs = [
            NetDriver(fe, fe.setup_queue(2 * k, 64), fe.setup_queue(2 * k + 1, 64))
            for k in range(2)
        ]
        fe.start_device()
        for net in pairs:
            net.post_rx_buffers()

        def receive_any() -> list[bytes]:
            return [f for net in pairs for f in net.receive(4, timeout=0.05)]

        host_mac = None
        for _ in range(50):
            pairs[0].send([arp_request()])
            for frame in receive_any():
                if frame[12:14] == b"\x08\x06" and frame[20:22] == b"\x00\x02":
                    host_mac = frame[22:28]
            if host_mac is not None:
                break
        assert host_mac is not None, "no ARP reply from the namespace"
        seqs: set[int] = set()
        for seq in range(20):
            pairs[seq % 2].send([echo_request(host_mac, seq)])
            deadline = time.monotonic() + 2.0
            while seq not in seqs and time.monotonic() < deadline:
                for frame in receive_any():
                    if frame[12:14] == b"\x08\x00" and frame[34] == 0:
                        seqs.add(int.from_bytes(frame[40:42], "big"))
    assert seqs == set(range(20))
    assert [device.stats(k).tx_frames > 0 for k in range(2)] == [True, True]


def test_busy_poll_window_is_checked() -> None:
    with pytest.raises(ValueError, match="busy-poll window"):
        NetDevice(LoopbackLink(), busy_poll=2.0)
