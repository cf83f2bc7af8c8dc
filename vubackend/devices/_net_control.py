# virtio-net feature bits, MAC addresses, and what the control queue
# commands (virtio 1.x §5.1.6.5) change in the device.
#
# Rules:
# * A command is answered OK only when its feature was acked and its body
#   is well formed; anything else is VIRTIO_NET_ERR, and nothing changes.
# * The device does not filter frames: RX mode, MAC tables and VLANs are
#   remembered (for the caller to look at), as a promiscuous NIC would.
# * The request thread (SET_CONFIG, RESET_DEVICE) and worker 0 (commands)
#   both write here; each write is one attribute assignment.

from __future__ import annotations

import enum
import os
from typing import Final, final

__all__ = [
    "CTRL_ERR",
    "CTRL_OK",
    "ControlState",
    "NetFeatures",
    "parse_mac",
    "random_mac",
]

CTRL_OK: Final = 0
CTRL_ERR: Final = 1
_CLASS_RX, _CLASS_MAC, _CLASS_VLAN, _CLASS_ANNOUNCE, _CLASS_MQ = range(5)


class NetFeatures(enum.IntFlag):
    """The virtio-net feature bits (virtio 1.x §5.1.3) the device knows."""

    CSUM = 1 << 0
    GUEST_CSUM = 1 << 1
    MTU = 1 << 3
    MAC = 1 << 5
    MRG_RXBUF = 1 << 15
    STATUS = 1 << 16
    CTRL_VQ = 1 << 17
    CTRL_RX = 1 << 18
    CTRL_VLAN = 1 << 19
    CTRL_RX_EXTRA = 1 << 20
    GUEST_ANNOUNCE = 1 << 21
    MQ = 1 << 22
    CTRL_MAC_ADDR = 1 << 23


def parse_mac(mac: str | bytes) -> bytes:
    """Six bytes from ``"aa:bb:cc:dd:ee:ff"`` (or six bytes).

    Raises:
        ValueError: not a unicast MAC address.
    """
    if isinstance(mac, bytes):
        raw = mac
    else:
        parts = mac.split(":")
        try:
            raw = bytes(int(p, 16) for p in parts) if len(parts) == 6 else b""
        except ValueError:
            raw = b""
        if any(len(p) not in (1, 2) for p in parts):
            raw = b""
    if len(raw) != 6:
        raise ValueError(f"{mac!r} is not a MAC address (six bytes, aa:bb:...)")
    if raw[0] & 1:
        raise ValueError(f"{mac!r} is a multicast address")
    return raw


def random_mac() -> bytes:
    """A random locally administered unicast MAC address."""
    raw = bytearray(os.urandom(6))
    raw[0] = (raw[0] & 0xFC) | 0x02
    return bytes(raw)


@final
class ControlState:
    """What the driver set through the control queue and config space."""

    def __init__(self, mac: bytes, max_pairs: int) -> None:
        self.mac = mac
        self.max_pairs = max_pairs
        self.rx_mode: dict[int, bool] = {}
        self.vlans: set[int] = set()
        self.mac_table: tuple[list[bytes], list[bytes]] = ([], [])
        self.active_pairs = 1

    def apply(self, cls: int, cmd: int, body: bytes, acked: int) -> int:
        """Apply one command; returns CTRL_OK or CTRL_ERR."""
        if cls == _CLASS_RX and acked & NetFeatures.CTRL_RX:
            if cmd in (0, 1) and len(body) >= 1:  # PROMISC, ALLMULTI
                self.rx_mode[cmd] = bool(body[0])
                return CTRL_OK
        elif cls == _CLASS_MAC:
            if cmd == 1 and len(body) == 6 and acked & NetFeatures.CTRL_MAC_ADDR:
                if body[0] & 1:
                    return CTRL_ERR
                self.mac = bytes(body)  # ADDR_SET
                return CTRL_OK
            if cmd == 0:  # TABLE_SET: two {le32 entries; u8 macs[][6]}
                tables = _mac_tables(body)
                if tables is not None:
                    self.mac_table = tables
                    return CTRL_OK
        elif cls == _CLASS_VLAN and acked & NetFeatures.CTRL_VLAN:
            if cmd in (0, 1) and len(body) >= 2:  # ADD, DEL
                vid = int.from_bytes(body[:2], "little")
                if vid < 4096:
                    if cmd == 0:
                        self.vlans.add(vid)
                    else:
                        self.vlans.discard(vid)
                    return CTRL_OK
        elif cls == _CLASS_ANNOUNCE and cmd == 0:
            return CTRL_OK
        elif cls == _CLASS_MQ and cmd == 0 and acked & NetFeatures.MQ:
            pairs = int.from_bytes(body[:2], "little") if len(body) >= 2 else 0
            if 1 <= pairs <= self.max_pairs:
                self.active_pairs = pairs
                return CTRL_OK
        return CTRL_ERR


def _mac_tables(body: bytes) -> tuple[list[bytes], list[bytes]] | None:
    tables: list[list[bytes]] = []
    at = 0
    for _ in range(2):
        if at + 4 > len(body):
            return None
        entries = int.from_bytes(body[at : at + 4], "little")
        at += 4
        if entries > (len(body) - at) // 6:
            return None
        tables.append([body[at + 6 * i : at + 6 * i + 6] for i in range(entries)])
        at += 6 * entries
    if at != len(body):
        return None
    return tables[0], tables[1]
