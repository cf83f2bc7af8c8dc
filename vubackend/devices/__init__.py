"""vubackend.devices: ready devices built only on the public API.

* :class:`BlkDevice`: virtio-blk over a raw image file or block device (read,
  write, flush, get id, discard, write zeroes; read-only, multi-queue,
  optional O_DIRECT). :class:`BlkFeatures` names its feature bits and
  :class:`BlkStats` counts what it served.
* :class:`RngDevice`: virtio-rng from the kernel's random source.
* :class:`NetDevice`: virtio-net (header, MRG_RXBUF, multi-queue with one
  worker per queue pair, control queue, MAC and link status in config
  space, split and packed rings, IN_ORDER), exchanging frames with a
  :class:`Link`; ``attach(daemon)`` after creating its daemon. Its counters
  are a :class:`NetStats`; :class:`NetFeatures` names the feature bits.
* Links: :class:`LoopbackLink` (every frame the guest sends comes back to
  it), :class:`TapLink` (a Linux TAP device, frames both ways),
  :class:`SinkLink` (counts and drops; can also send frames to the guest).
  Subclass :class:`Link` for others; :func:`frame_pieces` and
  :func:`frame_length` read a sent frame, ``Deliver`` is the callback a
  looping link uses.
"""

from vubackend.devices._blk import BlkDevice, BlkFeatures, BlkStats
from vubackend.devices._net import NetDevice, NetStats
from vubackend.devices._net_control import NetFeatures
from vubackend.devices._net_links import (
    Deliver,
    Link,
    LoopbackLink,
    SinkLink,
    TapLink,
    frame_length,
    frame_pieces,
)
from vubackend.devices._rng import RngDevice

__all__ = [
    "BlkDevice",
    "BlkFeatures",
    "BlkStats",
    "Deliver",
    "Link",
    "LoopbackLink",
    "NetDevice",
    "NetFeatures",
    "NetStats",
    "RngDevice",
    "SinkLink",
    "TapLink",
    "frame_length",
    "frame_pieces",
]
