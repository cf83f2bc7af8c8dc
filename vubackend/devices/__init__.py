"""vubackend.devices: ready devices built only on the public API.

* :class:`BlkDevice`: virtio-blk over a raw image file or block device (read,
  write, flush, get id, discard, write zeroes; read-only, multi-queue,
  optional O_DIRECT). :class:`BlkFeatures` names its feature bits and
  :class:`BlkStats` counts what it served.
* :class:`RngDevice`: virtio-rng from the kernel's random source.
"""

from vubackend.devices._blk import BlkDevice, BlkFeatures, BlkStats
from vubackend.devices._rng import RngDevice

__all__ = ["BlkDevice", "BlkFeatures", "BlkStats", "RngDevice"]
