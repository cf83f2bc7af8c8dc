"""A Linux guest (QEMU 7.2, the kernel's virtio-net driver, ``vectors=0``
because QEMU 7.2's MSI-X path crashes under emulation) served by
``vubackend net --tap``: the TAP device sits in a network namespace made by
the test, with a link-local address, and the guest pings it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.guest.rig import GuestImage, run_guest, vubackend

GUEST_MAC = "52:54:00:12:34:56"
PINGS = 1000


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def net_device(socket: Path, *, mac: str, chardev: str = "net0") -> list[str]:
    """QEMU arguments for a virtio-net-pci device on vhost-user ``socket``."""
    return [
        "-chardev", f"socket,id={chardev},path={socket}",
        "-netdev", f"vhost-user,id={chardev}n,chardev={chardev},queues=1",
        "-device",
        f"virtio-net-pci,netdev={chardev}n,mac={mac},vectors=0,romfile=",
    ]  # fmt: skip


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to make a network namespace")
    name = f"vubg{os.getpid()}"
    ip("netns", "add", name)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=10)


def test_guest_pings_a_tap_in_a_namespace(
    guest: GuestImage, tmp_path: Path, netns: str
) -> None:
    sock = tmp_path / "net.sock"
    tap = f"vubg{os.getpid() % 100000}"
    args = ["net", "--tap", tap, "--socket", str(sock), "--mac", GUEST_MAC]
    with vubackend(args, sock, tmp_path / "net.log") as net:
        # vubackend made the TAP device before it listened: move it into the
        # namespace, where the guest's peer address lives.
        ip("link", "set", tap, "netns", netns)
        ip("-n", netns, "addr", "add", "169.254.10.1/24", "dev", tap)
        ip("-n", netns, "link", "set", tap, "up")
        start = time.monotonic()
        run = run_guest(
            guest,
            "net",
            net_device(sock, mac=GUEST_MAC),
            params={"ip": "169.254.10.2", "peer": "169.254.10.1", "count": PINGS},
            log=tmp_path / "serial",
            timeout=240.0,
        )
        assert net.stop() == 0, net.output()
    assert run.results["net_driver"] == "virtio_net"
    assert run.results["net_mac"] == GUEST_MAC
    assert run.results["net_transmitted"] == str(PINGS)
    assert run.results["net_received"] == str(PINGS), run.serial[-2000:]
    served = re.search(r"net served: tx (\d+) frames.*rx (\d+) frames", net.output())
    assert served is not None, net.output()
    # Every echo request went out through the TAP device and every reply
    # came back (plus ARP and the warm-up pings).
    assert int(served.group(1)) >= PINGS
    assert int(served.group(2)) >= PINGS
    assert time.monotonic() - start < 240
